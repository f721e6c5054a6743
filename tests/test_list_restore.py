"""``fleece list`` and ``fleece restore`` through the real command line."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fleece.cli import main
from fleece.repo.backends.file import FileBackend
from fleece.repo.repository import Repository
from fleece.restore.image import DiskImage

CHUNK = 64 * 1024
MiB = 1 << 20
P1 = "20260101T000000.000001Z-aaaaaa"
P2 = "20260102T000000.000001Z-bbbbbb"


def sparse_disk(size: int, writes: dict[int, bytes]) -> bytes:
    """A disk image of ``size`` zero bytes with ``writes`` (offset → data) applied."""
    disk = bytearray(size)
    for offset, data in writes.items():
        disk[offset : offset + len(data)] = data
    return bytes(disk)


VDA = sparse_disk(8 * MiB, {0: b"boot" * 1000, 3 * MiB + 5: os.urandom(200_000),
                            8 * MiB - 10: b"end-marker"})
VDB = sparse_disk(3 * CHUNK + 1000, {3 * CHUNK: b"\x99" * 1000})


def extras(point_id: str) -> dict[str, Any]:
    """Fixed creation time, labels and stats, so list's output can be checked exactly."""
    return {"created": f"2026-01-0{point_id[7]}T00:00:00.000001Z", "labels": {"site": "a"},
            "stats": {"seconds": 2}}


@pytest.fixture
def repo_dir(tmp_path: Path, store_point: Any) -> Path:
    path = tmp_path / "repo"
    repo = Repository.init(FileBackend(path), chunk_size=CHUNK, hash="sha256")
    store_point(repo, P1, {"vda": VDA}, **extras(P1))
    store_point(repo, P2, {"vda": VDA[: 4 * MiB] + b"\x42" * CHUNK + VDA[4 * MiB + CHUNK :],
                           "#block5": VDB}, parent=P1, **extras(P2))
    return path


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    def _run(*args: str | Path) -> tuple[int, str, str]:
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out, err
    return _run


# -- list -----------------------------------------------------------------------------

def test_list_table(repo_dir: Path, run: Run) -> None:
    rc, out, err = run("list", "--repo", repo_dir)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "VM", "CREATED", "PARENT", "VERIFIED", "DISKS"]
    assert lines[1].startswith(P1) and "vda full 8.0 MiB" in lines[1]
    assert lines[2].startswith(P2) and P1 in lines[2]
    assert "vda incremental 8.0 MiB, #block5 incremental 193.0 KiB" in lines[2]


def test_list_json(repo_dir: Path, run: Run) -> None:
    rc, out, _ = run("list", "--repo", f"file://{repo_dir}", "--json")
    assert rc == 0
    doc = json.loads(out)
    assert list(doc) == ["points", "damaged"] and doc["damaged"] == []
    assert [p["id"] for p in doc["points"]] == [P1, P2]
    second = doc["points"][1]
    assert second == {
        "id": P2, "vm": "vm1", "created": "2026-01-02T00:00:00.000001Z", "parent": P1,
        "disks": [{"name": "vda", "level": "incremental", "size": 8 * MiB},
                  {"name": "#block5", "level": "incremental", "size": 3 * CHUNK + 1000}],
        "stats": {"seconds": 2}, "labels": {"site": "a"}, "verification": None,
    }
    rc, out, _ = run("list", "--repo", repo_dir, "--vm", "other", "--json")
    assert rc == 0 and json.loads(out) == {"points": [], "damaged": []}


def test_list_shows_the_good_points_when_one_is_damaged(repo_dir: Path, run: Run) -> None:
    point_file = next((repo_dir / "points").rglob(f"{P1}.json"))
    point_file.write_bytes(point_file.read_bytes().replace(b'"vm1"', b'"vmX"', 1))
    rc, out, err = run("list", "--repo", repo_dir, "--json")
    assert rc == 1  # damage is an error, but the good points are still listed
    doc = json.loads(out)
    assert [p["id"] for p in doc["points"]] == [P2] and doc["damaged"] == [P1]
    assert err.count("\n") == 1 and P1 in err and "fleece verify" in err


def test_list_of_something_that_is_not_a_repository(tmp_path: Path, run: Run) -> None:
    rc, out, err = run("list", "--repo", tmp_path)
    assert rc == 2 and out == ""
    assert err == (f"fleece: error: {tmp_path} is not a fleece repository (no config): create one "
                   f"with 'fleece init --repo {tmp_path} --encryption aes-256-gcm|none'; nothing was "
                   "written\n")


# -- restore --------------------------------------------------------------------------

def test_restore_is_identical_and_sparse(repo_dir: Path, tmp_path: Path, run: Run) -> None:
    out = tmp_path / "vda.raw"
    rc, stdout, _ = run("restore", "--repo", repo_dir, P1, "--output", out)
    assert rc == 0, stdout
    assert out.read_bytes() == VDA
    st = os.stat(out)
    assert st.st_size == 8 * MiB
    # Only the 7 chunks holding data (of 128) are allocated.
    assert st.st_blocks * 512 <= 16 * CHUNK


