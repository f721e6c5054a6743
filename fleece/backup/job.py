"""One backup of one VM: the export, a pipeline per disk, the restore point, the commit.

Order matters and is the whole point of this module:

1. take the VM's writer lock in the repository (before QEMU is touched);
2. open the point-in-time export (``fleece.fleecing``), which picks full or
   incremental per disk from the checkpoint bitmaps and from what the
   repository holds;
3. for each disk, plan on the chunk grid, run the pipeline, write its index;
4. write the restore point — last, so it only ever names stored data;
5. leave the export context normally, which commits the checkpoint bitmaps.
   Any failure before that aborts them: the previous checkpoint keeps
   recording, so the next incremental still sees every write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleece import __version__
from fleece.backup.audit import audit_clean_chunks
from fleece.backup.pipeline import DiskBackup, DiskStats, PipelineSettings, plan_work, planned_bytes
from fleece.backup.reader import BASE_ALLOCATION, connect, disconnect, plan_chunks
from fleece.backup.sources import ExportedDisk, PointInTime, PointInTimeSource, QmpSource, qmp_vm_name
from fleece.errors import BadInput, FleeceError, LockHeld, RepositoryCorrupt
from fleece.fleecing.checkpoints import LEVELS
from fleece.fleecing.names import checkpoint_bitmap
from fleece.fleecing.request_bound import max_request, parse_qemu_version
from fleece.maintenance.verify import require_new_point_intact
from fleece.qmp import QmpSession
from fleece.repo.format.index import ChunkIndex
from fleece.repo.format.point import DiskRecord, RestorePoint, iso_utc
from fleece.repo.gc_lock import check_no_gc
from fleece.repo.lock import Lease, vm_lock
from fleece.repo.repository import Repository
from fleece.testing import pause_point

log = logging.getLogger(__name__)



@dataclass
class BackupRequest:
    """What the user asked for."""

    qmp: str
    """QEMU's QMP socket; unused when ``source`` is given."""
    drives: list[str]
    repo: Repository | Callable[[], Repository]
    """The repository, or a callable that opens (or creates) it once the VM side checks out."""
    vm: str | None = None
    level: str = "auto"
    compression_level: int | None = 3
    trim: bool = True
    """Trim stored chunks from the snapshot so the reverse delta stays small."""
    scratch_dir: Path | None = None
    qga: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    settings: PipelineSettings = field(default_factory=PipelineSettings)
    verify: bool = False
    """Deep-verify the stored chunks and indexes before the point is written."""
    audit_bitmap: float | None = None
    """Percent of the chunks the dirty bitmap calls clean to read and compare with the parent
    before an incremental (``fleece.backup.audit``); None: trust the bitmap."""
    on_vm: Callable[[str], None] | None = None
    """Told the VM's name as soon as it is known (``--metrics-file`` labels a failure by it)."""
    source: PointInTimeSource | None = None
    """Where the point in time comes from (e.g. ``fleece.libvirt.LibvirtSource``); default QMP at ``qmp``."""


@dataclass
class DiskResult:
    """One disk's outcome."""

    drive: str
    level: str
    size: int
    reason: str | None
    stats: DiskStats
    bitmap_granularity: int | None = None
    """The dirty bitmap's granularity in bytes (incremental), as QEMU reports it."""
    audit: dict[str, Any] | None = None
    """``--audit-bitmap``: what the audit sampled and found (absent without it)."""

    def as_dict(self) -> dict[str, Any]:
        """The per-disk entry of ``backup --json``."""
        doc = {
            "drive": self.drive,
            "level": self.level,
            "size": self.size,
            **self.stats.as_dict(),
            "bitmap_granularity": self.bitmap_granularity,
            "reason": self.reason,
        }
        if self.audit is not None:
            doc["audit"] = self.audit
        return doc


@dataclass
class BackupResult:
    """What ``fleece backup`` reports."""

    point: RestorePoint
    disks: list[DiskResult]
    pause_ms: float | None
    seconds: float
    locks_extended: int = 0
    """Object Lock repositories: PutObjectRetention requests this backup made."""

    def as_dict(self) -> dict[str, Any]:
        """The ``backup --json`` object."""
        doc: dict[str, Any] = {
            "point": self.point.id,
            "vm": self.point.vm,
            "parent": self.point.parent,
            "disks": [d.as_dict() for d in self.disks],
            "pause_ms": self.pause_ms,
            "seconds": round(self.seconds, 3),
        }
        if self.point.object_lock is not None:
            doc["object_lock"] = {**self.point.object_lock, "locks_extended": self.locks_extended}
        return doc


