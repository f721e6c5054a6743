"""Writer locks as leases built from create-only writes, so they work on any store that
enforces ``If-None-Match: *`` (S3, Ceph RGW, a directory). The format is in docs/format.md
("Lock leases").

A lease is a sequence of *generation* objects, ``leases/vms/<vm>/<n>``, each
written once with a conditional create and never rewritten; the one with the
highest ``n`` says who holds the lease (``state`` ``held``) or that nobody
does (``released``, ``broken``). Every change — taking, renewing every
lease/3, recording ``uses``, releasing, taking over an expired lease,
breaking one — creates generation ``n + 1`` of the ``n`` its writer last saw.
Of two writers racing for the same ``n + 1`` the store lets exactly one
create it; the other learns what the winner wrote. So a takeover or a break
is never overwritten and a broken lease is never brought back, without any
compare-and-swap (``If-Match``, which Ceph RGW does not honour).

Generations older than the newest are deleted by whoever wrote the newest;
the newest is never deleted. A writer that created a number below the
newest (its listing was older than another's cleanup) sees the newer one in
the listing it makes after every write, and has lost.

The holder re-reads its lease in :meth:`Lease.check`, which a writer calls
just before committing and once more just after (see
:func:`fleece.backup.run_backup`): a lease whose newest generation is still
the one we wrote was ours all along, so no gc can have run meanwhile.

Mixed versions: fleece before generations kept one object at
``locks/vms/<vm>`` and rewrote it with ``If-Match``. A holder also writes
such an object there (a *guard*, expiring after :data:`GUARD_SECONDS`), so an
older fleece sees the lease; and a taker honours a live lease an older
fleece left there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any, NoReturn

from fleece.errors import FleeceError, LockHeld
from fleece.liveness import Owner
from fleece.repo.backends.base import Backend, ObjectMissing
from fleece.repo.format.keys import (
    LOCKS_PREFIX,
    lease_generation_key,
    lease_generations_prefix,
    parse_lease_generation_key,
    repo_lock_key,
    vm_lock_key,
)
from fleece.repo.format.point import iso_utc, parse_iso_utc

log = logging.getLogger(__name__)

LEASE_FORMAT = 2
"""Generation objects; format 1 is the single rewritten object (and the guard)."""
OLD_LEASE_FORMAT = 1
DEFAULT_LEASE_SECONDS = 600.0
GUARD_SECONDS = 7 * 86400.0
"""How long the old-layout guard keeps an older fleece away (it is deleted at release)."""
HELD, RELEASED, BROKEN = "held", "released", "broken"
_TAKEOVER_ATTEMPTS = 5
_GUARD_MARK = "guard_of"


def _iso(t: float) -> str:
    return iso_utc(datetime.fromtimestamp(t, UTC))


@dataclass(frozen=True)
class LeaseInfo:
    """What a lease object says about its holder."""

    key: str
    """The lock's key (``locks/vms/<vm>``), whatever object it was read from."""
    host: str
    pid: int
    token: str
    created: str
    expires: str
    uses: tuple[str, ...] | None = None
    """Point ids whose indexes the holder reads (a backup's parents): prune keeps them.
    None until the holder knows them."""
    boot_id: str | None = None
    pid_ns: int | None = None
    start_time: int | None = None
    machine_id: str | None = None
    """With host and pid: who holds it (:class:`fleece.liveness.Owner`); null in older leases."""

    @property
    def owner(self) -> Owner:
        """The holder, as :mod:`fleece.liveness` judges it."""
        return Owner(self.host, self.pid, self.boot_id, self.pid_ns, self.start_time, self.machine_id)
    generation: int = 0
    """The generation object this was read from (0: the old single object at ``key``)."""
    state: str = HELD
    """``held``; or, for a generation that ends a lease, ``released`` or ``broken``."""

    def expired(self, now: float | None = None) -> bool:
        """Whether the holder stopped renewing (by this host's clock)."""
        now = time.time() if now is None else now
        return parse_iso_utc(self.expires).timestamp() <= now

    def holder_gone(self) -> bool:
        """Whether the holder has certainly exited (:meth:`fleece.liveness.Owner.certainly_dead`).

        A killed backup cannot release its lease; on the same host, boot and
        pid namespace we can see that it is gone and need not wait for the
        lease to expire.
        """
        return self.owner.certainly_dead()

    @property
    def held(self) -> bool:
        """Whether this record says somebody holds the lease (it may have expired)."""
        return self.state == HELD

    def to_json(self) -> bytes:
        """The object's bytes: a generation (format 2), or the old single object (format 1)."""
        doc: dict[str, Any] = asdict(self)
        if self.generation:
            doc["format"] = LEASE_FORMAT
        else:
            doc = {"format": OLD_LEASE_FORMAT, **{k: v for k, v in doc.items()
                                                  if k not in ("generation", "state")}}
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_json(cls, blob: bytes) -> LeaseInfo:
        """Parse a lease object of either format; ``ValueError`` if it is not one."""
        doc = json.loads(blob)
        if not isinstance(doc, dict) or doc.get("format") not in (OLD_LEASE_FORMAT, LEASE_FORMAT):
            raise ValueError("not a lease")
        new = doc["format"] == LEASE_FORMAT
        owner = Owner.from_json({**doc, "host": str(doc["host"]), "pid": int(doc["pid"])})
        info = cls(
            key=str(doc["key"]),
            host=owner.host,
            pid=owner.pid,
            token=str(doc["token"]),
            created=str(doc["created"]),
            expires=str(doc["expires"]),
            uses=tuple(map(str, doc["uses"])) if isinstance(doc.get("uses"), list) else None,
            boot_id=owner.boot_id,
            pid_ns=owner.pid_ns,
            start_time=owner.start_time,
            machine_id=owner.machine_id,
            generation=int(doc["generation"]) if new else 0,
            state=str(doc["state"]) if new else HELD,
        )
        parse_iso_utc(info.expires)
        if info.state not in (HELD, RELEASED, BROKEN) or (new and info.generation < 1):
            raise ValueError("not a lease")
        return info

    def held_error(self, what: str, note: str = "") -> LockHeld:
        """The error for finding this lease in our way (``note`` follows the holder)."""
        return LockHeld(
            f"{what} is locked by {self.host} pid {self.pid} since {self.created} "
            f"(lease expires {self.expires}){note}; nothing was changed"
        )

    def describe(self) -> str:
        """What this record shows, for a holder that finds it where its own should be."""
        if self.state == BROKEN:
            return f"{self.host} pid {self.pid} broke it at {self.created} (fleece unlock)"
        if self.state == RELEASED:
            return f"{self.host} pid {self.pid} released it at {self.created}"
        return (f"{self.host} pid {self.pid} took it over at {self.created} (lease expires "
                f"{self.expires})")


