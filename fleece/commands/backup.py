"""``fleece backup``: one restore point of a running VM into a repository."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from fleece.backup.job import BackupRequest, BackupResult, run_backup
from fleece.backup.pipeline import PipelineSettings
from fleece.backup.remote import read_export, run_backup_from_export
from fleece.commands.cleanup import heal_before_backup, stop_guard
from fleece.commands.common import (
    add_client_tls_options,
    add_recorded_run,
    add_repo_option,
    human_size,
    limited_backend,
    open_repository,
    print_json,
    run_async,
    say,
)
from fleece.commands.config import apply_config
from fleece.commands.metrics import Run, recorded
from fleece.commands.progress import progress_display
from fleece.errors import BadInput, NotARepository
from fleece.fleecing.checkpoints import LEVELS
from fleece.fleecing.transport import client_tls
from fleece.libvirt.source import LibvirtSource
from fleece.repo.backends.url import open_backend
from fleece.repo.format.codec import DEFAULT_ZSTD_LEVEL, HASHES, parse_compression
from fleece.repo.repository import Repository, check_chunk_size, holds_objects

STOPPED_NOTE = "its restore point exists only if it was written before the signal (see fleece list)"
DEFAULT_CHUNK_SIZE = 4 << 20
DEFAULT_COMPRESS = f"zstd:{DEFAULT_ZSTD_LEVEL}"
DEFAULT_HASH = "blake3"
"""New repositories name chunks by BLAKE3: 3.5x cheaper than sha256 on the backup's hot path."""

