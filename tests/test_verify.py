"""``fleece verify``: intact repositories pass; every kind of damage is found and located."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from fleece.maintenance.verify import resolve_points, verify_points
from fleece.repo.backends.base import Backend
from fleece.repo.backends.file import FileBackend
from fleece.repo.repository import Repository
from fleece.testing.memory_backend import MemoryBackend

KiB = 1024
MiB = 1 << 20
CHUNK = 64 * KiB
P1 = "20260101T000000.000001Z-aaaaaa"
P2 = "20260102T000000.000001Z-bbbbbb"
P3 = "20260103T000000.000001Z-cccccc"

SHARED = os.urandom(CHUNK)          # chunk 2 of vda in P1 and P2, chunk 5 too in P2
ONLY_P3 = os.urandom(CHUNK)


def disk(size: int, chunks: dict[int, bytes]) -> bytes:
    data = bytearray(size)
    for i, piece in chunks.items():
        data[i * CHUNK : i * CHUNK + len(piece)] = piece
    return bytes(data)


VDA1 = disk(1 * MiB, {0: b"boot" * 100, 2: SHARED, 3: os.urandom(CHUNK)})
VDA2 = disk(1 * MiB, {0: b"boot" * 100, 2: SHARED, 3: os.urandom(CHUNK), 5: SHARED})
WEB = disk(512 * KiB + 100, {1: ONLY_P3, 8: b"tail"})


def chunk_file(repo_dir: Path, data: bytes) -> Path:
    # Named by the repository's own hash (blake3 for one `fleece backup` made).
    digest = Repository.open(FileBackend(repo_dir)).chunk_name(data).hex()
    return repo_dir / "chunks" / digest[:2] / digest


def flip_byte(path: Path, at: int = -5) -> None:
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0x01
    path.write_bytes(bytes(blob))


@pytest.fixture
def repo_dir(tmp_path: Path, store_point: Any) -> Path:
    path = tmp_path / "repo"
    repo = Repository.init(FileBackend(path), chunk_size=CHUNK, hash="sha256")
    store_point(repo, P1, {"vda": VDA1})
    store_point(repo, P2, {"vda": VDA2, "vdb": VDA1}, parent=P1)
    store_point(repo, P3, {"web": WEB}, vm="web1")
    return path


def test_intact_repository_verifies_shallow_and_deep(repo_dir: Path, fleece: Any) -> None:
    for extra in ((), ("--deep",)):
        res = fleece("verify", "--repo", repo_dir, "--json", *extra)
        assert res.rc == 0, res.err
        doc = res.json()
        assert doc["ok"] is True and doc["deep"] is bool(extra)
        assert [(p["id"], p["vm"], p["ok"], p["damage"]) for p in doc["points"]] == [
            (P1, "vm1", True, []), (P2, "vm1", True, []), (P3, "web1", True, [])]
        # Distinct chunks: boot, SHARED, two random chunk 3s, ONLY_P3, tail.
        assert doc["chunks_checked"] == 6
        assert doc["bytes_checked"] == (6 * CHUNK - CHUNK + 100 if extra else 0)
        assert set(doc) == {"points", "ok", "deep", "chunks_checked", "bytes_checked", "seconds"}


def test_one_flipped_byte_names_every_point_and_range_that_uses_the_chunk(
        repo_dir: Path, fleece: Any) -> None:
    flip_byte(chunk_file(repo_dir, SHARED))
    # The object still exists: only a deep verify can tell.
    assert fleece("verify", "--repo", repo_dir).rc == 0
    res = fleece("verify", "--repo", repo_dir, "--deep", "--json")
    assert res.rc == 1, res.err
    doc = res.json()
    assert doc["ok"] is False
    by_id = {p["id"]: p for p in doc["points"]}
    key = str(chunk_file(repo_dir, SHARED).relative_to(repo_dir))
    damaged = {
        (p["id"], d["disk"]): (d["problem"], d["ranges"], d["objects"])
        for p in doc["points"] for d in p["damage"]
    }
    assert damaged == {
        (P1, "vda"): ("chunk damaged", [[2 * CHUNK, 3 * CHUNK]], [key]),
        (P2, "vda"): ("chunk damaged", [[2 * CHUNK, 3 * CHUNK], [5 * CHUNK, 6 * CHUNK]], [key]),
        (P2, "vdb"): ("chunk damaged", [[2 * CHUNK, 3 * CHUNK]], [key]),
    }
    assert by_id[P3]["ok"] is True and not by_id[P1]["ok"] and not by_id[P2]["ok"]
    # The text form names the points and ranges too.
    res = fleece("verify", "--repo", repo_dir, "--deep")
    assert res.rc == 1
    lines = res.out.splitlines()
    assert lines[0] == f"DAMAGED  {P1}  vm1"
    assert lines[1].startswith(f"    vda: chunk damaged at bytes {2 * CHUNK}-{3 * CHUNK} (1 object;")
    assert f"ok  {P3}  web1" in lines
    assert lines[-1].endswith("2 damaged")


def test_verifying_only_the_untouched_point_passes(repo_dir: Path, fleece: Any) -> None:
    flip_byte(chunk_file(repo_dir, SHARED))
    assert fleece("verify", "--repo", repo_dir, "--deep", P3[:12]).rc == 0
    res = fleece("verify", "--repo", repo_dir, "--deep", "--vm", "vm1", "latest", "--json")
    assert res.rc == 1
    assert [p["id"] for p in res.json()["points"]] == [P2]


def test_merged_ranges_of_neighbouring_bad_chunks(tmp_path: Path, store_point: Any,
                                                  fleece: Any) -> None:
    repo = Repository.init(FileBackend(tmp_path / "r"), chunk_size=CHUNK, hash="sha256")
    a, b, c = os.urandom(CHUNK), os.urandom(CHUNK), os.urandom(100)
    store_point(repo, P1, {"vda": disk(4 * CHUNK + 100, {1: a, 2: b, 4: c})})
    for data in (a, b, c):
        chunk_file(tmp_path / "r", data).unlink()
    res = fleece("verify", "--repo", tmp_path / "r", "--json")
    assert res.rc == 1
    [damage] = res.json()["points"][0]["damage"]
    assert damage["problem"] == "chunk missing"
    assert damage["ranges"] == [[CHUNK, 3 * CHUNK], [4 * CHUNK, 4 * CHUNK + 100]]
    assert len(damage["objects"]) == 3


def test_damaged_or_missing_index_and_point_are_damage(repo_dir: Path, fleece: Any) -> None:
    flip_byte(repo_dir / "indexes" / P1 / "vda", at=40)
    (repo_dir / "indexes" / P2 / "vdb").unlink()
    point3 = repo_dir / "points" / "web1" / f"{P3}.json"
    point3.write_text(point3.read_text().replace('"vm": "web1"', '"vm": "web2"'))
    res = fleece("verify", "--repo", repo_dir, "--json")
    assert res.rc == 1
    doc = res.json()
    found = [(p["id"], d["disk"], d["problem"], d["ranges"], d["objects"])
             for p in doc["points"] for d in p["damage"]]
    assert found == [
        (P1, "vda", "index damaged", [[0, MiB]], [f"indexes/{P1}/vda"]),
        (P2, "vdb", "index missing", [[0, MiB]], [f"indexes/{P2}/vdb"]),
        (P3, None, "point damaged", [], [f"points/web1/{P3}.json"]),
    ]
    assert "checksum" in doc["points"][2]["damage"][0]["detail"]


def test_unknown_point_is_bad_input(repo_dir: Path, fleece: Any) -> None:
    res = fleece("verify", "--repo", repo_dir, "20990101")
    assert res.rc == 2 and res.out == ""
    assert res.err == f"fleece: error: no restore point '20990101' in {repo_dir}\n"
    res = fleece("verify", "--repo", repo_dir, "latest")
    assert res.rc == 2 and "ambiguous" in res.err
    assert fleece("verify", "--repo", repo_dir.parent).rc == 2  # not a repository


class CountingBackend(MemoryBackend):
    """Counts ``get`` per key."""

    def __init__(self) -> None:
        super().__init__()
        self.gets: dict[str, int] = {}

    def get(self, key: str) -> bytes:
        self.gets[key] = self.gets.get(key, 0) + 1
        return super().get(key)


def test_a_shared_chunk_is_fetched_once_per_run(store_point: Any) -> None:
    backend = CountingBackend()
    assert isinstance(backend, Backend)
    repo = Repository.init(backend, chunk_size=CHUNK, hash="sha256")
    same = disk(16 * CHUNK, dict.fromkeys(range(16), SHARED))
    for n in range(5):
        store_point(repo, f"2026010{n + 1}T000000.000001Z-aaaaaa", {"vda": same, "vdb": same})
    report = verify_points(repo, resolve_points(repo, []), deep=True, workers=4)
    assert report.ok and report.chunks_checked == 1 and report.bytes_checked == CHUNK
    chunk_gets = {k: n for k, n in backend.gets.items() if k.startswith("chunks/")}
    assert list(chunk_gets.values()) == [1]


def test_deep_verify_catches_a_chunk_whose_length_does_not_fit(tmp_path: Path,
                                                               store_point: Any) -> None:
    # A tail chunk's plaintext stored where a full chunk belongs: the digest
    # matches the object, but the disk would come out short.
    repo = Repository.init(MemoryBackend(), chunk_size=CHUNK, hash="sha256")
    tail = b"x" * 100
    point = store_point(repo, P1, {"vda": disk(CHUNK + 100, {1: tail})})
    index = repo.read_index(point, "vda")
    index.set(0, repo.chunk_name(tail))
    point.disks[0].index_key, point.disks[0].index_digest = repo.write_index(P2, "vda", index)
    point.id = P2
    repo.write_point(point)
    report = verify_points(repo, [("vm1", P2)], deep=True)
    [damage] = report.points[0].damage
    assert (damage.problem, damage.ranges) == ("chunk has the wrong length", [(0, CHUNK)])
    assert verify_points(repo, [("vm1", P1)], deep=True).ok


@pytest.mark.s3
def test_verify_on_s3(s3_env: Any, s3_bucket: str, store_point: Any, fleece: Any) -> None:
    from fleece.repo.backends.url import open_backend

    url = f"s3://{s3_bucket}/repo"
    repo = Repository.init(open_backend(url), chunk_size=CHUNK, hash="sha256")
    store_point(repo, P1, {"vda": VDA1})
    store_point(repo, P2, {"vda": VDA2}, parent=P1)
    assert fleece("verify", "--repo", url, "--deep").rc == 0
    digest = repo.chunk_name(SHARED).hex()
    key = f"repo/chunks/{digest[:2]}/{digest}"
    s3 = s3_env.client()
    blob = bytearray(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    blob[-1] ^= 0x80
    s3.put_object(Bucket=s3_bucket, Key=key, Body=bytes(blob))
    res = fleece("verify", "--repo", url, "--deep", "--json")
    assert res.rc == 1
    assert [p["ok"] for p in res.json()["points"]] == [False, False]
    assert json.dumps(res.json()).count("chunk damaged") == 2


# -- real VMs, real backups -------------------------------------------------------------

def backup(fleece: Any, vm: Any, repo: Path, *extra: str) -> Any:
    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, "--json", *extra)
    assert res.rc == 0, res.err
    return res.json()


@pytest.mark.qemu
def test_backups_of_a_vm_verify_until_one_byte_of_a_shared_chunk_flips(
        make_vm: Any, fleece: Any, tmp_path: Path) -> None:
    vm = make_vm([("qcow2", "32M")])
    repo = tmp_path / "repo"
    vm.write("vda", 0, MiB, 0x11)  # sixteen identical chunks: one object, in both points
    vm.write("vda", 4 * MiB, 256 * KiB, 0x12)
    p1 = backup(fleece, vm, repo, "--chunk-size", "64K")["point"]
    vm.write("vda", 4 * MiB, 64 * KiB, 0x13)
    p2 = backup(fleece, vm, repo)["point"]
    res = fleece("verify", "--repo", repo, "--deep", "--json")
    assert res.rc == 0, res.out
    assert res.json()["chunks_checked"] == 3  # the 0x11, 0x12 and 0x13 chunks

    flip_byte(chunk_file(repo, b"\x11" * CHUNK))
    res = fleece("verify", "--repo", repo, "--deep", "--json")
    assert res.rc == 1
    doc = res.json()
    assert [(p["id"], p["ok"]) for p in doc["points"]] == [(p1, False), (p2, False)]
    for p in doc["points"]:
        [damage] = p["damage"]
        assert damage["disk"] == "vda" and damage["ranges"] == [[0, MiB]]
        assert damage["problem"] == "chunk damaged"


@pytest.mark.qemu
def test_backup_verify_refuses_to_commit_a_damaged_chunk(make_vm: Any, fleece: Any,
                                                          tmp_path: Path) -> None:
    from fleece.repo.format.codec import encode_chunk

    vm = make_vm([("qcow2", "32M")])
    repo = tmp_path / "repo"
    vm.write("vda", 0, 64 * KiB, 0x21)
    p1 = backup(fleece, vm, repo, "--chunk-size", "64K", "--verify")["point"]
    # A damaged copy of the chunk the guest is about to write is already in
    # the repository: the backup deduplicates against it instead of storing it.
    new = b"\x22" * CHUNK
    bad = bytearray(encode_chunk(new, None))
    bad[-1] ^= 0xFF
    chunk_file(repo, new).parent.mkdir(parents=True, exist_ok=True)
    chunk_file(repo, new).write_bytes(bytes(bad))
    vm.write("vda", MiB, 64 * KiB, 0x22)

    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, "--verify")
    assert res.rc == 1
    assert "--verify found damage" in res.err
    assert f"vda: chunk damaged at bytes {MiB}-{MiB + CHUNK}" in res.err
    # No point was written; the old checkpoint still records, so nothing is lost.
    assert [p["id"] for p in fleece("list", "--repo", repo, "--json").json()["points"]] == [p1]
    assert set(vm.bitmaps("vda")) == {f"fleece-{p1}"}

    chunk_file(repo, new).unlink()  # the repository is repaired: the next backup stores it
    p2 = backup(fleece, vm, repo, "--verify")
    assert p2["parent"] == p1 and p2["disks"][0]["level"] == "incremental"
    assert fleece("verify", "--repo", repo, "--deep").rc == 0
