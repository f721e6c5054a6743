"""Client-side encryption: the master key, its passphrase-wrapped copies, sealing, name tokens.

docs/format.md ("Encryption") is the source of truth; in short:

* a repository has one random 64-byte *master key*, never stored in clear:
  each ``keys/<id>`` object holds it wrapped (AES-256-GCM) under a key
  derived from one passphrase with scrypt, so several passphrases (or a
  rotated one) open the same repository;
* subkeys come from the master with HKDF-SHA256: one for the AEAD that
  seals every object, one that keys the hash naming chunks and packs, one
  for the deterministic encryption (AES-SIV) of names inside object keys,
  one that authenticates ``config``;
* every object is *sealed*: a 32-byte header, then the plaintext in 64 KiB
  segments, each encrypted with its own nonce (prefix ‖ segment number) and
  the header plus the object's logical key as associated data — so a
  flipped bit, a truncation or an object moved to another key fails — then
  a sha256 of everything before it, which a job without the key can check.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import struct
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from fleece.errors import BadInput, RepositoryCorrupt, RepositoryError

CIPHERS = {"aes-256-gcm": 1, "chacha20-poly1305": 2}
"""The AEADs a repository may seal its objects with, and their ids in the envelope."""
MASTER_BYTES = 64
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
"""scrypt cost: 32 MiB of memory and about 0.1 s per attempt on the project's machines."""

ENVELOPE_MAGIC = b"FLEN"
ENVELOPE_VERSION = 1
ENVELOPE_HEADER = struct.Struct("<4sBBBxQ8s8x")
"""magic, version, cipher id, log2 of the segment size, (1 reserved), plaintext length,
nonce prefix, (8 reserved)."""
SEGMENT_LOG2 = 16
TAG = 16
TRAILER = 32
MAX_NAME = 159
"""Longest name (UTF-8 bytes) an encrypted repository can hold: its token must fit a key component."""


class WrongPassphrase(RepositoryError):
    """No key object of the repository opens with the passphrase given."""


# -- keys ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MasterKey:
    """The repository's master key and the subkeys derived from it."""

    material: bytes

    def subkey(self, purpose: str) -> bytes:
        """A 32-byte key for one purpose (HKDF-SHA256)."""
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"fleece " + purpose.encode()).derive(self.material)

    @classmethod
    def generate(cls) -> MasterKey:
        """A new random master key."""
        return cls(secrets.token_bytes(MASTER_BYTES))


def _kek(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)


def wrap_key(master: MasterKey, passphrase: bytes, key_id: str, created: str) -> bytes:
    """A ``keys/<id>`` object: the master key wrapped under ``passphrase``."""
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    wrapped = AESGCM(_kek(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)).encrypt(
        nonce, master.material, b"fleece key " + key_id.encode())
    doc = {"format": 1, "id": key_id, "created": created,
           "kdf": {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P,
                   "salt": base64.b64encode(salt).decode()},
           "wrap": {"cipher": "aes-256-gcm", "nonce": base64.b64encode(nonce).decode(),
                    "key": base64.b64encode(wrapped).decode()}}
    return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"