def test_restore_incremental_and_short_tail(repo_dir: Path, tmp_path: Path, run: Run) -> None:
    out = tmp_path / "p2-vda.raw"
    assert run("restore", "--repo", repo_dir, P2[:10], "--drive", "vda", "-o", out)[0] == 0
    expected = bytearray(VDA)
    expected[4 * MiB : 4 * MiB + CHUNK] = b"\x42" * CHUNK
    assert out.read_bytes() == bytes(expected)
    out_b = tmp_path / "p2-block5.raw"
    assert run("restore", "--repo", repo_dir, P2, "--drive", "#block5", "-o", out_b)[0] == 0
    assert out_b.read_bytes() == VDB


def test_restore_with_one_worker(repo_dir: Path, tmp_path: Path, run: Run) -> None:
    out = tmp_path / "one.raw"
    assert run("restore", "--repo", repo_dir, P1, "-o", out, "--workers", "1")[0] == 0
    assert out.read_bytes() == VDA


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([P2], "has several disks (vda, #block5); choose one with --drive"),
        ([P1, "--drive", "vdz"], "has no disk 'vdz' (it has: vda)"),
        (["20990101"], "no restore point '20990101'"),
        (["2026"], "matches 2 restore points"),
        ([P1, "--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_restore_bad_input(repo_dir: Path, tmp_path: Path, run: Run, args: list[str],
                           message: str) -> None:
    out = tmp_path / "out.raw"
    rc, _, err = run("restore", "--repo", repo_dir, *args, "--output", out)
    assert rc == 2
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_restore_refuses_to_clobber_without_force(repo_dir: Path, tmp_path: Path,
                                                  run: Run) -> None:
    out = tmp_path / "existing.raw"
    out.write_bytes(b"precious")
    rc, _, err = run("restore", "--repo", repo_dir, P1, "--output", out)
    assert rc == 2 and "--force" in err
    assert out.read_bytes() == b"precious"
    assert run("restore", "--repo", repo_dir, P1, "--output", out, "--force")[0] == 0
    assert out.read_bytes() == VDA


def test_restore_output_not_writable(repo_dir: Path, tmp_path: Path, run: Run) -> None:
    rc, _, err = run("restore", "--repo", repo_dir, P1, "-o", tmp_path / "no" / "such" / "x")
    assert rc == 2 and "cannot create output" in err and "No such file" in err
    rc, _, err = run("restore", "--repo", repo_dir, P1, "-o", tmp_path)
    assert rc == 2 and "not a regular file" in err


def test_corrupt_chunk_fails_and_removes_the_partial_output(repo_dir: Path, tmp_path: Path,
                                                            run: Run) -> None:
    digest = Repository.open(FileBackend(repo_dir)).chunk_name(VDA[8 * MiB - CHUNK :]).hex()
    chunk = repo_dir / "chunks" / digest[:2] / digest
    data = bytearray(chunk.read_bytes())
    data[-3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    out = tmp_path / "broken.raw"
    rc, _, err = run("restore", "--repo", repo_dir, P1, "-o", out)
    assert rc == 1
    assert digest in err and "partial output" in err and "removed" in err
    assert not out.exists()


def test_missing_chunk_fails_and_removes_the_partial_output(repo_dir: Path, tmp_path: Path,
                                                            run: Run) -> None:
    digest = Repository.open(FileBackend(repo_dir)).chunk_name(VDA[:CHUNK]).hex()
    (repo_dir / "chunks" / digest[:2] / digest).unlink()
    out = tmp_path / "broken.raw"
    rc, _, err = run("restore", "--repo", repo_dir, P1, "-o", out)
    assert rc == 1 and "missing" in err
    assert not out.exists()


def test_disk_image_random_access(repo_dir: Path) -> None:
    repo = Repository.open(FileBackend(repo_dir))
    image = DiskImage(repo, repo.find_point(P1))
    assert image.size == 8 * MiB
    start, data = image.chunk_at(3 * MiB + 100)
    assert start == 3 * MiB and data == VDA[3 * MiB : 3 * MiB + CHUNK]
    assert image.read(CHUNK - 7, 3 * CHUNK) == VDA[CHUNK - 7 : 4 * CHUNK - 7]
    assert image.read(8 * MiB - 10, 10) == b"end-marker"


# -- the installed console script -----------------------------------------------------

def test_console_script_list_and_restore(repo_dir: Path, tmp_path: Path, fleece: Any) -> None:
    res = fleece("list", "--repo", repo_dir, "--json")
    assert res.rc == 0, res.err
    assert [p["id"] for p in res.json()["points"]] == [P1, P2]
    out = tmp_path / "cli.raw"
    res = fleece("restore", "--repo", repo_dir, "latest", "--drive", "#block5", "-o", out)
    assert res.rc == 0, res.err
    assert out.read_bytes() == VDB
    res = fleece("restore", "--repo", repo_dir, "latest", "-o", tmp_path / "x.raw")
    assert res.rc == 2 and "choose one with --drive" in res.err
