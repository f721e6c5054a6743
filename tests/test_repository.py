"""The repository layer: config, chunks, indexes, points, and their checks."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from fleece.errors import BadInput, RepositoryCorrupt, RepositoryError
from fleece.fleecing.names import new_point_id
from fleece.repo.backends.file import FileBackend
from fleece.repo.format.codec import chunk_digest, encode_chunk
from fleece.repo.format.delta import DeltaRef
from fleece.repo.format.index import INDEX_VERSION_DELTAS, ChunkIndex
from fleece.repo.format.keys import escape_name, unescape_name
from fleece.repo.format.point import DiskRecord, RestorePoint
from fleece.repo.repository import InitSettings, Repository

CHUNK = 64 * 1024


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(FileBackend(tmp_path / "repo"), chunk_size=CHUNK, hash="sha256")


def flip_byte(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x20
    path.write_bytes(bytes(data))


def make_point(repo: Repository, vm: str = "vm1", disks: dict[str, bytes] | None = None,
               point_id: str | None = None, parent: str | None = None) -> RestorePoint:
    """Store ``disks`` (name → contents) the way a backup would and commit a point."""
    point_id = point_id or new_point_id()
    records = []
    for name, data in (disks or {"vda": b"\x01" * CHUNK + bytes(CHUNK)}).items():
        index = ChunkIndex.empty(CHUNK, len(data))
        for i in range(index.n_chunks):
            piece = data[i * CHUNK : (i + 1) * CHUNK]
            if piece.strip(b"\0"):
                digest = repo.chunk_name(piece)
                repo.put_chunk(digest, encode_chunk(piece, 3))
                index.set(i, digest)
        key, digest_hex = repo.write_index(point_id, name, index)
        records.append(DiskRecord(name, "full", len(data), key, digest_hex, None, {}))
    point = RestorePoint(point_id, vm, "2026-01-01T00:00:00.000000Z", parent, CHUNK, records,
                         "0.1.0", "7.2.0", {"k": "v"}, {"n": 1})
    repo.write_point(point)
    return point


# -- config ---------------------------------------------------------------------------

def test_init_then_open(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path / "r")
    created = Repository.init(backend, chunk_size=1 << 20, compression_level=7, hash="sha256")
    doc = json.loads((tmp_path / "r" / "config").read_bytes())
    assert doc["format"] == 3 and doc["chunk_size"] == 1 << 20 and doc["hash"] == "sha256"
    assert doc["compression"] == {"codec": "zstd", "level": 7}
    assert doc["encryption"] == "none"
    assert re.fullmatch(r"[0-9a-f]{32}", doc["id"])
    opened = Repository.open(FileBackend(tmp_path / "r"))
    assert opened.config == created.config
    assert opened.url == str(tmp_path / "r")


def test_uncompressed_repository(tmp_path: Path) -> None:
    Repository.init(FileBackend(tmp_path), compression_level=None, hash="sha256")
    assert json.loads((tmp_path / "config").read_bytes())["compression"]["codec"] == "none"
    assert Repository.open(FileBackend(tmp_path)).config.compression_level is None


@pytest.mark.parametrize("size", [0, 32 * 1024, 3 * CHUNK, 32 << 20, 100_000])
def test_chunk_size_must_be_a_power_of_two_in_range(tmp_path: Path, size: int) -> None:
    with pytest.raises(BadInput, match="power of two"):
        Repository.init(FileBackend(tmp_path), chunk_size=size, hash="sha256")
    assert not (tmp_path / "config").exists()


def test_init_twice_is_refused(repo: Repository) -> None:
    with pytest.raises(BadInput, match="already holds"):
        Repository.init(repo.backend, hash="sha256")


def test_not_a_repository(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"is not a fleece repository \(no config\)") as e:
        Repository.open(FileBackend(tmp_path))
    assert e.value.exit_code == 2


def test_open_or_init_creates_only_in_an_empty_location(tmp_path: Path) -> None:
    fresh = Repository.open_or_init(FileBackend(tmp_path / "new"), InitSettings(chunk_size=CHUNK))
    assert fresh.config.chunk_size == CHUNK
    again = Repository.open_or_init(FileBackend(tmp_path / "new"), InitSettings(chunk_size=1 << 20))
    assert again.config == fresh.config  # opened, not re-created with other settings
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(BadInput, match="not a fleece repository"):
        Repository.open_or_init(FileBackend(tmp_path / "other"), InitSettings())
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]


def test_newer_format_is_refused_as_an_operation_failure(tmp_path: Path) -> None:
    (tmp_path / "config").write_text(json.dumps({"format": 4}))
    with pytest.raises(RepositoryError, match="format 4") as e:
        Repository.open(FileBackend(tmp_path))
    assert not isinstance(e.value, BadInput)
    assert e.value.exit_code == 1


@pytest.mark.parametrize("text", ["not json", "[]", '{"format": 1}',
                                  '{"format": 1, "id": "x", "chunk_size": 1000, "hash": "sha256",'
                                  ' "compression": {"codec": "zstd", "level": 3},'
                                  ' "encryption": "none"}'])
def test_damaged_config(tmp_path: Path, text: str) -> None:
    (tmp_path / "config").write_text(text)
    with pytest.raises(RepositoryCorrupt):
        Repository.open(FileBackend(tmp_path))


# -- chunks ---------------------------------------------------------------------------

def test_chunks_round_trip_and_are_immutable(repo: Repository) -> None:
    data = b"chunk data" * 100
    digest = repo.chunk_name(data)
    assert repo.chunk_key(digest) == f"chunks/{digest.hex()[:2]}/{digest.hex()}"
    assert not repo.backend.exists(repo.chunk_key(digest))
    assert repo.put_chunk(digest, encode_chunk(data, 3)) is True
    repo.flush()  # the file backend publishes chunks once they are durable
    assert repo.backend.exists(repo.chunk_key(digest))
    assert repo.put_chunk(digest, encode_chunk(data, None)) is False
    assert repo.get_chunk(digest) == data


def test_flipped_byte_in_a_stored_chunk_is_detected(repo: Repository, tmp_path: Path) -> None:
    data = bytes(range(256)) * 256
    digest = repo.chunk_name(data)
    repo.put_chunk(digest, encode_chunk(data, 3))
    repo.flush()
    path = tmp_path / "repo" / repo.chunk_key(digest)
    flip_byte(path, path.stat().st_size - 5)
    with pytest.raises(RepositoryCorrupt):
        repo.get_chunk(digest)


def test_missing_chunk_is_corruption(repo: Repository) -> None:
    with pytest.raises(RepositoryCorrupt, match="missing"):
        repo.get_chunk(chunk_digest(b"never stored"))


# -- chunk index ----------------------------------------------------------------------

def test_chunk_index_basics() -> None:
    idx = ChunkIndex.empty(CHUNK, 3 * CHUNK + 10)
    assert idx.n_chunks == 4
    assert [idx.chunk_length(i) for i in range(4)] == [CHUNK, CHUNK, CHUNK, 10]
    assert [idx.get(i) for i in range(4)] == [None] * 4
    d1, d2 = chunk_digest(b"1"), chunk_digest(b"2")
    idx.set(0, d1)
    idx.set(3, d2)
    idx.set(2, d1)
    assert idx.digests() == {d1, d2}
    assert list(idx.stored()) == [(0, d1), (2, d1), (3, d2)]
    copy = idx.copy()
    copy.set(0, None)
    assert idx.get(0) == d1 and copy.get(0) is None
    with pytest.raises(IndexError):
        idx.get(4)
    with pytest.raises(ValueError):
        idx.set(1, bytes(32))  # the zero marker is not a digest


def test_a_zero_base_under_deltas_is_data_and_zero_runs_skip_it() -> None:
    idx = ChunkIndex.empty(CHUNK, 6 * CHUNK + 10, version=INDEX_VERSION_DELTAS)
    idx.set(1, chunk_digest(b"1"))
    idx.add_delta(3, DeltaRef(chunk_digest(b"pack"), 0, 100, 512, chunk_digest(b"d")))
    assert idx.get(3) is None and not idx.is_zero(3)  # a base of zeroes, data on top
    assert [i for i in range(idx.n_chunks) if idx.is_zero(i)] == [0, 2, 4, 5, 6]
    assert list(idx.zero_runs(1 << 30)) == [(0, CHUNK), (2 * CHUNK, CHUNK), (4 * CHUNK, 2 * CHUNK + 10)]
    assert list(idx.zero_runs(CHUNK)) == [(0, CHUNK), (2 * CHUNK, CHUNK), (4 * CHUNK, CHUNK),
                                          (5 * CHUNK, CHUNK), (6 * CHUNK, 10)]
    idx.set(3, None)  # rewritten whole as zeroes: the deltas go
    assert idx.is_zero(3) and list(idx.zero_runs(1 << 30)) == [(0, CHUNK), (2 * CHUNK, 4 * CHUNK + 10)]


def test_chunk_index_binary_round_trip() -> None:
    idx = ChunkIndex.empty(CHUNK, 10 * CHUNK)
    idx.set(7, chunk_digest(b"seven"))
    blob = idx.to_bytes()
    assert blob[:4] == b"FLIX" and len(blob) == 28 + 32 * 10 + 32
    assert ChunkIndex.from_bytes(blob) == idx
    empty = ChunkIndex.empty(CHUNK, 0)
    assert ChunkIndex.from_bytes(empty.to_bytes()).n_chunks == 0


@pytest.mark.parametrize("pos", [0, 5, 9, 30, 28 + 32 * 7, -1])
def test_flipped_byte_in_index_is_detected(pos: int) -> None:
    idx = ChunkIndex.empty(CHUNK, 10 * CHUNK)
    idx.set(7, chunk_digest(b"seven"))
    blob = bytearray(idx.to_bytes())
    blob[pos] ^= 1
    with pytest.raises(RepositoryCorrupt):
        ChunkIndex.from_bytes(bytes(blob))
    with pytest.raises(RepositoryCorrupt):
        ChunkIndex.from_bytes(bytes(blob[:-40]))


def test_read_index_checks_the_digest_in_the_point(repo: Repository, tmp_path: Path) -> None:
    point = make_point(repo)
    assert repo.read_index(point, "vda").get(0) == repo.chunk_name(b"\x01" * CHUNK)
    flip_byte(tmp_path / "repo" / point.disks[0].index_key, 40)
    with pytest.raises(RepositoryCorrupt, match="index"):
        repo.read_index(point, "vda")
    with pytest.raises(BadInput):
        repo.read_index(point, "vdb")


def test_missing_index_is_corruption(repo: Repository) -> None:
    point = make_point(repo)
    repo.backend.delete(point.disks[0].index_key)
    with pytest.raises(RepositoryCorrupt, match="missing"):
        repo.read_index(point, "vda")


# -- restore points -------------------------------------------------------------------

def test_point_ids_sort_by_time() -> None:
    t = datetime(2026, 11, 23, 7, 36, 0, 123456, tzinfo=UTC)
    pid = new_point_id(t)
    assert re.fullmatch(r"20261123T073600\.123456Z-[0-9a-f]{6}", pid)
    cet = timezone(timedelta(hours=1))
    assert new_point_id(datetime(2026, 11, 23, 8, 36, 0, 123456, tzinfo=cet))[:23] == pid[:23]
    ids = [new_point_id(t + timedelta(microseconds=n)) for n in (5, 1, 3, 2)]
    assert sorted(ids) == [ids[1], ids[3], ids[2], ids[0]]
    assert new_point_id(t) != new_point_id(t)  # random tail


def test_point_round_trip(repo: Repository) -> None:
    point = make_point(repo)
    blob = point.to_json()
    doc = json.loads(blob)
    assert doc["format"] == 1 and re.fullmatch(r"[0-9a-f]{64}", doc["checksum"])
    assert RestorePoint.from_json(blob) == point
    assert repo.find_point(point.id) == point


def test_flipped_byte_in_point_is_detected(repo: Repository, tmp_path: Path) -> None:
    point = make_point(repo)
    path = tmp_path / "repo" / "points" / "vm1" / f"{point.id}.json"
    text = path.read_text()
    path.write_text(text.replace('"k": "v"', '"k": "w"'))  # still valid JSON
    with pytest.raises(RepositoryCorrupt, match="checksum"):
        repo.find_point(point.id)
    path.write_text(text[:-10])
    with pytest.raises(RepositoryCorrupt, match="JSON"):
        repo.find_point(point.id)


def resealed(doc: dict[str, object]) -> bytes:
    """A point document with a correct checksum, to test field validation alone."""
    doc = {k: v for k, v in doc.items() if k != "checksum"}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    doc["checksum"] = hashlib.sha256(canonical.encode()).hexdigest()
    return json.dumps(doc).encode()


@pytest.mark.parametrize("field", ["id", "vm", "created", "parent", "chunk_size", "disks",
                                   "fleece_version", "qemu_version", "labels", "stats"])
def test_point_missing_field_is_corrupt(repo: Repository, field: str) -> None:
    doc = json.loads(make_point(repo).to_json())
    del doc[field]
    with pytest.raises(RepositoryCorrupt, match=field):
        RestorePoint.from_json(resealed(doc))


def test_point_with_wrong_types_or_unknown_format(repo: Repository) -> None:
    doc = json.loads(make_point(repo).to_json())
    bad = dict(doc, chunk_size="65536")
    with pytest.raises(RepositoryCorrupt, match="chunk_size"):
        RestorePoint.from_json(resealed(bad))
    bad_disk = dict(doc, disks=[dict(doc["disks"][0], level="partial")])
    with pytest.raises(RepositoryCorrupt, match="level"):
        RestorePoint.from_json(resealed(bad_disk))
    with pytest.raises(RepositoryError, match="format 9"):
        RestorePoint.from_json(resealed(dict(doc, format=9)))
    extra = dict(doc, future_field=[1, 2])
    assert RestorePoint.from_json(resealed(extra)).id == doc["id"]


def test_write_point_twice_is_refused(repo: Repository) -> None:
    point = make_point(repo)
    with pytest.raises(RepositoryError, match="already exists"):
        repo.write_point(point)


def test_list_and_find_points(repo: Repository) -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    a1 = make_point(repo, "web", point_id=new_point_id(t))
    b1 = make_point(repo, "db", point_id=new_point_id(t + timedelta(seconds=1)))
    a2 = make_point(repo, "web", point_id=new_point_id(t + timedelta(days=1)), parent=a1.id)
    assert [p.id for p in repo.list_points()] == [a1.id, b1.id, a2.id]
    assert [p.id for p in repo.list_points("web")] == [a1.id, a2.id]
    assert repo.list_points("nobody") == []
    assert repo.find_point(a2.id).parent == a1.id
    assert repo.find_point(b1.id[:20]).vm == "db"  # unique prefix
    with pytest.raises(BadInput, match="matches 3"):
        repo.find_point("2026010")
    with pytest.raises(BadInput, match="no restore point"):
        repo.find_point("2030")
    with pytest.raises(BadInput, match="ambiguous"):
        repo.find_point("latest")
    assert repo.find_point("latest", vm="web").id == a2.id


def test_delete_point_removes_point_and_indexes(repo: Repository, tmp_path: Path) -> None:
    keep = make_point(repo)
    gone = make_point(repo)
    repo.delete_point(gone)
    assert [p.id for p in repo.list_points()] == [keep.id]
    assert not (tmp_path / "repo" / "indexes" / gone.id).exists()
    assert repo.read_index(keep, "vda").n_chunks == 2


@pytest.mark.parametrize("name", ["vda", "#block123", "disk0", "../../etc", "a/b", ".", "..",
                                  ".tmp-x", "ünï cödé", "%41"])
def test_awkward_names_stay_inside_their_directory(repo: Repository, tmp_path: Path,
                                                  name: str) -> None:
    assert unescape_name(escape_name(name)) == name
    point = make_point(repo, vm=name, disks={name: b"\x07" * 100})
    root = tmp_path / "repo"
    index_file = root / point.disks[0].index_key
    assert index_file.parent == root / "indexes" / point.id
    assert (root / "points" / escape_name(name) / f"{point.id}.json").parent.parent == root / "points"
    assert repo.find_point(point.id).vm == name
    assert repo.list_points(name)[0].disks[0].name == name
    assert repo.read_index(point, name).n_chunks == 1


def test_distinct_names_never_share_a_key() -> None:
    names = ["a/b", "a%2Fb", "a_b", "A/B", ".a", "%2Ea"]
    assert len({escape_name(n) for n in names}) == len(names)
    with pytest.raises(BadInput):
        escape_name("")
    with pytest.raises(BadInput):
        escape_name("x" * 300)
