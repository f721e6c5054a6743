"""``fleece backup``: one restore point of a running VM into a repository."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from fleece.backup import LEVELS, BackupRequest, BackupResult, run_backup
from fleece.codec import HASHES, parse_compression
from fleece.commands.common import add_json_option, add_repo_option, human_size, print_json, run
from fleece.commands.config import apply_config
from fleece.commands.progress import progress_display
from fleece.errors import BadInput
from fleece.pipeline import PipelineSettings
from fleece.repo.repository import Repository, check_chunk_size
from fleece.repo.url import open_backend

DEFAULT_CHUNK_SIZE = 4 << 20
DEFAULT_COMPRESS = "zstd:3"
DEFAULT_HASH = "blake3"
"""New repositories name chunks by BLAKE3: 3.5x cheaper than sha256 on the backup's hot path."""

CONFIG_KEYS: dict[str, type] = {
    "qmp": str, "drive": list, "repo": str, "vm": str, "level": str, "compress": str,
    "chunk_size": str, "hash": str, "scratch_dir": str, "qga": str, "readers": int, "storers": int,
    "trim": bool, "labels": dict, "verify": bool,
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``backup`` to the command line."""
    p = sub.add_parser("backup", help="take a full or incremental restore point of a running VM")
    p.add_argument("--config", metavar="FILE", help="read settings from a TOML file (see configs/)")
    p.add_argument("--qmp", metavar="SOCKET", help="QEMU's QMP unix socket path or HOST:PORT")
    p.add_argument("--drive", action="append", default=[], metavar="NAME",
                   help="disk to back up: device id, node name or block backend name (repeatable)")
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
    p.add_argument("--qga", metavar="SOCKET", default=None,
                   help="guest agent socket: freeze guest filesystems around the snapshot point")
    p.add_argument("--no-trim", dest="trim", action="store_false", default=None,
                   help="do not discard stored chunks from the snapshot")
    p.add_argument("--readers", type=int, default=None, help="NBD connections reading in parallel")
    p.add_argument("--storers", type=int, default=None,
                   help="chunks stored in parallel (default 4; 16 on S3)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="label recorded in the restore point (repeatable)")
    p.add_argument("--verify", action="store_true", default=None,
                   help="deep-verify what this backup stored before committing it")
    add_json_option(p)
    p.set_defaults(func=cmd_backup)


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


def cmd_backup(args: argparse.Namespace) -> int:
    """Parse, back up, report."""
    apply_config(args, CONFIG_KEYS, "backup")
    if not args.qmp:
        raise BadInput("backup needs --qmp SOCKET (or qmp = … in --config)")
    if not args.drive:
        raise BadInput("backup needs at least one --drive NAME")
    if not args.repo:
        raise BadInput("backup needs --repo URL")
    if len(set(args.drive)) != len(args.drive):
        raise BadInput("the same --drive is given twice")
    level = args.level or "auto"
    if level not in LEVELS:
        raise BadInput(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    compression = parse_compression(args.compress or DEFAULT_COMPRESS)
    chunk_size = check_chunk_size(parse_size(args.chunk_size) if args.chunk_size else DEFAULT_CHUNK_SIZE)
    settings = PipelineSettings()
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

    backend = open_backend(args.repo)
    if args.storers is None:
        # S3 is latency-bound and wants more uploads in flight than a local disk.
        settings.storers = backend.preferred_concurrency or settings.storers
    # Readers probe (HEAD) and storers upload at once; + the lease heartbeat.
    backend.reserve_connections(settings.readers + settings.storers + 1)
    repo: Repository | Callable[[], Repository]
    try:
        repo = Repository.open(backend)
    except BadInput:
        if next(iter(backend.list("")), None) is not None:
            # Another host may have created it since our look (a shared
            # bucket); if there is still no config, it is not ours to write into.
            repo = Repository.open(backend)
        else:
            def repo() -> Repository:
                return Repository.open_or_init(backend, chunk_size, compression,
                                               hash=args.hash or DEFAULT_HASH)

    req = BackupRequest(
        qmp=args.qmp,
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
    )

    def say(line: str) -> None:
        sys.stderr.write(f"fleece: {line}\n")

    with progress_display() as progress:
        result = run(run_backup(req, progress, say))
    if args.json:
        print_json(result.as_dict())
    else:
        print_summary(result)
    return 0


def print_summary(result: BackupResult) -> None:
    """The one-screen summary after a backup."""
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
        if d.reason:
            print(f"    full because {d.reason}")
    secs = max(result.seconds, 1e-9)
    pause = f", guest paused {result.pause_ms:.1f} ms" if result.pause_ms is not None else ""
    print(
        f"  total: dirty {human_size(total_dirty)}, read {human_size(total_read)},"
        f" stored {human_size(total_stored)} in {secs:.1f} s"
        f" ({human_size(total_read / secs)}/s){pause}"
    )
