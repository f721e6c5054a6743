"""Positions that read as zeroes: every reader asks the index the same question.

A chain of real backups in which an incremental's writes land as deltas on
positions whose base is the zero marker (the full held zeroes there), later
points punch holes (write-zeroes with unmap) into data and into such deltas,
and a position is rewritten whole. Each point must read back as the disk
was at its snapshot through ``restore``, ``serve``, ``restore --live`` and
a ``copy`` into a second repository.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from backups import backup, restore
from test_serve import serving

KiB = 1024
MiB = 1 << 20
CHUNK = 4 * MiB  # the default: the 1 MiB write below is stored as one delta
ERROR_POLICY = "rerror=stop,werror=stop"


def disk_deltas(result: dict[str, Any]) -> int:
    return sum(int(d["deltas"]) for d in result["disks"])


def same_raw(a: Path, b: Path | str) -> bool:
    res = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(a), str(b)])
    return res.returncode == 0


def identical_qcow2(image: Path, expected: Path) -> bool:
    res = subprocess.run(["qemu-img", "compare", "-q", "-U", "-f", "qcow2", "-F", "raw", str(image),
                          str(expected)])
    return res.returncode == 0


def chain(vm: Any, fleece: Any, repo: Path, tmp_path: Path) -> list[tuple[str, Path]]:
    """Four points and the disk as it was at each (a raw copy of the guest's view)."""
    points: list[tuple[str, Path]] = []

    def point(*extra: str) -> dict[str, Any]:
        result: dict[str, Any] = backup(fleece, vm, repo, *extra)
        points.append((str(result["point"]), vm.snapshot_shadow("vda", tmp_path / f"p{len(points)}.raw")))
        return result

    # P0, full: 4 MiB of data; 32 MiB on (chunks 8 and 10) is zero, so not stored.
    vm.write("vda", 0, 4 * MiB, 0x11)
    vm.write("vda", 16 * MiB, 4 * MiB, 0x12)
    point("--level", "full")
    # P1: 1 MiB at 32 MiB, a delta on a zero base (the reproduction).
    vm.write("vda", 32 * MiB, MiB, 0x44)
    assert disk_deltas(point()) == 1
    # P2: a second delta on the same zero base; a delta on another; a hole punched in data.
    vm.write("vda", 33 * MiB + 4 * KiB, 64 * KiB, 0x45)
    vm.write("vda", 40 * MiB + 512 * KiB, MiB, 0x46)
    vm.discard("vda", MiB, 64 * KiB)
    assert disk_deltas(point()) >= 2
    # P3: the delta at 40 MiB punched back to zeroes (a zero base, deltas that read as
    # zeroes); a whole chunk of data punched; the zero-based position rewritten whole.
    vm.discard("vda", 40 * MiB + 512 * KiB, MiB)
    vm.discard("vda", 16 * MiB, 4 * MiB)
    vm.write("vda", 32 * MiB, 4 * MiB, 0x47)
    point()
    return points


@pytest.mark.qemu
def test_every_reader_sees_deltas_on_zero_bases_and_holes_punched_later(
        make_vm: Any, fleece: Any, live: Any, tmp_path: Path, short_tmp: Path) -> None:
    vm = make_vm([("qcow2", "64M")])
    repo = tmp_path / "repo"
    points = chain(vm, fleece, repo, tmp_path)
    vm.shutdown()

    copied = tmp_path / "copied"
    res = fleece("copy", "--from", repo, "--to", copied, "--init")
    assert res.rc == 0, res.err
    res = fleece("verify", "--repo", repo, "--deep")
    assert res.rc == 0, res.out + res.err

    for k, (point, expected) in enumerate(points):
        out = restore(fleece, repo, point, tmp_path / f"restored-{k}.raw")
        assert same_raw(out, expected), f"restore of point {k}"
        out = restore(fleece, copied, point, tmp_path / f"copied-{k}.raw")
        assert same_raw(out, expected), f"restore of copied point {k}"
        with serving("--repo", repo, point, "--socket", short_tmp / f"s{k}") as uri:
            assert same_raw(expected, uri), f"serve of point {k}"
            copy = tmp_path / f"served-{k}.raw"
            subprocess.run(["nbdcopy", uri, str(copy)], check=True)  # reads by its block status
            assert same_raw(copy, expected), f"nbdcopy of served point {k}"

        # restore --live onto a paused VM's blank placeholder, left paused.
        target = make_vm([("qcow2", "64M")], device_options=ERROR_POLICY)
        image = tmp_path / f"live-{k}.qcow2"
        lr = live("--repo", repo, point, "--drive", "vda", "--output", image,
                  "--qmp", target.qmp_path, "--no-start")
        rc, err = lr.finish()
        assert rc == 0, err
        target.hmp(f'qemu-io -d {target.qdev("vda")} "flush"')  # qcow2 metadata to disk
        assert identical_qcow2(image, expected), f"live restore of point {k}"
        target.shutdown()