async def vm_name(session: QmpSession) -> str:
    """The VM's name as docs/design.md §4.2 defines it: ``-name``, else its UUID, else the socket."""
    return await qmp_vm_name(session)


def check_level(level: str) -> str:
    """Validate ``--level``."""
    if level not in LEVELS:
        raise BadInput(f"--level must be one of {', '.join(LEVELS)}, not {level!r}")
    return level


async def run_backup(
    req: BackupRequest,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    say: Callable[[str], None] | None = None,
) -> BackupResult:
    """Take one restore point of ``req.drives``; see the module docstring for the order.

    Three steps, each its own function: open (or create) the repository,
    back up the disks inside the export, commit the point.
    ``progress(drive, total_bytes)`` returns a callback fed with bytes done;
    ``say`` receives one-line notices (why a disk is full, the pause).
    """
    check_level(req.level)
    say = say or log.warning
    started = time.monotonic()
    source = req.source or QmpSource(req.qmp)
    async with source:
        vm = req.vm or await source.vm_name()
        if req.on_vm is not None:
            req.on_vm(vm)
        qemu = await source.qemu_version()
        repo = await _open_repository(req, source)
        with vm_lock(repo.backend, vm) as lease:
            # We will reuse chunks we do not upload: no gc may run until we
            # commit. Our lease exists now, so a gc starting later sees it.
            check_no_gc(repo.backend)
            points = _PointsOfVm(repo, vm)

            def parent_ok(drive: str, parent: str) -> bool:
                point = points.get(parent)
                return point is not None and any(d.name == drive for d in point.disks)

            async with source.export(
                req.drives,
                level=req.level,
                parent_ok=parent_ok,
                discard=req.trim,
                scratch_dir=req.scratch_dir,
                qga=req.qga,
                log=say,
                known_point=points.latest_id(),
            ) as export:
                pause_point("export-live")  # test hook (fleece.testing); inert in production
                results, records, indexes = await _back_up_disks(req, repo, export, points, lease,
                                                                 progress, qemu)
                latest = points.latest()
                object_lock = await asyncio.to_thread(
                    lock_new_point, req, repo, indexes,
                    [*(points.get(d.since) for d in export.disks if d.since), latest])
                point = RestorePoint(
                    id=export.checkpoint,
                    vm=vm,
                    created=iso_utc(),
                    parent=_parent(export, results),
                    chunk_size=repo.config.chunk_size,
                    disks=records,
                    fleece_version=__version__,
                    qemu_version=qemu,
                    labels=dict(req.labels),
                    object_lock=object_lock,
                    stats={
                        "pause_ms": export.pause_ms,
                        "seconds": round(time.monotonic() - started, 3),
                        "bytes_read": sum(r.stats.bytes_read for r in results),
                        "bytes_stored": sum(r.stats.bytes_stored for r in results),
                        # verify --boot then expects the agent to answer.
                        "guest_agent": req.qga is not None,
                    },
                )
                await _commit(req, repo, lease, points, point, progress)
    return BackupResult(point, results, export.pause_ms, time.monotonic() - started,
                        repo.lock_ledger.extended)


def lock_new_point(req: BackupRequest, repo: Repository, indexes: list[ChunkIndex],
                   sources: list[RestorePoint | None]) -> dict[str, str] | None:
    """Object Lock repositories: lock what the new point names N days past it; its ``object_lock``.

    ``sources`` are the points whose indexes named chunks the backup reused
    without a request (its parents and the VM's latest point). None when the
    repository does not lock objects.
    """
    if repo.lock is None:
        return None
    return repo.lock_new_point(indexes, [p for p in sources if p is not None],
                               req.settings.storers or repo.backend.preferred_concurrency or 4)


async def _open_repository(req: BackupRequest, source: PointInTimeSource) -> Repository:
    """The repository, created only once the VM side checks out (a failed backup creates none)."""
    # Unknown drives are bad input: say so before the repository is touched
    # (a fresh location is only initialized once the VM side checks out).
    await source.check_drives(req.drives)
    if isinstance(req.repo, Repository):
        return req.repo
    if req.level == "incremental":
        raise FleeceError(
            "--level incremental needs a parent restore point, and the repository does "
            "not exist yet; nothing was changed"
        )
    # A fresh location becomes a repository only if the export can be set up.
    await source.preflight(req.drives, req.scratch_dir)
    return req.repo()


