"""A backup server's half: one restore point read from an export on another host.

The hypervisor runs ``fleece export start --listen tcp:HOST:PORT --tls-creds
DIR --json``; the backup server hands that JSON to ``fleece backup
--from-export FILE --vm NAME --repo URL --tls-creds DIR``, which reads each
disk over ``nbds://`` (the dirty bitmap too, for an incremental) and writes
the restore point under the export's checkpoint id; then the hypervisor runs
``fleece export stop`` (which commits the checkpoint bitmaps) — or ``stop
--abort`` if this backup failed, so that the next export covers these writes
again. The order is the same as a local backup's (``fleece.backup.job``): chunks,
indexes, then the point, all before the checkpoint is committed.

An export whose parent checkpoint this repository does not hold is backed up
in full, and says why.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleece import __version__
from fleece.backup.job import (
    BackupRequest,
    BackupResult,
    DiskResult,
    _back_up_disk,
    _PointsOfVm,
    lock_new_point,
)
from fleece.errors import BadInput
from fleece.fleecing import DiskExport
from fleece.fleecing.export import TRIM_ALIGNMENT
from fleece.fleecing.names import CHECKPOINT_RE, checkpoint_bitmap
from fleece.fleecing.request_bound import CBW_CLUSTER
from fleece.fleecing.transport import check_client_uri
from fleece.maintenance.verify import require_new_point_intact
from fleece.qmp import Disk
from fleece.repo.format.index import ChunkIndex
from fleece.repo.format.point import DiskRecord, RestorePoint, iso_utc
from fleece.repo.gc_lock import check_no_gc
from fleece.repo.lock import vm_lock
from fleece.repo.repository import Repository


def read_export(source: str) -> tuple[str, list[DiskExport], int | None]:
    """The checkpoint, disks and ``max_request`` of ``fleece export start --json`` output in
    ``source`` (``-``: stdin).

    JSON without ``max_request`` (an older fleece, or ``--libvirt``) does not say which
    QEMU serves it: every request is then bounded to the copy-before-write cluster, which
    is right on every version (docs/design.md §2.4).
    """
    try:
        text = Path("/dev/stdin").read_text() if source == "-" else Path(source).read_text()
        raw: Any = json.loads(text)
    except OSError as exc:
        raise BadInput(f"--from-export {source}: {exc.strerror}") from None
    except ValueError:
        raise BadInput(f"--from-export {source} is not JSON from 'fleece export start --json'") from None
    try:
        checkpoint = str(raw["checkpoint"])
        if not CHECKPOINT_RE.match(checkpoint_bitmap(checkpoint)):
            raise ValueError(checkpoint)
        disks = []
        for d in raw["disks"]:
            size = int(d["size"])
            disks.append(DiskExport(
                drive=str(d["drive"]),
                disk=Disk(device_id=None, qdev="", backend="", node_name=str(d.get("node") or ""),
                          format="", virtual_size=size, filename=""),
                uri=str(d["uri"]), export_name=str(d.get("export") or ""), size=size,
                dirty_bitmap=d.get("dirty_bitmap"), checkpoint=checkpoint, since=d.get("since"),
                level=str(d["level"]), reason=d.get("reason"), discard=bool(d.get("discard")),
            ))
    except (KeyError, TypeError, ValueError):
        raise BadInput(f"--from-export {source} is not JSON from 'fleece export start --json'") from None
    if not disks:
        raise BadInput(f"--from-export {source} names no disk")
    bound = raw.get("max_request", CBW_CLUSTER)
    if bound is not None and (not isinstance(bound, int) or bound <= 0 or CBW_CLUSTER % bound):
        raise BadInput(f"--from-export {source}: max_request {bound!r} is not a divisor of {CBW_CLUSTER}")
    return checkpoint, disks, bound


async def run_backup_from_export(
    req: BackupRequest,
    checkpoint: str,
    disks: list[DiskExport],
    max_request: int | None,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
) -> BackupResult:
    """Take the restore point ``checkpoint`` of the exported ``disks`` (:func:`read_export`).

    ``req.vm`` names the VM; ``req.settings.tls`` holds the client credentials.
    """
    if not req.vm:
        raise BadInput("backup --from-export needs --vm NAME (the export does not say which VM it is)")
    for d in disks:
        check_client_uri(d.uri, req.settings.tls)
    started = time.monotonic()
    repo = req.repo if isinstance(req.repo, Repository) else req.repo()
    vm = req.vm
    with vm_lock(repo.backend, vm) as lease:
        check_no_gc(repo.backend)
        points = _PointsOfVm(repo, vm)
        latest = points.latest()
        uses = {d.since for d in disks if d.since} | ({latest.id} if latest else set())
        await asyncio.to_thread(lease.record_uses, sorted(uses))
        results: list[DiskResult] = []
        records: list[DiskRecord] = []
        indexes: list[ChunkIndex] = []
        for disk in disks:
            # A parent this repository lacks makes the disk full, with the reason.
            parent = points.get(disk.since) if disk.since else None
            trim = TRIM_ALIGNMENT if disk.discard and req.trim else None
            result, record, index = await asyncio.to_thread(
                _back_up_disk, req, repo, checkpoint, disk, parent, latest, trim, progress, max_request)
            results.append(result)
            records.append(record)
            indexes.append(index)
        parents = sorted({d.since for d, r in zip(disks, results, strict=True)
                          if d.since and r.level == "incremental"})
        point = RestorePoint(
            id=checkpoint, vm=vm, created=iso_utc(), parent=parents[-1] if parents else None,
            chunk_size=repo.config.chunk_size, disks=records, fleece_version=__version__,
            labels=dict(req.labels),
            object_lock=await asyncio.to_thread(
                lock_new_point, req, repo, indexes,
                [*(points.get(d.since) for d in disks if d.since), latest]),
            stats={"pause_ms": None, "seconds": round(time.monotonic() - started, 3),
                   "bytes_read": sum(r.stats.bytes_read for r in results),
                   "bytes_stored": sum(r.stats.bytes_stored for r in results)},
        )
        if req.verify:
            await asyncio.to_thread(require_new_point_intact, repo, point,
                                    points.get(point.parent) if point.parent else None,
                                    progress=progress)
        lease.check()
        await asyncio.to_thread(repo.write_point, point)
    return BackupResult(point, results, None, time.monotonic() - started, repo.lock_ledger.extended)
