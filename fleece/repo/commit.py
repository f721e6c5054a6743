"""Committing a restore point under the VM's lease: the one place every writer of a point goes through.

A backup (local, ``--from-export``, through libvirt) and ``fleece copy``
take the VM's writer lease with :func:`writer_lease` (then look for a
running gc: our lease exists first, so a gc starting later sees it), store
chunks, deltas and indexes, then commit the point — ``copy`` with
:func:`commit_point`, the asynchronous backup with :func:`commit_point_async`,
both running the steps of :func:`_commit_steps` in order:

1. check that the VM's lease (:mod:`fleece.repo.lock`) is still exactly
   ours — a lapsed or broken lease means a gc may have run and deleted
   chunks the point names: nothing is written;
2. write the point object (a conditional create): from here on it exists;
3. check the lease again — a break that landed between the first check and
   the write let a gc run that saw no lease, so the point is withdrawn
   (deleted again) and the writer fails. A lease still ours now was there
   all along.

The test hooks before the first step and after the write run in the
caller's thread: a backup stopped there (SIGTERM, Ctrl-C) is cancelled
before it writes, never behind its back in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

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
    for step, _ in _commit_steps(repo, lease, point, write):
        step()


async def commit_point_async(repo: Repository, lease: Lease, point: RestorePoint) -> None:
    """:func:`commit_point` from a coroutine: the repository's requests in worker threads."""
    for step, blocking in _commit_steps(repo, lease, point, None):
        if blocking:
            await asyncio.to_thread(step)
        else:
            step()


def _commit_steps(repo: Repository, lease: Lease, point: RestorePoint,
                  write: Callable[[RestorePoint], None] | None
                  ) -> list[tuple[Callable[[], None], bool]]:
    """The commit, step by step: ``(step, whether it waits on the repository)``."""
    return [
        (partial(pause_point, Phase.BEFORE_POINT), False),
        (lease.check, True),
        (partial(write or repo.write_point, point), True),
        (partial(pause_point, Phase.POINT_WRITTEN), False),
        (partial(_withdraw_unless_still_ours, repo, lease, point), True),
    ]


def _withdraw_unless_still_ours(repo: Repository, lease: Lease, point: RestorePoint) -> None:
    """Delete ``point`` again and raise if the lease was lost since the check before the write."""
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
