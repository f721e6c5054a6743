"""The checked-in sample of repository format 1 must keep reading back exactly.

The expectations here are written from docs/format.md by hand (struct layouts,
sha256 of known plaintexts), not computed by fleece, so a change to any byte
layout, key name or checksum rule fails this test. Never regenerate the sample
to make it pass: old repositories on users' disks look like this one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest

from fleece.cli import main
from fleece.repo.backends.file import FileBackend
from fleece.repo.repository import Repository

SAMPLE = Path(__file__).parent / "data" / "sample-repo-v1"
CHUNK = 64 * 1024
A = b"\x55" * CHUNK
B = hashlib.shake_256(b"fleece sample chunk B").digest(CHUNK)
C = b"fleece!\n" * (CHUNK // 8)
D = b"\xaa" * (100_000 - CHUNK)
Z = bytes(CHUNK)
P1 = "20261123T073600.123456Z-3f9a1c"
P2 = "20261124T073600.000001Z-0b7e55"


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def chunk_path(data: bytes) -> Path:
    h = sha(data).hex()
    return SAMPLE / "chunks" / h[:2] / h


def test_sample_holds_exactly_the_documented_objects() -> None:
    files = {p.relative_to(SAMPLE).as_posix() for p in SAMPLE.rglob("*") if p.is_file()}
    chunks = {chunk_path(x).relative_to(SAMPLE).as_posix() for x in (A, B, C, D)}
    assert files == chunks | {
        "config",
        f"indexes/{P1}/vda",
        f"indexes/{P2}/vda",
        f"indexes/{P2}/%23block7",
        f"points/web1/{P1}.json",
        f"points/web1/{P2}.json",
    }


def test_config_fields() -> None:
    assert json.loads((SAMPLE / "config").read_bytes()) == {
        "format": 1,
        "id": "00112233445566778899aabbccddeeff",
        "chunk_size": 65536,
        "hash": "sha256",
        "compression": {"codec": "zstd", "level": 3},
        "encryption": "none",
    }
    repo = Repository.open(FileBackend(SAMPLE))
    assert repo.config.chunk_size == CHUNK
    assert repo.config.compression_level == 3


@pytest.mark.parametrize(
    ("plain", "codec"), [(A, 1), (B, 0), (C, 1), (D, 1)], ids=["A-zstd", "B-plain", "C", "D"]
)
def test_chunk_object_header(plain: bytes, codec: int) -> None:
    blob = chunk_path(plain).read_bytes()
    magic, version, got_codec, length = struct.unpack_from("<4sBBQ", blob)
    assert (magic, version, got_codec, length) == (b"FLCK", 1, codec, len(plain))
    if codec == 0:
        assert blob[14:] == plain
    else:
        assert blob[14:18] == b"\x28\xb5\x2f\xfd"  # zstd frame magic
        assert len(blob) < len(plain)


def parse_index(blob: bytes) -> tuple[int, int, list[bytes]]:
    """Format-1 index parsed straight from the spec."""
    magic, version, reserved, chunk_size, disk_size, count = struct.unpack_from("<4sB3sIQQ", blob)
    assert (magic, version, reserved) == (b"FLIX", 1, b"\0\0\0")
    assert len(blob) == 28 + 32 * count + 32
    assert blob[-32:] == sha(blob[:-32])
    entries = [blob[28 + 32 * i : 60 + 32 * i] for i in range(count)]
    return chunk_size, disk_size, entries


def test_index_layout() -> None:
    zero = bytes(32)
    assert parse_index((SAMPLE / "indexes" / P1 / "vda").read_bytes()) == (
        CHUNK, 4 * CHUNK, [sha(A), zero, sha(B), sha(A)]
    )
    assert parse_index((SAMPLE / "indexes" / P2 / "vda").read_bytes()) == (
        CHUNK, 4 * CHUNK, [sha(A), sha(C), sha(B), zero]
    )
    assert parse_index((SAMPLE / "indexes" / P2 / "%23block7").read_bytes()) == (
        CHUNK, 100_000, [sha(C), sha(D)]
    )


def test_point_json_and_checksum() -> None:
    blob = (SAMPLE / "points" / "web1" / f"{P2}.json").read_bytes()
    doc = json.loads(blob)
    checksum = doc.pop("checksum")
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert checksum == hashlib.sha256(canonical.encode()).hexdigest()
    index_blob = (SAMPLE / "indexes" / P2 / "%23block7").read_bytes()
    assert doc["disks"][1] == {
        "name": "#block7",
        "level": "full",
        "virtual_size": 100000,
        "index_key": f"indexes/{P2}/%23block7",
        "index_digest": hashlib.sha256(index_blob).hexdigest(),
        "bitmap": None,
        "stats": {},
    }
    assert {k: doc[k] for k in ("format", "id", "vm", "created", "parent", "chunk_size")} == {
        "format": 1, "id": P2, "vm": "web1", "created": "2026-11-24T07:36:00.000001Z",
        "parent": P1, "chunk_size": 65536,
    }
    assert (doc["fleece_version"], doc["qemu_version"], doc["labels"]) == ("0.1.0", None, {})
    assert doc["disks"][0]["level"] == "incremental"


def test_repository_reads_the_sample() -> None:
    repo = Repository.open(FileBackend(SAMPLE))
    points = repo.list_points()
    assert [p.id for p in points] == [P1, P2]
    assert points[1].parent == P1
    assert [d.name for d in points[1].disks] == ["vda", "#block7"]
    assert points[0].labels == {"env": "test"}
    assert points[0].stats == {"seconds": 1.5}
    index = repo.read_index(points[1], "vda")
    assert [index.get(i) for i in range(4)] == [sha(A), sha(C), sha(B), None]
    assert repo.get_chunk(sha(D)) == D


@pytest.mark.parametrize(
    ("point", "drive", "expected"),
    [
        (P1, "vda", A + Z + B + A),
        (P2, "vda", A + C + B + Z),
        (P2, "#block7", C + D),
    ],
)
def test_restore_sample(tmp_path: Path, point: str, drive: str, expected: bytes) -> None:
    out = tmp_path / "disk.raw"
    # A copy, so that a buggy restore cannot damage the checked-in sample.
    repo_dir = tmp_path / "repo"
    shutil.copytree(SAMPLE, repo_dir)
    rc = main(["restore", "--repo", str(repo_dir), point, "--drive", drive, "--output", str(out)])
    assert rc == 0
    assert out.read_bytes() == expected
