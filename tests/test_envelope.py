"""Sealed objects and key objects of an encrypted repository, one layer at a time (no VM).

Objects are bound to their logical key: an authentic object of the *same*
repository moved under another object's name (index ↔ index, point ↔ point,
chunk ↔ chunk, pack ↔ pack) fails to open. Every new object has a salt and
a key of its own, so no nonce repeats however many objects a repository
holds. Key objects: Argon2id at a calibrated cost, a cap on what a key
object may ask for, bounded JSON, and ``key export`` writes the very bytes
that opened.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from fleece.errors import RepositoryCorrupt
from fleece.repo import keyring
from fleece.repo.backends.file import FileBackend
from fleece.repo.format import crypto, envelope, keys
from fleece.repo.format.codec import encode_chunk
from fleece.repo.format.delta import PackWriter, encode_delta, encode_delta_body
from fleece.repo.format.index import ChunkIndex
from fleece.repo.format.point import DiskRecord, RestorePoint
from fleece.repo.repository import Repository

PASSPHRASE = b"envelope test passphrase"
CHUNK = 64 * 1024
P1 = "20261203T010203.000001Z-ab0001"
P2 = "20261204T010203.000002Z-ab0002"


def chunk(tag: int) -> bytes:
    return bytes([tag]) * 1000 + bytes(range(256)) * ((CHUNK - 1000) // 256) + bytes([tag]) * 536


def build(root: Path, cipher: str) -> Repository:
    """An encrypted repository with two points of VM ``web`` (disks vda, vdb), chunks and two packs."""
    repo = Repository.init(FileBackend(root), chunk_size=CHUNK, compression_level=3, format=2,
                           encryption=cipher, passphrase=PASSPHRASE)
    for n, (point_id, parent) in enumerate(((P1, None), (P2, P1))):
        disks = []
        for d, disk in enumerate(("vda", "vdb")):
            index = ChunkIndex.empty(CHUNK, 2 * CHUNK, repo.index_version)
            for i in range(2):
                data = chunk(16 * n + 4 * d + i)
                digest = repo.chunk_name(data)
                repo.put_chunk(digest, encode_chunk(data, 3))
                index.set(i, digest)
            writer = PackWriter(repo.put_pack)
            body = encode_delta_body([(100, 50)], bytes([n + d + 1]) * 50)
            writer.add(0, encode_delta(body, None), 50, repo.digest(body))
            for position, ref in writer.close():
                index.add_delta(position, ref)
            key, digest_hex = repo.write_index(point_id, disk, index)
            disks.append(DiskRecord(name=disk, level="full", virtual_size=2 * CHUNK, index_key=key,
                                    index_digest=digest_hex, bitmap=f"fleece-{point_id}", stats={}))
        repo.write_point(RestorePoint(id=point_id, vm="web", created=f"2026-12-0{3 + n}T01:02:03.00000{n}Z",
                                      parent=parent, chunk_size=CHUNK, disks=disks, fleece_version="0.3",
                                      qemu_version="9.0.0", labels={}, stats={}))
    return repo


def stored_path(repo: Repository, key: str) -> Path:
    return Path(repo.url) / repo.stored_key(key)


@pytest.fixture(params=["aes-256-gcm", "chacha20-poly1305"])
def sealed(request: pytest.FixtureRequest, tmp_path: Path) -> Repository:
    return build(tmp_path / "repo", request.param)


def logical(repo: Repository, prefix: str) -> list[str]:
    return sorted(repo.backend.list(prefix))


# -- swaps inside one repository --------------------------------------------------------------

@pytest.mark.parametrize("kind", ["indexes/", "points/", "chunks/", "packs/"])
def test_an_authentic_object_of_the_same_repository_under_another_name_fails_to_open(
        sealed: Repository, kind: str) -> None:
    a, b = logical(sealed, kind)[:2]
    assert sealed.backend.get(a) != sealed.backend.get(b)
    shutil.copyfile(stored_path(sealed, a), stored_path(sealed, b))  # whole, authentic, misplaced
    assert sealed.backend.get(a)  # the original still opens where it belongs
    with pytest.raises(RepositoryCorrupt, match="fails authentication"):
        sealed.backend.get(b)
    if kind == "packs/":  # the ranged read of one delta too
        with pytest.raises(RepositoryCorrupt, match="fails authentication"):
            Repository.open(FileBackend(Path(sealed.url)), lambda: PASSPHRASE).backend.get_range(b, 16, 10)


def test_a_point_swapped_with_another_point_of_its_vm_is_refused_by_load(sealed: Repository) -> None:
    one, two = (keys.point_key("web", p) for p in (P1, P2))
    shutil.copyfile(stored_path(sealed, one), stored_path(sealed, two))
    with pytest.raises(RepositoryCorrupt):
        sealed.load_point("web", P2)


# -- the envelope ----------------------------------------------------------------------------

def test_new_objects_are_envelope_2_with_a_salt_of_their_own(sealed: Repository) -> None:
    salts = set()
    for key in sealed.backend.list(""):
        blob = stored_path(sealed, key).read_bytes()
        header = envelope.parse_header(blob, key)
        assert header.version == 2 and len(header.nonce_material) == 24 and envelope.check_outer(blob)
        salts.add(header.nonce_material)
        ranged = key.startswith(keys.PACKS_PREFIX)
        assert header.segment_log2 == 16 if ranged else header.segments == 1
    assert len(salts) == len(list(sealed.backend.list("")))


def test_sealing_the_same_object_twice_never_reuses_a_key_and_nonce(sealed: Repository) -> None:
    assert sealed.sealed is not None
    one, two = (bytes(sealed.sealed.sealer.seal("points/x/y.json", b"same plaintext")) for _ in range(2))
    assert one[16:40] != two[16:40]  # the salts, hence the object keys, differ
    assert one[48:-32] != two[48:-32]


@pytest.mark.parametrize("damage", ["flip header", "flip body", "truncate", "pad", "other cipher"])
def test_a_damaged_envelope_fails_to_open(sealed: Repository, damage: str) -> None:
    key = logical(sealed, "indexes/")[0]
    path = stored_path(sealed, key)
    blob = bytearray(path.read_bytes())
    if damage == "flip header":
        blob[10] ^= 1  # the plaintext length
    elif damage == "flip body":
        blob[60] ^= 1
    elif damage == "truncate":
        del blob[-40:]
    elif damage == "pad":
        blob += b"\0" * 16
    else:
        blob[5] = 3 - blob[5]
    path.write_bytes(bytes(blob))
    with pytest.raises(RepositoryCorrupt):
        sealed.backend.get(key)
    assert not envelope.check_outer(bytes(blob))


def test_a_ranged_read_fetches_only_the_segments_it_needs(sealed: Repository) -> None:
    assert sealed.sealed is not None
    sealer = sealed.sealed.sealer
    plaintext = bytes(range(256)) * 1024  # 256 KiB: four 64 KiB segments
    blob = bytes(sealer.seal("packs/ab/cd", plaintext, ranged=True))
    first, last, start, size = sealer.segment_span(blob[:48], "packs/ab/cd", 70_000, 100)
    assert (first, last) == (1, 1) and size == 65536 + 16
    assert sealer.open_range("packs/ab/cd", blob[:48], blob[start : start + size], first, last,
                             70_000, 100) == plaintext[70_000:70_100]
    assert sealer.open("packs/ab/cd", blob) == plaintext


def test_an_object_sealed_straight_into_a_buffer_is_what_seal_returns(sealed: Repository) -> None:
    assert sealed.sealed is not None
    sealer = sealed.sealed.sealer
    data = chunk(7) * 3
    buf = memoryview(bytearray(sealer.sealed_size(len(data)) + 100))
    view = sealer.seal("chunks/aa/bb", data, into=buf)
    assert isinstance(view, memoryview) and view.obj is buf.obj
    assert sealer.open("chunks/aa/bb", bytes(view)) == data


# -- key objects -----------------------------------------------------------------------------

def key_doc(repo: Repository) -> dict[str, Any]:
    (key,) = repo.raw_backend.list(keys.KEY_OBJECTS_PREFIX)
    return dict(json.loads(repo.raw_backend.get(key)))


def test_a_new_key_object_is_argon2id_at_64_mib_or_more_and_opens(sealed: Repository) -> None:
    kdf = key_doc(sealed)["kdf"]
    assert kdf["name"] == "argon2id" and kdf["memory_kib"] >= 64 * 1024
    assert crypto.ARGON2_ITERATIONS <= kdf["iterations"] <= 12 and kdf["lanes"] == 4
    assert Repository.open(FileBackend(Path(sealed.url)), lambda: PASSPHRASE).master == sealed.master


def test_calibration_raises_the_passes_on_a_fast_host_within_the_cap() -> None:
    assert crypto.calibrated_iterations(1.0) == 3  # slow host: the floor
    assert crypto.calibrated_iterations(0.25) == 6  # twice as fast as the target: twice the passes
    assert crypto.calibrated_iterations(0.001) == 12  # capped at 4x the default work
    assert crypto.ARGON2_MEMORY_KIB * 12 <= crypto.ARGON2_MAX_WORK


def wrapped(kdf: dict[str, Any]) -> bytes:
    doc = {"format": 1, "id": "0123456789abcdef", "created": "", "kdf": kdf,
           "wrap": {"cipher": "aes-256-gcm", "nonce": base64.b64encode(bytes(12)).decode(),
                    "key": base64.b64encode(bytes(80)).decode()}}
    return json.dumps(doc).encode()


SALT = base64.b64encode(bytes(16)).decode()


@pytest.mark.parametrize("kdf", [
    {"name": "argon2id", "memory_kib": 512 * 1024, "iterations": 3, "lanes": 4, "salt": SALT},
    {"name": "argon2id", "memory_kib": 64 * 1024, "iterations": 13, "lanes": 4, "salt": SALT},
    {"name": "scrypt", "n": 1 << 22, "r": 32, "p": 16, "salt": SALT},
    {"name": "scrypt", "n": 1 << 19, "r": 8, "p": 1, "salt": SALT},
    {"name": "scrypt", "n": 1 << 15, "r": 8, "p": 1.0, "salt": SALT},
    {"name": "pbkdf2", "salt": SALT},
])
def test_a_key_object_asking_for_more_than_the_cap_is_not_a_key(kdf: dict[str, Any]) -> None:
    with pytest.raises(RepositoryCorrupt, match="not a fleece key"):
        crypto.parse_key(wrapped(kdf), "key k")


@pytest.mark.parametrize("kdf", [
    {"name": "scrypt", "n": 1 << 15, "r": 8, "p": 1, "salt": SALT},  # every key before envelope 2
    {"name": "scrypt", "n": 1 << 17, "r": 8, "p": 1, "salt": SALT},
    {"name": "argon2id", "memory_kib": 64 * 1024, "iterations": 12, "lanes": 4, "salt": SALT},
    {"name": "argon2id", "memory_kib": 256 * 1024, "iterations": 3, "lanes": 4, "salt": SALT},
])
def test_key_objects_within_the_cap_parse(kdf: dict[str, Any]) -> None:
    assert crypto.parse_key(wrapped(kdf), "key k")["kdf"] == kdf


@pytest.mark.parametrize("blob", [b"[" * 200_000, b"{\"a\":" * 5000 + b"1" + b"}" * 5000,
                                  b'{"format": 1, "kdf": [[[[[[1]]]]]]}', b" " * 20_000 + b"{}"])
def test_a_deep_or_huge_key_object_is_refused_in_one_line(blob: bytes) -> None:
    with pytest.raises(RepositoryCorrupt, match="not a fleece key"):
        crypto.parse_key(blob, "key k")


def test_a_planted_costly_key_object_is_never_derived_and_the_repository_opens(
        sealed: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    planted = wrapped({"name": "argon2id", "memory_kib": 1024 * 1024, "iterations": 3, "lanes": 4,
                       "salt": SALT}).replace(b"0123456789abcdef", b"0000000000000000")
    sealed.raw_backend.put(keys.key_object_key("0000000000000000"), planted)  # sorts first
    derived: list[dict[str, Any]] = []
    real = crypto._derive

    def spy(passphrase: bytes, kdf: dict[str, Any]) -> bytes:
        derived.append(kdf)
        return real(passphrase, kdf)

    monkeypatch.setattr(crypto, "_derive", spy)
    opened = Repository.open(FileBackend(Path(sealed.url)), lambda: PASSPHRASE)
    assert opened.master == sealed.master
    assert [k["memory_kib"] for k in derived] == [64 * 1024]


def test_key_export_writes_the_bytes_that_opened_not_what_the_store_holds_now(sealed: Repository) -> None:
    (key,) = sealed.raw_backend.list(keys.KEY_OBJECTS_PREFIX)
    original = sealed.raw_backend.get(key)
    opened = Repository.open(FileBackend(Path(sealed.url)), lambda: PASSPHRASE)
    sealed.raw_backend.put(key, original.replace(b"argon2id", b"scrypt"))  # replaced meanwhile
    assert keyring.export_key(opened) == original
