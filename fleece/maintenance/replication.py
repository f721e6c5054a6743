"""``fleece copy``: restore points from one repository into another, with everything they need.

For each point the destination lacks, oldest first: every chunk it needs
that the destination does not hold is fetched, checked against its digest
and stored as it is (the destination's dedup decides what to send), then its
indexes, and the point object last, with a conditional create. So a point
appears in the destination only once all it names is there; a copy that is
interrupted leaves at most chunks and indexes, which the next copy reuses
(or gc collects). Points the destination already holds are skipped: copying
again is idempotent.

The destination is written under the same protocol as a backup: the VM's
lease is held while its points are copied, a running gc is waited out
(refused, as a backup is), and each point is committed by
:func:`fleece.repo.commit.commit_point` (the lease checked before and
after). A destination that does not exist yet is created
only when the user says so (``copy --init``), with the source's chunk size,
hash, compression and Object Lock settings — and, from an encrypted source,
with its master key and key objects (the same passphrases open both), so
that sealed objects then move as they are; an encrypted source's points go
into a plaintext destination only with ``--to-plaintext``. An existing destination
must have the source's chunk size; how the objects travel (as they are,
sealed as they are, or renamed for another key or hash) is
:mod:`fleece.maintenance.transfer`'s business.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from fleece.errors import BadInput, NotARepository, RepositoryError, RepositoryExists
from fleece.maintenance.transfer import CopyReport, Renamed, SameNames, Sealed, Transfer, names_agree
from fleece.repo.backends.base import Backend
from fleece.repo.commit import commit_point, writer_lease
from fleece.repo.format.point import RestorePoint
from fleece.repo.local_state import LocalState
from fleece.repo.object_lock import ObjectLock
from fleece.repo.repository import (
    InitSettings,
    Passphrase,
    Repository,
    RepositoryConfig,
    holds_objects,
    plaintext_refused,
    read_config,
)

__all__ = ["DEFAULT_WORKERS", "CopyReport", "copy_points", "open_destination", "settings_like"]

DEFAULT_WORKERS = 8


def open_destination(source: Repository, backend: Backend, passphrase: Passphrase | None = None,
                     asked: str = "its passphrase", *, init: Callable[[], InitSettings] | None = None,
                     to_plaintext: bool = False, state: LocalState | None = None,
                     accept_change: bool = False) -> Repository:
    """The destination repository; created with the settings ``init`` returns (called only then;
    :func:`settings_like`) if the location is empty and the user said so, else an empty location
    is :class:`NotARepository`.

    An encrypted destination opens with the source's key when it shares it
    (no passphrase asked), else with ``passphrase``; without one, a
    :class:`RepositoryError` says to give ``asked``. Fails closed: an
    encrypted source goes into a plaintext destination only with
    ``to_plaintext``, and a destination ``passphrase`` given means the
    destination must be encrypted. With ``state`` the destination is checked
    against (and recorded in) this host's record. Nothing is written before
    it opens.
    """
    try:
        config = read_config(backend)
    except NotARepository:
        if init is None or holds_objects(backend):
            raise
        if state is not None and not accept_change:
            state.check_location_empty(backend.url)
        try:
            dest = _checked(source, _create_like(source, backend, init()))
            return dest if state is None else dest.remember(state, accept_change=True)
        except RepositoryExists:  # another process made it between our look and our put
            config = read_config(backend)
    _check_geometry(source, config, backend.url)
    if state is not None:
        state.check(backend.url, config.id, config.encryption, config.auth, accept_change=accept_change)
    if config.encryption == "none":
        if passphrase is not None:
            raise plaintext_refused(backend.url, "open")
        if source.master is not None and not to_plaintext:
            raise BadInput(f"{backend.url} is not encrypted and {source.url} is: copying would "
                           "store its points in clear; give --to-plaintext if that is what you "
                           "want; nothing was copied")
        dest = Repository.open(backend)
    elif source.shares_key(config):
        dest = Repository.open_with_key_of(backend, config, source)
    elif passphrase is None:
        raise RepositoryError(f"repository {backend.url} is encrypted with another key than "
                              f"{source.url}: give {asked}; nothing was copied")
    else:
        dest = _checked(source, Repository.open(backend, passphrase))
    return dest if state is None else dest.remember(state, accept_change)


def settings_like(source: Repository, *, to_plaintext: bool = False,
                  object_lock: ObjectLock | bool | None = True) -> InitSettings:
    """A destination made like ``source``: its geometry, hash and compression, its encryption
    (its key: sealed objects then move as they are) unless ``to_plaintext``, and its Object Lock
    settings (``object_lock=True``) unless given others (or None: no lock)."""
    c = source.config
    lock = c.object_lock if object_lock is True else (object_lock or None)
    return InitSettings(encryption="none" if to_plaintext else c.encryption,
                        chunk_size=c.chunk_size, compression_level=c.compression_level,
                        hash=c.hash, object_lock=lock)


def _create_like(source: Repository, backend: Backend, init: InitSettings) -> Repository:
    if init.encryption != "none":
        return Repository.init_sharing_key(backend, source, init.object_lock)
    return Repository.init(backend, init.chunk_size, init.compression_level, hash=init.hash,
                           object_lock=init.object_lock)


def _check_geometry(source: Repository, config: RepositoryConfig, url: str) -> None:
    if config.chunk_size != source.config.chunk_size:
        raise BadInput(
            f"cannot copy from {source.url} (chunk size {source.config.chunk_size}) to {url} (chunk "
            f"size {config.chunk_size}): indexes name chunks by position, so both must use the same; "
            "nothing was copied")


def _checked(source: Repository, dest: Repository) -> Repository:
    _check_geometry(source, dest.config, dest.url)
    return dest


def pick_transfer(source: Repository, dest: Repository) -> type[Transfer]:
    """How objects travel from ``source`` to ``dest`` (:mod:`fleece.maintenance.transfer`)."""
    if not names_agree(source, dest):
        return Renamed
    return Sealed if source.master is not None else SameNames


def copy_points(source: Repository, dest: Repository, points: list[RestorePoint], *,
                workers: int = DEFAULT_WORKERS, say: Callable[[str], None] | None = None) -> CopyReport:
    """Copy ``points`` (grouped by VM, oldest first) that ``dest`` lacks; see the module docstring."""
    started = time.monotonic()
    report = CopyReport()
    have = set(dest.point_refs())
    by_vm: dict[str, list[RestorePoint]] = {}
    for p in sorted(points, key=lambda p: p.id):
        by_vm.setdefault(p.vm, []).append(p)
    with ThreadPoolExecutor(workers, thread_name_prefix="fleece-copy") as pool:
        transfer = pick_transfer(source, dest)(source, dest, pool, report)
        for vm, vm_points in by_vm.items():
            todo = [p for p in vm_points if (vm, p.id) not in have]
            report.skipped += [p.id for p in vm_points if (vm, p.id) in have]
            if not todo:
                continue
            with writer_lease(dest, vm) as lease:
                transfer.seed(vm, sorted(i for v, i in source.point_refs(vm) if (v, i) in have))
                for point in todo:
                    committed = transfer.objects(point)
                    if dest.lock is not None:
                        committed = _lock_copied(transfer, dest, committed)
                    commit_point(dest, lease, committed, transfer.commit)
                    report.copied.append(point.id)
                    report.objects_written += 1
                    if say is not None:
                        say(f"copied point {point.id} of VM {vm}")
    report.seconds = time.monotonic() - started
    return report


def _lock_copied(transfer: Transfer, dest: Repository, point: RestorePoint) -> RestorePoint:
    """Object Lock destinations: lock everything ``point`` names N days ahead; the point to commit.

    Objects the copy wrote are locked already; those the destination held
    get their lock extended where it ends too soon (one request each, as a
    backup's first extension round). The point then records the horizon
    measured here, so the next backup trusts it — except a sealed point,
    whose bytes move as they are and keep their own (untrusted) record.
    """
    indexes = [dest.read_index(point, disk.name) for disk in point.disks]
    lock = dest.lock_new_point(indexes, [])
    return point if isinstance(transfer, Sealed) else replace(point, object_lock=lock)
