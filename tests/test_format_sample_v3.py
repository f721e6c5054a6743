"""The checked-in samples of repository format 3 (paged indexes) must keep reading back exactly.

As for formats 1 and 2, the expectations are written from docs/format.md by
hand — struct layouts, sha256 of known plaintexts, the frame and the seal
opened with the cryptography library directly — not computed by fleece, so a
change to any byte layout, key name or checksum rule fails here. Never
regenerate the samples to make this pass (tests/data/make_sample_repo_v3.py
says what they hold).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import struct
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from fleece.cli import main

DATA = Path(__file__).parent / "data"
SAMPLE = DATA / "sample-repo-v3"
ENCRYPTED = DATA / "sample-repo-v3-encrypted"
CHUNK = 64 * 1024
POSITIONS = 800
A = b"\x55" * CHUNK
B = hashlib.shake_256(b"fleece sample chunk B").digest(CHUNK)
C = b"fleece!\n" * (CHUNK // 8)
E = b"delta!\n\0" * 1024
H = b"\x77" * 8192 + bytes(CHUNK - 8192)  # a chunk with holes
D1 = struct.pack("<III", 1, 4096, len(E)) + E  # delta plaintext: one extent at 4096
P1 = "20261207T010203.000001Z-bb0001"
P2 = "20261208T010203.000002Z-bb0002"
P3 = "20261209T010203.000003Z-bb0003"
ZERO = bytes(32)


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def sparse_form(data: bytes) -> bytes:
    """docs/format.md "Chunks", format 3: header, zero-block bitmap, the non-zero 4 KiB blocks."""
    blocks = [data[k : k + 4096] for k in range(0, len(data), 4096)]
    bitmap = bytearray(-(-len(blocks) // 8))
    for k, block in enumerate(blocks):
        if not any(block):
            bitmap[k // 8] |= 1 << (k % 8)
    return (b"FLSP" + struct.pack("<IQ", 4096, len(data)) + bytes(bitmap)
            + b"".join(b for b in blocks if any(b)))


def name(data: bytes) -> bytes:
    """A chunk's name in the plain format-3 sample: sha256 of its sparse form."""
    return sha(sparse_form(data))


def disk(point: str) -> bytes:
    """What vda holds at each point, from the description alone."""
    out = bytearray(POSITIONS * CHUNK)
    out[0:CHUNK] = A
    out[256 * CHUNK : 257 * CHUNK] = A
    out[515 * CHUNK : 516 * CHUNK] = C if point == P3 else B
    out[700 * CHUNK : 701 * CHUNK] = H
    if point != P1:
        out[3 * CHUNK + 4096 : 3 * CHUNK + 4096 + len(E)] = E
    return bytes(out)


def unframe(blob: bytes, magic: bytes) -> bytes:
    """The 14-byte chunk frame of docs/format.md: magic, version 1, codec, length; payload."""
    found, version, codec, length = struct.unpack_from("<4sBBQ", blob)
    assert (found, version) == (magic, 1) and codec in (0, 1)
    body = blob[14:] if codec == 0 else zstandard.ZstdDecompressor().decompress(blob[14:])
    assert len(body) == length
    return body


