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
import re
from pathlib import Path
from typing import Any

from fleece import __version__
from fleece.commands.common import open_repository, passphrase_source, print_json, say
from fleece.commands.metrics import Run
from fleece.errors import BadInput, FleeceError
from fleece.guest.boot import Expectations
from fleece.guest.machine import Shape, check_shape, parse_qemu_args
from fleece.repo.backends.base import ObjectMissing
from fleece.repo.format import keys
from fleece.repo.format.point import RestorePoint, parse_iso_utc
from fleece.repo.repository import Repository
from fleece.repo.verification import Verification, new_stamp, newest, store


class VerificationFailed(FleeceError):
    """The point was judged and failed (exit 1); the verdict is recorded."""


def add_options(p: argparse.ArgumentParser) -> None:
    """The options of ``--fsck`` and ``--boot``."""
    p.add_argument("--fsck", action="store_true",
                   help="check every partition table and file system of the point, read-only, in a "
                        "libguestfs appliance (never the host's kernel); records the verdict")
    p.add_argument("--boot", action="store_true",
                   help="boot the point in a throwaway QEMU (overlays, no network) straight from the "
                        "repository and judge it; records the verdict")
    p.add_argument("--drive", action="append", metavar="NAME",
                   help="--fsck: only this disk of the point (repeatable; default every disk)")
    p.add_argument("--unverified", action="store_true",
                   help="--fsck/--boot: every point of --vm without a verdict of this kind, newest first")
    p.add_argument("--limit", type=int, metavar="N", help="--unverified: at most N points")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="--boot: how long the guest has to be ready (default 600)")
    p.add_argument("--expect", action="append", nargs="+", metavar="WHAT",
                   help="--boot: 'agent' (the guest agent answers guest-ping) or 'serial REGEX' (the "
                        "console prints a match); repeatable. A point taken with --qga expects the agent")
    p.add_argument("--run", action="append", metavar="CMD", dest="run_commands",
                   help="--boot: once ready, run CMD in the guest through the agent (sh -c); it must "
                        "exit 0 (repeatable)")
    p.add_argument("--memory", type=int, default=1024, metavar="MIB", help="--boot: MiB (default 1024)")
    p.add_argument("--cpus", type=int, default=1, metavar="N", help="--boot: vCPUs (default 1)")
    p.add_argument("--machine", default="pc", metavar="TYPE", help="--boot: QEMU machine type (pc)")
    p.add_argument("--firmware", default="bios", choices=("bios", "uefi"),
                   help="--boot: bios (SeaBIOS) or uefi (OVMF); default bios")
    p.add_argument("--disk-bus", default="virtio", choices=("virtio", "scsi", "ide"),
                   help="--boot: how the disks attach (default virtio); the first disk boots")
    p.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                   help="--boot: more QEMU arguments (shell words; no network device)")
    p.add_argument("--report-dir", metavar="DIR", default=None,
                   help="--fsck/--boot: also write the report (JSON) there, with the console log and a "
                        "screendump (PNG) of --boot")
    p.add_argument("--scratch-dir", metavar="DIR", default=None,
                   help="--fsck/--boot: where the run's scratch directory goes "
                        "(default $TMPDIR or /var/tmp)")


GUEST_ONLY = ("drive", "unverified", "limit", "expect", "run_commands", "report_dir", "scratch_dir")


def wanted(args: argparse.Namespace) -> bool:
    """Whether the command line asks for a guest-level verification."""
    if not (args.fsck or args.boot) and any(getattr(args, k) for k in GUEST_ONLY):
        raise BadInput("--drive, --unverified, --limit, --expect, --run, --report-dir and --scratch-dir "
                       "go with --fsck or --boot")
    return bool(args.fsck or args.boot)


def check_args(args: argparse.Namespace) -> None:
    """Refuse combinations that make no sense, before anything is opened."""
    mode = "--boot" if args.boot else "--fsck"
    if args.fsck and args.boot:
        raise BadInput("--fsck and --boot are separate runs: give one")
    if args.deep or args.outer:
        raise BadInput(f"{mode} cannot be combined with --deep or --outer")
    if not args.vm:
        raise BadInput(f"{mode} needs --vm VM")
    if len(args.points) > 1 or (args.points and args.unverified):
        raise BadInput(f"{mode} checks one point (default: the VM's newest), or --unverified ones")
    if args.limit is not None and (not args.unverified or args.limit < 1):
        raise BadInput("--limit N (N ≥ 1) goes with --unverified")
    if args.drive and len(set(args.drive)) != len(args.drive):
        raise BadInput("a --drive is given twice")
    if args.boot and args.drive:
        raise BadInput("--boot boots every disk of the point; --drive goes with --fsck")
    if args.report_dir and not Path(args.report_dir).is_dir():
        raise BadInput(f"--report-dir {args.report_dir} is not a directory")
    if args.scratch_dir and not Path(args.scratch_dir).is_dir():
        raise BadInput(f"--scratch-dir {args.scratch_dir} is not a directory")
    if args.fsck and (args.expect or args.run_commands or args.qemu_arg):
        raise BadInput("--expect, --run and --qemu-arg go with --boot")
    if args.boot and not 1 <= args.timeout <= 86400:
        raise BadInput("--timeout must be between 1 and 86400 seconds")


