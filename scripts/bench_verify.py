"""Verification benchmark (``scripts/bench --verify``): judging a point straight from the repository.

A disk of ``--disk-size`` (4G) that boots by itself (syslinux on an active FAT
partition, the project's real guest) with an ext4 data partition holding
``--data-size`` (2G) of incompressible files is backed up into a local
repository. Then, whole processes, each beside its reference:

* ``verify --boot`` (judged by the serial console) against the same guest
  booting from a local raw copy of the disk in the same QEMU (goal <= 1.3x),
  and the bytes the guest read against the data held (goal <= 5 %);
* ``verify --fsck`` against ``e2fsck -fn`` of a local copy of the data
  partition plus the appliance's start, reported separately (goal <= 1.5x).

The machine is shared and everything runs under TCG here, so one run of
each is printed with its parts; read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
FLEECE = str(ROOT / ".venv" / "bin" / "fleece")
MiB = 1 << 20


def size_of(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def fleece(*args: str | Path) -> tuple[float, int, dict[str, Any] | None, str]:
    t0 = time.perf_counter()
    res = subprocess.run([FLEECE, *map(str, args)], capture_output=True, text=True)
    took = time.perf_counter() - t0
    try:
        doc = json.loads(res.stdout)
    except ValueError:
        doc = None
    return took, res.returncode, doc, res.stderr


def build(work: Path, disk_size: int, data_size: int) -> tuple[Path, Path]:
    """The bootable disk and a copy of its data partition's image."""
    from disks import SYSLINUX_MBR, Part, partitioned, run, vfat
    from guest import build_guest

    kernel = build_guest()
    tree = work / "data.tree"
    tree.mkdir()
    left, n = data_size, 0
    with open("/dev/urandom", "rb") as rnd:
        while left > 0:
            piece = min(left, (n % 8 + 1) * 8 * MiB)
            (tree / f"f{n:05d}").write_bytes(rnd.read(piece))
            left, n = left - piece, n + 1
    fat = vfat(work / "boot.fat", 96 * MiB, "BOOT")
    run("syslinux", "--install", fat)
    cfg = work / "syslinux.cfg"
    cfg.write_text("DEFAULT fleece\nPROMPT 0\nTIMEOUT 0\nLABEL fleece\n  KERNEL /vmlinuz\n"
                   "  APPEND initrd=/initrd.img console=ttyS0 quiet panic=-1\n")
    for src, name in [(kernel / "vmlinuz", "vmlinuz"), (kernel / "initrd.img", "initrd.img"),
                      (cfg, "syslinux.cfg")]:
        run("mcopy", "-i", fat, src, f"::{name}")
    data_mib = (disk_size - 100 * MiB) // MiB
    data = work / "data.ext4"
    with open(data, "wb") as f:
        f.truncate(data_mib * MiB)
    run("mkfs.ext4", "-q", "-F", "-L", "data", "-d", tree, data)
    shutil.rmtree(tree)
    disk = partitioned(work / "disk.raw", disk_size, "dos",
                       [Part(96, "c", fat, bootable=True), Part(data_mib, "83", data)])
    with open(disk, "r+b") as f:
        f.write(SYSLINUX_MBR.read_bytes()[:440])
    return disk, data


def back_up(work: Path, disk: Path, repo: Path) -> str:
    qmp = work / "qmp.sock"
    proc = subprocess.Popen(["qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none", "-S",
                             "-name", "bench",
                             "-blockdev", f"driver=file,filename={disk},node-name=bench-file,read-only=on",
                             "-blockdev", "driver=raw,file=bench-file,node-name=bench-fmt,read-only=on",
                             "-device", "virtio-blk-pci,drive=bench-fmt,id=vda",
                             "-qmp", f"unix:{qmp},server=on,wait=off"])
    try:
        while not qmp.exists():
            time.sleep(0.05)
        _, rc, doc, err = fleece("backup", "--qmp", qmp, "--drive", "vda", "--repo", repo, "--vm", "bench",
                                 "--json")
        if rc != 0 or doc is None:
            raise SystemExit(f"backup failed: {err}")
        return str(doc["point"])
    finally:
        proc.kill()
        proc.wait()


