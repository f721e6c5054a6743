"""Garbage collection: delete the chunks, packs and index objects no restore point needs.

Mark and sweep under the exclusive gc lease (:mod:`fleece.repo.gc_lock`),
which no backup runs alongside:

1. mark: read every point and every index it names (each checked against
   its checksums) and collect every chunk digest and pack they name. An unreadable point
   or index stops gc before it deletes anything: gc cannot know what that
   point needs.
2. orphan indexes: index objects whose point does not exist. Younger than
   the grace period they are spared, and so are the chunks they name (a
   backup writes its indexes just before its point); older ones go.
3. sweep: list ``chunks/`` and ``packs/`` and delete every object not marked, and every
   verification record (``verified/``) whose point does not exist, in batches
   (``delete_many`` where the backend has it: 1000 keys per S3 request),
   checking before each batch that the gc lease is still ours.

In an Object Lock repository the store refuses to delete an object whose
lock has not ended (garbage of a failed backup, chunks of pruned points that
later points shared until recently): gc leaves it, reports it
(``objects_locked``) and deletes it in a run after its lock ends. It costs
no extra request: the store's answer to the batched delete says which.

A pack is kept whole while any kept point names any delta in it; gc reports
the bytes of unnamed deltas inside kept packs (``pack_bytes_unreferenced``)
rather than rewriting packs, because a delta's reference (pack, offset) is
written into checksummed indexes that are never rewritten (docs/format.md).

gc's only side effects are deletions of objects no point names, so a gc
that fails halfway leaves a repository that is whole, just not yet clean.
Memory: one set entry per distinct chunk (~100 bytes; 100 MB for a million
chunks, 4 TiB of distinct data at 4 MiB) plus one index at a time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from fleece.errors import FleeceError, LockHeld, RepositoryCorrupt, RepositoryError
from fleece.repo.backends.base import Backend, ObjectInfo, ObjectMissing
from fleece.repo.format import keys
from fleece.repo.format.delta import PACK_OVERHEAD
from fleece.repo.format.index import ChunkIndex
from fleece.repo.gc_lock import CLOCK_SKEW, gc_lock, lease_margin, running_backups
from fleece.repo.lock import DEFAULT_LEASE_SECONDS, Lease
from fleece.repo.repository import Repository

log = logging.getLogger(__name__)

DEFAULT_GRACE = timedelta(hours=24)
"""How old an index object without a point must be before gc deletes it."""
DELETE_BATCH = 1000


@dataclass
class GcReport:
    """What one gc run found and deleted (or, in a dry run, would delete)."""

    dry_run: bool
    points: int = 0
    chunks_kept: int = 0
    chunks_deleted: int = 0
    packs_kept: int = 0
    packs_deleted: int = 0
    pack_bytes_unreferenced: int = 0
    """Bytes of deltas inside kept packs that no kept point names (packs are kept whole)."""
    indexes_deleted: int = 0
    records_deleted: int = 0
    """Verification records whose point is gone."""
    indexes_spared: int = 0
    """Orphan indexes younger than the grace period (their chunks were kept too)."""
    temporaries_deleted: int = 0
    """Hidden ``.tmp-*`` files (file backend) that a killed writer left, older than the grace."""
    bytes_freed: int = 0
    objects_locked: int = 0
    """Unreferenced objects left because their Object Lock has not ended yet."""
    running_backups: list[str] = field(default_factory=list)
    """VMs whose lease was live (reported by dry runs, which take no lease)."""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The ``gc --json`` object."""
        return {
            "dry_run": self.dry_run,
            "points": self.points,
            "chunks_kept": self.chunks_kept,
            "chunks_deleted": self.chunks_deleted,
            "packs_kept": self.packs_kept,
            "packs_deleted": self.packs_deleted,
            "pack_bytes_unreferenced": self.pack_bytes_unreferenced,
            "indexes_deleted": self.indexes_deleted,
            "indexes_spared": self.indexes_spared,
            "records_deleted": self.records_deleted,
            "temporaries_deleted": self.temporaries_deleted,
            "objects_deleted": (self.chunks_deleted + self.packs_deleted + self.indexes_deleted
                                + self.records_deleted),
            "bytes_freed": self.bytes_freed,
            "objects_locked": self.objects_locked,
            "running_backups": self.running_backups,
            "seconds": round(self.seconds, 3),
        }