def parse_key(blob: bytes, what: str) -> dict[str, Any]:
    """A key object's JSON, checked for the members :func:`unwrap_key` needs."""
    try:
        doc = json.loads(blob)
        if not isinstance(doc, dict) or doc.get("format") != 1:
            raise ValueError("not a format-1 key object")
        kdf, wrap = doc["kdf"], doc["wrap"]
        if kdf["name"] != "scrypt" or wrap["cipher"] != "aes-256-gcm":
            raise ValueError("unknown kdf or cipher")
        for field in (kdf["salt"], wrap["nonce"], wrap["key"]):
            base64.b64decode(field, validate=True)
        int(kdf["n"]), int(kdf["r"]), int(kdf["p"]), str(doc["id"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise RepositoryCorrupt(f"{what} is not a fleece key ({exc})") from None
    return doc


def unwrap_key(doc: dict[str, Any], passphrase: bytes) -> MasterKey | None:
    """The master key ``doc`` wraps, or None when ``passphrase`` does not open it."""
    kdf, wrap = doc["kdf"], doc["wrap"]
    n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
    if not (1 << 10 <= n <= 1 << 22 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        raise RepositoryCorrupt(f"key {doc['id']} has scrypt parameters out of range")
    kek = _kek(passphrase, base64.b64decode(kdf["salt"]), n, r, p)
    try:
        material = AESGCM(kek).decrypt(base64.b64decode(wrap["nonce"]), base64.b64decode(wrap["key"]),
                                       b"fleece key " + str(doc["id"]).encode())
    except InvalidTag:
        return None
    return MasterKey(material) if len(material) == MASTER_BYTES else None


def config_auth(master: MasterKey, doc: dict[str, Any]) -> str:
    """The MAC that binds ``config`` (without its ``auth`` member) to the master key."""
    body = {k: v for k, v in doc.items() if k != "auth"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hmac.new(master.subkey("config"), canonical, hashlib.sha256).hexdigest()


# -- sealing ---------------------------------------------------------------------------------

class Sealer:
    """Seals and opens objects with one repository's keys (thread-safe)."""

    def __init__(self, master: MasterKey, cipher: str) -> None:
        if cipher not in CIPHERS:
            raise BadInput(f"unknown encryption {cipher!r} (choose from {', '.join(CIPHERS)}, none)")
        self.cipher_id = CIPHERS[cipher]
        aead_key = master.subkey("objects")
        self._aead: AESGCM | ChaCha20Poly1305 = (AESGCM(aead_key) if cipher == "aes-256-gcm"
                                                else ChaCha20Poly1305(aead_key))
        self._siv = AESSIV(master.subkey("names") + master.subkey("names 2"))
        self.id_key = master.subkey("ids")
        """Keys the hash that names chunks and packs (:func:`fleece.codec.digest_function`)."""
        self.segment = 1 << SEGMENT_LOG2

    def seal(self, key: str, plaintext: bytes | bytearray | memoryview) -> bytes:
        """The sealed object for logical ``key``."""
        view = memoryview(plaintext)
        header = ENVELOPE_HEADER.pack(ENVELOPE_MAGIC, ENVELOPE_VERSION, self.cipher_id, SEGMENT_LOG2,
                                      len(view), secrets.token_bytes(8))
        ad = header + key.encode()
        prefix = header[16:24]
        parts = [header]
        seg = self.segment
        for n, start in enumerate(range(0, max(len(view), 1), seg)):
            parts.append(self._aead.encrypt(prefix + n.to_bytes(4, "big"), view[start : start + seg], ad))
        body = b"".join(parts)
        return body + hashlib.sha256(body).digest()

    def open(self, key: str, blob: bytes) -> bytes:
        """The plaintext of a whole sealed object; :class:`RepositoryCorrupt` if anything is off."""
        length, prefix, header = self._header(key, blob[: ENVELOPE_HEADER.size])
        segments = _segments(length, self.segment)
        if len(blob) != ENVELOPE_HEADER.size + length + segments * TAG + TRAILER:
            raise RepositoryCorrupt(f"object {key} is truncated or padded (sealed size does not match)")
        out = bytearray()
        pos = ENVELOPE_HEADER.size
        for n in range(segments):
            size = min(self.segment, length - n * self.segment) + TAG
            out += self._decrypt(key, header, prefix, n, blob[pos : pos + size])
            pos += size
        return bytes(out)

    def segment_span(self, header: bytes, key: str, offset: int, length: int) -> tuple[int, int, int, int]:
        """For plaintext ``[offset, offset + length)``: ``(first segment, last segment, sealed
        start, sealed length)`` to fetch."""
        total, _, _ = self._header(key, header)
        end = min(offset + length, total)
        if offset >= end:
            return 0, -1, 0, 0
        first, last = offset // self.segment, (end - 1) // self.segment
        start = ENVELOPE_HEADER.size + first * (self.segment + TAG)
        stop = ENVELOPE_HEADER.size + min((last + 1) * self.segment, total) + (last + 1) * TAG
        return first, last, start, stop - start

    def open_range(self, key: str, header: bytes, sealed: bytes, first: int, last: int,
                   offset: int, length: int) -> bytes:
        """Decrypt segments ``first..last`` (``sealed``) and return plaintext ``[offset, +length)``."""
        total, prefix, header = self._header(key, header)
        out = bytearray()
        pos = 0
        for n in range(first, last + 1):
            size = min(self.segment, total - n * self.segment) + TAG
            out += self._decrypt(key, header, prefix, n, sealed[pos : pos + size])
            pos += size
        skip = offset - first * self.segment
        return bytes(out[skip : skip + length])

    def _header(self, key: str, header: bytes) -> tuple[int, bytes, bytes]:
        if len(header) < ENVELOPE_HEADER.size:
            raise RepositoryCorrupt(f"object {key} is truncated (no envelope header)")
        magic, version, cipher, seg_log2, length, prefix = ENVELOPE_HEADER.unpack_from(header)
        if magic != ENVELOPE_MAGIC or version != ENVELOPE_VERSION:
            raise RepositoryCorrupt(f"object {key} is not sealed (bad envelope magic or version)")
        if cipher != self.cipher_id or seg_log2 != SEGMENT_LOG2:
            raise RepositoryCorrupt(f"object {key} is sealed with another cipher or segment size")
        return length, prefix, bytes(header[: ENVELOPE_HEADER.size])

    def _decrypt(self, key: str, header: bytes, prefix: bytes, n: int, ct: bytes) -> bytes:
        try:
            return self._aead.decrypt(prefix + n.to_bytes(4, "big"), ct, header + key.encode())
        except InvalidTag:
            raise RepositoryCorrupt(f"object {key} fails authentication (damaged, truncated, swapped "
                                    "for another object, or from another repository)") from None

    # -- names -------------------------------------------------------------------------------

    def name_token(self, name: str) -> str:
        """A name as it appears in an object key: deterministic, reversible only with the key."""
        raw = name.encode("utf-8", errors="surrogateescape")
        if len(raw) > MAX_NAME:
            raise BadInput(f"name {name[:40]!r}… is longer than an encrypted repository allows "
                           f"({MAX_NAME} bytes)")
        padded = raw + b"\x80" + bytes(-(len(raw) + 1) % 32)
        return base64.urlsafe_b64encode(self._siv.encrypt(padded, None)).decode().rstrip("=")

    def name_of(self, token: str) -> str | None:
        """The name behind ``token``; None for a component that is not one of ours."""
        try:
            padded = self._siv.decrypt(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)), None)
        except (InvalidTag, ValueError):
            return None
        raw = padded.rstrip(b"\0")
        if not raw.endswith(b"\x80"):
            return None
        return raw[:-1].decode("utf-8", errors="surrogateescape")


def _segments(length: int, segment: int) -> int:
    return max(1, -(-length // segment))


def check_outer(blob: bytes) -> bool:
    """Whether a sealed object is whole, checked without the key (its trailing sha256)."""
    return (len(blob) >= ENVELOPE_HEADER.size + TAG + TRAILER and blob[:4] == ENVELOPE_MAGIC
            and hashlib.sha256(blob[:-TRAILER]).digest() == blob[-TRAILER:])


def new_key_id() -> str:
    """16 random hex digits: a key object's name."""
    return os.urandom(8).hex()
