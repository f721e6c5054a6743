"""What client-side encryption costs: full backups and restores, encrypted vs plain, same disk.

The disk of scripts/bench-incremental (2 GiB, about 1 GiB of real files and
incompressible data) in a running QEMU; per run, a full backup (default
settings) into a new plain repository and into new encrypted ones
(AES-256-GCM, ChaCha20-Poly1305), each followed by a restore of it to a file,
the three modes in a different order every run, whole processes; the median
of each, and the encrypted one as a ratio of the plain one (goal: at most
1.10 for backup and restore). ``scripts/bench`` prints the same rows
(:func:`encryption_rows`).

``--versus OTHER_FLEECE`` measures another build too, interleaved with this
one run by run (before/after on one machine under the same load), and prints
each build's ratios.

Usage: scripts/bench-encryption [--runs 3] [--keep] [--versus OTHER_FLEECE]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import FLEECE, VM, build_disk, end_work, print_table

PASSPHRASE = "bench passphrase"
MODES = ("none", "aes-256-gcm", "chacha20-poly1305")
GOAL = "<= 1.10"


CPU: dict[str, list[float]] = {}
"""CPU seconds (user + system) of each measured process, by what it was: on a shared host the
wall time follows the load, the CPU time much less."""


def timed_fleece(*args: str | Path, mode: str, fleece: str = FLEECE, cpu_as: str | None = None) -> float:
    """Seconds a whole ``fleece`` process took (the passphrase in its environment unless ``mode``
    is ``none``: a passphrase given means an encrypted repository); its CPU seconds go to
    ``CPU[cpu_as]``."""
    env = {k: v for k, v in os.environ.items() if k != "FLEECE_PASSPHRASE"}
    if mode != "none":
        env["FLEECE_PASSPHRASE"] = PASSPHRASE
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([fleece, *map(str, args)], check=True, capture_output=True, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cpu_as is not None:
        CPU.setdefault(cpu_as, []).append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return wall


def encryption_rows(vm: VM, work: Path, runs: int,
                    builds: dict[str, str] | None = None) -> list[tuple[str, str, str, str]]:
    """Backup and restore, each cipher against plain: ``(measure, ratio, goal, notes)`` rows,
    for each of ``builds`` (name → fleece executable; this one alone by default)."""
    builds = builds or {"": FLEECE}
    backup_s: dict[tuple[str, str], list[float]] = {(b, m): [] for b in builds for m in MODES}
    restore_s: dict[tuple[str, str], list[float]] = {(b, m): [] for b in builds for m in MODES}
    for run in range(runs):
        for mode in MODES[run % len(MODES):] + MODES[: run % len(MODES)]:  # rotate the order
            for build, fleece in builds.items():
                repo, out = work / f"repo-enc-{mode}", work / "restore-enc.raw"
                shutil.rmtree(repo, ignore_errors=True)
                timed_fleece("init", "--repo", repo, "--encryption", mode, mode=mode, fleece=fleece)
                backup_s[build, mode].append(timed_fleece("backup", "--qmp", vm.qmp, "--drive", "vda",
                                                          "--repo", repo, "--level", "full", mode=mode,
                                                          fleece=fleece,
                                                          cpu_as=f"{build}full backup {mode}"))
                restore_s[build, mode].append(timed_fleece("restore", "--repo", repo, "latest", "-o", out,
                                                           "--force", mode=mode, fleece=fleece,
                                                           cpu_as=f"{build}restore {mode}"))
                out.unlink()
                shutil.rmtree(repo)
    rows = []
    for build in builds:
        for what, times in (("full backup", backup_s), ("restore", restore_s)):
            plain_runs = times[build, "none"]
            plain = statistics.median(plain_runs)
            plain_cpu = statistics.median(CPU[f"{build}{what} none"])
            for mode in MODES[1:]:
                t = statistics.median(times[build, mode])
                cpu = statistics.median(CPU[f"{build}{what} {mode}"])
                rows.append((f"{build}{what}, {mode} / plain", f"{t / plain:.2f}", GOAL,
                             f"{t:.2f} s vs {plain:.2f} s (runs: "
                             f"{', '.join(f'{x:.2f}' for x in times[build, mode])} / "
                             f"{', '.join(f'{x:.2f}' for x in plain_runs)}); CPU of fleece "
                             f"{cpu / plain_cpu:.2f}x ({cpu:.2f} s vs {plain_cpu:.2f} s)"))
    return rows


def main() -> None:
    """Build the disk, run the VM, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--data", default="/usr/lib/x86_64-linux-gnu")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--versus", metavar="FLEECE", help="another fleece build, measured interleaved")
    args = ap.parse_args()
    builds = {"this: ": FLEECE, "versus: ": args.versus} if args.versus else None
    work = Path(tempfile.mkdtemp(prefix="fleece-bench-enc."))
    vm = None
    try:
        print(f"bench-encryption: building the disk in {work} ...", file=sys.stderr)
        vm = VM(work, build_disk(work, Path(args.data), "2G", 384), "enc")
        rows = encryption_rows(vm, work, args.runs, builds)
    finally:
        if vm is not None:
            vm.stop()
        end_work("bench-encryption", work, args.keep)
    print_table(rows, widths=(52, 7, 7),
                title=f"fleece encryption bench on {os.cpu_count()} cores, {args.runs} runs each, medians")


if __name__ == "__main__":
    main()