def reference_boot(work: Path, disk: Path) -> float:
    """Seconds from QEMU's start until the guest on a local copy prints FLEECE-IDLE, then quit."""
    console = work / "ref-console.log"
    from fleece.guest.accel import qemu_accel_args

    accel = qemu_accel_args()  # what verify --boot uses too
    t0 = time.perf_counter()
    proc = subprocess.Popen(["qemu-system-x86_64", "-nodefaults", "-nic", "none", "-machine", "pc",
                             *accel, "-m", "256", "-display", "none", "-device", "VGA",
                             "-serial", f"file:{console}",
                             "-drive", f"file={disk},format=raw,if=virtio,snapshot=on"])
    try:
        while not (console.exists()
                   and re.search(r"^FLEECE-IDLE", console.read_text(errors="replace"), re.M)):
            if proc.poll() is not None or time.perf_counter() - t0 > 1800:
                raise SystemExit("the reference guest did not boot")
            time.sleep(0.2)
        return time.perf_counter() - t0
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--disk-size", default="4G")
    ap.add_argument("--data-size", default="2G")
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleece-bench-verify.", dir=args.dir))
    rows: list[tuple[str, str, str]] = []
    try:
        data_size = size_of(args.data_size)
        print(f"bench: building a {args.disk_size} bootable disk with {args.data_size} of data ...",
              file=sys.stderr)
        disk, data = build(work, size_of(args.disk_size), data_size)
        repo = work / "repo"
        point = back_up(work, disk, repo)
        ref = reference_boot(work, disk)
        took, rc, doc, err = fleece("verify", "--repo", repo, "--vm", "bench", "--boot", point,
                                    "--memory", "256", "--expect", "serial", "^FLEECE-IDLE", "--json")
        if rc != 0 or doc is None:
            raise SystemExit(f"verify --boot failed: {err}")
        bytes_read = doc["bytes_read"]
        assert isinstance(bytes_read, dict)
        read = sum(int(v) for v in bytes_read.values())
        rows += [("boot: local copy, QEMU start to ready (reference)", f"{ref:.1f} s", ""),
                 ("boot: verify --boot, whole process", f"{took:.1f} s",
                  f"{took / ref:.2f}x (goal <= 1.3x)"),
                 ("boot: verify --boot time to ready", f"{doc['time_to_ready']:.1f} s", ""),
                 ("boot: bytes the guest read / data held", f"{read / MiB:.1f} MiB",
                  f"{100 * read / data_size:.2f} % (goal <= 5 %)")]
        t0 = time.perf_counter()
        e2 = subprocess.run(["e2fsck", "-fn", str(data)], capture_output=True, text=True)
        e2fsck_s = time.perf_counter() - t0
        took, rc, doc, err = fleece("verify", "--repo", repo, "--vm", "bench", "--fsck", point, "--json")
        if rc != 0 or doc is None or e2.returncode != 0:
            raise SystemExit(f"verify --fsck failed: {err}{e2.stdout}")
        appliance = float(doc["appliance_seconds"])
        rows += [("fsck: e2fsck -fn of a local raw copy (reference)", f"{e2fsck_s:.1f} s", ""),
                 ("fsck: libguestfs appliance start (separate)", f"{appliance:.1f} s", ""),
                 ("fsck: verify --fsck minus the appliance's start", f"{took - appliance:.1f} s",
                  f"{(took - appliance) / e2fsck_s:.2f}x (goal <= 1.5x)")]
    finally:
        if args.keep:
            print(f"bench: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"fleece verify bench on {os.cpu_count()} cores, {args.disk_size} disk holding {args.data_size}")
    for what, value, ratio in rows:
        print(f"  {what:52} {value:>12}  {ratio}")


if __name__ == "__main__":
    main()
