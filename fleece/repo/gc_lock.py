"""Backups and garbage collection exclude each other through leases (docs/format.md).

A backup relies on chunks it did not upload: those its parent's and the
latest point's indexes name, and those ``put_chunk``'s existence probe found. If gc
deleted such a chunk between that decision and the backup's commit, the
committed point would name a missing chunk. Backends offer no atomic
multi-object operation, so the two sides use leases, shared for backups and
exclusive for gc, and each side *creates its own lease first and then looks
for the other's*:

* a backup holds its VM lease (``locks/vms/<vm>``, its generations under
  ``leases/vms/<vm>/``), then calls
  :func:`check_no_gc`;
* gc holds ``locks/repo/gc`` (:func:`gc_lock`), then looks at every VM lease.

Both objects are created before either look, and S3 and the file system
both list and read after write consistently, so whichever side looks last
sees the other and backs off: they never both proceed. A lease counts as
live until ``CLOCK_SKEW`` seconds after its expiry (by the reader's clock),
so hosts whose clocks differ by less than that still agree; a holder whose
own lease lapsed notices at its next renewal or :meth:`Lease.check`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from fleece.errors import LockHeld
from fleece.repo.backends.base import Backend
from fleece.repo.format.keys import VM_LOCKS_PREFIX, repo_lock_key, unescape_name
from fleece.repo.format.point import parse_iso_utc
from fleece.repo.lock import DEFAULT_LEASE_SECONDS, Lease, LeaseInfo, read_lease, read_leases, repo_lock

GC_LOCK = "gc"
CLOCK_SKEW = 60.0
"""Seconds past its expiry that a lease of another host still counts as live."""


def lease_live(info: LeaseInfo, now: float | None = None) -> bool:
    """Whether ``info``'s holder may still be working (allowing for clock skew).

    Before expiry only a holder that has certainly exited
    (:meth:`fleece.liveness.Owner.certainly_dead`: same host, boot and pid
    namespace, pid gone or reused) is not live: a backup in a container with
    our host name, whose pid means nothing here, is waited for.
    """
    now = time.time() if now is None else now
    if info.holder_gone():
        return False
    return parse_iso_utc(info.expires).timestamp() + CLOCK_SKEW > now


def running_gc(backend: Backend) -> LeaseInfo | None:
    """The lease of a gc that may be running, or None."""
    info = read_lease(backend, repo_lock_key(GC_LOCK))
    return info if info is not None and lease_live(info) else None


def check_no_gc(backend: Backend) -> None:
    """Raise ``LockHeld`` if a gc may be running; a backup calls this *after* taking its VM lease."""
    info = running_gc(backend)
    if info is not None:
        raise LockHeld(
            f"garbage collection is running on {backend.url} ({info.host} pid {info.pid} since "
            f"{info.created}); the backup did not start and nothing was changed; run it again "
            "when gc has finished"
        )


def running_backups(backend: Backend) -> list[tuple[str, LeaseInfo]]:
    """``(vm, lease)`` of every live VM lease: backups (or prunes) that may be running."""
    found = [(unescape_name(info.key[len(VM_LOCKS_PREFIX):]), info)
             for info in read_leases(backend, VM_LOCKS_PREFIX) if lease_live(info)]
    return sorted(found, key=lambda f: f[0])


@contextmanager
def gc_lock(backend: Backend, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> Iterator[Lease]:
    """Hold the exclusive gc lease for the ``with`` block, with no backup running.

    ``LockHeld`` (and the lease released again) when another gc holds it or
    any VM lease is live.
    """
    # A look before our lease exists only spares backups a needless back-off
    # while a waiting gc retries; the look after it is the one that counts.
    _refuse_if_busy(backend)
    with repo_lock(backend, GC_LOCK, lease_seconds) as lease:
        _refuse_if_busy(backend)
        yield lease


def _refuse_if_busy(backend: Backend) -> None:
    busy = running_backups(backend)
    if busy:
        vm, info = busy[0]
        more = f" and {len(busy) - 1} more" if len(busy) > 1 else ""
        raise LockHeld(
            f"VM {vm} is locked by {info.host} pid {info.pid} since {info.created} (a backup "
            f"or prune is running){more}; gc deleted nothing; run it again later or use --wait"
        )


def lease_margin(lease: Lease, now: float | None = None) -> float:
    """Seconds until ``lease`` expires by this host's clock."""
    now = time.time() if now is None else now
    return parse_iso_utc(lease.info.expires).timestamp() - now
