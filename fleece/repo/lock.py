"""Writer locks as lease objects, so they work on any backend (S3 included).

A lease is a small JSON object created with a conditional put; its holder
rewrites it every lease/3 with a later expiry, and deletes it when done. A
lease nobody renewed past its expiry belongs to a dead process and may be
taken over. The format is in docs/format.md ("Lock leases").

Every rewrite of a lease — the holder's renewal and ``uses`` record, a
takeover of a stale one — is a compare-and-swap
(:meth:`~fleece.repo.backend.Backend.replace_if`) against the exact bytes the
writer last saw, so a takeover or a break landing in between is never
overwritten and a broken lease is never brought back. The holder also
re-reads its lease in :meth:`Lease.check`, which a writer calls just before
committing and once more just after (see :func:`fleece.backup.run_backup`):
a lease that stayed byte for byte ours from acquisition to that last read
existed all along, so no gc can have run meanwhile.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from fleece.errors import FleeceError, LockHeld
from fleece.liveness import Owner
from fleece.repo.backends.base import Backend, ObjectMissing
from fleece.repo.format.keys import repo_lock_key, vm_lock_key
from fleece.repo.format.point import iso_utc, parse_iso_utc

log = logging.getLogger(__name__)

LEASE_FORMAT = 1
DEFAULT_LEASE_SECONDS = 600.0
_TAKEOVER_ATTEMPTS = 5


def _iso(t: float) -> str:
    return iso_utc(datetime.fromtimestamp(t, UTC))


@dataclass(frozen=True)
class LeaseInfo:
    """What a lease object says about its holder."""

    key: str
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

    def to_json(self) -> bytes:
        """The lease object's bytes."""
        doc: dict[str, Any] = {"format": LEASE_FORMAT, **asdict(self)}
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_json(cls, blob: bytes) -> LeaseInfo:
        """Parse a lease object; ``ValueError`` if it is not one."""
        doc = json.loads(blob)
        if not isinstance(doc, dict) or doc.get("format") != LEASE_FORMAT:
            raise ValueError("not a format-1 lease")
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
        )
        parse_iso_utc(info.expires)
        return info

    def held_error(self, what: str) -> LockHeld:
        """The error for finding this lease in our way."""
        return LockHeld(
            f"{what} is locked by {self.host} pid {self.pid} since {self.created} "
            f"(lease expires {self.expires}); nothing was changed"
        )


def read_lease(backend: Backend, key: str) -> LeaseInfo | None:
    """The lease stored at ``key``, or None when there is none.

    An unreadable object (not written by this format) is reported as a lease
    by an unknown holder that expires one default lease after its mtime, so
    it blocks for a while and then can be taken over.
    """
    found = read_lease_bytes(backend, key)
    return None if found is None else found[0]


def read_lease_bytes(backend: Backend, key: str) -> tuple[LeaseInfo, bytes] | None:
    """:func:`read_lease` and the exact bytes it parsed (what a compare-and-swap compares)."""
    try:
        blob = backend.get(key)
    except ObjectMissing:
        return None
    try:
        return LeaseInfo.from_json(blob), blob
    except (ValueError, KeyError, TypeError):
        try:
            mtime = backend.mtime(key)
        except ObjectMissing:
            return None
        return (LeaseInfo(key, "unknown host", 0, "", _iso(mtime),
                          _iso(mtime + DEFAULT_LEASE_SECONDS)), blob)