def top_table(blob: bytes) -> tuple[int, int, list[bytes]]:
    """docs/format.md "Index version 3": (disk size, positions per page, page names)."""
    plain = unframe(blob, b"FLIT")
    assert plain[-32:] == sha(plain[:-32])
    magic, version, chunk, size, count, per_page, reserved = struct.unpack_from("<4sB3xIQQII", plain)
    assert (magic, version, chunk, reserved) == (b"FLIX", 3, CHUNK, 0)
    assert count == -(-size // CHUNK)
    pages = -(-count // per_page)
    assert len(plain) == 36 + 32 * pages + 32
    return size, per_page, [plain[36 + 32 * p : 68 + 32 * p] for p in range(pages)]


def page(blob: bytes) -> tuple[list[bytes], dict[int, list[tuple[bytes, int, int, int, bytes]]]]:
    """A page: base digests, and per position its delta references."""
    plain = unframe(blob, b"FLPG")
    n, m = struct.unpack_from("<II", plain)
    assert len(plain) == 8 + 40 * n + 80 * m
    bases, refs = [], {}
    for k in range(n):
        base, first, count, reserved = struct.unpack_from("<32sIHH", plain, 8 + 40 * k)
        assert reserved == 0 and first + count <= m
        bases.append(base)
        if count:
            refs[k] = [struct.unpack_from("<32sQII32s", plain, 8 + 40 * n + 80 * (first + j))
                       for j in range(count)]
    return bases, refs


def test_config_says_format_3() -> None:
    doc = json.loads((SAMPLE / "config").read_bytes())
    assert doc["format"] == 3 and doc["hash"] == "sha256" and doc["chunk_size"] == CHUNK


def test_sample_holds_chunks_a_pack_four_pages_three_indexes_three_points() -> None:
    files = {p.relative_to(SAMPLE).as_posix() for p in SAMPLE.rglob("*") if p.is_file()}
    chunks = {f"chunks/{name(x).hex()[:2]}/{name(x).hex()}" for x in (A, B, C, H)}
    packs = {f for f in files if f.startswith("packs/")}
    pages = {f for f in files if f.startswith("pages/")}
    assert len(packs) == 1 and len(pages) == 4
    assert files == chunks | packs | pages | {"config", *(f"indexes/{p}/vda" for p in (P1, P2, P3)),
                                              *(f"points/web3/{p}.json" for p in (P1, P2, P3))}
    for key in packs | pages:  # named by the sha256 of their bytes
        assert key.rsplit("/", 1)[1] == sha((SAMPLE / key).read_bytes()).hex()


def _page(name: bytes) -> tuple[list[bytes], dict[int, list[tuple[bytes, int, int, int, bytes]]]]:
    return page((SAMPLE / f"pages/{name.hex()[:2]}/{name.hex()}").read_bytes())


def test_top_tables_and_pages_by_hand() -> None:
    tops = {}
    for p in (P1, P2, P3):
        blob = (SAMPLE / f"indexes/{p}/vda").read_bytes()
        point = json.loads((SAMPLE / f"points/web3/{p}.json").read_bytes())
        assert point["disks"][0]["index_digest"] == hashlib.sha256(blob).hexdigest()
        size, per_page, names = top_table(blob)
        assert (size, per_page, len(names)) == (POSITIONS * CHUNK, 256, 4)
        tops[p] = names
    n1, n2, n3 = tops[P1], tops[P2], tops[P3]
    # Point 1: pages 0 and 1 hold the same entries (A at their first position): one object.
    assert n1[0] == n1[1] and n1[3] == ZERO  # page 3 reads as zeroes: no object
    # Point 2 touched page 0 only; point 3 page 2 only: the others keep their names.
    assert n2[0] != n1[0] and n2[1:] == n1[1:]
    assert n3[2] != n2[2] and (n3[0], n3[1], n3[3]) == (n2[0], n2[1], n2[3])
    bases, refs = _page(n1[0])
    assert len(bases) == 256 and bases[0] == name(A) and set(bases[1:]) == {ZERO} and not refs
    bases, refs = _page(n1[2])
    assert (bases[3], bases[188]) == (name(B), name(H)) and bases.count(ZERO) == 254 and not refs
    bases, refs = _page(n3[2])
    assert (bases[3], bases[188]) == (name(C), name(H)) and bases.count(ZERO) == 254
    # The chunk with holes is named by its 8 KiB of data: the zero blocks are one bit each.
    assert sparse_form(H) == b"FLSP" + struct.pack("<IQ", 4096, CHUNK) + b"\xfc\xff" + b"\x77" * 8192
    bases, refs = _page(n2[0])
    assert bases[3] == ZERO and list(refs) == [3]  # a delta over a zero base: data, not a hole
    ((pack, offset, length, covered, digest),) = refs[3]
    assert (covered, digest) == (len(E), sha(D1))
    blob = (SAMPLE / f"packs/{pack.hex()[:2]}/{pack.hex()}").read_bytes()
    assert unframe(blob[offset : offset + length], b"FLDT") == D1


@pytest.mark.parametrize("point", [P1, P2, P3])
def test_every_point_restores_to_what_the_description_says(point: str, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(SAMPLE, repo)  # never touch the checked-in bytes
    out = tmp_path / "vda.raw"
    assert main(["restore", "--repo", str(repo), point, "--drive", "vda", "-o", str(out)]) == 0
    assert sha(out.read_bytes()) == sha(disk(point))


def test_list_and_deep_verify_read_the_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(SAMPLE, repo)
    assert main(["verify", "--repo", str(repo), "--deep", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and [p["id"] for p in report["points"]] == [P1, P2, P3]


# -- the encrypted sample (passphrase "sample") ----------------------------------------------

def _master() -> bytes:
    (key_file,) = (ENCRYPTED / "keys").iterdir()
    doc = json.loads(key_file.read_bytes())
    kdf, wrap = doc["kdf"], doc["wrap"]
    kek = Scrypt(salt=base64.b64decode(kdf["salt"]), length=32, n=kdf["n"], r=kdf["r"],
                 p=kdf["p"]).derive(b"sample")
    return AESGCM(kek).decrypt(base64.b64decode(wrap["nonce"]), base64.b64decode(wrap["key"]),
                               b"fleece key " + doc["id"].encode())


def _subkey(master: bytes, purpose: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"fleece " + purpose.encode()).derive(master)


def _open(master: bytes, key: str, stored: str | None = None) -> bytes:
    """docs/format.md "Sealed objects", by hand (AES-256-GCM, 64 KiB segments); ``key`` is the
    logical key (in the associated data), ``stored`` where it lies if the key holds a name token."""
    blob = (ENCRYPTED / (stored or key)).read_bytes()
    assert blob[-32:] == sha(blob[:-32])  # the outer checksum
    header = blob[:32]
    magic, version, cipher, seg_log2, length, prefix = struct.unpack_from("<4sBBBxQ8s", header)
    assert (magic, version, cipher, seg_log2) == (b"FLEN", 1, 1, 16)
    aead, out, pos = AESGCM(_subkey(master, "objects")), b"", 32
    for n in range(max(1, -(-length // 65536))):
        size = min(65536, length - n * 65536) + 16
        out += aead.decrypt(prefix + n.to_bytes(4, "big"), blob[pos : pos + size], header + key.encode())
        pos += size
    assert len(out) == length and pos == len(blob) - 32
    return out


def test_encrypted_sample_pages_are_sealed_and_named_by_a_keyed_hash() -> None:
    doc = json.loads((ENCRYPTED / "config").read_bytes())
    assert doc["format"] == 3 and doc["encryption"] == "aes-256-gcm"
    master = _master()
    ids = _subkey(master, "ids")
    pages = sorted(p.relative_to(ENCRYPTED).as_posix() for p in (ENCRYPTED / "pages").rglob("*")
                   if p.is_file())
    assert len(pages) == 4
    for key in pages:
        plain = _open(master, key)  # the page object as a plain repository would hold it
        assert key.rsplit("/", 1)[1] == hmac.new(ids, plain, hashlib.sha256).hexdigest()
        bases, _ = page(plain)
        assert len(bases) == 256
    (index_key,) = [p for p in (ENCRYPTED / "indexes").rglob("*") if p.is_file()
                    and p.parent.name == P1]
    _, _, names = top_table(_open(master, f"indexes/{P1}/vda",
                                  index_key.relative_to(ENCRYPTED).as_posix()))
    assert names[0] == names[1] and names[3] == ZERO
    chunk_a = hmac.new(ids, sparse_form(A), hashlib.sha256).digest()
    assert page(_open(master, f"pages/{names[0].hex()[:2]}/{names[0].hex()}"))[0][0] == chunk_a


def test_encrypted_sample_restores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ENCRYPTED, repo)
    monkeypatch.setenv("FLEECE_PASSPHRASE", "sample")
    out = tmp_path / "vda.raw"
    assert main(["restore", "--repo", str(repo), P2, "--vm", "web3", "--drive", "vda",
                 "-o", str(out)]) == 0
    assert sha(out.read_bytes()) == sha(disk(P2))
