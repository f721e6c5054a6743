"""The checked-in encrypted samples, one per envelope version, must keep opening and restoring.

``tests/data/sample-repo-encrypted-v1`` (AES-256-GCM, a scrypt key object,
envelope 1: written by fleece before envelope 2) and ``-v2``
(ChaCha20-Poly1305, an Argon2id key object, envelope 2), each with its
passphrase next to it. Everything is decoded here by hand from
docs/format.md ("Encryption") with the primitives alone — the KDF, the key
wrap, the HKDF subkeys, the envelope of each version, the name tokens, the
keyed chunk names — and then restored by the CLI. A change to key
derivation or to either envelope that would strand existing repositories
fails here. Never regenerate a sample to make this pass.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import struct
from pathlib import Path

import blake3
import pytest
import zstandard
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from test_format_sample_v2 import CHUNK, CHUNK1, CHUNK2_P2, D1, D2, A, B, C, Z, parse_index_v2

from fleece.cli import main

DATA = Path(__file__).parent / "data"
P1 = "20261201T010203.000001Z-ee0001"
P2 = "20261202T010203.000002Z-ee0002"
EXPECTED = {P1: A + Z + B + A, P2: A + CHUNK1 + CHUNK2_P2 + C}
VERSIONS = {1: ("aes-256-gcm", "scrypt"), 2: ("chacha20-poly1305", "argon2id")}


def sample(version: int) -> Path:
    return DATA / f"sample-repo-encrypted-v{version}"


def passphrase(version: int) -> bytes:
    return (DATA / f"sample-repo-encrypted-v{version}.passphrase").read_text().strip().encode()


def subkey(master: bytes, purpose: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"fleece " + purpose.encode()).derive(master)


def unwrap(version: int) -> bytes:
    """The master key, from the key object and the passphrase (docs: "The master key")."""
    (path,) = (sample(version) / "keys").iterdir()
    doc = json.loads(path.read_bytes())
    assert doc["format"] == 1 and doc["id"] == path.name and doc["wrap"]["cipher"] == "aes-256-gcm"
    kdf, salt = doc["kdf"], base64.b64decode(doc["kdf"]["salt"])
    assert kdf["name"] == VERSIONS[version][1]
    if kdf["name"] == "scrypt":
        kek = Scrypt(salt=salt, length=32, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(passphrase(version))
    else:
        assert kdf["memory_kib"] >= 64 * 1024
        kek = Argon2id(salt=salt, length=32, iterations=kdf["iterations"], lanes=kdf["lanes"],
                       memory_cost=kdf["memory_kib"]).derive(passphrase(version))
    master = AESGCM(kek).decrypt(base64.b64decode(doc["wrap"]["nonce"]),
                                 base64.b64decode(doc["wrap"]["key"]), b"fleece key " + doc["id"].encode())
    assert len(master) == 64
    return master


def open_by_hand(version: int, master: bytes, logical: str, blob: bytes) -> bytes:
    """One sealed object, opened as docs/format.md "Sealed objects" says for its version."""
    cipher: type[AESGCM] | type[ChaCha20Poly1305] = (
        AESGCM if VERSIONS[version][0] == "aes-256-gcm" else ChaCha20Poly1305)
    aead: AESGCM | ChaCha20Poly1305
    assert blob[:4] == b"FLEN" and blob[4] == version
    if version == 1:
        _, _, cipher_id, log2, length, prefix = struct.unpack_from("<4sBBBxQ8s8x", blob)
        header, aead = blob[:32], cipher(subkey(master, "objects"))

        def nonce(n: int) -> bytes:
            return bytes(prefix + n.to_bytes(4, "big"))
        assert blob[-32:] == hashlib.sha256(blob[:-32]).digest()
    else:
        _, _, cipher_id, log2, length, salt = struct.unpack_from("<4sBBBxQ24s8x", blob)
        header = blob[:48]
        object_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
                          info=b"fleece object " + bytes([cipher_id])).derive(subkey(master, "objects 2"))
        aead = cipher(object_key)

        def nonce(n: int) -> bytes:
            return n.to_bytes(12, "big")
        assert blob[-32:] == blake3.blake3(blob[:-32]).digest()
        assert log2 == 16 if logical.startswith("packs/") else (1 << log2) >= length
    assert cipher_id == {AESGCM: 1, ChaCha20Poly1305: 2}[cipher]
    seg = 1 << log2
    segments = max(1, -(-length // seg))
    assert len(blob) == len(header) + length + 16 * segments + 32
    out, pos = b"", len(header)
    for n in range(segments):
        size = min(seg, length - n * seg) + 16
        out += aead.decrypt(nonce(n), blob[pos : pos + size], header + logical.encode())
        pos += size
    return out


def name_of(master: bytes, token: str) -> str:
    siv = AESSIV(subkey(master, "names") + subkey(master, "names 2"))
    padded = siv.decrypt(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)), None)
    return padded.rstrip(b"\0")[:-1].decode()


def keyed(master: bytes, data: bytes) -> bytes:
    return hmac.new(subkey(master, "ids"), data, hashlib.sha256).digest()


def unchunk(blob: bytes) -> bytes:
    magic, version, codec, length = struct.unpack_from("<4sBBQ", blob)
    assert (magic, version) == (b"FLCK", 1)
    body = blob[14:] if codec == 0 else zstandard.ZstdDecompressor().decompress(blob[14:])
    assert len(body) == length
    return body


@pytest.fixture(scope="module", params=[1, 2])
def opened(request: pytest.FixtureRequest) -> tuple[int, bytes, dict[str, bytes]]:
    """(version, master key, logical key → plaintext) of every sealed object, opened by hand."""
    version = request.param
    master = unwrap(version)
    root = sample(version)
    config = json.loads((root / "config").read_bytes())
    body = {k: v for k, v in config.items() if k != "auth"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    assert config["auth"] == hmac.new(subkey(master, "config"), canonical, hashlib.sha256).hexdigest()
    assert config["encryption"] == VERSIONS[version][0] and config["format"] == 2
    plain = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stored = path.relative_to(root).as_posix()
        if stored == "config" or stored.startswith("keys/"):
            continue
        parts = stored.split("/")
        if parts[0] == "indexes":
            parts[2] = name_of(master, parts[2])
        elif parts[0] == "points":
            parts[1] = name_of(master, parts[1])
        logical = "/".join(parts)
        plain[logical] = open_by_hand(version, master, logical, path.read_bytes())
    return version, master, plain


def test_every_object_opens_by_hand_and_names_decrypt(opened: tuple[int, bytes, dict[str, bytes]]) -> None:
    _, master, plain = opened
    chunks = {k: unchunk(v) for k, v in plain.items() if k.startswith("chunks/")}
    assert sorted(chunks.values()) == sorted([A, B, C])
    for key, data in chunks.items():  # named by the keyed hash of their plaintext
        assert key == f"chunks/{keyed(master, data).hex()[:2]}/{keyed(master, data).hex()}"
    assert {k for k in plain if not k.startswith(("chunks/", "packs/"))} == {
        f"indexes/{P1}/vda", f"indexes/{P2}/vda", f"points/web3/{P1}.json", f"points/web3/{P2}.json"}
    point = json.loads(plain[f"points/web3/{P2}.json"])
    assert point["vm"] == "web3" and point["parent"] == P1 and point["disks"][0]["name"] == "vda"


def test_indexes_name_keyed_chunks_and_deltas_in_the_pack(
        opened: tuple[int, bytes, dict[str, bytes]]) -> None:
    _, master, plain = opened
    entries, size = parse_index_v2(plain[f"indexes/{P2}/vda"])
    assert size == 4 * CHUNK
    assert [base for base, _ in entries] == [keyed(master, A), bytes(32), keyed(master, B), keyed(master, C)]
    (d1,), (d2,) = entries[1][1], entries[2][1]
    for (pack, offset, length, _, digest), body in ((d1, D1), (d2, D2)):
        encoded = plain[f"packs/{pack.hex()[:2]}/{pack.hex()}"][offset : offset + length]
        assert encoded[:5] == b"FLDT\x01" and digest == keyed(master, body)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("point", [P1, P2])
def test_the_cli_restores_every_point_of_each_version(version: int, point: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(sample(version), repo)  # never touch the checked-in bytes
    monkeypatch.setenv("FLEECE_PASSPHRASE", passphrase(version).decode())
    out = tmp_path / "vda.raw"
    assert main(["restore", "--repo", str(repo), point, "--drive", "vda", "-o", str(out)]) == 0
    assert out.read_bytes() == EXPECTED[point]


@pytest.mark.parametrize("version", [1, 2])
def test_deep_and_outer_verify_pass_on_each_version(version: int, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(sample(version), repo)
    assert main(["verify", "--repo", str(repo), "--outer", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["objects_checked"] == 8
    monkeypatch.setenv("FLEECE_PASSPHRASE", passphrase(version).decode())
    assert main(["verify", "--repo", str(repo), "--deep", "--json"]) == 0
    assert [p["id"] for p in json.loads(capsys.readouterr().out)["points"]] == [P1, P2]


def test_both_samples_are_what_their_names_say() -> None:
    for version in VERSIONS:
        files = [p for p in sample(version).rglob("*") if p.is_file() and p.parent.name != "keys"
                 and p.name != "config"]
        assert files and all(p.read_bytes()[4] == version for p in files)
