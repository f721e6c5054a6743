"""Prune: apply a retention policy to each VM's restore points (docs/format.md).

Per VM, prune takes the VM's writer lease, so no backup of that VM starts
while it deletes. If a backup already holds the lease, prune reads from it
the points that backup uses (its parents, published with
:meth:`Lease.record_uses`) and keeps them; a lease that does not name them
yet (the backup is just starting) makes prune skip that VM.

Removing a point deletes the point object first, so it stops existing as a
whole, then its index objects. Chunks are left to :mod:`fleece.maintenance.gc`.
Every index is complete on its own, so removing a parent never harms the
points after it.

In an Object Lock repository a point whose object is still locked (its
lock, read with one HEAD per point to remove) is kept and reported with the
time its lock ends; its indexes and chunks are locked no longer than it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any

from fleece.errors import BadInput, FleeceError, LockHeld, RepositoryError
from fleece.maintenance.retention import Decision, Policy, select
from fleece.repo.backends.base import Backend, ObjectMissing
from fleece.repo.format import keys
from fleece.repo.format.point import iso_utc
from fleece.repo.gc_lock import lease_live
from fleece.repo.lock import LeaseInfo, acquire, read_lease
from fleece.repo.object_lock import lock_clock
from fleece.repo.protect import is_protected, protected_ids
from fleece.repo.repository import Repository
from fleece.repo.verification import delete_for_point

log = logging.getLogger(__name__)


@dataclass
class VmPrune:
    """What prune decided and did for one VM."""

    vm: str
    decisions: list[Decision] = field(default_factory=list)
    skipped: str | None = None
    """Why this VM was left alone, or None."""
    locked: dict[str, str] = field(default_factory=dict)
    """Points no rule keeps that stay because their objects are locked: id → ISO lock end."""

    @property
    def kept(self) -> list[Decision]:
        """The points that stay."""
        return [d for d in self.decisions if d.keep]

    @property
    def removed(self) -> list[Decision]:
        """The points removed (or, in a dry run, that would be)."""
        return [d for d in self.decisions if not d.keep]


@dataclass
class PruneReport:
    """The outcome of one prune run."""

    policy: Policy
    dry_run: bool
    vms: list[VmPrune] = field(default_factory=list)
    object_lock: bool = False
    """The repository locks objects: ``--json`` says which points stay locked."""

    def as_dict(self) -> dict[str, Any]:
        """The ``prune --json`` object (``locked`` only in Object Lock repositories)."""
        doc: dict[str, Any] = {
            "dry_run": self.dry_run,
            "policy": self.policy.as_dict(),
            "kept": [{"vm": v.vm, "id": d.point_id, "reasons": list(d.reasons)}
                     for v in self.vms for d in v.kept],
            "removed": [{"vm": v.vm, "id": d.point_id, "reason": "no keep rule selects it"}
                        for v in self.vms for d in v.removed],
            "skipped": [{"vm": v.vm, "reason": v.skipped} for v in self.vms if v.skipped],
        }
        if self.object_lock:
            doc["locked"] = [{"vm": v.vm, "id": pid, "until": until}
                             for v in self.vms for pid, until in v.locked.items()]
        return doc


def prune(
    repo: Repository,
    policy: Policy,
    *,
    vm: str | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
    tz: tzinfo | None = None,
    say: Callable[[str], None] | None = None,
) -> PruneReport:
    """Prune ``vm``'s points (every VM's when None); see the module docstring.

    ``BadInput`` for an empty policy or a VM without points. ``say`` gets one
    line per point removed as it happens.
    """
    if policy.empty:
        raise BadInput("prune needs at least one --keep-* rule with a count of 1 or more "
                       "(or --keep-within); nothing was removed")
    vms = sorted({v for v, _ in repo.point_refs(vm)})
    if vm is not None and not vms:
        raise BadInput(f"no restore points of VM {vm!r} in {repo.url}")
    report = PruneReport(policy, dry_run, object_lock=repo.lock is not None)
    for name in vms:
        report.vms.append(_prune_vm(repo, name, policy, dry_run, now, tz, say or log.info))
    return report


def _prune_vm(repo: Repository, vm: str, policy: Policy, dry_run: bool, now: datetime | None,
              tz: tzinfo | None, say: Callable[[str], None]) -> VmPrune:
    result = VmPrune(vm)
    backend = repo.backend
    with ExitStack() as stack:
        holder = _running_holder(backend, vm, stack, dry_run)
        in_use: tuple[str, ...] = ()
        if holder is not None:
            if holder.uses is None:
                result.skipped = (f"a backup is starting or another prune is running ({holder.host} "
                                  f"pid {holder.pid} since {holder.created}); nothing removed, run "
                                  "prune again later")
                return result
            in_use = holder.uses
        ids = [pid for _, pid in repo.point_refs(vm)]
        result.decisions = select(ids, policy, now=now, tz=tz,
                                  protected=protected_ids(backend, vm), in_use=in_use)
        if repo.lock is not None:
            _keep_locked_points(repo, result)
        if dry_run:
            return result
        for n, decision in enumerate(result.decisions):
            if decision.keep:
                continue
            # Protected since we listed the markers: honour it.
            if is_protected(backend, vm, decision.point_id):
                result.decisions[n] = Decision(decision.point_id, True, ("protected",))
                continue
            try:
                remove_point(repo, vm, decision.point_id)
            except FleeceError as exc:
                done = sum(1 for d in result.decisions[:n] if not d.keep)
                raise RepositoryError(
                    f"prune of VM {vm} stopped after removing {done} point(s): {exc}; every "
                    "remaining point is intact (gc removes index objects left behind)") from exc
            say(f"{vm}: removed {decision.point_id}")
    return result


def _keep_locked_points(repo: Repository, result: VmPrune) -> None:
    """Keep the points to remove whose object is still locked, saying until when."""
    for n, decision in enumerate(result.decisions):
        if decision.keep:
            continue
        try:
            lock = repo.backend.lock_of(keys.point_key(result.vm, decision.point_id))
        except ObjectMissing:
            continue
        if lock is not None and lock.until > lock_clock():
            until = iso_utc(datetime.fromtimestamp(lock.until, UTC))
            result.locked[decision.point_id] = until
            result.decisions[n] = Decision(decision.point_id, True, (f"locked until {until}",))


def _running_holder(backend: Backend, vm: str, stack: ExitStack, dry_run: bool) -> LeaseInfo | None:
    """Take ``vm``'s lease into ``stack``; or return the live lease of the backup that holds it.

    A dry run takes no lease (it changes nothing) and only looks.
    """
    key = keys.vm_lock_key(vm)
    if dry_run:
        info = read_lease(backend, key)
        return info if info is not None and lease_live(info) else None
    for _ in range(3):
        try:
            stack.enter_context(acquire(backend, key, f"VM {vm}"))
            return None
        except LockHeld:
            info = read_lease(backend, key)
            if info is not None:
                return info
            # Released between our attempt and our look: try again.
    raise LockHeld(f"VM {vm}: its lock changed hands repeatedly while prune tried to take it; "
                   "nothing was removed")


def remove_point(repo: Repository, vm: str, point_id: str) -> None:
    """Delete a point object, then every index object under ``indexes/<point-id>/``, then its
    verification records (``verified/<vm>/<point-id>/``).

    Listing the prefix (rather than reading the point for its index keys)
    also removes a point whose object is damaged.
    """
    repo.backend.delete(keys.point_key(vm, point_id))
    prefix = f"{keys.INDEXES_PREFIX}{point_id}/"
    for key in list(repo.backend.list(prefix)):
        repo.backend.delete(key)
    delete_for_point(repo.backend, vm, point_id)
