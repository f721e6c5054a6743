"""``fleece copy``: replicate restore points to a second repository (e.g. local → S3)."""

from __future__ import annotations

import argparse
import sys

from fleece.commands.backup import CONFIG_KEYS as BACKUP_KEYS
from fleece.commands.common import (
    TO_PASSPHRASE_COMMAND_ENV,
    TO_PASSPHRASE_ENV,
    add_passphrase_option,
    add_recorded_run,
    human_size,
    limited_backend,
    open_repository,
    print_json,
    to_passphrase_source,
)
from fleece.commands.config import apply_config
from fleece.commands.metrics import Run, recorded
from fleece.errors import BadInput
from fleece.maintenance.replication import DEFAULT_WORKERS, copy_points, open_destination
from fleece.repo.backends.url import open_backend
from fleece.repo.format.point import RestorePoint
from fleece.repo.repository import Repository

CONFIG_KEYS: dict[str, type] = {**BACKUP_KEYS, "to_passphrase_file": str}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``copy`` to the command line."""
    p = sub.add_parser("copy", help="copy restore points, with all they need, to another repository")
    p.add_argument("--config", metavar="FILE",
                   help="read settings from a TOML file ([copy] table; unsafe_locks, limits, metrics)")
    p.add_argument("--from", dest="source", required=True, metavar="URL", help="the source repository")
    p.add_argument("--to", dest="dest", required=True, metavar="URL",
                   help="the destination repository (created like the source if the location is empty)")
    p.add_argument("--vm", metavar="NAME", help="only this VM's points")
    p.add_argument("points", nargs="*", metavar="POINT",
                   help="point ids, unique prefixes or 'latest' (default: every point)")
    add_passphrase_option(p)
    p.add_argument("--to-passphrase-file", metavar="FILE",
                   help="the destination's passphrase, when it is encrypted with another key than the "
                        f"source (or set {TO_PASSPHRASE_ENV} or {TO_PASSPHRASE_COMMAND_ENV})")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, metavar="N",
                   help=f"chunks copied in parallel (default {DEFAULT_WORKERS})")
    add_recorded_run(p, run)


def run(args: argparse.Namespace) -> int:
    """Resolve the points, copy what the destination lacks, report."""
    apply_config(args, CONFIG_KEYS, "copy")
    with recorded(args.metrics_file, "copy", args.dest, args.vm) as record:
        return _copy(args, record)


def _copy(args: argparse.Namespace, record: Run) -> int:
    if not 1 <= args.workers <= 64:
        raise BadInput("--workers must be between 1 and 64")
    if args.source.rstrip("/") == args.dest.rstrip("/"):
        raise BadInput("--from and --to name the same repository")
    source = open_repository(args, limited_backend(open_backend(args.source), args))
    points = _select(source, args.points, args.vm)
    dest_backend = limited_backend(open_backend(args.dest, unsafe_locks=bool(args.unsafe_locks)), args)
    if dest_backend.url == source.url:  # the same place, however it was spelled
        raise BadInput("--from and --to name the same repository")
    dest_backend.reserve_connections(args.workers + 2)
    dest = open_destination(source, dest_backend, to_passphrase_source(args),
                            f"its passphrase with {TO_PASSPHRASE_ENV}, --to-passphrase-file or "
                            f"{TO_PASSPHRASE_COMMAND_ENV}")

    def say(line: str) -> None:
        if not args.json:
            sys.stderr.write(f"fleece: {line}\n")

    report = copy_points(source, dest, points, workers=args.workers, say=say)
    record.values = {"fleece_copy_points_copied": len(report.copied),
                     "fleece_copy_bytes_copied": report.bytes_copied,
                     "fleece_copy_objects_written": report.objects_written}
    if args.json:
        print_json(report.as_dict())
    else:
        print(f"copied {len(report.copied)} point{'s' if len(report.copied) != 1 else ''} "
              f"({report.chunks_copied} chunks, {human_size(report.bytes_copied)} sent, "
              f"{report.chunks_present} chunks already there) in {report.seconds:.1f} s; "
              f"{len(report.skipped)} already in {dest.url}"
              + ("; chunks renamed for the destination (another key or hash)" if report.renamed else ""))
    return 0


def _select(source: Repository, wanted: list[str], vm: str | None) -> list[RestorePoint]:
    """The points named on the command line, or every point (of ``vm``)."""
    if not wanted:
        points = source.list_points(vm)
        if not points:
            raise BadInput(f"{source.url} holds no restore points"
                           + (f" of VM {vm}" if vm else "") + "; nothing was copied")
        return points
    found: dict[tuple[str, str], RestorePoint] = {}
    for name in wanted:
        point = source.find_point(name, vm)
        found[(point.vm, point.id)] = point
    return list(found.values())
