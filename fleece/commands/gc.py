"""``fleece gc``: delete the chunks and index objects no restore point needs."""

from __future__ import annotations

import argparse
import sys
import time

from fleece.commands.backup import CONFIG_KEYS as BACKUP_KEYS
from fleece.commands.common import (
    add_recorded_run,
    add_repo_option,
    human_size,
    open_repository,
    print_json,
)
from fleece.commands.config import apply_config
from fleece.commands.metrics import Run, recorded
from fleece.errors import BadInput, LockHeld
from fleece.maintenance.gc import DEFAULT_GRACE, GcReport, collect_garbage
from fleece.maintenance.retention import format_duration, parse_duration

CONFIG_KEYS: dict[str, type] = {**BACKUP_KEYS, "grace": str, "wait": str}
POLL_SECONDS = 10.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``gc`` to the command line."""
    p = sub.add_parser("gc", help="delete chunks that no restore point names")
    p.add_argument("--config", metavar="FILE", help="read settings from a TOML file ([gc] table)")
    add_repo_option(p, required=False)
    p.add_argument("--dry-run", action="store_true", help="report what would be deleted; delete nothing")
    p.add_argument("--grace", metavar="DURATION", default=None,
                   help="spare index objects without a point younger than this "
                        f"(default {format_duration(DEFAULT_GRACE)})")
    p.add_argument("--wait", metavar="DURATION", default=None,
                   help="while backups (or another gc) hold their locks, retry for up to DURATION")
    add_recorded_run(p, run)


def run(args: argparse.Namespace) -> int:
    """Collect garbage, waiting for running backups if asked to; report (and record it)."""
    apply_config(args, CONFIG_KEYS, "gc")
    metrics = None if args.dry_run else args.metrics_file
    with recorded(metrics, "gc", args.repo or "") as record:
        return _gc(args, record)


def _gc(args: argparse.Namespace, record: Run) -> int:
    if not args.repo:
        raise BadInput("gc needs --repo URL (or repo = … in --config)")
    grace = parse_duration(args.grace) if args.grace else DEFAULT_GRACE
    deadline = time.monotonic() + (parse_duration(args.wait).total_seconds() if args.wait else 0)
    repo = open_repository(args)
    told = False
    pause = 1.0  # short at first (a prune ends in seconds), then every POLL_SECONDS
    while True:
        try:
            report = collect_garbage(repo, dry_run=args.dry_run, grace=grace)
            break
        except LockHeld as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            if not told:
                sys.stderr.write(f"fleece: waiting up to {format_duration(parse_duration(args.wait))}:"
                                 f" {exc}\n")
                told = True
            time.sleep(min(pause, left))
            pause = min(2 * pause, POLL_SECONDS)
    record.values = {"fleece_gc_objects_deleted": report.chunks_deleted + report.indexes_deleted,
                     "fleece_gc_bytes_freed": report.bytes_freed,
                     "fleece_gc_chunks_kept": report.chunks_kept}
    if args.json:
        print_json(report.as_dict())
    else:
        print_report(report)
    return 0


def print_report(report: GcReport) -> None:
    """Two lines: what was deleted and freed, what was kept."""
    would = "would delete" if report.dry_run else "deleted"
    packs = f", {report.packs_deleted} packs" if report.packs_deleted else ""
    print(f"gc {would} {report.chunks_deleted} chunks{packs} and {report.indexes_deleted} orphan indexes, "
          f"{human_size(report.bytes_freed)}{' would be' if report.dry_run else ''} freed "
          f"in {report.seconds:.1f} s")
    points = f"{report.points} restore point" + ("" if report.points == 1 else "s")
    kept_packs = f" and {report.packs_kept} packs" if report.packs_kept else ""
    print(f"kept {report.chunks_kept} chunks{kept_packs} named by {points}"
          + (f" and {report.indexes_spared} recent orphan indexes" if report.indexes_spared else ""))
    if report.objects_locked:
        print(f"left {report.objects_locked} unreferenced objects that Object Lock still protects; "
              "a gc after their lock ends deletes them")
    if report.running_backups:
        print(f"note: backups of {', '.join(report.running_backups)} are running; gc would wait "
              "for them and spare their chunks")