def _unknown(key: str, generation: int, mtime: float) -> LeaseInfo:
    """A lease object we cannot read: held by an unknown holder until a lease after its mtime."""
    return LeaseInfo(key, "unknown host", 0, "", _iso(mtime), _iso(mtime + DEFAULT_LEASE_SECONDS),
                     generation=generation)


def _parse(backend: Backend, key: str, object_key: str, generation: int,
           blob: bytes) -> LeaseInfo | None:
    try:
        info = LeaseInfo.from_json(blob)
        if info.generation != generation or info.key != key:
            raise ValueError("a lease object under another name")
        return info
    except (ValueError, KeyError, TypeError):
        try:
            return _unknown(key, generation, backend.mtime(object_key))
        except ObjectMissing:
            return None


def _generations(backend: Backend, key: str) -> list[int]:
    """The generation numbers stored for lock ``key``, ascending."""
    found = []
    for name in backend.list(lease_generations_prefix(key)):
        parsed = parse_lease_generation_key(name)
        if parsed is not None and parsed[0] == key:
            found.append(parsed[1])
    return sorted(found)


def newest_generation(backend: Backend, key: str) -> tuple[LeaseInfo, bytes] | None:
    """The newest generation of lock ``key`` and its bytes; None when it never had one."""
    for _ in range(_TAKEOVER_ATTEMPTS):
        numbers = _generations(backend, key)
        if not numbers:
            return None
        object_key = lease_generation_key(key, numbers[-1])
        try:
            blob = backend.get(object_key)
        except ObjectMissing:
            continue  # superseded and cleaned up between our listing and our read
        info = _parse(backend, key, object_key, numbers[-1], blob)
        if info is not None:
            return info, blob
    raise LockHeld(f"the lease {key} changed {_TAKEOVER_ATTEMPTS} times while it was read")


