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
from fleece.errors import BadInput, FleeceError, RepositoryCorrupt
from fleece.fleecing.checkpoints import LEVELS
from fleece.fleecing.names import checkpoint_bitmap
from fleece.fleecing.request_bound import max_request, parse_qemu_version
from fleece.machine.record import MachineRecord, store_file
from fleece.maintenance.verify import require_new_point_intact
from fleece.qmp import QmpSession
from fleece.repo.commit import commit_point_async, writer_lease
from fleece.repo.format.defaults import DEFAULT_ZSTD_LEVEL
from fleece.repo.format.index import ChunkIndex
from fleece.repo.format.point import DiskRecord, RestorePoint, iso_utc
from fleece.repo.lock import Lease
from fleece.repo.repository import Repository
from fleece.testing import Phase, pause_point

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
    compression_level: int | None = DEFAULT_ZSTD_LEVEL
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

    def totals(self) -> dict[str, int]:
        """Everything the backup wrote to the repository: every disk's chunks, packs, index
        pages and index, and the point object (its bytes count as metadata)."""
        point = len(self.point.to_json())
        return {
            "bytes_stored": sum(d.stats.bytes_stored for d in self.disks) + point,
            "objects_written": sum(d.stats.objects_written for d in self.disks) + 1,
            "bytes_metadata": sum(d.stats.bytes_metadata for d in self.disks) + point,
        }

    def as_dict(self) -> dict[str, Any]:
        """The ``backup --json`` object."""
        doc: dict[str, Any] = {
            "point": self.point.id,
            "vm": self.point.vm,
            "parent": self.point.parent,
            "disks": [d.as_dict() for d in self.disks],
            "pause_ms": self.pause_ms,
            "seconds": round(self.seconds, 3),
            **self.totals(),
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
        with writer_lease(repo, vm) as lease:
            points = _PointsOfVm(repo, vm)

            def parent_ok(drive: str, parent: str) -> bool:
                point = points.get(parent)
                return point is not None and any(d.name == drive for d in point.disks)

            # QEMU's shape is read before the export puts its filters over the disks.
            early = await _capture_machine(source) if getattr(source, "MACHINE_BEFORE_EXPORT", False) \
                else None
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
                pause_point(Phase.EXPORT_LIVE)
                machine = await _record_machine(early or await _capture_machine(source), repo,
                                                export, say)
                point, results = await store_point(req, repo, export, lease, points, qemu,
                                                   max_request(parse_qemu_version(qemu)), started,
                                                   progress, machine)
    return BackupResult(point, results, export.pause_ms, time.monotonic() - started,
                        repo.lock_ledger.extended)


Captured = tuple[str, dict[str, Any], dict[str, bytes], dict[str, str], float]


async def _capture_machine(source: PointInTimeSource) -> Captured | None:
    """The machine as the source records it (libvirt, QMP), or None; ``(…, seconds taken)``."""
    record = getattr(source, "record_machine", None)
    if record is None:
        return None
    started = time.monotonic()
    kind, summary, files, moments = await record()
    return kind, summary, files, moments, time.monotonic() - started


async def _record_machine(captured: Captured | None, repo: Repository, export: PointInTime,
                          say: Callable[[str], None]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The machine record's files stored; the record for the point, or None.

    libvirt: read right after the disks' point in time is set up; QMP: just
    before (docs/machines.md).
    """
    if captured is None:
        return None, {}
    started = time.monotonic()
    kind, summary, files, moments, took = captured
    summary["disk_sizes"] = {d.drive: d.size for d in export.disks}
    if kind == "qemu":
        from fleece.machine.qemu import match_drive
        summary["drives"] = {d.drive: match_drive(summary["disks"], d.drive) for d in export.disks}
        in_point = {str(m.get("node")) for m in summary["drives"].values() if m}
        for flash in summary["pflash"]:
            if not flash["read_only"] and flash["node"] not in in_point:
                say(f"the UEFI variable store (pflash node {flash['node']}) is not in this point; "
                    f"add --drive {flash['node']} to restore the machine with its variables")

    def store() -> tuple[MachineRecord, int]:
        stored, written = {}, 0
        for role, data in files.items():
            stored[role], n = store_file(repo, data)
            written += n
        return MachineRecord(kind, summary, stored, moments), written
    machine, written = await asyncio.to_thread(store)
    return machine.to_dict(), {"machine_objects_written": written,
                               "machine_seconds": round(time.monotonic() - started + took, 4)}


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
    bound: int | None,
) -> tuple[list[DiskResult], list[DiskRecord], list[ChunkIndex]]:
    """Store every exported disk (chunks, deltas, index); what each stored, its record and index.

    ``bound`` is how far one request to the export may reach (``max_request``; None: unbounded).
    """
    results: list[DiskResult] = []
    records: list[DiskRecord] = []
    indexes: list[ChunkIndex] = []
    latest = points.latest()
    # Prune keeps the points whose indexes we are about to read.
    uses = {d.since for d in export.disks if d.since} | ({latest.id} if latest else set())
    await asyncio.to_thread(lease.record_uses, sorted(uses))
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


async def store_point(
    req: BackupRequest,
    repo: Repository,
    export: PointInTime,
    lease: Lease,
    points: _PointsOfVm,
    qemu: str | None,
    bound: int | None,
    started: float,
    progress: Callable[[str, int], Callable[[int], None]] | None,
    machine: tuple[dict[str, Any] | None, dict[str, Any]] = (None, {}),
) -> tuple[RestorePoint, list[DiskResult]]:
    """Store every disk of ``export``, then commit its restore point
    (:func:`fleece.repo.commit.commit_point_async`).

    The one sequence every backup takes, local or from another host's export:
    chunks, deltas and indexes; the Object Lock extension; the point built
    from its disks and parents; ``--verify``; the lease-checked commit.
    ``qemu`` is the source's QEMU version, recorded in the point (None when
    another host's export does not say); ``bound`` how far one request to the
    export may reach (``max_request``).
    """
    results, records, indexes = await _back_up_disks(req, repo, export, points, lease, progress,
                                                     bound)
    latest = points.latest()
    object_lock = await asyncio.to_thread(
        lock_new_point, req, repo, indexes,
        [*(points.get(d.since) for d in export.disks if d.since), latest])
    point = RestorePoint(
        id=export.checkpoint,
        vm=points.vm,
        created=iso_utc(),
        parent=_parent(export, results),
        chunk_size=repo.config.chunk_size,
        disks=records,
        fleece_version=__version__,
        qemu_version=qemu,
        labels=dict(req.labels),
        object_lock=object_lock,
        machine=machine[0],
        stats={
            **machine[1],
            "pause_ms": export.pause_ms,
            "seconds": round(time.monotonic() - started, 3),
            "bytes_read": sum(r.stats.bytes_read for r in results),
            "bytes_stored": sum(r.stats.bytes_stored for r in results),
            # verify --boot then expects the agent to answer.
            "guest_agent": req.qga is not None,
        },
    )
    if req.verify:
        # Before the point exists: damage fails the backup, which
        # aborts the checkpoint (the previous one keeps recording).
        await asyncio.to_thread(
            require_new_point_intact, repo, point,
            points.get(point.parent) if point.parent else None, progress=progress)
    # From here on the point exists. The export's normal exit then commits
    # the checkpoint bitmaps; a lost lease fails the backup, which aborts them.
    await commit_point_async(repo, lease, point)
    return point, results


def _parent(export: PointInTime, results: list[DiskResult]) -> str | None:
    """The point's parent: the newest one a disk stayed incremental on.

    Only disks that stayed incremental have a parent (a damaged or resized
    parent makes a disk full after all).
    """
    parents = sorted({d.since for d, r in zip(export.disks, results, strict=True)
                      if d.since and r.level == "incremental"})
    return parents[-1] if parents else None


class _PointsOfVm:
    """The VM's restore points by id, each read only when asked for.

    A backup needs its parent and the latest point; reading every point of
    the VM would cost a request per point on S3.
    """

    def __init__(self, repo: Repository, vm: str) -> None:
        self.vm = vm
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
            found = audit_clean_chunks(h, plan, index, repo, req.audit_bitmap, max_request)
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
    index_key, index_digest, written = repo.write_index_counted(point_id, disk.drive, index)
    stats.add(objects_written=written.objects, bytes_stored=written.bytes,  # pages, the index
              bytes_metadata=written.bytes)
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
