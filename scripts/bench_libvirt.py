"""fleece --libvirt beside virtnbdbackup on the same libvirt domain (``scripts/bench --libvirt``).

Builds the same realistic disk as ``scripts/bench`` (ext4 made with
``mkfs.ext4 -d`` from a system library directory, plus 128 MiB of random
data), runs it as a libvirt domain (TCG, q35, virtio qcow2, paused) on a
private libvirtd (``tests/libvirt_host.py``), and backs it up with both tools
through libvirt's pull-mode backup API:

* a full backup with each;
* then the guest writes 1 % of the disk in 64 KiB pieces at random
  (scattered) offsets, and each tool takes an incremental.

Figures: wall time of the whole command, and bytes stored (``du`` of the
repository or the output directory). fleece runs with its defaults
(4 MiB chunks, zstd:3, sha256 dedup) and with 256 KiB chunks (a finer grid
for scattered writes); virtnbdbackup with ``-z`` (lz4), its compressed mode.
virtnbdbackup refuses to run beside another tool's checkpoints, so its chain
runs first and its checkpoints are deleted before each fleece chain; every
incremental follows writes at the same offsets.

Usage: scripts/bench --libvirt [--data DIR] [--disk-size 2G] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FLEECE = str(ROOT / ".venv" / "bin" / "fleece")
MiB = 1 << 20
PIECE = 64 * 1024

sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
from bench import build_disk, end_work  # noqa: E402
from libvirt_host import DISK_XML, DOMAIN_XML, LibvirtHost  # noqa: E402


def timed(*args: str | Path) -> tuple[float, str]:
    """Run a command that must succeed; (wall seconds, stdout)."""
    t = time.perf_counter()
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"{' '.join(map(str, args[:3]))} failed ({p.returncode}): {p.stderr[-2000:]}")
    return dt, p.stdout


def du(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def scattered_writes(uri: str, domain: str, size: int, fraction: float, seed: int, work: Path) -> int:
    """The guest writes ``fraction`` of the disk in 64 KiB pieces of random bytes at random
    offsets (the same offsets for the same ``seed``); bytes written."""
    import libvirt
    import libvirt_qemu

    piece = work / f"piece-{os.getpid()}.bin"
    piece.write_bytes(os.urandom(PIECE))  # incompressible: no tool stores it for free
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByName(domain)
        blocks = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute": "query-block"}', 0))
        qdev = next(b["qdev"] for b in blocks["return"] if b.get("qdev"))
        n = int(size * fraction) // PIECE
        for off in random.Random(seed).sample(range(size // PIECE), n):
            libvirt_qemu.qemuMonitorCommand(
                dom, f'qemu-io -d {qdev} "write -s {piece} {off * PIECE} {PIECE}"',
                libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        return n * PIECE
    finally:
        conn.close()
        piece.unlink()


def start_domain(host: LibvirtHost, work: Path, image: Path, name: str = "fleece-bench") -> str:
    """Start ``host`` and run ``image`` (qcow2, as ``vda``) there as domain ``name``, paused."""
    host.start()
    (work / "domain.xml").write_text(DOMAIN_XML.format(
        name=name, disks=DISK_XML.format(fmt="qcow2", path=image, target="vda")))
    host.virsh("define", str(work / "domain.xml"))
    host.virsh("start", "--paused", name)
    return name


def delete_checkpoints(host: LibvirtHost, name: str) -> None:
    """Drop every checkpoint of domain ``name`` (virtnbdbackup refuses to run beside others')."""
    for cp in host.virsh("checkpoint-list", name, "--name").stdout.split():
        host.virsh("checkpoint-delete", name, cp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/usr/lib/x86_64-linux-gnu", help="directory to fill the disk with")
    ap.add_argument("--disk-size", default="2G")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if shutil.which("virtnbdbackup") is None:
        raise SystemExit("bench --libvirt: virtnbdbackup is not installed "
                         "(Debian: apt install virtnbdbackup)")
    work = Path(tempfile.mkdtemp(prefix="fleece-bench-lv.", dir="/var/tmp"))
    host = LibvirtHost()
    rows: list[tuple[str, str, str, str]] = []
    load0 = os.getloadavg()[0]
    try:
        print(f"bench --libvirt: building an ext4 disk from {args.data} in {work} ...", file=sys.stderr)
        image = build_disk(work, Path(args.data), args.disk_size)
        size = int(json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)],
                                             capture_output=True, text=True, check=True).stdout)
                   ["virtual-size"])
        name = start_domain(host, work, image)
        lv = ["--libvirt", name, "--connect", host.uri]
        repo, out = work / "fleece-repo", work / "virtnbdbackup"
        vnb: list[str | Path] = ["virtnbdbackup", "-U", host.uri, "-d", name, "-o", out, "-z", "-n",
                                 "-S", work]

        # Warm the page cache for both: neither tool's first full pays for a cold image.
        subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)

        # virtnbdbackup refuses to run while another tool's checkpoints exist: its
        # chain first, then its checkpoints go, then fleece's chain. Both incrementals
        # see the same writes (same offsets, same count).
        t_vf, _ = timed(*vnb, "-l", "full")
        s_vf = du(out)
        written = scattered_writes(host.uri, name, size, 0.01, 20261130, work)
        t_vi, _ = timed(*vnb, "-l", "inc")
        s_vi = du(out) - s_vf
        delete_checkpoints(host, name)

        def fleece_chain(repo: Path, *extra: str) -> tuple[float, int, float, int, dict[str, Any]]:
            t_full, res = timed(FLEECE, "backup", "--init", *lv, "--repo", repo, "--json", *extra)
            s_full = du(repo)
            scattered_writes(host.uri, name, size, 0.01, 20261130, work)
            t_inc, res = timed(FLEECE, "backup", "--init", *lv, "--repo", repo, "--json")
            inc = json.loads(res)
            assert inc["disks"][0]["level"] == "incremental", inc
            return t_full, s_full, t_inc, du(repo) - s_full, inc

        t_ff, s_ff, t_fi, s_fi, inc = fleece_chain(repo)
        delete_checkpoints(host, name)
        t_sf, s_sf, t_si, s_si, inc_s = fleece_chain(work / "fleece-repo-256k", "--chunk-size", "256K")
        rows.append(("full", f"{t_ff:.1f} s, {s_ff / MiB:.0f} MiB", f"{t_sf:.1f} s, {s_sf / MiB:.0f} MiB",
                     f"{t_vf:.1f} s, {s_vf / MiB:.0f} MiB"))
        rows.append((f"incremental: {written / MiB:.0f} MiB, 64 KiB pieces, scattered",
                     f"{t_fi:.1f} s, {s_fi / MiB:.1f} MiB (read {inc['disks'][0]['bytes_read'] / MiB:.0f})",
                     f"{t_si:.1f} s, {s_si / MiB:.1f} MiB (read {inc_s['disks'][0]['bytes_read'] / MiB:.0f})",
                     f"{t_vi:.1f} s, {s_vi / MiB:.1f} MiB"))
        # The last point must hold the disk as it is: restore it and compare with the image.
        t_r, _ = timed(FLEECE, "restore", "--repo", work / "fleece-repo-256k", inc_s["point"],
                       "--output", work / "r.raw")
        host.virsh("destroy", "--graceful", name)  # QEMU exits cleanly: the image is complete
        same = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2",
                               str(work / "r.raw"), str(image)]).returncode == 0
        if not same:
            raise SystemExit("bench --libvirt: fleece's incremental does not restore the disk")
        rows.append(("restore of the last point (checked identical)", f"{t_r:.1f} s", "", ""))
        load = os.getloadavg()[0]
        print(f"fleece --libvirt vs virtnbdbackup -z on {os.cpu_count()} cores (load average "
              f"{load0:.1f} before, {load:.1f} after), disk {args.disk_size} of {args.data}\n")
    finally:
        host.stop()
        end_work("bench --libvirt", work, args.keep)
    print(f"| {'backup':<46} | {'fleece --libvirt':<30} | {'fleece --chunk-size 256K':<30} "
          "| virtnbdbackup -z (lz4)")
    print(f"|{'-' * 48}|{'-' * 32}|{'-' * 32}|------")
    for what, fl, fs, vn in rows:  # (the restore row: fleece 256K only)
        print(f"| {what:<46} | {fl:<30} | {fs:<30} | {vn}")


if __name__ == "__main__":
    main()
