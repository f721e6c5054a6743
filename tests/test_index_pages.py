"""Format 3: paged indexes (docs/format.md "Index version 3").

An incremental stores only the pages it touched and a small top table; every
reader gets the whole index back; gc keeps the pages kept points name and
deletes the others; copy carries pages. One layer (the repository over the
file backend, and over the encrypted wrapper), no QEMU: the end-to-end
backups of format-3 repositories run in the backup, copy and gc test files.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import struct
from datetime import timedelta
from pathlib import Path

import blake3
import pytest

from fleece.errors import RepositoryCorrupt
from fleece.maintenance.gc import collect_garbage
from fleece.repo.backends.file import FileBackend
from fleece.repo.format import keys
from fleece.repo.format.codec import encode_chunk, sparse_digest_function
from fleece.repo.format.delta import DeltaRef
from fleece.repo.format.index import INDEX_VERSION_PAGED, PAGE_POSITIONS, ChunkIndex
from fleece.repo.format.point import DiskRecord, RestorePoint
from fleece.repo.repository import Repository

CHUNK = 4 * 1024 * 1024
TIB = 1 << 40


def _repo(tmp_path: Path, **kw: object) -> Repository:
    return Repository.init(FileBackend(tmp_path / "repo"), **kw)  # type: ignore[arg-type]


def _digest(n: int) -> bytes:
    return hashlib.sha256(f"chunk {n}".encode()).digest()


def _point(repo: Repository, point_id: str, index: ChunkIndex, parent: str | None = None
           ) -> tuple[RestorePoint, int, int]:
    key, digest, written = repo.write_index_counted(point_id, "vda", index)
    point = RestorePoint(id=point_id, vm="vm1", created="2026-12-07T10:00:00.000000Z",
                         parent=parent, chunk_size=index.chunk_size,
                         disks=[DiskRecord(name="vda", level="full", virtual_size=index.disk_size,
                                           index_key=key, index_digest=digest, bitmap=None,
                                           stats={})],
                         fleece_version="0.3.0", qemu_version=None, labels={}, stats={})
    repo.write_point(point)
    return point, written.objects, written.bytes


P1 = "20261207T100000.000001Z-000001"
P2 = "20261207T110000.000001Z-000002"
P3 = "20261207T120000.000001Z-000003"


def test_new_repositories_are_format_3_with_paged_indexes(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    assert repo.config.format == 3 and repo.index_version == INDEX_VERSION_PAGED


def test_incremental_of_a_1_tib_disk_writes_what_it_touched(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's case: 1 TiB thin disk, 256 MiB of data, then 16 scattered positions change.

    Version 2 rewrote 10,487,108 bytes of index per point; version 3 writes
    the touched pages and a top table."""
    repo = _repo(tmp_path)
    full = ChunkIndex.empty(CHUNK, TIB, repo.index_version)
    for k in range(64):  # 256 MiB of data: 64 positions spread over the disk
        full.set(k * 4096, _digest(k))
    _, objects, written = _point(repo, P1, full)
    assert objects == 64 + 1  # one page per position with data (each in its own page), the top
    incr = repo.read_index(repo.load_point("vm1", P1), "vda")
    assert incr == full
    incr = incr.copy()
    for k in range(16):
        incr.set(k * 16384 + 7, _digest(1000 + k))  # 16 positions in 16 different pages
    encoded: list[int] = []
    encode = ChunkIndex.encode_page

    def counted(self: ChunkIndex, p: int) -> bytes:
        encoded.append(p)
        return encode(self, p)

    monkeypatch.setattr(ChunkIndex, "encode_page", counted)
    _, objects, written = _point(repo, P2, incr, parent=P1)
    assert objects == 16 + 1
    assert len(encoded) == 16  # the untouched pages are not even encoded again
    assert written < 64 * 1024, written  # was 10,487,108 with version 2
    back = repo.read_index(repo.load_point("vm1", P2), "vda")
    assert back == incr
    v2 = incr.copy()
    v2.version = 2
    assert len(v2.to_bytes()) == 36 + 40 * (TIB // CHUNK) + 32  # what version 2 would write


def test_unchanged_pages_are_not_rewritten_and_equal_pages_are_one_object(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    disk = 4 * PAGE_POSITIONS * CHUNK  # four pages
    index = ChunkIndex.empty(CHUNK, disk, repo.index_version)
    index.set(0, _digest(1))
    index.set(PAGE_POSITIONS, _digest(1))  # page 1 equals page 0: one object
    index.set(3 * PAGE_POSITIONS + 5, _digest(2))
    _, objects, _ = _point(repo, P1, index)
    assert objects == 2 + 1
    assert len(list(repo.backend.list(keys.PAGES_PREFIX))) == 2
    again = repo.read_index(repo.load_point("vm1", P1), "vda").copy()
    _, objects, _ = _point(repo, P2, again, parent=P1)  # nothing changed
    assert objects == 1  # the top table only


def test_a_zero_base_with_deltas_is_not_a_zero_page(tmp_path: Path) -> None:
    """One definition of "reads as zeroes" (ChunkIndex.is_zero) decides which pages exist."""
    repo = _repo(tmp_path)
    index = ChunkIndex.empty(CHUNK, 2 * PAGE_POSITIONS * CHUNK, repo.index_version)
    ref = DeltaRef(_digest(7), 16, 100, 50, _digest(8))
    index.add_delta(PAGE_POSITIONS + 3, ref)
    assert index.page_is_zero(0) and not index.page_is_zero(1)
    point, objects, _ = _point(repo, P1, index)
    assert objects == 1 + 1
    back = repo.read_index(point, "vda")
    assert back.deltas_of(PAGE_POSITIONS + 3) == (ref,) and back.is_zero(0)
    assert not back.is_zero(PAGE_POSITIONS + 3)


def test_damaged_or_missing_pages_are_refused(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    index = ChunkIndex.empty(CHUNK, 3 * CHUNK, repo.index_version)
    index.set(1, _digest(1))
    point, _, _ = _point(repo, P1, index)
    (page_key,) = repo.backend.list(keys.PAGES_PREFIX)
    path = tmp_path / "repo" / page_key
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(RepositoryCorrupt, match="does not match its name"):
        repo.read_index(point, "vda")
    path.unlink()
    with pytest.raises(RepositoryCorrupt, match="is missing"):
        repo.read_index(point, "vda")


def test_gc_keeps_pages_of_kept_points_and_deletes_the_others(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    disk = 2 * PAGE_POSITIONS * CHUNK
    data = b"x" * CHUNK
    one = repo.digest(data)
    repo.put_chunk(one, encode_chunk(data, 3))
    index = ChunkIndex.empty(CHUNK, disk, repo.index_version)
    index.set(0, one)
    index.set(PAGE_POSITIONS + 1, one)  # page 1 differs from page 0
    first, _, _ = _point(repo, P1, index)
    index = repo.read_index(first, "vda").copy()
    index.set(1, one)  # page 0 changes; page 1 stays shared
    second, _, _ = _point(repo, P2, index, parent=P1)
    assert len(list(repo.backend.list(keys.PAGES_PREFIX))) == 3
    repo.delete_point(first)
    report = collect_garbage(repo, grace=timedelta(0))
    assert (report.pages_kept, report.pages_deleted) == (2, 1)
    assert report.as_dict()["objects_deleted"] == 1
    assert repo.read_index(second, "vda") == index  # whole after gc


def test_encrypted_pages_are_sealed_and_keyed(tmp_path: Path) -> None:
    repo = _repo(tmp_path, encryption="aes-256-gcm", passphrase=b"pw")
    index = ChunkIndex.empty(CHUNK, 3 * CHUNK, repo.index_version)
    index.set(2, repo.digest(b"y" * CHUNK))
    point, _, _ = _point(repo, P1, index)
    stored = [k for k in repo.raw_backend.list("") if k.startswith(keys.PAGES_PREFIX)]
    assert len(stored) == 1
    raw = (tmp_path / "repo" / stored[0]).read_bytes()
    assert raw[:4] == b"FLEN"  # sealed
    assert repo.read_index(point, "vda") == index


# -- chunk names that do not hash holes (format 3) ------------------------------------------

def _sparse_form(data: bytes) -> bytes:
    """docs/format.md "Chunks", by hand: header, zero-block bitmap, then the non-zero blocks."""
    blocks = [data[k : k + 4096] for k in range(0, len(data), 4096)]
    bitmap = bytearray(-(-len(blocks) // 8))
    for k, block in enumerate(blocks):
        if not any(block):
            bitmap[k // 8] |= 1 << (k % 8)
    return (b"FLSP" + struct.pack("<IQ", 4096, len(data)) + bytes(bitmap)
            + b"".join(b for b in blocks if any(b)))


@pytest.mark.parametrize("hash_name", ["sha256", "blake3"])
@pytest.mark.parametrize("key", [None, b"k" * 32])
def test_a_fragmented_chunk_is_named_by_its_data_not_its_holes(hash_name: str, key: bytes | None) -> None:
    rng = random.Random(29)
    chunk = bytearray(CHUNK)
    for piece in range(4):  # 1 MiB of data in four 256 KiB pieces, some unaligned
        at = piece * CHUNK // 4 + rng.randrange(0, 4096)
        chunk[at : at + 256 * 1024] = rng.randbytes(256 * 1024)
    allocated = 4 * 256 * 1024
    form = _sparse_form(bytes(chunk))
    assert len(form) <= 1.05 * allocated  # what is hashed
    expected = (hmac.new(key, form, hashlib.sha256).digest() if hash_name == "sha256" and key else
                hashlib.sha256(form).digest() if hash_name == "sha256" else
                blake3.blake3(form, key=key).digest() if key else blake3.blake3(form).digest())
    name = sparse_digest_function(hash_name, key)
    assert name(chunk) == name(memoryview(bytes(chunk))) == expected
    # A block of written zeroes and a hole are the same content: one name.
    assert name(bytes(4096) + b"x" * 4096) == name(bytearray(4096) + b"x" * 4096)
    assert name(b"x" * 4096 + bytes(10)) != name(b"x" * 4096 + bytes(11))  # the length counts


def test_format_3_repositories_name_chunks_by_the_sparse_form(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "3", hash="sha256")
    data = b"\x01" * 4096 + bytes(CHUNK - 4096)
    assert repo.chunk_name(data) == hashlib.sha256(_sparse_form(data)).digest()
    assert repo.digest(data) == hashlib.sha256(data).digest()  # packs and pages: their bytes
    older = _repo(tmp_path / "2", format=2, hash="sha256")
    assert older.chunk_name(data) == hashlib.sha256(data).digest()


def test_gc_spares_the_pages_and_chunks_of_a_young_orphan_index(tmp_path: Path) -> None:
    """A backup writes pages, then its top table, then its point: between the two, gc keeps both."""
    repo = _repo(tmp_path)
    data = b"z" * CHUNK
    name = repo.chunk_name(data)
    repo.put_chunk(name, encode_chunk(data, 3))
    index = ChunkIndex.empty(CHUNK, 2 * PAGE_POSITIONS * CHUNK, repo.index_version)
    index.set(PAGE_POSITIONS + 2, name)
    repo.write_index(P1, "vda", index)  # no point: an orphan, younger than the grace period
    report = collect_garbage(repo, grace=timedelta(hours=1))
    assert (report.indexes_spared, report.pages_kept, report.pages_deleted) == (1, 1, 0)
    assert (report.chunks_kept, report.chunks_deleted) == (1, 0)
    old = collect_garbage(repo, grace=timedelta(0))
    assert (old.indexes_deleted, old.pages_deleted, old.chunks_deleted) == (1, 1, 1)