def _old_layout(backend: Backend, key: str) -> tuple[LeaseInfo, bytes, bool] | None:
    """The single lease object at ``key`` (an older fleece's lease, or a guard); True for a guard."""
    try:
        blob = backend.get(key)
    except ObjectMissing:
        return None
    try:
        guard = bool(json.loads(blob).get(_GUARD_MARK))
    except (ValueError, AttributeError):
        guard = False
    info = _parse(backend, key, key, 0, blob)
    return None if info is None else (info, blob, guard)


def read_lease(backend: Backend, key: str) -> LeaseInfo | None:
    """Who holds lock ``key``, or None when nobody does.

    The newest generation when it says ``held`` (expired or not); else a
    lease an older fleece keeps at ``key`` itself. An unreadable object is
    reported as a lease by an unknown holder that expires one default lease
    after its mtime, so it blocks for a while and then can be taken over.
    """
    found = read_lease_bytes(backend, key)
    return None if found is None else found[0]


def read_lease_bytes(backend: Backend, key: str) -> tuple[LeaseInfo, bytes] | None:
    """:func:`read_lease` and the exact bytes it parsed."""
    newest = newest_generation(backend, key)
    if newest is not None and newest[0].held:
        return newest
    old = _old_layout(backend, key)
    if old is None or (old[2] and newest is not None):
        return None  # a guard whose generations say the lease ended: a leftover
    return old[0], old[1]


def read_leases(backend: Backend, prefix: str) -> list[LeaseInfo]:
    """Every lease held (expired or not) under a lock prefix such as ``locks/vms/``.

    Two listings (generations and old-layout objects) and one read per lock.
    """
    keys = {parsed[0] for name in backend.list(lease_generations_prefix(prefix.rstrip("/")))
            if (parsed := parse_lease_generation_key(name)) is not None}
    keys.update(k for k in backend.list(prefix) if k.startswith(LOCKS_PREFIX))
    found = []
    for key in sorted(keys):
        info = read_lease(backend, key)
        if info is not None:
            found.append(info)
    return found


