"""Committing a restore point under the VM's lease: the one place every writer of a point goes through.

A backup (local, ``--from-export``, through libvirt) and ``fleece copy``
take the VM's writer lease with :func:`writer_lease` (then look for a
running gc: our lease exists first, so a gc starting later sees it), store
chunks, deltas and indexes, then call :func:`commit_point`, which

1. checks that the VM's lease (:mod:`fleece.repo.lock`) is still exactly
   ours — a lapsed or broken lease means a gc may have run and deleted
   chunks the point names: nothing is written;
2. writes the point object (a conditional create): from here on it exists;
3. checks the lease again — a break that landed between the first check and
   the write let a gc run that saw no lease, so the point is withdrawn
   (deleted again) and the writer fails. A lease still ours now was there
   all along.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fleece.errors import FleeceError, LockHeld
from fleece.repo.format.point import RestorePoint
from fleece.repo.gc_lock import check_no_gc
from fleece.repo.lock import Lease, vm_lock
from fleece.repo.repository import Repository
from fleece.testing import Phase, pause_point


@contextmanager
def writer_lease(repo: Repository, vm: str) -> Iterator[Lease]:
    """Hold ``vm``'s writer lease in ``repo``, refusing while a gc runs.

    The writer will name chunks it did not upload: no gc may run until it
    commits. The lease exists before the look, so a gc starting later sees it.
    """
    with vm_lock(repo.backend, vm) as lease:
        check_no_gc(repo.backend)
        yield lease


def commit_point(repo: Repository, lease: Lease, point: RestorePoint,
                 write: Callable[[RestorePoint], None] | None = None) -> None:
    """Write ``point`` into ``repo`` while ``lease`` holds, before and after (module docstring).

    ``write`` writes the point object (default :meth:`Repository.write_point`;
    a copy of a sealed point writes its bytes as they are). Raises
    :class:`LockHeld` when the lease was lost; the point is then not in the
    repository (or the message says it could not be removed).
    """
    pause_point(Phase.BEFORE_POINT)
    lease.check()
    (write or repo.write_point)(point)
    pause_point(Phase.POINT_WRITTEN)
    try:
        lease.check()
    except LockHeld as lost:
        try:
            repo.delete_point(point)
        except FleeceError as exc:
            raise LockHeld(f"{lost}, but point {point.id} was written and could not be deleted "
                           f"again ({exc}); run fleece verify and remove it with fleece prune "
                           "if it is damaged") from exc
        raise