def expectations(args: argparse.Namespace, point: RestorePoint) -> Expectations:
    """What makes this point's guest ready (``BadInput`` for a bad --expect or regex)."""
    expect = Expectations(agent=bool(point.stats.get("guest_agent")), run=args.run_commands or [],
                          timeout=args.timeout)
    for words in args.expect or []:
        if words == ["agent"]:
            expect.agent = True
        elif len(words) == 2 and words[0] == "serial":
            try:
                expect.serial = re.compile(words[1], re.M)
            except re.error as exc:
                raise BadInput(f"--expect serial {words[1]!r}: not a regular expression ({exc})") from None
        else:
            raise BadInput(f"--expect {' '.join(words)!r}: give 'agent' or 'serial REGEX'")
    if expect.run and not expect.agent:
        raise BadInput("--run needs the guest agent: add --expect agent (or take the point with --qga)")
    if not expect.agent and expect.serial is None:
        raise BadInput("nothing to judge the boot by: the point was not taken with --qga; give "
                       "--expect agent or --expect serial REGEX")
    return expect


def run(args: argparse.Namespace, record: Run) -> int:
    """Judge one point (or the unverified ones); record and print each verdict; exit 1 (one line)
    when one fails."""
    check_args(args)
    kind = "boot" if args.boot else "fsck"
    record.command = f"verify-{kind}"
    shape = None
    if args.boot:
        shape = Shape(memory=args.memory, cpus=args.cpus, machine=args.machine, firmware=args.firmware,
                      bus=args.disk_bus, extra=parse_qemu_args(args.qemu_arg))
    source = passphrase_source(args)
    passphrase = source() if source is not None else None
    repo = open_repository(args, passphrase=passphrase)
    if not repo.point_refs(args.vm):
        raise BadInput(f"no restore points of VM {args.vm} in {repo.url}")
    if args.unverified:
        points = [repo.load_point(vm, pid) for vm, pid in reversed(repo.point_refs(args.vm))
                  if not _has_kind(repo, args.vm, pid, kind)][: args.limit]
    else:
        points = [repo.find_point(args.points[0] if args.points else "latest", args.vm)]
    plans = []
    for point in points:
        names = [d.name for d in point.disks]
        for drive in args.drive or []:
            if drive not in names:
                raise BadInput(f"point {point.id} has no disk {drive!r} (it has {', '.join(names)})")
        plans.append((point, expectations(args, point) if args.boot else None))
    if shape is not None:
        check_shape(shape)  # QEMU's own verdict on the flags, before anything starts
    if args.fsck:
        from fleece.guest.appliance import require

        require()
    secret = passphrase if repo.master is not None else None
    verdicts = []
    for point, expect in plans:
        if args.boot:
            assert shape is not None and expect is not None
            verdict = _boot(args, point, shape, expect, secret)
        else:
            verdict = _fsck(args, point, secret)
        verdicts.append((point, verdict, _store(args, repo, point, verdict)))
    return _finish(args, repo, verdicts, record)


def _has_kind(repo: Repository, vm: str, point_id: str, kind: str) -> bool:
    """Whether the point has a readable verdict of ``kind`` (any result)."""
    for key in repo.backend.list(keys.verification_prefix(vm, point_id)):
        try:
            if Verification.from_json(repo.backend.get(key), key).kind == kind:
                return True
        except (FleeceError, ObjectMissing):
            continue
    return False


def _fsck(args: argparse.Namespace, point: RestorePoint, passphrase: bytes | None) -> Verification:
    from fleece.guest.fsck import fsck_point

    done = fsck_point(args.repo, point, drives=args.drive, passphrase=passphrase,
                      scratch_parent=Path(args.scratch_dir) if args.scratch_dir else None, say=say)
    report = done.report
    problems = report.failures()
    summary = "fsck clean" if report.ok else "FAILED: " + "; ".join(problems)
    doc: dict[str, Any] = {**report.as_dict(), "accel": done.accel,
                           "appliance_seconds": round(done.appliance_seconds, 3)}
    return Verification(point.vm, point.id, "fsck", report.ok, summary, seconds=done.seconds,
                        fleece_version=__version__, report=doc)