class Lease:
    """A lease we hold; a heartbeat thread keeps renewing it until :meth:`release`."""

    def __init__(self, backend: Backend, info: LeaseInfo, what: str, lease_seconds: float,
                 stored: bytes | None = None) -> None:
        self.backend = backend
        self.info = info
        self._stored = info.to_json() if stored is None else stored
        """The bytes of our lease as we last wrote them: what every rewrite compares."""
        self._unsure: bytes | None = None
        """A rewrite whose reply was lost: it may be what is stored now."""
        self.what = what
        self.lease_seconds = lease_seconds
        self.lost: str | None = None
        """Why the lease was lost, or None while we hold it."""
        self._expires_at = parse_iso_utc(info.expires).timestamp()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()  # renewals and record_uses rewrite the same object

    @property
    def key(self) -> str:
        """The lease object's key."""
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
        """Push the expiry one lease ahead; ``LockHeld`` if someone else holds it now."""
        with self._write_lock:
            if self.lost is not None:
                raise LockHeld(f"lost the lock on {self.what}: {self.lost}")
            now = time.time()
            if now >= self._expires_at:
                # Others may have treated the lease as dead meanwhile (gc does):
                # renewing now would hide that gap from check().
                self.lost = "it expired before it could be renewed"
                raise LockHeld(f"lost the lock on {self.what}: {self.lost}")
            self._rewrite(replace(self.info, expires=_iso(now + self.lease_seconds)))
            self._expires_at = now + self.lease_seconds

    def record_uses(self, point_ids: list[str]) -> None:
        """Publish in the lease the points whose indexes the holder reads (prune keeps them)."""
        with self._write_lock:
            if self.lost is not None:
                raise LockHeld(f"lost the lock on {self.what}: {self.lost}")
            self._rewrite(replace(self.info, uses=tuple(point_ids)))

    def _rewrite(self, info: LeaseInfo) -> None:
        """Store ``info`` in place of our lease by compare-and-swap; ``LockHeld`` if it is not ours."""
        new = info.to_json()
        try:
            swapped = self.backend.replace_if(self.key, new, self._stored)
            if not swapped and self._unsure is not None:
                swapped = self.backend.replace_if(self.key, new, self._unsure)
        except FleeceError:
            self._unsure = new  # the write may have happened and only its reply was lost
            raise
        if not swapped:
            self.lost = "it was removed or taken over by another process"
            raise LockHeld(f"lost the lock on {self.what}: {self.lost}")
        self._stored, self._unsure, self.info = new, None, info

    def check(self) -> None:
        """Raise ``LockHeld`` unless the stored lease is still exactly ours.

        Re-reads the lease object: call it just before committing (and just
        after, see the module docstring). A backend error propagates: a
        writer that cannot tell must not commit either.
        """
        with self._write_lock:
            if self.lost is None and time.time() >= self._expires_at:
                self.lost = "it expired without being renewed"
            if self.lost is None:
                try:
                    current: bytes | None = self.backend.get(self.key)
                except ObjectMissing:
                    current = None
                if current is not None and current == self._unsure:
                    self._stored, self._unsure = current, None
                    self.info = LeaseInfo.from_json(current)
                elif current != self._stored:
                    self.lost = "it was removed or taken over by another process"
            if self.lost is not None:
                raise LockHeld(f"lost the lock on {self.what}: {self.lost}; nothing was committed")

    def release(self, quiet: bool = False) -> str | None:
        """Stop renewing and delete the lease if it is still ours.

        Never raises: a lease we cannot delete expires by itself. Returns what
        was left behind then (None once released), also logged as a warning
        unless ``quiet``.
        """
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        try:
            # Backends have no compare-and-delete: a break and a new holder
            # landing between this read and the delete lose their lease.
            if self.backend.get(self.key) in (self._stored, self._unsure):
                self.backend.delete(self.key)
        except ObjectMissing:
            pass
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
        )
        if backend.put(key, info.to_json(), if_absent=True):
            lease = Lease(backend, info, what, lease_seconds)
            if heartbeat:
                lease.start_heartbeat()
            return lease
        found = read_lease_bytes(backend, key)
        if found is None:
            continue  # released between our put and our read
        holder, blob = found
        if not holder.expired() and not holder.holder_gone():
            raise holder.held_error(what)
        # One compare-and-swap: of two takers of the same stale lease one
        # wins, and a holder that renewed meanwhile keeps its lease.
        if not backend.replace_if(key, info.to_json(), blob):
            continue
        log.warning(
            "took over the stale lock on %s (held by %s pid %d, %s)",
            what, holder.host, holder.pid,
            "which has exited" if holder.holder_gone() else f"expired {holder.expires}",
        )
        lease = Lease(backend, info, what, lease_seconds)
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
    """Remove the lease at ``key`` whoever holds it; what was removed (None: there was none).

    With ``expected`` (the lease as the caller read it and judged it), only
    that lease goes: ``LockHeld`` if it changed hands since, so that a lease
    someone just took over is never removed. Only for when its holder is known
    to be gone: a live holder notices at its next renewal or check and commits
    nothing (its renewal, a compare-and-swap, cannot recreate it).
    """
    info = read_lease(backend, key)
    if expected is not None and info != expected:
        raise LockHeld(f"the lock of {what} changed hands meanwhile; nothing was removed")
    if info is not None:
        backend.delete(key)
    return info