class Lease:
    """A lease we hold; a heartbeat thread keeps renewing it until :meth:`release`."""

    def __init__(self, backend: Backend, info: LeaseInfo, what: str, lease_seconds: float,
                 stored: bytes | None = None) -> None:
        self.backend = backend
        self.info = info
        self._stored = info.to_json() if stored is None else stored
        """The bytes of our newest generation: what :meth:`check` compares."""
        self._unsure: LeaseInfo | None = None
        """A generation whose create's reply was lost: it may be stored."""
        self._guard: bytes | None = None
        """The old-layout guard we wrote at ``key`` (deleted again at release)."""
        self.what = what
        self.lease_seconds = lease_seconds
        self.lost: str | None = None
        """Why the lease was lost, or None while we hold it."""
        self._expires_at = parse_iso_utc(info.expires).timestamp()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()  # renewals and record_uses write the next generation

    @property
    def key(self) -> str:
        """The lock's key (``locks/vms/<vm>``)."""
        return self.info.key

    def start_heartbeat(self) -> None:
        """Renew every lease/3 in a daemon thread."""
        self._thread = threading.Thread(
            target=self._heartbeat, name=f"fleece-lease-{self.key}", daemon=True
        )
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                self.renew()
            except LockHeld as exc:
                log.error("%s", exc)
                return
            except FleeceError as exc:
                # A backend hiccup: try again next tick while the lease lasts.
                if time.time() >= self._expires_at:
                    self.lost = f"could not renew before it expired ({exc})"
                    log.error("lost the lock %s: %s", self.key, self.lost)
                    return
                log.warning("could not renew the lock %s, will retry: %s", self.key, exc)

    def renew(self) -> None:
        """Push the expiry one lease ahead; ``LockHeld`` (saying what was seen) if it is lost."""
        with self._write_lock:
            self._raise_if_lost()
            now = time.time()
            if now >= self._expires_at:
                # Others may have treated the lease as dead meanwhile (gc does):
                # renewing now would hide that gap from check().
                self.lost = f"it expired at {self.info.expires} before it could be renewed"
                raise LockHeld(f"lost the lock on {self.what}: {self.lost}")
            self._write_next(replace(self.info, expires=_iso(now + self.lease_seconds)))
            self._expires_at = now + self.lease_seconds

    def record_uses(self, point_ids: list[str]) -> None:
        """Publish in the lease the points whose indexes the holder reads (prune keeps them)."""
        with self._write_lock:
            self._raise_if_lost()
            self._write_next(replace(self.info, uses=tuple(point_ids)))

    def _raise_if_lost(self) -> None:
        if self.lost is not None:
            raise LockHeld(f"lost the lock on {self.what}: {self.lost}")

    def _write_next(self, info: LeaseInfo) -> None:
        """Create the generation after ours holding ``info``; ``LockHeld`` if another got there first."""
        for _ in range(2):
            new = replace(info, generation=self.info.generation + 1)
            blob = new.to_json()
            try:
                created = self.backend.put(lease_generation_key(self.key, new.generation), blob,
                                           if_absent=True)
            except FleeceError:
                self._unsure = new  # the create may have happened and only its reply was lost
                raise
            if created:
                self._unsure = None
                self._adopt(new, blob)
                return
            there = self._read_generation(new.generation)
            if self._unsure is not None and there is not None and there[1] == self._unsure.to_json():
                self._adopt(self._unsure, there[1])  # our own earlier create: build on it
                self._unsure = None
                continue
            self._lose(there[0] if there is not None else None, new.generation)
        self._lose(None, self.info.generation + 1)

    def _adopt(self, info: LeaseInfo, blob: bytes) -> None:
        """``info`` (stored as ``blob``) is our newest generation: make sure nothing is newer,
        and delete what it supersedes."""
        numbers = _generations(self.backend, self.key)
        if numbers and numbers[-1] > info.generation:
            newer = self._read_generation(numbers[-1])
            self._lose(newer[0] if newer is not None else None, numbers[-1])
        self.info, self._stored = info, blob
        _delete_older(self.backend, self.key, [n for n in numbers if n < info.generation])

    def _read_generation(self, generation: int) -> tuple[LeaseInfo, bytes] | None:
        object_key = lease_generation_key(self.key, generation)
        try:
            blob = self.backend.get(object_key)
        except ObjectMissing:
            return None
        info = _parse(self.backend, self.key, object_key, generation, blob)
        return None if info is None else (info, blob)

    def _lose(self, seen: LeaseInfo | None, generation: int) -> NoReturn:
        """Record and raise that generation ``generation`` is not ours, saying what it holds."""
        if seen is None:
            self.lost = (f"generation {generation} of its lease ({self.backend.url}) was written by "
                         "another process and is gone again")
        else:
            self.lost = f"{seen.describe()} (generation {generation} of the lease)"
        raise LockHeld(f"lost the lock on {self.what}: {self.lost}")

    def check(self) -> None:
        """Raise ``LockHeld`` unless the newest generation of the lease is still exactly ours.

        Re-reads the lease: call it just before committing (and just after,
        see the module docstring). A backend error propagates: a writer that
        cannot tell must not commit either.
        """
        with self._write_lock:
            if self.lost is None and time.time() >= self._expires_at:
                self.lost = f"it expired at {self.info.expires} without being renewed"
            if self.lost is None:
                numbers = _generations(self.backend, self.key)
                if self._unsure is not None and numbers and numbers[-1] == self._unsure.generation:
                    there = self._read_generation(self._unsure.generation)
                    if there is not None and there[1] == self._unsure.to_json():
                        self.info, self._stored, self._unsure = self._unsure, there[1], None
                newest = numbers[-1] if numbers else 0
                if newest != self.info.generation:
                    there = self._read_generation(newest) if newest else None
                    self.lost = (f"{there[0].describe()} (generation {newest} of the lease)"
                                 if there is not None else
                                 f"its lease objects were deleted (generation {self.info.generation} "
                                 "is gone)")
                else:
                    there = self._read_generation(newest)
                    if there is None or there[1] != self._stored:
                        self.lost = (f"generation {newest} of its lease holds another holder's record"
                                     if there is not None else
                                     f"its lease objects were deleted (generation {newest} is gone)")
            if self.lost is not None:
                raise LockHeld(f"lost the lock on {self.what}: {self.lost}; nothing was committed")

    def _write_guard(self) -> None:
        """Put an old-layout object at ``key`` so that an older fleece sees the lease.

        ``LockHeld`` (our generation released again) when an older fleece
        holds a live lease there.
        """
        now = time.time()
        guard = {"format": OLD_LEASE_FORMAT, "key": self.key, "host": self.info.host,
                 "pid": self.info.pid, "token": self.info.token, "created": self.info.created,
                 "expires": _iso(now + GUARD_SECONDS), "uses": None,
                 _GUARD_MARK: lease_generations_prefix(self.key)}
        blob = json.dumps(guard, sort_keys=True).encode()
        if not self.backend.put(self.key, blob, if_absent=True):
            old = _old_layout(self.backend, self.key)
            if old is not None and not old[2] and not old[0].expired() and not old[0].holder_gone():
                self.release(quiet=True)
                raise old[0].held_error(self.what, ", a fleece older than lease generations")
            # A guard a crashed holder left, or an older fleece's expired lease.
            self.backend.put(self.key, blob)
        self._guard = blob

    def release(self, quiet: bool = False) -> str | None:
        """Stop renewing and end the lease with a ``released`` generation if it is still ours.

        Never raises: a lease we cannot release expires by itself. Returns what
        was left behind then (None once released), also logged as a warning
        unless ``quiet``.
        """
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        try:
            with self._write_lock:
                if self.lost is None:
                    # LockHeld: somebody else's now, nothing of ours to end.
                    with contextlib.suppress(LockHeld):
                        self._write_next(replace(self.info, state=RELEASED, created=_iso(time.time())))
                if self._guard is not None:
                    with contextlib.suppress(ObjectMissing):
                        if self.backend.get(self.key) == self._guard:
                            self.backend.delete(self.key)
                    self._guard = None
        except FleeceError as exc:
            if not quiet:
                log.warning(
                    "could not release the lock %s (%s); it expires by itself at %s",
                    self.key, exc, self.info.expires,
                )
            return f"the lock {self.key} could not be released and expires by itself at {self.info.expires}"
        return None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        # Leaving on a fleece error (a store that is down, typically): the user
        # gets one line, the error followed by the lock it left behind.
        failing = isinstance(exc, FleeceError)
        left = self.release(quiet=failing)
        if left is not None and exc is not None and failing:
            exc.args = (f"{exc}; {left}",)