CONFIG_KEYS: dict[str, type] = {
    "qmp": str, "drive": list, "repo": str, "vm": str, "level": str, "compress": str,
    "chunk_size": str, "hash": str, "scratch_dir": str, "qga": str, "readers": int, "storers": int,
    "trim": bool, "labels": dict, "verify": bool, "passphrase_file": str, "unsafe_locks": bool,
    "limit_upload": str, "limit_download": str, "metrics_file": str, "libvirt": str, "connect": str,
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``backup`` to the command line."""
    p = sub.add_parser("backup", help="take a full or incremental restore point of a running VM")
    p.add_argument("--config", metavar="FILE", help="read settings from a TOML file (see configs/)")
    p.add_argument("--qmp", metavar="SOCKET", help="QEMU's QMP unix socket path or HOST:PORT")
    p.add_argument("--libvirt", metavar="DOMAIN",
                   help="a libvirt domain (name or UUID), backed up through libvirt's backup API")
    p.add_argument("--connect", metavar="URI",
                   help="libvirt connection URI with --libvirt (default $LIBVIRT_DEFAULT_URI, else "
                        "qemu:///system)")
    p.add_argument("--drive", action="append", default=[], metavar="NAME",
                   help="disk to back up: device id, node name or block backend name; with --libvirt "
                        "its target dev (default: every disk) (repeatable)")
    add_repo_option(p, required=False)
    p.add_argument("--vm", metavar="NAME",
                   help="VM name in the repository (default: QEMU's -name, else UUID, else socket)")
    p.add_argument("--level", choices=LEVELS, default=None,
                   help="auto (default): incremental when the chain is valid, else full")
    p.add_argument("--compress", metavar="zstd[:LEVEL]|none", default=None,
                   help=f"chunk compression (default {DEFAULT_COMPRESS})")
    p.add_argument("--chunk-size", metavar="SIZE", default=None,
                   help="chunk size when this backup creates the repository (default 4M)")
    p.add_argument("--hash", choices=HASHES, default=None,
                   help=f"chunk hash when this backup creates the repository (default {DEFAULT_HASH}; "
                        "~3.5x faster to compute than sha256; existing repositories keep theirs)")
    p.add_argument("--scratch-dir", metavar="DIR", default=None,
                   help="private directory for the reverse delta and the NBD socket")
    p.add_argument("--qga", metavar="SOCKET", default=None, nargs="?", const="",
                   help="guest agent socket: freeze guest filesystems around the snapshot point "
                        "(with --libvirt: no SOCKET, libvirt reaches the agent)")
    p.add_argument("--no-trim", dest="trim", action="store_false", default=None,
                   help="do not discard stored chunks from the snapshot")
    p.add_argument("--readers", type=int, default=None, help="NBD connections reading in parallel")
    p.add_argument("--storers", type=int, default=None,
                   help="chunks stored in parallel (default 4; 16 on S3)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="label recorded in the restore point (repeatable)")
    p.add_argument("--verify", action="store_true", default=None,
                   help="deep-verify what this backup stored before committing it")
    p.add_argument("--audit-bitmap", type=float, default=None, metavar="PERCENT",
                   help="before an incremental, read PERCENT of the chunks the dirty bitmap calls clean "
                        "and compare them with the parent point (nothing is fetched from the "
                        "repository); any difference makes the disk's backup full, with the reason")
    p.add_argument("--from-export", metavar="FILE",
                   help="back up an export made on another host: FILE ('-': stdin) is the output of "
                        "'fleece export start --json' there (needs --vm; no --qmp, --drive)")
    add_client_tls_options(p)
    add_recorded_run(p, run)


def parse_size(text: str) -> int:
    """``4M`` → 4194304; plain numbers are bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if t and t[-1] in units:
            return int(t[:-1]) * units[t[-1]]
        return int(t)
    except ValueError:
        raise BadInput(f"not a size: {text!r} (examples: 4M, 1048576)") from None


def run(args: argparse.Namespace) -> int:
    """Parse, back up, report (and record the outcome in ``--metrics-file``)."""
    apply_config(args, CONFIG_KEYS, "backup")
    with recorded(args.metrics_file, "backup", args.repo or "", args.vm) as record:
        return _backup(args, record)


def backup_metrics(result: BackupResult) -> dict[str, float]:
    """The ``--metrics-file`` gauges of a backup."""
    disks = result.disks
    audits = [d.audit for d in disks if d.audit is not None]
    extra = {"fleece_backup_audit_mismatches": float(sum(a["mismatched"] for a in audits))} if audits else {}
    return {
        **extra,
        "fleece_backup_bytes_dirty": sum(d.stats.bytes_dirty for d in disks),
        "fleece_backup_bytes_read": sum(d.stats.bytes_read for d in disks),
        "fleece_backup_bytes_stored": sum(d.stats.bytes_stored for d in disks),
        # chunks, packs and the index of each disk, and the point
        "fleece_backup_objects_written": sum(d.stats.objects_written for d in disks) + 1,
    }


def _backup(args: argparse.Namespace, record: Run) -> int:
    if args.audit_bitmap is not None and not 0 < args.audit_bitmap <= 100:
        raise BadInput("--audit-bitmap PERCENT must be more than 0 and at most 100")
    tls = client_tls(args.tls_creds, args.tls_psk)
    if args.qmp and args.libvirt:
        raise BadInput("backup takes --qmp SOCKET or --libvirt DOMAIN, not both")
    if args.connect and not args.libvirt:
        raise BadInput("--connect URI goes with --libvirt DOMAIN")
    if args.from_export:
        if args.qmp or args.libvirt or args.drive or args.qga:
            raise BadInput("--from-export reads an export made elsewhere: drop --qmp, --libvirt, "
                           "--drive and --qga")
        if not args.vm:
            raise BadInput("backup --from-export needs --vm NAME")
        # Read once (it may be stdin); bad input is refused before the repository is touched.
        exported = read_export(args.from_export)
    elif tls is not None:
        raise BadInput("--tls-creds/--tls-psk are for --from-export (an nbds:// export on another host)")
    elif not args.qmp and not args.libvirt:
        raise BadInput("backup needs --qmp SOCKET or --libvirt DOMAIN (or qmp = … in --config)")
    elif not args.drive and not args.libvirt:
        raise BadInput("backup needs at least one --drive NAME")
    if args.qga == "" and not args.libvirt:
        raise BadInput("--qga needs the guest agent's SOCKET (only --libvirt reaches the agent itself)")
    if args.qga and args.libvirt:
        raise BadInput("with --libvirt, --qga takes no socket: libvirt talks to the guest agent")
    if not args.repo:
        raise BadInput("backup needs --repo URL")
    if len(set(args.drive)) != len(args.drive):
        raise BadInput("the same --drive is given twice")
    level = args.level or "auto"
    if level not in LEVELS:
        raise BadInput(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    compression = parse_compression(args.compress or DEFAULT_COMPRESS)
    chunk_size = check_chunk_size(parse_size(args.chunk_size) if args.chunk_size else DEFAULT_CHUNK_SIZE)
    settings = PipelineSettings(tls=tls)
    for name in ("readers", "storers"):
        value = getattr(args, name)
        if value is not None:
            if not 1 <= value <= 64:
                raise BadInput(f"--{name} must be between 1 and 64")
            setattr(settings, name, value)
    labels = dict(getattr(args, "labels", None) or {})
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadInput(f"--label wants KEY=VALUE, not {item!r}")
        labels[key] = value

    store = open_backend(args.repo, unsafe_locks=bool(args.unsafe_locks))
    backend = limited_backend(store, args)
    if args.storers is None:
        # S3 is latency-bound and wants more uploads in flight than a local disk.
        settings.storers = backend.preferred_concurrency or settings.storers
    # Readers probe (HEAD) and storers upload at once; + the lease heartbeat.
    backend.reserve_connections(settings.readers + settings.storers + 1)
    repo: Repository | Callable[[], Repository]
    try:
        repo = open_repository(args, backend)
    except NotARepository:
        if holds_objects(backend):
            # Another host may have created it since our look (a shared
            # bucket); if there is still no config, it is not ours to write into.
            repo = open_repository(args, backend)
        else:
            def repo() -> Repository:
                return Repository.open_or_init(backend, chunk_size, compression,
                                               hash=args.hash or DEFAULT_HASH)

    req = BackupRequest(
        qmp=args.qmp or "",
        drives=list(args.drive),
        repo=repo,
        vm=args.vm,
        level=level,
        compression_level=compression,
        trim=True if args.trim is None else bool(args.trim),
        scratch_dir=Path(args.scratch_dir) if args.scratch_dir else None,
        qga=args.qga,
        labels={str(k): str(v) for k, v in labels.items()},
        settings=settings,
        verify=bool(args.verify),
        audit_bitmap=args.audit_bitmap,
        on_vm=lambda name: setattr(record, "vm", name),
        source=LibvirtSource(args.libvirt, args.connect) if args.libvirt else None,
    )
    if args.libvirt and args.qga is not None:
        req.qga = "libvirt"

    with progress_display() as progress:
        if args.from_export:
            result = run_async(run_backup_from_export(req, *exported, progress))
        else:
            # SIGTERM aborts like Ctrl-C; a dead earlier run's leftovers are cleaned first.
            with stop_guard(args, "the backup", STOPPED_NOTE):
                if args.qmp:
                    heal_before_backup(args.qmp)
                result = run_async(run_backup(req, progress, say))
    record.vm = result.point.vm
    record.values = backup_metrics(result)
    if args.json:
        out = result.as_dict()
        report = store.store_report()
        if report is not None:
            out["store"] = report
        print_json(out)
    else:
        print_summary(result)
    return 0


def print_summary(result: BackupResult) -> None:
    """The one-screen summary after a backup (why a disk is full was said on stderr, once)."""
    p = result.point
    print(f"restore point {p.id} of VM {p.vm}" + (f" (parent {p.parent})" if p.parent else ""))
    total_dirty = total_read = total_stored = 0
    for d in result.disks:
        s = d.stats
        total_dirty += s.bytes_dirty
        total_read += s.bytes_read
        total_stored += s.bytes_stored
        changed = "dirty" if d.level == "incremental" else "data"
        deltas = f", {s.deltas} deltas" if s.deltas else ""
        print(
            f"  {d.drive}: {d.level}, {human_size(d.size)} disk, {changed} {human_size(s.bytes_dirty)},"
            f" read {human_size(s.bytes_read)}, stored {human_size(s.bytes_stored)}"
            f" in {s.objects_written} objects; chunks {s.chunks_new} new, {s.chunks_reused} reused,"
            f" {s.chunks_zero} zero, {s.chunks_unchanged} unchanged{deltas}"
        )
    secs = max(result.seconds, 1e-9)
    pause = f", guest paused {result.pause_ms:.1f} ms" if result.pause_ms is not None else ""
    print(
        f"  total: dirty {human_size(total_dirty)}, read {human_size(total_read)},"
        f" stored {human_size(total_stored)} in {secs:.1f} s"
        f" ({human_size(total_read / secs)}/s){pause}"
    )