def _boot(args: argparse.Namespace, point: RestorePoint, shape: Shape, expect: Expectations,
          passphrase: bytes | None) -> Verification:
    from fleece.guest.boot import boot_point

    stamp = new_stamp()
    screen = Path(args.report_dir) / f"{point.vm}-{point.id}-{stamp}.png" if args.report_dir else None
    done = boot_point(args.repo, point, shape, expect, passphrase=passphrase,
                      scratch_parent=Path(args.scratch_dir) if args.scratch_dir else None,
                      screen=screen, say=say)
    summary = f"booted in {done.time_to_ready:.0f} s" if done.ok and done.time_to_ready is not None \
        else f"FAILED: {done.reason}"
    return Verification(point.vm, point.id, "boot", done.ok, summary, stamp=stamp, seconds=done.seconds,
                        time_to_ready=done.time_to_ready, fleece_version=__version__,
                        report=done.report)


def _store(args: argparse.Namespace, repo: Repository, point: RestorePoint, verdict: Verification) -> bool:
    """Record the verdict in the repository (and in --report-dir); whether the point still exists."""
    if args.report_dir:
        path = Path(args.report_dir) / f"{point.vm}-{point.id}-{verdict.stamp}.json"
        path.write_bytes(verdict.to_json())
    stored = store(repo.backend, verdict)
    if not stored:
        say(f"point {point.id} was removed while it was verified; no verdict was recorded")
    return stored


def _as_json(point: RestorePoint, verdict: Verification, stored: bool) -> dict[str, Any]:
    return {"mode": verdict.kind, "vm": point.vm, "point": point.id, "ok": verdict.ok,
            "summary": verdict.summary, "seconds": round(verdict.seconds, 3),
            "time_to_ready": None if verdict.time_to_ready is None else round(verdict.time_to_ready, 3),
            "record": verdict.key if stored else None, **verdict.report}


def _finish(args: argparse.Namespace, repo: Repository,
            verdicts: list[tuple[RestorePoint, Verification, bool]], record: Run) -> int:
    """Export metrics, print, and fail with one line when a point failed."""
    failed = [(p, v) for p, v, _ in verdicts if not v.ok]
    record.failed = bool(failed)
    record.values = {"fleece_verify_result": 0.0 if failed else 1.0,
                     "fleece_verify_points_checked": float(len(verdicts))}
    if verdicts:
        last = verdicts[0][1]
        record.values["fleece_verify_seconds"] = last.seconds
        if last.time_to_ready is not None:
            record.values["fleece_verify_time_to_ready_seconds"] = last.time_to_ready
    newest_ok = newest_verified_point(repo, args.vm)
    if newest_ok is not None:
        record.values["fleece_verify_newest_verified_point_timestamp_seconds"] = newest_ok
    if args.json:
        if args.unverified:
            print_json({"mode": "boot" if args.boot else "fsck", "ok": not failed,
                        "points": [_as_json(p, v, s) for p, v, s in verdicts]})
        else:
            print_json(_as_json(*verdicts[0]))
    else:
        for point, verdict, _ in verdicts:
            print_report(point, verdict)
        if args.unverified:
            print(f"{len(verdicts)} unverified point{'s' if len(verdicts) != 1 else ''} of VM {args.vm} "
                  f"judged ({'boot' if args.boot else 'fsck'}): {len(failed)} failed")
    if failed:
        point, verdict = failed[0]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise VerificationFailed(f"point {point.id} of VM {point.vm}: {verdict.summary}{more}")
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
    if verdict.kind == "boot":
        _print_boot(rep, verdict)
    print(f"{verdict.summary} ({verdict.seconds:.1f} s)")


def _print_boot(rep: dict[str, Any], verdict: Verification) -> None:
    shape = rep.get("shape", {})
    print(f"  machine: {shape.get('machine')}, {shape.get('firmware')}, {shape.get('memory')} MiB, "
          f"{shape.get('cpus')} CPU, {rep.get('accel', '?').upper()}, no network")
    if verdict.time_to_ready is not None:
        print(f"  ready after {verdict.time_to_ready:.1f} s")
    agent = rep.get("agent")
    if agent:
        osinfo = agent.get("osinfo") or {}
        name = osinfo.get("pretty-name") or osinfo.get("name") or "no OS info"
        print(f"  guest agent answered ({name}, kernel {osinfo.get('kernel-release', '?')})")
    if rep.get("serial_match"):
        print(f"  console matched: {rep['serial_match']!r}")
    for c in rep.get("commands", []):
        error = f" ({c['error']})" if c.get("error") else ""
        print(f"  --run {c['command']!r}: exit {c.get('exitcode')}{error}")
        for stream in ("stdout", "stderr"):
            if c.get(stream):
                print("      " + c[stream].rstrip("\n").replace("\n", "\n      "))
    for disk, n in rep.get("bytes_read", {}).items():
        errors = rep.get("read_errors", {}).get(disk, 0)
        print(f"  {disk}: the guest read {n} bytes, {errors} read errors")
    if rep.get("screendump"):
        print(f"  screendump: {rep['screendump']}")
    if not verdict.ok:
        tail = rep.get("console", "").strip().splitlines()[-15:]
        if tail:
            print("  console (last lines):")
            for line in tail:
                print(f"      {line}")