async def _back_up_disks(
    req: BackupRequest,
    repo: Repository,
    export: PointInTime,
    points: _PointsOfVm,
    lease: Lease,
    progress: Callable[[str, int], Callable[[int], None]] | None,
    qemu: str,
) -> tuple[list[DiskResult], list[DiskRecord], list[ChunkIndex]]:
    """Store every exported disk (chunks, deltas, index); what each stored, its record and index.

    ``qemu`` is the source's QEMU version (``7.2.22``): it decides how far one request may reach.
    """
    results: list[DiskResult] = []
    records: list[DiskRecord] = []
    indexes: list[ChunkIndex] = []
    latest = points.latest()
    # Prune keeps the points whose indexes we are about to read.
    uses = {d.since for d in export.disks if d.since} | ({latest.id} if latest else set())
    await asyncio.to_thread(lease.record_uses, sorted(uses))
    bound = max_request(parse_qemu_version(qemu))
    for disk in export.disks:
        result, record, index = await asyncio.to_thread(
            _back_up_disk, req, repo, export.checkpoint, disk,
            points.get(disk.since) if disk.since else None, latest,
            export.trim_alignment if disk.discard else None, progress, bound,
        )
        results.append(result)
        records.append(record)
        indexes.append(index)
    return results, records, indexes


def _parent(export: PointInTime, results: list[DiskResult]) -> str | None:
    """The point's parent: the newest one a disk stayed incremental on.

    Only disks that stayed incremental have a parent (a damaged or resized
    parent makes a disk full after all).
    """
    parents = sorted({d.since for d, r in zip(export.disks, results, strict=True)
                      if d.since and r.level == "incremental"})
    return parents[-1] if parents else None


async def _commit(
    req: BackupRequest,
    repo: Repository,
    lease: Lease,
    points: _PointsOfVm,
    point: RestorePoint,
    progress: Callable[[str, int], Callable[[int], None]] | None,
) -> None:
    """Verify what was stored if asked, then write the point: from then on it exists."""
    if req.verify:
        # Before the point exists: damage fails the backup, which
        # aborts the checkpoint (the previous one keeps recording).
        await asyncio.to_thread(
            require_new_point_intact, repo, point,
            points.get(point.parent) if point.parent else None, progress=progress)
    # Written last: from here on the point exists. The export's
    # normal exit then commits the checkpoint bitmaps. A lapsed
    # lease means a gc may have run: do not commit.
    pause_point("before-point")  # test hook (fleece.testing); inert in production
    await asyncio.to_thread(lease.check)
    await asyncio.to_thread(repo.write_point, point)
    await asyncio.to_thread(_confirm_lease_after_commit, repo, lease, point)


def _confirm_lease_after_commit(repo: Repository, lease: Lease, point: RestorePoint) -> None:
    """Withdraw ``point`` if our lease was broken between the pre-commit check and the write.

    Only then can a gc have run meanwhile (it saw no lease) and deleted
    chunks the point names; a lease still ours now was there all along
    (:mod:`fleece.repo.lock`).
    """
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


class _PointsOfVm:
    """The VM's restore points by id, each read only when asked for.

    A backup needs its parent and the latest point; reading every point of
    the VM would cost a request per point on S3.
    """

    def __init__(self, repo: Repository, vm: str) -> None:
        self._repo = repo
        self._ids = {point_id: name for name, point_id in repo.point_refs(vm)}
        self._read: dict[str, RestorePoint | None] = {}

    def get(self, point_id: str) -> RestorePoint | None:
        """Point ``point_id`` of this VM, or None if the repository has no such point."""
        name = self._ids.get(point_id)
        if name is None:
            return None
        if point_id not in self._read:
            try:
                self._read[point_id] = self._repo.load_point(name, point_id)
            except RepositoryCorrupt as exc:
                # Damage must not stop every later backup: such a point is no
                # parent and no source of known chunks (`fleece verify` reports it).
                log.warning("%s; backing up without it", exc)
                self._read[point_id] = None
        return self._read[point_id]

    def latest_id(self) -> str | None:
        """The id of the VM's newest point, without reading it."""
        return max(self._ids) if self._ids else None

    def latest(self) -> RestorePoint | None:
        """The VM's newest point (ids sort by time), or None."""
        return self.get(max(self._ids)) if self._ids else None


