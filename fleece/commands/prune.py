"""``fleece prune``: remove the restore points a retention policy does not keep."""

from __future__ import annotations

import argparse

from fleece.commands.backup import CONFIG_KEYS as BACKUP_KEYS
from fleece.commands.common import (
    add_recorded_run,
    add_repo_option,
    open_repository,
    print_json,
)
from fleece.commands.config import apply_config
from fleece.commands.metrics import Run, recorded
from fleece.errors import BadInput
from fleece.maintenance.prune import PruneReport, prune
from fleece.maintenance.retention import CALENDAR_RULES, Policy, parse_duration

RULES = ("last", *CALENDAR_RULES)
# A per-VM config file also holds the backup's settings: accept, ignore them.
CONFIG_KEYS: dict[str, type] = {
    **BACKUP_KEYS, **{f"keep_{r}": int for r in RULES}, "keep_within": str,
}


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {n}")
    return n


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``prune`` to the command line."""
    p = sub.add_parser("prune", help="remove restore points that no --keep-* rule keeps")
    p.add_argument("--config", metavar="FILE", help="read settings from a TOML file ([prune] table)")
    add_repo_option(p, required=False)
    p.add_argument("--vm", metavar="NAME", help="only this VM's points (default: every VM's)")
    p.add_argument("--keep-last", type=_count, default=None, metavar="N", help="keep the N newest points")
    for rule, period in (("hourly", "hours"), ("daily", "days"), ("weekly", "ISO weeks"),
                         ("monthly", "months"), ("yearly", "years")):
        p.add_argument(f"--keep-{rule}", type=_count, default=None, metavar="N",
                       help=f"keep the newest point of each of the last N {period} that have one")
    p.add_argument("--keep-within", metavar="DURATION", default=None,
                   help="keep every point younger than DURATION (e.g. 36h, 7d)")
    p.add_argument("--dry-run", action="store_true", help="show what would be removed; remove nothing")
    add_recorded_run(p, run)


def run(args: argparse.Namespace) -> int:
    """Parse the policy, prune, report (and record the outcome in ``--metrics-file``)."""
    apply_config(args, CONFIG_KEYS, "prune")
    metrics = None if args.dry_run else args.metrics_file
    with recorded(metrics, "prune", args.repo or "", args.vm) as record:
        return _prune(args, record)


def _prune(args: argparse.Namespace, record: Run) -> int:
    if not args.repo:
        raise BadInput("prune needs --repo URL (or repo = … in --config)")
    policy = Policy(
        **{r: getattr(args, f"keep_{r}") or 0 for r in RULES},
        within=parse_duration(args.keep_within) if args.keep_within else None,
    )
    if policy.empty:
        raise BadInput("prune needs at least one --keep-* rule with a count of 1 or more "
                       "(or --keep-within); nothing was removed")
    repo = open_repository(args)

    report = prune(repo, policy, vm=args.vm, dry_run=args.dry_run)
    record.values = {"fleece_prune_points_kept": sum(len(v.kept) for v in report.vms),
                     "fleece_prune_points_removed": sum(len(v.removed) for v in report.vms)}
    if args.json:
        print_json(report.as_dict())
    else:
        print_report(report)
    return 0


def print_report(report: PruneReport) -> None:
    """Per VM, one line per point: kept and why, or removed."""
    verb = "would remove" if report.dry_run else "removed"
    removed = kept = 0
    for v in report.vms:
        print(f"VM {v.vm}:" + (f" skipped: {v.skipped}" if v.skipped else ""))
        for d in v.decisions:
            if d.keep:
                print(f"  keep    {d.point_id}  ({', '.join(d.reasons)})")
            else:
                print(f"  {'remove' if report.dry_run else 'removed'} {d.point_id}")
        removed += len(v.removed)
        kept += len(v.kept)
    print(f"{verb} {removed} point{'s' if removed != 1 else ''}, kept {kept}"
          + ("; run fleece gc to free their chunks" if removed and not report.dry_run else ""))
