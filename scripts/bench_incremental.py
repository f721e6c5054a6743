"""Incrementals against the dirty bytes: what an incremental reads, stores and writes.

The scenario of the exact-incrementals work, as an operator meets it: a
2 GiB qcow2 disk holding about 1 GiB of data (an ext4 tree of real files
plus incompressible data) in a running QEMU; a full backup; then 320
scattered 64 KiB guest writes of random data (20 MiB, 1 % of the disk) and
an incremental. Then a chain of 12 more incrementals of random-size writes
(512 B … 1 MiB, unaligned, random data), and the restore of the last point
against the restore of the full. Every figure is for whole processes and is
printed as a ratio against the dirty bytes or the full's restore time.

``--fleece PATH`` runs another fleece (an older checkout's ``.venv/bin/fleece``)
through the same scenario, for before/after figures.

``--big-disk`` runs the metadata scenario instead (issue 29): a 1 TiB thin
qcow2 disk holding 256 MiB (64 scattered 4 MiB pieces of random data), a full
backup, 16 scattered 64 KiB random writes (1 MiB dirty) and an incremental,
once into a format-3 repository (paged indexes) and once, beside it, into a
format-2 repository (the whole index rewritten by every point) as the
reference. It prints the bytes each incremental really added to the
repository (every new object's size on disk) against the goal 1.1 x dirty +
64 KiB, the ``--json`` figures, wall time and peak RSS. ``--size`` changes the
disk size (``16T``).

Usage: scripts/bench-incremental [--fleece PATH] [--data DIR] [--keep] [--big-disk [--size 1T]]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import FLEECE, VM, MiB, build_disk, end_work, print_table, timed

GRANULE = 64 * 1024


def guest_write_random(vm: VM, work: Path, offset: int, length: int, rng: random.Random) -> None:
    """The guest writes ``length`` random bytes at ``offset``."""
    src = work / "w.bin"
    src.write_bytes(rng.randbytes(length))
    device = "/machine/peripheral/vda/virtio-backend"
    vm.mon.cmd_raw("human-monitor-command", {
        "command-line": f'qemu-io -d {device} "write -s {src} {offset} {length}"'})


def objects(repo: Path) -> set[str]:
    return {str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file() and "locks" not in p.parts}


def backup(fleece: str, vm: VM, repo: Path) -> tuple[float, dict[str, Any], int]:
    """(wall seconds, --json, objects written) of one backup."""
    before = objects(repo) if repo.exists() else set()
    t = time.perf_counter()
    p = subprocess.run([fleece, "backup", "--init", "--qmp", vm.qmp, "--drive", "vda", "--repo", str(repo),
                        "--json"], check=True, text=True, capture_output=True)
    wall = time.perf_counter() - t
    return wall, json.loads(p.stdout), len(objects(repo) - before)


def new_bytes(repo: Path, before: set[str]) -> int:
    """Bytes of every object in ``repo`` that was not in ``before`` (what a backup added)."""
    return sum((repo / k).stat().st_size for k in objects(repo) - before)


def backup_rss(fleece: str, vm: VM, repo: Path) -> tuple[float, dict[str, Any], int, int, int]:
    """(wall, --json, objects added, bytes added, peak RSS in bytes) of one backup."""
    before = objects(repo) if repo.exists() else set()
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", fleece, "backup", "--qmp", vm.qmp, "--drive",
                        "vda", "--repo", str(repo), "--json"], check=True, text=True,
                       capture_output=True)
    wall = time.perf_counter() - t
    rss = int(p.stderr.strip().splitlines()[-1]) * 1024
    return wall, json.loads(p.stdout), len(objects(repo) - before), new_bytes(repo, before), rss


def big_disk(args: argparse.Namespace, work: Path) -> list[tuple[str, str, str, str]]:
    """The metadata scenario of the module docstring; its table rows.

    Each format gets its own VM on its own copy of the scenario (same seed, so
    the same data and writes): a VM keeps one checkpoint, the last backup's.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fleece.repo.backends.file import FileBackend
    from fleece.repo.repository import Repository

    rows: list[tuple[str, str, str, str]] = []
    for fmt in (3, 2):
        rng = random.Random(20261207)
        image = work / f"big-{fmt}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), args.size], check=True)
        size = int(json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)],
                                             check=True, capture_output=True, text=True).stdout)
                   ["virtual-size"])
        vm = VM(work, image, f"big{fmt}")
        repo = work / f"repo-v{fmt}"
        try:
            for k in range(64):  # 256 MiB of data in 64 scattered 4 MiB pieces
                guest_write_random(vm, work, (k * (size // 64)) // (4 * MiB) * (4 * MiB), 4 * MiB, rng)
            Repository.init(FileBackend(repo), format=fmt)
            full = backup_rss(args.fleece, vm, repo)
            for g in rng.sample(range(size // GRANULE), 16):
                guest_write_random(vm, work, g * GRANULE, GRANULE, rng)
            dirty = 16 * GRANULE
            wall, doc, n, added, rss = backup_rss(args.fleece, vm, repo)
        finally:
            vm.stop()
        d = doc["disks"][0]
        label = "format 3 (paged index)" if fmt == 3 else "reference: format 2 (whole index)"
        rows += [
            (f"{label}: bytes added / dirty", f"{added / dirty:.2f}",
             f"<= {(1.1 * dirty + 64 * 1024) / dirty:.2f}" if fmt == 3 else "",
             f"{args.size} thin disk, {dirty / MiB:.0f} MiB dirty ({d['level']}); {added} bytes in "
             f"{n} new objects; --json bytes_stored {doc.get('bytes_stored', d['bytes_stored'])}, "
             f"bytes_metadata {doc.get('bytes_metadata', '-')}"),
            ("  incremental wall, whole process", f"{wall:.2f} s", "<= 1.0" if fmt == 3 else "", ""),
            ("  incremental peak RSS", f"{rss / MiB:.0f} MiB", "<= 256" if fmt == 3 else "",
             f"full: {full[4] / MiB:.0f} MiB peak, {full[0]:.2f} s, {full[3] / MiB:.1f} MiB added"),
        ]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big-disk", action="store_true", help="the metadata scenario (see above)")
    ap.add_argument("--size", default="1T", help="--big-disk: the thin disk's size (1T)")
    ap.add_argument("--fleece", default=FLEECE, help="the fleece command to measure")
    ap.add_argument("--data", default="/usr/lib/x86_64-linux-gnu")
    ap.add_argument("--random-mib", type=int, default=384,
                    help="incompressible data added to the tree (default: about 1 GiB of data in all)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleece-bench-inc."))
    rng = random.Random(20261130)
    vm = None
    rows: list[tuple[str, str, str, str]] = []
    if args.big_disk:
        try:
            rows = big_disk(args, work)
        finally:
            end_work("bench-incremental", work, args.keep)
        print_table(rows, (56, 9, 22), title=f"fleece metadata bench ({args.fleece}) on "
                    f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
        return
    try:
        print(f"bench-incremental: building the disk in {work} ...", file=sys.stderr)
        image = build_disk(work, Path(args.data), "2G", args.random_mib)
        vm = VM(work, image, "inc")
        repo = work / "repo"
        full_wall, full, full_objects = backup(args.fleece, vm, repo)
        f0 = full["disks"][0]
        size = f0["size"]
        rows.append(("full backup", f"{full_wall:.2f} s", "",
                     f"read {f0['bytes_read'] / MiB:.0f} MiB, stored {f0['bytes_stored'] / MiB:.0f} MiB "
                     f"in {full_objects} objects"))

        # -- 1 % scattered 64 KiB random writes -------------------------------------------------
        granules = rng.sample(range(size // GRANULE), size // 100 // GRANULE)
        for g in granules:
            guest_write_random(vm, work, g * GRANULE, GRANULE, rng)
        dirty = len(granules) * GRANULE
        wall, inc, n_objects = backup(args.fleece, vm, repo)
        d = inc["disks"][0]
        assert d["level"] == "incremental", d
        rows += [
            ("1 % scattered 64 KiB writes: bytes read / dirty", f"{d['bytes_read'] / dirty:.2f}", "<= 1.05",
             f"dirty {dirty / MiB:.1f} MiB ({len(granules)} writes of random data), "
             f"read {d['bytes_read'] / MiB:.1f} MiB"),
            ("  bytes stored / dirty", f"{d['bytes_stored'] / dirty:.2f}", "<= 1.1 (+1 MiB)",
             f"stored {d['bytes_stored'] / MiB:.1f} MiB"),
            ("  objects written", f"{n_objects}", f"<= {dirty // (8 * MiB) + 8}",
             "counted in the repository (chunks, packs, index pages, index, point)"),
            ("  wall time, whole process", f"{wall:.2f} s", "<= 1.0 (moonshot 0.3)", ""),
        ]

        # -- a chain of 12 incrementals of random-size writes -------------------------------------
        chain_read = chain_dirty_writes = 0
        for _ in range(12):
            for _ in range(rng.randint(20, 60)):
                length = rng.randint(1, 2048) * 512
                offset = rng.randrange(0, size - length) // 512 * 512
                guest_write_random(vm, work, offset, length, rng)
                chain_dirty_writes += length
            _, step, _ = backup(args.fleece, vm, repo)
            chain_read += step["disks"][0]["bytes_read"]
        last = step["point"]
        t_full, _ = timed(args.fleece, "restore", "--repo", repo, full["point"], "-o", work / "full.raw")
        t_last, _ = timed(args.fleece, "restore", "--repo", repo, last, "-o", work / "last.raw")
        for name in ("full.raw", "last.raw"):
            (work / name).unlink()
        rows.append(("restore of the 13th incremental / restore of the full", f"{t_last / t_full:.2f}",
                     "<= 1.5", f"full {t_full:.2f} s, last {t_last:.2f} s; the chain's incrementals read "
                     f"{chain_read / MiB:.0f} MiB for {chain_dirty_writes / MiB:.0f} MiB of guest writes"))
        try:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from fleece.repo.backends.file import FileBackend
            from fleece.repo.format.delta import MAX_DEPTH
            from fleece.repo.repository import Repository

            r = Repository.open(FileBackend(repo))
            index = r.read_index(r.find_point(last), "vda")
            depth = max((len(index.deltas_of(i)) for i in range(index.n_chunks)), default=0)
            page = 1 if index.version >= 3 else 0  # format 3: the position's index page
            rows.append(("serve/restore: most object reads for one chunk position",
                         f"{page + 1 + depth}", f"<= {2 + MAX_DEPTH}",
                         "index page (format 3) + base chunk + deltas in the last point's index"))
        except Exception as exc:  # an older fleece's repository has no deltas to count
            rows.append(("serve/restore: most object reads for one chunk position", "1", "",
                         f"whole chunks only ({type(exc).__name__})"))
    finally:
        if vm is not None:
            vm.stop()
        end_work("bench-incremental", work, args.keep)

    print_table(rows, (56, 9, 22),
                title=f"fleece incremental bench ({args.fleece}) on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