def _back_up_disk(
    req: BackupRequest,
    repo: Repository,
    point_id: str,
    disk: ExportedDisk,
    parent: RestorePoint | None,
    latest: RestorePoint | None,
    trim_alignment: int | None,
    progress: Callable[[str, int], Callable[[int], None]] | None,
    max_request: int | None,
) -> tuple[DiskResult, DiskRecord, ChunkIndex]:
    """Plan, read and store one disk; write its index. Runs in a worker thread.

    ``max_request`` bounds every request to the export (QEMU < 8.0: the
    copy-before-write cluster, :func:`fleece.fleecing.export.max_request`).
    """
    chunk_size = repo.config.chunk_size
    level, reason = disk.level, disk.reason
    index = ChunkIndex.empty(chunk_size, disk.size, repo.index_version)
    dirty_context = disk.dirty_bitmap
    parent_index: ChunkIndex | None = None
    if level == "incremental" and parent is not None:
        parent_index = _readable_index(repo, parent, disk.drive)
        if parent_index is None:
            level, dirty_context = "full", None
            reason = f"the index of {disk.drive} in point {parent.id} is damaged or missing"
        elif parent_index.disk_size != disk.size or parent_index.chunk_size != chunk_size:
            level = "full"
            reason = (
                f"the disk is {disk.size} bytes now, {parent_index.disk_size} in point {parent.id}"
            )
            dirty_context = None
        else:
            index = parent_index.copy()
            index.version = repo.index_version
    elif level == "incremental":
        level, dirty_context = "full", None
        reason = reason or "the parent point is not in the repository"
    if level == "full":
        dirty_context = None

    # Digests we know are stored: no lookup and no upload for them.
    known: set[bytes] = set()
    if level == "incremental":
        known |= index.digests()
    # When the parent is the latest point its digests are in already: an index
    # of a large disk is megabytes, not worth a second download from S3.
    parent_is_latest = (level == "incremental" and parent is not None and latest is not None
                        and parent.id == latest.id)
    if latest is not None and not parent_is_latest and any(d.name == disk.drive for d in latest.disks):
        same = parent is not None and parent.id == latest.id  # read (or found damaged) above
        latest_index = parent_index if same else _readable_index(repo, latest, disk.drive)
        known |= latest_index.digests() if latest_index else set()

    contexts = (BASE_ALLOCATION,) + ((dirty_context,) if dirty_context else ())
    h = connect(disk.uri, contexts, tls=req.settings.tls)
    audit = None
    try:
        plan = plan_chunks(h, chunk_size, dirty_context, max_request)
        if req.audit_bitmap is not None and level == "incremental" and parent is not None:
            found = audit_clean_chunks(h, plan, index, repo, req.audit_bitmap)
            audit = found.as_dict(chunk_size)
            if found.mismatched:
                # The bitmap missed writes: nothing of this incremental is kept; a full instead.
                level, dirty_context = "full", None
                reason = (f"--audit-bitmap: {len(found.mismatched)} of {found.sampled} chunks the dirty "
                          f"bitmap called clean differ from point {parent.id} (first at offset "
                          f"{found.mismatched[0] * chunk_size}): the bitmap missed writes")
                log.warning("%s: %s", disk.drive, reason)
                index = ChunkIndex.empty(chunk_size, disk.size, repo.index_version)
                plan = plan_chunks(h, chunk_size, None, max_request)
    finally:
        disconnect(h)
    deltas = level == "incremental" and repo.has_deltas
    advance = (progress(disk.drive, planned_bytes(plan_work(plan, index, deltas)))
               if progress else None)
    settings = PipelineSettings(**{**req.settings.__dict__})
    settings.compression_level = req.compression_level
    settings.trim_alignment = trim_alignment
    settings.max_request = max_request
    stats = DiskBackup(repo, disk.uri, plan, index, known, settings, advance, deltas=deltas).run()
    index_key, index_digest = repo.write_index(point_id, disk.drive, index)
    stats.objects_written += 1  # the index
    granularity = disk.bitmap_granularity if level == "incremental" else None
    record = DiskRecord(
        name=disk.drive,
        level=level,
        virtual_size=disk.size,
        index_key=index_key,
        index_digest=index_digest,
        bitmap=checkpoint_bitmap(point_id),
        stats=stats.as_dict(),
    )
    return DiskResult(disk.drive, level, disk.size, reason, stats, granularity, audit), record, index


def _readable_index(repo: Repository, point: RestorePoint, drive: str) -> ChunkIndex | None:
    """``drive``'s index in ``point``, or None (said) when it is damaged or missing."""
    try:
        return repo.read_index(point, drive)
    except RepositoryCorrupt as exc:
        log.warning("%s; backing up without it", exc)
        return None