def _delete_older(backend: Backend, key: str, numbers: list[int]) -> None:
    """Delete superseded generations (best effort: a leftover is ignored and deleted later)."""
    if not numbers:
        return
    try:
        for n in numbers:  # usually one: a request each, apart from gc's batched deletes
            backend.delete(lease_generation_key(key, n))
    except FleeceError as exc:
        log.debug("could not delete superseded generations of %s: %s", key, exc)


def acquire(
    backend: Backend,
    key: str,
    what: str,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    heartbeat: bool = True,
) -> Lease:
    """Take the lease at ``key``, taking over an expired one; ``LockHeld`` if it is held."""
    me = Owner.current()
    for _ in range(_TAKEOVER_ATTEMPTS):
        newest = newest_generation(backend, key)
        holder = newest[0] if newest is not None else None
        if holder is not None and holder.held and not holder.expired() and not holder.holder_gone():
            raise holder.held_error(what)
        now = time.time()
        info = LeaseInfo(
            key=key,
            host=me.host,
            pid=me.pid,
            token=secrets.token_hex(16),
            created=_iso(now),
            expires=_iso(now + lease_seconds),
            boot_id=me.boot_id,
            pid_ns=me.pid_ns,
            start_time=me.start_time,
            machine_id=me.machine_id,
            generation=(holder.generation if holder is not None else 0) + 1,
        )
        blob = info.to_json()
        # One conditional create: of two takers one wins, and a holder that
        # renewed meanwhile (it wrote this same generation) keeps its lease.
        if not backend.put(lease_generation_key(key, info.generation), blob, if_absent=True):
            continue
        lease = Lease(backend, info, what, lease_seconds, stored=blob)
        try:
            lease._adopt(info, blob)
        except LockHeld:
            continue  # our listing was older than a cleanup: a newer generation exists
        lease._write_guard()
        if holder is not None and holder.held:
            log.warning(
                "took over the stale lock on %s (held by %s pid %d, %s)",
                what, holder.host, holder.pid,
                "which has exited" if holder.holder_gone() else f"expired {holder.expires}",
            )
        if heartbeat:
            lease.start_heartbeat()
        return lease
    raise LockHeld(f"{what}: the lock changed hands {_TAKEOVER_ATTEMPTS} times while we "
                   "tried to take it; nothing was changed")


