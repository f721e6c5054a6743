"""What client-side encryption costs: full backups and restores, encrypted vs plain, same disk.

The disk of scripts/bench-incremental (2 GiB, about 1 GiB of real files and
incompressible data) in a running QEMU; full backups (default settings) into
a plain repository and into encrypted ones (AES-256-GCM, ChaCha20-Poly1305),
alternated and repeated, whole processes; the median of each, and the
encrypted one as a ratio of the plain one (goal: at most 1.10). Then a
restore of each.

Usage: scripts/bench-encryption [--runs 3] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import FLEECE, VM, build_disk, end_work

PASSPHRASE = "bench passphrase"


def timed_fleece(*args: str | Path, mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "FLEECE_PASSPHRASE"}
    if mode != "none":  # a passphrase given means an encrypted repository (fail closed)
        env["FLEECE_PASSPHRASE"] = PASSPHRASE
    t = time.perf_counter()
    subprocess.run([FLEECE, *map(str, args)], check=True, capture_output=True, env=env)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--data", default="/usr/lib/x86_64-linux-gnu")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleece-bench-enc."))
    vm = None
    modes = ["none", "aes-256-gcm", "chacha20-poly1305"]
    backup_s: dict[str, list[float]] = {m: [] for m in modes}
    restore_s: dict[str, float] = {}
    try:
        print(f"bench-encryption: building the disk in {work} ...", file=sys.stderr)
        vm = VM(work, build_disk(work, Path(args.data), "2G", 384), "enc")
        for _ in range(args.runs):
            for mode in modes:
                repo = work / f"repo-{mode}"
                shutil.rmtree(repo, ignore_errors=True)
                timed_fleece("init", "--repo", repo, "--encryption", mode, mode=mode)
                backup_s[mode].append(timed_fleece("backup", "--qmp", vm.qmp, "--drive", "vda",
                                                   "--repo", repo, "--level", "full", mode=mode))
        for mode in modes:
            out = work / "restore.raw"
            restore_s[mode] = timed_fleece("restore", "--repo", work / f"repo-{mode}", "latest",
                                           "-o", out, "--force", mode=mode)
            out.unlink()
    finally:
        if vm is not None:
            vm.stop()
        end_work("bench-encryption", work, args.keep)
    plain = statistics.median(backup_s["none"])
    print(f"fleece encryption bench on {os.cpu_count()} cores, {args.runs} runs each, medians\n")
    print(f"| {'measure':<44} | {'value':>7} | {'goal':<7} | notes")
    print(f"|{'-' * 46}|{'-' * 9}|{'-' * 9}|------")
    for mode in modes[1:]:
        t = statistics.median(backup_s[mode])
        print(f"| {'full backup, ' + mode + ' / plain':<44} | {t / plain:>7.2f} | {'<= 1.10':<7} | "
              f"{t:.2f} s vs {plain:.2f} s (runs: {', '.join(f'{x:.2f}' for x in backup_s[mode])} / "
              f"{', '.join(f'{x:.2f}' for x in backup_s['none'])})")
        print(f"| {'restore, ' + mode + ' / plain':<44} | {restore_s[mode] / restore_s['none']:>7.2f} | "
              f"{'':<7} | {restore_s[mode]:.2f} s vs {restore_s['none']:.2f} s")


if __name__ == "__main__":
    main()
