"""A backup server's half: one restore point read from an export on another host.

The hypervisor runs ``fleece export start --listen tcp:HOST:PORT --tls-creds
DIR --json``; the backup server hands that JSON to ``fleece backup
--from-export FILE --vm NAME --repo URL --tls-creds DIR``, which reads each
disk over ``nbds://`` (the dirty bitmap too, for an incremental) and writes
the restore point under the export's checkpoint id; then the hypervisor runs
``fleece export stop`` (which commits the checkpoint bitmaps) — or ``stop
--abort`` if this backup failed, so that the next export covers these writes
again. The point is stored and committed by the very code of a local backup
(:func:`fleece.backup.job.store_point`): chunks, indexes, then the point under
the VM's lease, all before the checkpoint is committed.

An export whose parent checkpoint this repository does not hold is backed up
in full, and says why.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fleece.backup.job import BackupRequest, BackupResult, _PointsOfVm, store_point
from fleece.errors import BadInput
from fleece.fleecing import DiskExport
from fleece.fleecing.export import TRIM_ALIGNMENT
from fleece.fleecing.names import CHECKPOINT_RE, checkpoint_bitmap
from fleece.fleecing.request_bound import CBW_CLUSTER
from fleece.fleecing.transport import check_client_uri
from fleece.qmp import Disk
from fleece.repo.commit import writer_lease
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


@dataclass
class _RemotePointInTime:
    """An export another host set up, as :func:`fleece.backup.job.store_point` reads it."""

    checkpoint: str
    disks: list[DiskExport]
    pause_ms: float | None = None
    """The hypervisor measured the pause, not this process."""
    trim_alignment: int = TRIM_ALIGNMENT


async def run_backup_from_export(
    req: BackupRequest,
    checkpoint: str,
    disks: list[DiskExport],
    max_request: int | None,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
) -> BackupResult:
    """Take the restore point ``checkpoint`` of the exported ``disks`` (:func:`read_export`).

    ``req.vm`` names the VM; ``req.settings.tls`` holds the client credentials.
    A parent this repository lacks makes a disk full, with the reason.
    """
    if not req.vm:
        raise BadInput("backup --from-export needs --vm NAME (the export does not say which VM it is)")
    for d in disks:
        check_client_uri(d.uri, req.settings.tls)
    started = time.monotonic()
    repo = req.repo if isinstance(req.repo, Repository) else req.repo()
    # Trims only where the export allows them and the user did not turn them off.
    export = _RemotePointInTime(checkpoint, [replace(d, discard=d.discard and req.trim) for d in disks])
    with writer_lease(repo, req.vm) as lease:
        points = _PointsOfVm(repo, req.vm)
        point, results = await store_point(req, repo, export, lease, points, None, max_request,
                                           started, progress)
    return BackupResult(point, results, None, time.monotonic() - started, repo.lock_ledger.extended)
