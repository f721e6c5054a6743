"""Damaged index, point and config objects: ``verify`` and ``restore`` name the object and the fault.

Damaged and missing chunks are covered where verify and restore are:
``tests/test_verify.py`` (every point and byte range that uses a bad chunk)
and ``tests/test_list_restore.py`` (restore fails, no partial output).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from fleece.repo.backends.file import FileBackend
from fleece.repo.repository import Repository

CHUNK = 64 * 1024
P1 = "20260101T000000.000001Z-aaaaaa"
P2 = "20260102T000000.000001Z-bbbbbb"
INDEX = f"indexes/{P2}/vda"
POINT = f"points/vm1/{P2}.json"


def flip_byte(path: Path, at: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0x01
    path.write_bytes(bytes(blob))


def damage(repo: Path, kind: str) -> None:
    if kind == "index-flipped-byte":
        flip_byte(repo / INDEX, 40)
    elif kind == "index-missing":
        (repo / INDEX).unlink()
    elif kind == "point-edited":
        (repo / POINT).write_text((repo / POINT).read_text().replace('"full"', '"incremental"'))
    elif kind == "point-truncated":
        (repo / POINT).write_bytes((repo / POINT).read_bytes()[:30])
    elif kind == "config-truncated":
        (repo / "config").write_bytes((repo / "config").read_bytes()[:20])


# kind → (what `restore` of P2 says, what `verify --json` reports for P2)
CASES = {
    "index-flipped-byte": (f"index {INDEX} of point {P2} does not match the digest in the point (damaged)",
                           ("vda", "index damaged", [INDEX])),
    "index-missing": (f"index {INDEX} of point {P2} is missing from ",
                      ("vda", "index missing", [INDEX])),
    "point-edited": (f"restore point {POINT} fails its checksum (content damaged)",
                     (None, "point damaged", [POINT])),
    "point-truncated": (f"restore point {POINT} is not valid JSON (",
                        (None, "point damaged", [POINT])),
    "config-truncated": ("config is not valid JSON", None),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_damage_is_named_by_verify_and_restore_and_nothing_partial_is_left(
        tmp_path: Path, store_point: Any, fleece: Any, kind: str) -> None:
    repo_dir = tmp_path / "repo"
    repo = Repository.init(FileBackend(repo_dir), chunk_size=CHUNK, hash="sha256")
    data = os.urandom(4 * CHUNK)
    store_point(repo, P1, {"vda": data})
    store_point(repo, P2, {"vda": data[::-1]})
    damage(repo_dir, kind)
    says, found = CASES[kind]

    out = tmp_path / "out.raw"
    res = fleece("restore", "--repo", repo_dir, P2, "--output", out)
    assert (res.rc, res.out) == (1, ""), res.err
    assert res.err.startswith("fleece: error: ") and res.err.count("\n") == 1
    assert says in res.err and "Traceback" not in res.err
    assert not out.exists()

    res = fleece("verify", "--repo", repo_dir, "--json")
    assert res.rc == 1
    if found is None:  # no point can be checked without the config: one line
        assert res.out == "" and res.err.startswith("fleece: error: ") and says in res.err
    else:
        doc = res.json()
        by_id = {p["id"]: p for p in doc["points"]}
        assert by_id[P1]["ok"] is True  # the damage is pinned on the one point it hurts
        [d] = by_id[P2]["damage"]
        assert (d["disk"], d["problem"], d["objects"]) == found
        if found[0] is not None:
            assert d["ranges"] == [[0, 4 * CHUNK]]  # without its index no byte of the disk restores
        # The other point still restores.
        assert fleece("restore", "--repo", repo_dir, P1, "--output", out).rc == 0
        assert out.read_bytes() == data


@pytest.mark.qemu
@pytest.mark.parametrize("damaged", ["index", "point"])
def test_a_damaged_latest_point_does_not_stop_the_next_backup_which_is_full_and_says_why(
        make_vm: Any, fleece: Any, tmp_path: Path, damaged: str) -> None:
    from backups import CHUNK, MiB, backup, identical, restore

    vm = make_vm([("qcow2", "16M")], name="web1")
    vm.write("vda", 0, MiB, 0x51)
    repo = tmp_path / "repo"
    p1 = backup(fleece, vm, repo)["point"]
    if damaged == "index":
        flip_byte(repo / "indexes" / p1 / "vda", 40)
        why = f"index indexes/{p1}/vda of point {p1} does not match the digest in the point (damaged)"
    else:
        point = repo / "points" / "web1" / f"{p1}.json"
        point.write_bytes(point.read_bytes()[:30])
        why = f"restore point points/web1/{p1}.json is not valid JSON ("
    vm.write("vda", CHUNK, 4096, 0x52)

    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, "--json")
    assert res.rc == 0, res.err
    doc = res.json()
    disk = doc["disks"][0]
    assert (doc["parent"], disk["level"]) == (None, "full")
    if damaged == "index":
        assert disk["reason"] == f"the index of vda in point {p1} is damaged or missing"
    else:  # the checkpoint bitmap names a point that cannot be read
        assert disk["reason"] == (f"vda: checkpoint bitmap fleece-{p1} on fmt-vda does not match "
                                  "a restore point of this disk")
    notices = [line for line in res.err.splitlines() if why in line]
    assert len(notices) == 1 and notices[0].endswith("; backing up without it"), res.err
    p2 = doc["point"]
    assert identical(restore(fleece, repo, p2, tmp_path / "p2.raw"), vm.shadow("vda"))
    # verify still reports the old damage, and only that.
    report = fleece("verify", "--repo", repo, "--json")
    assert report.rc == 1
    assert [(p["id"], p["ok"]) for p in report.json()["points"]] == [(p1, False), (p2, True)]
    # The chain goes on from the new point.
    vm.write("vda", 0, 4096, 0x53)
    p3 = backup(fleece, vm, repo)
    assert (p3["parent"], p3["disks"][0]["level"], p3["disks"][0]["bytes_read"]) == (p2, "incremental", 65536)
    assert identical(restore(fleece, repo, p3["point"], tmp_path / "p3.raw"), vm.shadow("vda"))
