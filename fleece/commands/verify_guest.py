"""The other half of ``fleece verify``: ``--fsck`` and ``--boot``, judged from the repository.

Both serve the point read-only from the repository (``fleece.guest``), judge
it, store the verdict as a verification record beside the point
(``fleece.repo.verification``), print the report (or ``--json``) and exit 1
with the reason in one line when the point fails. Bad input — a missing
point, VM or drive, a bad regex, an unusable ``--qemu-arg`` — is refused
(exit 2) before anything starts.
"""

from __future__ import annotations

import argparse
from typing import Any

from fleece.commands.common import open_repository, passphrase_source, print_json, say
from fleece.commands.metrics import Run
from fleece.errors import BadInput, FleeceError
from fleece.repo.format.point import RestorePoint, parse_iso_utc
from fleece.repo.repository import Repository
from fleece.repo.verification import Verification, newest, store


class VerificationFailed(FleeceError):
    """The point was judged and failed (exit 1); the verdict is recorded."""


def add_options(p: argparse.ArgumentParser) -> None:
    """The options of ``--fsck`` and ``--boot``."""
    p.add_argument("--fsck", action="store_true",
                   help="check every partition table and file system of the point, read-only, in a "
                        "libguestfs appliance (never the host's kernel); records the verdict")
    p.add_argument("--drive", action="append", metavar="NAME",
                   help="--fsck: only this disk of the point (repeatable; default every disk)")
    p.add_argument("--scratch-dir", metavar="DIR", default=None,
                   help="--fsck/--boot: where the run's scratch directory goes "
                        "(default $TMPDIR or /var/tmp)")


def wanted(args: argparse.Namespace) -> bool:
    """Whether the command line asks for a guest-level verification."""
    return bool(args.fsck)


def check_args(args: argparse.Namespace) -> None:
    """Refuse combinations that make no sense, before anything is opened."""
    if args.deep or args.outer:
        raise BadInput("--fsck cannot be combined with --deep or --outer")
    if not args.vm:
        raise BadInput("--fsck needs --vm VM")
    if len(args.points) > 1:
        raise BadInput("--fsck checks one point (default: the VM's newest)")
    if args.drive and len(set(args.drive)) != len(args.drive):
        raise BadInput("a --drive is given twice")


def run(args: argparse.Namespace, record: Run) -> int:
    """Judge one point; record and print the verdict; exit 1 (one line) when it fails."""
    check_args(args)
    source = passphrase_source(args)
    passphrase = source() if source is not None else None
    repo = open_repository(args, passphrase=passphrase)
    if not repo.point_refs(args.vm):
        raise BadInput(f"no restore points of VM {args.vm} in {repo.url}")
    point = repo.find_point(args.points[0] if args.points else "latest", args.vm)
    names = [d.name for d in point.disks]
    for drive in args.drive or []:
        if drive not in names:
            raise BadInput(f"point {point.id} has no disk {drive!r} (it has {', '.join(names)})")
    record.command = "verify-fsck"
    verdict = _fsck(args, repo, point, passphrase if repo.master is not None else None)
    return _finish(args, repo, point, verdict, record)


def _fsck(args: argparse.Namespace, repo: Repository, point: RestorePoint,
          passphrase: bytes | None) -> Verification:
    from pathlib import Path

    from fleece.guest.fsck import fsck_point

    done = fsck_point(args.repo, point, drives=args.drive, passphrase=passphrase,
                      scratch_parent=Path(args.scratch_dir) if args.scratch_dir else None, say=say)
    report = done.report
    problems = report.failures()
    summary = "fsck clean" if report.ok else "FAILED: " + "; ".join(problems)
    doc: dict[str, Any] = {**report.as_dict(), "accel": done.accel,
                           "appliance_seconds": round(done.appliance_seconds, 3)}
    return Verification(point.vm, point.id, "fsck", report.ok, summary, seconds=done.seconds,
                        report=doc)


def _finish(args: argparse.Namespace, repo: Repository, point: RestorePoint, verdict: Verification,
            record: Run) -> int:
    """Store the record, export metrics, print, and fail with one line when the point failed."""
    stored = store(repo.backend, verdict)
    record.failed = not verdict.ok
    record.values = {"fleece_verify_result": 1.0 if verdict.ok else 0.0,
                     "fleece_verify_seconds": verdict.seconds}
    if verdict.time_to_ready is not None:
        record.values["fleece_verify_time_to_ready_seconds"] = verdict.time_to_ready
    newest_ok = newest_verified_point(repo, point.vm)
    if newest_ok is not None:
        record.values["fleece_verify_newest_verified_point_timestamp_seconds"] = newest_ok
    if args.json:
        print_json({"mode": verdict.kind, "vm": point.vm, "point": point.id, "ok": verdict.ok,
                    "summary": verdict.summary, "seconds": round(verdict.seconds, 3),
                    "time_to_ready": verdict.time_to_ready,
                    "record": verdict.key if stored else None, **verdict.report})
    else:
        print_report(point, verdict)
    if not stored:
        say(f"point {point.id} was removed while it was verified; no verdict was recorded")
    if not verdict.ok:
        raise VerificationFailed(f"point {point.id} of VM {point.vm}: {verdict.summary}")
    return 0


def newest_verified_point(repo: Repository, vm: str) -> float | None:
    """Creation time (Unix seconds) of the VM's newest point whose newest verdict passed."""
    verdicts = newest(repo.backend, vm)
    good = sorted(pid for pid, v in verdicts.items() if v.ok)
    for vm_name, point_id in reversed(repo.point_refs(vm)):
        if point_id in good:
            try:
                return parse_iso_utc(repo.load_point(vm_name, point_id).created).timestamp()
            except (FleeceError, ValueError):
                continue
    return None


def print_report(point: RestorePoint, verdict: Verification) -> None:
    """The report for people: tables, file systems with findings, then the verdict."""
    rep = verdict.report
    print(f"point {point.id} of VM {point.vm}, {verdict.kind}")
    for t in rep.get("partition_tables", []):
        print(f"  {'ok' if t['ok'] else 'DAMAGED':7} partition table {t['device']} ({t['disk']}): "
              f"{t['type']}")
        if not t["ok"]:
            print("      " + t["findings"].replace("\n", "\n      "))
    for f in rep.get("filesystems", []):
        state = "clean" if f["clean"] else "not checked" if f["clean"] is None else "ERRORS"
        label = f" label {f['label']!r}" if f["label"] else ""
        uuid = f" uuid {f['uuid']}" if f["uuid"] else ""
        used = "" if f["used"] is None else f", {f['used']} used"
        print(f"  {state:11} {f['device']} ({f['disk']}) {f['type']}{label}{uuid}: "
              f"{f['size']} bytes{used}")
        if f["clean"] is False or f["clean"] is None:
            findings = f["findings"] if f["clean"] is False else f["findings"].splitlines()[0]
            print("      " + findings.replace("\n", "\n      "))
    if "appliance_seconds" in rep:
        print(f"  appliance ({rep['accel'].upper()}) ready in {rep['appliance_seconds']:.1f} s")
    print(f"{verdict.summary} ({verdict.seconds:.1f} s)")
