"""``fleece verify``: prove that restore points still restore (exit 1 on any damage)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from fleece.commands import verify_guest
from fleece.commands.common import (
    add_recorded_run,
    add_repo_option,
    human_size,
    open_repository,
    print_json,
)
from fleece.commands.metrics import Run, recorded
from fleece.commands.progress import progress_display
from fleece.errors import BadInput
from fleece.maintenance.verify import DEFAULT_WORKERS, VerifyReport, resolve_points, verify_points
from fleece.repo.backends.url import open_backend


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``verify`` command."""
    p = subparsers.add_parser(
        "verify", help="check that restore points are complete and undamaged")
    add_repo_option(p)
    p.add_argument("points", nargs="*", metavar="POINT",
                   help="point ids, unique prefixes or 'latest' (default: every point)")
    p.add_argument("--vm", metavar="NAME", help="only this VM's points")
    p.add_argument("--deep", action="store_true",
                   help="fetch, decode and hash every chunk (default: check that they exist)")
    p.add_argument("--outer", action="store_true",
                   help="encrypted repository, no key needed: check that every sealed object is "
                        "whole (its outer checksum) — a job for the storage side")
    verify_guest.add_options(p)
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, metavar="N",
                   help=f"chunks checked in parallel (default {DEFAULT_WORKERS})")
    add_recorded_run(p, run)


def run(args: argparse.Namespace) -> int:
    """Verify; 0 when everything holds, 1 when anything is damaged, 2 for bad input."""
    with recorded(args.metrics_file, "verify", args.repo, args.vm) as record:
        return _verify(args, record)


def _verify(args: argparse.Namespace, record: Run) -> int:
    if not 1 <= args.workers <= 256:
        raise BadInput("--workers must be between 1 and 256")
    if verify_guest.wanted(args):
        return verify_guest.run(args, record)
    if args.drive or args.scratch_dir:
        raise BadInput("--drive and --scratch-dir go with --fsck")
    if args.outer:
        if args.deep or args.points or args.vm:
            raise BadInput("--outer checks every object and takes no points, --vm or --deep")
        return run_outer(args)
    repo = open_repository(args)
    refs = resolve_points(repo, args.points, args.vm)
    with progress_display() as progress:
        report = verify_points(repo, refs, deep=args.deep, workers=args.workers,
                               progress=progress)
    record.failed = not report.ok
    record.values = {"fleece_verify_points_checked": len(report.points),
                     "fleece_verify_damaged_points": sum(not p.ok for p in report.points),
                     "fleece_verify_bytes_checked": report.bytes_checked}
    if args.json:
        print_json(report.as_dict())
    else:
        print_report(report)
    return 0 if report.ok else 1


def run_outer(args: argparse.Namespace) -> int:
    """Check every sealed object's outer checksum without the key; exit 1 if any fails."""
    from fleece.repo.outer import check_outer_checksums

    report = check_outer_checksums(open_backend(args.repo), workers=args.workers)
    if args.json:
        print_json(report)
    else:
        for key in report["damaged"]:
            print(f"DAMAGED  {key}")
        print(f"{report['objects_checked']} sealed objects checked without the key "
              f"({human_size(report['bytes_checked'])}); {len(report['damaged'])} damaged")
    return 0 if report["ok"] else 1


def print_report(report: VerifyReport) -> None:
    """One line per point, one indented line per damage, then a summary."""
    for p in report.points:
        locked = "" if p.lock_until is None else f"  locked until {_iso(p.lock_until)}"
        print(f"{'ok' if p.ok else 'DAMAGED'}  {p.id}  {p.vm}{locked}")
        for d in p.damage:
            print(f"    {d.describe()}")
    damaged = sum(not p.ok for p in report.points)
    secs = max(report.seconds, 1e-9)
    rate = f" ({human_size(report.bytes_checked / secs)}/s)" if report.deep else ""
    print(f"{len(report.points)} point{'s' if len(report.points) != 1 else ''} verified"
          f"{' deep' if report.deep else ''}: {report.chunks_checked} chunks, "
          f"{human_size(report.bytes_checked)} hashed in {secs:.1f} s{rate}; "
          f"{damaged} damaged")
    if report.object_lock is not None:
        horizon = report.lock_horizon
        print(f"object lock ({report.object_lock['mode']}, {report.object_lock['days']} days): "
              + ("no object could be read" if horizon is None else
                 f"every object these points need is locked until at least {_iso(horizon)}"))


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
