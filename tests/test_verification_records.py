"""Verification records: a verdict stored beside its point, never in it; gone with the point.

Built through the Python API (no appliance, no QEMU): the records' life
cycle — list shows the newest, prune takes them with their point, gc takes
those of points that are gone, an encrypted repository seals them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fleece.cli import main
from fleece.errors import RepositoryCorrupt
from fleece.maintenance.gc import collect_garbage
from fleece.maintenance.prune import prune
from fleece.maintenance.retention import Policy
from fleece.repo.backends.file import FileBackend
from fleece.repo.format import keys
from fleece.repo.repository import Repository
from fleece.repo.verification import Verification, newest, store
from fleece.testing.memory_backend import MemoryBackend

P1 = "20260101T000000.000001Z-aaaaaa"
P2 = "20260102T000000.000001Z-bbbbbb"
CS = 64 * 1024


def test_list_shows_each_points_newest_verdict_and_the_point_is_unchanged(
        tmp_path: Path, store_point: Any, capsys: pytest.CaptureFixture[str]) -> None:
    repo = Repository.init(FileBackend(tmp_path / "repo"), chunk_size=CS)
    store_point(repo, P1, {"vda": b"a" * CS})
    store_point(repo, P2, {"vda": b"b" * CS}, parent=P1)
    point_bytes = (tmp_path / "repo" / "points" / "vm1" / f"{P2}.json").read_bytes()
    assert store(repo.backend, Verification("vm1", P2, "fsck", False, "FAILED: ext4 on /dev/sda1 has errors",
                                            stamp="20260103T000000.000001Z-000001"))
    assert store(repo.backend, Verification("vm1", P2, "boot", True, "booted in 41 s", time_to_ready=41.2,
                                            stamp="20260104T000000.000001Z-000002"))
    assert (tmp_path / "repo" / "points" / "vm1" / f"{P2}.json").read_bytes() == point_bytes

    assert main(["list", "--repo", str(tmp_path / "repo"), "--json"]) == 0
    points = json.loads(capsys.readouterr().out)["points"]
    assert points[0]["verification"] is None
    assert points[1]["verification"] == {"kind": "boot", "ok": True, "summary": "booted in 41 s",
                                         "at": points[1]["verification"]["at"], "time_to_ready": 41.2}
    assert main(["list", "--repo", str(tmp_path / "repo")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "booted in 41 s" in table[2] and "  -  " in table[1]


def test_a_damaged_record_is_refused_and_the_one_before_it_is_shown(tmp_path: Path, store_point: Any) -> None:
    repo = Repository.init(FileBackend(tmp_path / "repo"), chunk_size=CS)
    store_point(repo, P1, {"vda": b"a" * CS})
    older = Verification("vm1", P1, "fsck", True, "fsck clean", stamp="20260103T000000.000001Z-000001")
    newer = Verification("vm1", P1, "fsck", True, "fsck clean", stamp="20260104T000000.000001Z-000002")
    store(repo.backend, older)
    store(repo.backend, newer)
    path = tmp_path / "repo" / newer.key
    path.write_bytes(path.read_bytes().replace(b"fsck clean", b"fsck CLEAN"))
    with pytest.raises(RepositoryCorrupt):
        Verification.from_json(path.read_bytes(), newer.key)
    assert newest(repo.backend, "vm1")[P1].stamp == older.stamp


def test_prune_removes_a_points_records_and_gc_removes_orphans(tmp_path: Path, store_point: Any) -> None:
    repo = Repository.init(FileBackend(tmp_path / "repo"), chunk_size=CS)
    store_point(repo, P1, {"vda": b"a" * CS})
    store_point(repo, P2, {"vda": b"b" * CS}, parent=P1)
    for pid in (P1, P2):
        store(repo.backend, Verification("vm1", pid, "fsck", True, "fsck clean"))
    prune(repo, Policy(last=1))
    assert list(newest(repo.backend, "vm1")) == [P2]
    assert list(repo.backend.list(keys.verification_prefix("vm1", P1))) == []

    # A record whose point went another way (a prune cut short): gc takes it, and only it.
    orphan = Verification("vm1", P1, "boot", True, "booted in 3 s")
    repo.backend.put(orphan.key, orphan.to_json())
    report = collect_garbage(repo)
    assert report.records_deleted == 1 and report.as_dict()["records_deleted"] == 1
    assert list(newest(repo.backend, "vm1")) == [P2]


def test_a_record_for_a_point_that_is_gone_is_not_left(tmp_path: Path) -> None:
    repo = Repository.init(FileBackend(tmp_path / "repo"), chunk_size=CS)
    assert not store(repo.backend, Verification("vm1", P1, "fsck", True, "fsck clean"))
    assert list(repo.backend.list(keys.VERIFIED_PREFIX)) == []


def test_an_encrypted_repository_seals_records_and_hides_the_vm(store_point: Any) -> None:
    raw = MemoryBackend()
    repo = Repository.init(raw, chunk_size=CS, hash="blake3", encryption="aes-256-gcm",
                           passphrase=b"secret words")
    store_point(repo, P1, {"vda": b"a" * CS}, vm="web1")
    store(repo.backend, Verification("web1", P1, "fsck", True, "fsck clean"))
    stored = [k for k in raw.objects if k.startswith(keys.VERIFIED_PREFIX)]
    assert len(stored) == 1 and "web1" not in stored[0] and P1 in stored[0]
    assert raw.objects[stored[0]].startswith(b"FLEN") and b"fsck clean" not in raw.objects[stored[0]]
    again = Repository.open(raw, lambda: b"secret words")
    assert newest(again.backend, "web1")[P1].summary == "fsck clean"