def collect_garbage(
    repo: Repository,
    *,
    dry_run: bool = False,
    grace: timedelta = DEFAULT_GRACE,
    now: Callable[[], float] = time.time,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    say: Callable[[str], None] | None = None,
) -> GcReport:
    """Run gc on ``repo`` (see the module docstring); ``LockHeld`` if a backup or gc is running.

    A dry run takes no lease and deletes nothing; it reports what a gc run
    now would delete, and which backups are running (whose new chunks it
    counts as garbage, though a real gc would wait for them).
    """
    started = time.monotonic()
    report = GcReport(dry_run)
    say = say or log.info
    if dry_run:
        report.running_backups = [vm for vm, _ in running_backups(repo.backend)]
        _collect(repo, None, report, grace, now, say)
    else:
        with gc_lock(repo.backend, lease_seconds) as lease:
            _collect(repo, lease, report, grace, now, say)
    report.seconds = time.monotonic() - started
    return report


def _collect(repo: Repository, lease: Lease | None, report: GcReport, grace: timedelta,
             now: Callable[[], float], say: Callable[[str], None]) -> None:
    backend = repo.backend
    refs = repo.point_refs()
    marked: set[bytes] = set()
    live: dict[bytes, set[tuple[int, int]]] = {}  # pack → (offset, length) of named deltas
    named_indexes: set[str] = set()
    for vm, point_id in refs:
        if _mark_point(repo, vm, point_id, marked, live, named_indexes):
            report.points += 1
    say(f"marked {len(marked)} chunks named by {report.points} restore points")

    live_ids = {point_id for _, point_id in refs}
    old_orphans: list[ObjectInfo] = []
    for info in backend.list_info(keys.INDEXES_PREFIX):
        parsed = keys.parse_index_key(info.key)
        if parsed is None or parsed[0] in live_ids or info.key in named_indexes:
            continue
        mtime = info.mtime if not math.isnan(info.mtime) else _mtime(backend, info.key)
        if mtime is None:
            continue
        if now() - mtime < grace.total_seconds():
            report.indexes_spared += 1
            _mark_orphan(backend, info.key, marked, live)
        else:
            old_orphans.append(info)

    # Backups cannot commit while we hold the lease. A point that appeared
    # anyway came from a writer that ignores the protocol: delete nothing.
    if lease is not None and set(repo.point_refs()) - set(refs):
        raise RepositoryError("a restore point was committed while gc held its lease (a writer that "
                              "does not take leases?); gc deleted nothing")

    sweeper = _Sweeper(backend, lease)
    try:
        for info in old_orphans:
            if sweeper.add(info, "indexes"):
                report.indexes_deleted += 1
        # Verdicts of points that are gone (a prune cut short, a verify racing a prune).
        live_refs = set(refs)
        for info in backend.list_info(keys.VERIFIED_PREFIX):
            record = keys.parse_verification_key(info.key)
            if record is not None and record[:2] not in live_refs and sweeper.add(info, "records"):
                report.records_deleted += 1
        for info in backend.list_info(keys.CHUNKS_PREFIX):
            digest = keys.parse_chunk_key(info.key)
            if digest is None:
                continue  # not ours to judge
            if digest in marked:
                report.chunks_kept += 1
            elif sweeper.add(info, "chunks"):
                report.chunks_deleted += 1
        for info in backend.list_info(keys.PACKS_PREFIX):
            pack = keys.parse_pack_key(info.key)
            if pack is None:
                continue
            if pack in live:
                report.packs_kept += 1
                if info.size >= 0:
                    used = sum(n for _, n in live[pack])
                    report.pack_bytes_unreferenced += max(0, info.size - used - PACK_OVERHEAD)
            elif sweeper.add(info, "packs"):
                report.packs_deleted += 1
        sweeper.flush()
    except FleeceError as exc:
        message = (f"gc stopped after deleting {sweeper.deleted} unreferenced objects: {exc}; "
                   "every restore point is intact; run gc again")
        raise (LockHeld(message) if isinstance(exc, LockHeld) else RepositoryError(message)) from exc
    report.bytes_freed = sweeper.bytes
    report.chunks_deleted -= sweeper.locked.get("chunks", 0)
    report.packs_deleted -= sweeper.locked.get("packs", 0)
    report.indexes_deleted -= sweeper.locked.get("indexes", 0)
    report.records_deleted -= sweeper.locked.get("records", 0)
    report.objects_locked = sum(sweeper.locked.values())
    if report.objects_locked:
        say(f"{report.objects_locked} unreferenced objects are still locked (Object Lock); "
            "a gc after their lock ends deletes them")
    # A killed backup's staged chunks never became objects: hidden temporary
    # files of the file backend. Past the grace period nobody can publish them.
    count, size = backend.sweep_temporaries(now() - grace.total_seconds(), delete=lease is not None)
    report.temporaries_deleted += count
    report.bytes_freed += size