@contextmanager
def vm_lock(
    backend: Backend, vm: str, lease_seconds: float = DEFAULT_LEASE_SECONDS
) -> Iterator[Lease]:
    """Hold the writer lock of VM ``vm`` for the ``with`` block."""
    with acquire(backend, vm_lock_key(vm), f"VM {vm}", lease_seconds) as lease:
        yield lease


@contextmanager
def repo_lock(
    backend: Backend, name: str, lease_seconds: float = DEFAULT_LEASE_SECONDS
) -> Iterator[Lease]:
    """Hold the repository-wide exclusive lock ``name`` (e.g. ``gc``)."""
    with acquire(backend, repo_lock_key(name), f"repository ({name})", lease_seconds) as lease:
        yield lease


def break_lease(backend: Backend, key: str, what: str,
                expected: LeaseInfo | None = None) -> LeaseInfo | None:
    """End the lease at ``key`` whoever holds it; what was ended (None: there was none).

    Writes a ``broken`` generation after the newest (and removes the holder's
    guard, or an older fleece's single lease object). With ``expected`` (the
    lease as the caller read it and judged it), only that lease goes:
    ``LockHeld`` if it changed hands since, so that a lease someone just took
    over is never ended. Only for when its holder is known to be gone: a live
    holder notices at its next renewal or check and commits nothing (its
    renewal, a conditional create of the generation the break took, fails).
    """
    info = read_lease(backend, key)
    if expected is not None and info != expected:
        raise LockHeld(f"the lock of {what} changed hands meanwhile; nothing was removed")
    if info is None:
        return None
    if info.generation == 0:  # an older fleece's lease: it has only the one object
        backend.delete(key)
        return info
    now = time.time()
    me = Owner.current()
    broken = replace(info, host=me.host, pid=me.pid, boot_id=me.boot_id, pid_ns=me.pid_ns,
                     start_time=me.start_time, machine_id=me.machine_id, token=secrets.token_hex(16),
                     created=_iso(now), expires=_iso(now), uses=None, state=BROKEN,
                     generation=info.generation + 1)
    if not backend.put(lease_generation_key(key, broken.generation), broken.to_json(), if_absent=True):
        raise LockHeld(f"the lock of {what} changed hands meanwhile; nothing was removed")
    old = _old_layout(backend, key)
    if old is not None and old[2] and old[0].token == info.token:
        backend.delete(key)
    _delete_older(backend, key, [n for n in _generations(backend, key) if n < broken.generation])
    return info
