"""``fleece restore`` to qcow2, onto NBD exports and block devices, and of damaged points."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleece.repo.backends.file import FileBackend
from fleece.repo.repository import Repository

KiB = 1024
MiB = 1 << 20
CHUNK = 64 * KiB


def backup(fleece: Any, vm: Any, repo: Path, *extra: str) -> str:
    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, "--json", *extra)
    assert res.rc == 0, res.err
    return str(res.json()["point"])


def compare(a: str | Path, b: str | Path, fmt_a: str = "raw", fmt_b: str = "raw") -> str:
    res = subprocess.run(["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b)],
                         capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else f"rc {res.returncode}: {res.stdout}"


def chunk_file(repo: Path, data: bytes) -> Path:
    # Named as the repository names chunks (format 3: the hash of the sparse form).
    digest = Repository.open(FileBackend(repo)).chunk_name(data).hex()
    return repo / "chunks" / digest[:2] / digest


@pytest.fixture
def backed_up(make_vm: Any, fleece: Any, tmp_path: Path) -> tuple[Path, str, Path]:
    """A VM's 32 MiB disk with scattered data, backed up: (repo, point, raw copy of the disk)."""
    vm = make_vm([("qcow2", "32M")])
    vm.write("vda", 0, MiB, 0x11)
    vm.write("vda", 5 * MiB + 4 * KiB, 300 * KiB, 0x12)
    vm.write("vda", 32 * MiB - 4 * KiB, 4 * KiB, 0x13)
    repo = tmp_path / "repo"
    point = backup(fleece, vm, repo, "--chunk-size", "64K")
    return repo, point, vm.snapshot_shadow("vda", tmp_path / "source.raw")


@pytest.mark.qemu
def test_qcow2_restore_passes_check_compares_identical_and_keeps_holes(
        backed_up: tuple[Path, str, Path], fleece: Any, tmp_path: Path) -> None:
    repo, point, source = backed_up
    out = tmp_path / "out.qcow2"
    res = fleece("restore", "--repo", repo, point, "--format", "qcow2", "-o", out)
    assert res.rc == 0, res.err
    assert "as qcow2" in res.out
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(out)],
                                     capture_output=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 32 * MiB
    check = subprocess.run(["qemu-img", "check", str(out)], capture_output=True, text=True)
    assert check.returncode == 0 and "No errors were found" in check.stdout
    assert compare(out, source, "qcow2") == "Images are identical."
    # Only the chunks holding data became clusters: 16 + 5 + 1 of 64 KiB.
    extents = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(out)],
                                        capture_output=True, check=True).stdout)
    assert sum(e["length"] for e in extents if e["data"]) == 22 * CHUNK
    assert not list(tmp_path.glob(".out.qcow2.fleece-*"))


@pytest.mark.qemu
def test_existing_qcow2_output_needs_force_and_survives_a_failed_restore(
        backed_up: tuple[Path, str, Path], fleece: Any, tmp_path: Path) -> None:
    repo, point, _ = backed_up
    out = tmp_path / "out.qcow2"
    out.write_bytes(b"precious")
    res = fleece("restore", "--repo", repo, point, "--format", "qcow2", "-o", out)
    assert res.rc == 2 and "--force" in res.err and out.read_bytes() == b"precious"
    chunk_file(repo, b"\x12" * CHUNK).unlink()
    res = fleece("restore", "--repo", repo, point, "--format", "qcow2", "-o", out, "--force")
    assert res.rc == 1
    assert f"is damaged at bytes {5 * MiB + CHUNK}-{5 * MiB + 4 * CHUNK} (3 chunks" in res.err
    assert f"{out} was left unchanged" in res.err
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.qcow2", "repo", "source.raw", "vms"]


@pytest.mark.qemu
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_damaged_point_is_refused_unless_allow_damage(
        backed_up: tuple[Path, str, Path], fleece: Any, tmp_path: Path, fmt: str) -> None:
    repo, point, source = backed_up
    blob = bytearray(chunk_file(repo, b"\x11" * CHUNK).read_bytes())
    blob[-1] ^= 1
    chunk_file(repo, b"\x11" * CHUNK).write_bytes(bytes(blob))
    out = tmp_path / f"out.{fmt}"
    res = fleece("restore", "--repo", repo, point, "--format", fmt, "-o", out)
    assert res.rc == 1
    assert f"disk vda of restore point {point} is damaged at bytes 0-{MiB} (16 chunks;" in res.err
    assert "--allow-damage" in res.err and res.err.count("\n") == 1
    assert not out.exists()

    res = fleece("restore", "--repo", repo, point, "--format", fmt, "-o", out, "--allow-damage")
    assert res.rc == 0, res.err
    assert f"bytes 0-{MiB} of vda are damaged in the repository and were restored as zeroes" in res.err
    assert f"DAMAGED: {MiB} bytes restored as zeroes at 0-{MiB}" in res.out
    expected = bytearray(source.read_bytes())
    expected[:MiB] = bytes(MiB)
    raw = tmp_path / "check.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(out), str(raw)], check=True)
    assert raw.read_bytes() == bytes(expected)


@contextlib.contextmanager
def qemu_nbd(image: Path, sock: Path) -> Iterator[str]:
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "--persistent", f"--socket={sock}", str(image)])
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.qemu
def test_restore_onto_an_nbd_export_overwrites_old_data_and_zeroes_holes(
        backed_up: tuple[Path, str, Path], fleece: Any, tmp_path: Path, short_tmp: Path) -> None:
    repo, point, source = backed_up
    target = tmp_path / "target.raw"
    target.write_bytes(b"\xee" * (33 * MiB))  # bigger, and full of old data
    with qemu_nbd(target, short_tmp / "t.sock") as uri:
        res = fleece("restore", "--repo", repo, point, "-o", uri)
        assert res.rc == 2 and "--force" in res.err
        res = fleece("restore", "--repo", repo, point, "-o", uri, "--format", "qcow2", "--force")
        assert res.rc == 2 and "raw bytes" in res.err
        res = fleece("restore", "--repo", repo, point, "-o", uri, "--force")
        assert res.rc == 0, res.err
    data = target.read_bytes()
    assert data[: 32 * MiB] == source.read_bytes()
    assert data[32 * MiB :] == b"\xee" * MiB


@pytest.mark.qemu
def test_restore_onto_a_block_device(backed_up: tuple[Path, str, Path], fleece: Any,
                                     tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup for a loop device")
    repo, point, source = backed_up
    backing = tmp_path / "loop.img"
    backing.write_bytes(b"\xee" * (32 * MiB))
    res = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"no loop device: {res.stderr.strip()}")
    device = res.stdout.strip()
    try:
        res = fleece("restore", "--repo", repo, point, "-o", device)
        assert res.rc == 2 and "--force" in res.err
        res = fleece("restore", "--repo", repo, point, "-o", device, "--force")
        assert res.rc == 0, res.err
        with open(device, "rb") as f:
            assert f.read() == source.read_bytes()
    finally:
        subprocess.run(["losetup", "-d", device], check=True)