def _mark_point(repo: Repository, vm: str, point_id: str, marked: set[bytes],
                live: dict[bytes, set[tuple[int, int]]], named_indexes: set[str]) -> bool:
    """Mark every chunk ``vm``'s point names; False when the point is gone (pruned meanwhile)."""
    try:
        point = repo.load_point(vm, point_id)
    except ObjectMissing:
        return False
    except RepositoryError as exc:
        raise RepositoryCorrupt(f"{exc}; gc cannot tell which chunks it needs, so it deleted "
                                "nothing (see fleece verify)") from exc
    for disk in point.disks:
        named_indexes.add(disk.index_key)
        try:
            index = repo.read_index(point, disk.name)
        except RepositoryError as exc:
            if not repo.backend.exists(keys.point_key(vm, point_id)):
                return False  # pruned while we read it: its chunks need no mark
            raise RepositoryCorrupt(f"{exc}; gc cannot tell which chunks point {point_id} needs, "
                                    "so it deleted nothing (see fleece verify)") from exc
        _mark_index(index, marked, live)
    return True


def _mark_index(index: ChunkIndex, marked: set[bytes], live: dict[bytes, set[tuple[int, int]]]) -> None:
    """Mark the base chunks and the packs (with the deltas used in them) ``index`` names."""
    for _, digest in index.stored():
        marked.add(digest)
    for _, ref in index.delta_refs():
        live.setdefault(ref.pack, set()).add((ref.offset, ref.length))


def _mark_orphan(backend: Backend, key: str, marked: set[bytes],
                 live: dict[bytes, set[tuple[int, int]]]) -> None:
    """Mark the chunks a young orphan index names (it may belong to a point about to commit)."""
    try:
        index = ChunkIndex.from_bytes(backend.get(key), f"index {key}")
    except ObjectMissing:
        return
    except RepositoryCorrupt as exc:
        log.warning("%s; its chunks are not spared", exc)
        return
    _mark_index(index, marked, live)


def _mtime(backend: Backend, key: str) -> float | None:
    try:
        return backend.mtime(key)
    except ObjectMissing:
        return None


class _Sweeper:
    """Deletes objects in batches, each only while the gc lease is safely ours."""

    def __init__(self, backend: Backend, lease: Lease | None) -> None:
        self.backend = backend
        self.lease = lease
        """None in a dry run: nothing is deleted, only counted."""
        self.batch: list[str] = []
        self.queued: dict[str, tuple[str, int]] = {}
        """key → (kind, size) of the batch, to take back what a lock kept."""
        self.deleted = 0
        self.bytes = 0
        self.locked: dict[str, int] = {}
        """kind → objects the store kept because their lock has not ended."""

    def add(self, info: ObjectInfo, kind: str) -> bool:
        """Queue ``info`` (a ``chunks``, ``packs`` or ``indexes`` object) for deletion.

        False when it vanished before its size was known.
        """
        size = info.size
        if size < 0:  # the backend lists no sizes: ask for the object itself
            try:
                size = len(self.backend.get(info.key))
            except ObjectMissing:
                return False
        self.bytes += size
        if self.lease is None:
            return True
        self.batch.append(info.key)
        self.queued[info.key] = (kind, size)
        if len(self.batch) >= DELETE_BATCH:
            self.flush()
        return True

    def flush(self) -> None:
        """Delete the queued objects after checking the lease."""
        if not self.batch:
            return
        assert self.lease is not None
        # Renewing re-reads the lease: one that was broken or taken over
        # stops us within a batch, not at the next heartbeat. A backup treats
        # it as gone CLOCK_SKEW after expiry; stop well before that.
        self.lease.renew()
        if lease_margin(self.lease) < CLOCK_SKEW:
            raise LockHeld("gc could not renew its lease in time, so it stopped deleting")
        kept = self.backend.delete_unlocked(self.batch)
        for key in kept:
            kind, size = self.queued.get(key, ("chunks", 0))
            self.locked[kind] = self.locked.get(kind, 0) + 1
            self.bytes -= size
        self.deleted += len(self.batch) - len(kept)
        self.batch = []
        self.queued = {}
