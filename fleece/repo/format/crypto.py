"""Client-side encryption: the master key, its passphrase-wrapped copies, sealing, name tokens.

docs/format.md ("Encryption") is the source of truth; in short:

* a repository has one random 64-byte *master key*, never stored in clear:
  each ``keys/<id>`` object holds it wrapped (AES-256-GCM) under a key
  derived from one passphrase with Argon2id (scrypt in key objects written
  by earlier fleece, still read), so several passphrases (or a rotated one)
  open the same repository. The Argon2id cost is calibrated when the key is
  made; a key object asking for more than :data:`COST_CAP` times the default
  is not tried (a planted one must not stall or kill a restore);
* subkeys come from the master with HKDF-SHA256: one that derives each
  sealed object's own key, one that keys the hash naming chunks and packs,
  one for the deterministic encryption (AES-SIV) of names inside object
  keys, one that authenticates ``config``;
* every object is *sealed* (:mod:`fleece.repo.format.envelope`): a header
  with a random salt, the object key derived from it, the plaintext in AEAD
  segments with the header plus the object's logical key as associated data
  — so a flipped bit, a truncation or an object moved to another key fails
  — then a checksum of everything before it, which a job without the key
  can check.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from fleece.errors import BadInput, RepositoryCorrupt, RepositoryError
from fleece.repo.format import envelope
from fleece.repo.format.envelope import HEADER_MAX, Aead, check_outer

__all__ = ["CIPHERS", "HEADER_MAX", "MasterKey", "Sealer", "WrongPassphrase", "check_outer", "config_auth",
           "new_key_id", "parse_key", "unwrap_key", "wrap_key"]

CIPHERS = {"aes-256-gcm": 1, "chacha20-poly1305": 2}
"""The AEADs a repository may seal its objects with, and their ids in the envelope."""
_AEADS: dict[int, type[AESGCM] | type[ChaCha20Poly1305]] = {1: AESGCM, 2: ChaCha20Poly1305}
MASTER_BYTES = 64
MAX_NAME = 159
"""Longest name (UTF-8 bytes) an encrypted repository can hold: its token must fit a key component."""

# -- passphrase KDF ------------------------------------------------------------------------------

ARGON2_MEMORY_KIB = 64 * 1024
"""Argon2id memory for new key objects: 64 MiB (as borg 2; OWASP asks for at least 19 MiB)."""
ARGON2_LANES = 4
ARGON2_ITERATIONS = 3
"""The floor of the Argon2id passes; :func:`calibrated_iterations` raises it on fast hosts."""
KDF_TARGET_SECONDS = 0.5
"""How long ``init`` (or ``key add``) aims to make one passphrase attempt take on this host."""
COST_CAP = 4
"""A key object may ask for at most this many times the default cost (memory, and memory x passes)."""
ARGON2_MAX_MEMORY_KIB = COST_CAP * ARGON2_MEMORY_KIB
ARGON2_MAX_WORK = COST_CAP * ARGON2_MEMORY_KIB * ARGON2_ITERATIONS
"""Memory (KiB) x passes: 4 x the default, so calibration goes up to 12 passes at 64 MiB."""
SCRYPT_MAX_MEMORY = COST_CAP * ARGON2_MEMORY_KIB * 1024
"""scrypt (old key objects: n = 2¹⁵, r = 8, 32 MiB) may use at most 256 MiB (128 · n · r bytes) …"""
SCRYPT_MAX_WORK = COST_CAP * (1 << 17) * 8
"""… and n · r · p at most 4 x that of scrypt at 2¹⁷, r = 8, p = 1."""
MAX_KEY_OBJECT = 16 * 1024
"""The largest key object read (one is ~500 bytes): a planted giant is refused before parsing."""
MAX_KEY_DEPTH = 4
"""The deepest JSON nesting a key object may have (it has 2): no RecursionError on a planted one."""
_KEY_ID = re.compile(r"[0-9a-f]{16}")


class WrongPassphrase(RepositoryError):
    """No key object of the repository opens with the passphrase given."""


@dataclass(frozen=True)
class MasterKey:
    """The repository's master key and the subkeys derived from it."""

    material: bytes
    key_object: bytes | None = field(default=None, compare=False, repr=False)
    """The bytes of the key object it was unwrapped from (``fleece key export`` writes them)."""

    def subkey(self, purpose: str) -> bytes:
        """A 32-byte key for one purpose (HKDF-SHA256)."""
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"fleece " + purpose.encode()).derive(self.material)

    @classmethod
    def generate(cls) -> MasterKey:
        """A new random master key."""
        return cls(secrets.token_bytes(MASTER_BYTES))


class KeyDocument(dict[str, Any]):
    """A key object's JSON (checked by :func:`parse_key`) and the bytes it was read from."""

    def __init__(self, doc: dict[str, Any], blob: bytes) -> None:
        super().__init__(doc)
        self.blob = blob


def _derive(passphrase: bytes, kdf: dict[str, Any]) -> bytes:
    """The 32-byte wrapping key (parameters checked by :func:`parse_key` or made here)."""
    salt = base64.b64decode(kdf["salt"])
    if kdf["name"] == "argon2id":
        return Argon2id(salt=salt, length=32, iterations=kdf["iterations"], lanes=kdf["lanes"],
                        memory_cost=kdf["memory_kib"]).derive(passphrase)
    return Scrypt(salt=salt, length=32, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(passphrase)


def calibrated_iterations(seconds_at_floor: float, target: float = KDF_TARGET_SECONDS) -> int:
    """Argon2id passes at 64 MiB that take about ``target`` seconds here, given how long the floor's
    :data:`ARGON2_ITERATIONS` took: never below the floor, never above the cap."""
    if seconds_at_floor <= 0:
        return ARGON2_MAX_WORK // ARGON2_MEMORY_KIB
    wanted = int(ARGON2_ITERATIONS * target / seconds_at_floor)
    return max(ARGON2_ITERATIONS, min(wanted, ARGON2_MAX_WORK // ARGON2_MEMORY_KIB))


def wrap_key(master: MasterKey, passphrase: bytes, key_id: str, created: str,
             iterations: int | None = None) -> bytes:
    """A ``keys/<id>`` object: the master key wrapped under ``passphrase`` with Argon2id.

    Without ``iterations`` the cost is calibrated: the floor's derivation (with
    the real salt, so it is not wasted when the floor is what this host gets)
    is timed, and the passes raised toward :data:`KDF_TARGET_SECONDS`.
    """
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    kdf: dict[str, Any] = {"name": "argon2id", "memory_kib": ARGON2_MEMORY_KIB, "lanes": ARGON2_LANES,
                           "iterations": iterations or ARGON2_ITERATIONS,
                           "salt": base64.b64encode(salt).decode()}
    started = time.perf_counter()
    kek = _derive(passphrase, kdf)
    if iterations is None:
        kdf["iterations"] = calibrated_iterations(time.perf_counter() - started)
        if kdf["iterations"] != ARGON2_ITERATIONS:
            kek = _derive(passphrase, kdf)
    wrapped = AESGCM(kek).encrypt(nonce, master.material, b"fleece key " + key_id.encode())
    doc = {"format": 1, "id": key_id, "created": created, "kdf": kdf,
           "wrap": {"cipher": "aes-256-gcm", "nonce": base64.b64encode(nonce).decode(),
                    "key": base64.b64encode(wrapped).decode()}}
    return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"


def _json_depth(text: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in JSON ``text`` (brackets inside strings not counted)."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif c in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _int(doc: dict[str, Any], name: str, low: int, high: int) -> int:
    value = doc[name]
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{name} {value!r} is outside {low}..{high}")
    return value


def _b64(doc: dict[str, Any], name: str, low: int, high: int) -> bytes:
    value = doc[name]
    if not isinstance(value, str) or len(value) > 4 * high:
        raise ValueError(f"{name} is not base64")
    raw = base64.b64decode(value, validate=True)
    if not low <= len(raw) <= high:
        raise ValueError(f"{name} holds {len(raw)} bytes, not {low}..{high}")
    return raw


def _check_kdf(kdf: dict[str, Any]) -> None:
    """Raise ValueError unless ``kdf`` names a known KDF at a cost within the cap."""
    if not isinstance(kdf, dict):
        raise ValueError("kdf is not an object")
    _b64(kdf, "salt", 16, 64)
    if kdf.get("name") == "argon2id":
        memory = _int(kdf, "memory_kib", 8 * 1024, ARGON2_MAX_MEMORY_KIB)
        passes = _int(kdf, "iterations", 1, ARGON2_MAX_WORK)
        lanes = _int(kdf, "lanes", 1, 16)
        if memory < 8 * lanes or memory * passes > ARGON2_MAX_WORK:
            raise ValueError(f"argon2id cost {memory} KiB x {passes} passes is above the cap "
                             f"({COST_CAP}x the default)")
    elif kdf.get("name") == "scrypt":
        n, r, p = _int(kdf, "n", 1 << 10, 1 << 24), _int(kdf, "r", 1, 32), _int(kdf, "p", 1, 16)
        if n & (n - 1) or 128 * n * r > SCRYPT_MAX_MEMORY or n * r * p > SCRYPT_MAX_WORK:
            raise ValueError(f"scrypt cost n={n} r={r} p={p} is above the cap ({COST_CAP}x the default)")
    else:
        raise ValueError(f"unknown kdf {kdf.get('name')!r}")


def parse_key(blob: bytes, what: str) -> dict[str, Any]:
    """A key object's JSON, checked for every member :func:`unwrap_key` needs, its size, nesting and
    KDF cost bounded: :class:`RepositoryCorrupt` when it is not a key this fleece will try.

    The result also carries ``blob`` (a :class:`KeyDocument`), so the key that opened can be
    exported byte for byte.
    """
    if len(blob) > MAX_KEY_OBJECT:
        raise RepositoryCorrupt(f"{what} is not a fleece key ({len(blob)} bytes, more than the "
                                f"{MAX_KEY_OBJECT} a key object may have)")
    try:
        if _json_depth(blob) > MAX_KEY_DEPTH:
            raise ValueError(f"nested deeper than {MAX_KEY_DEPTH}")
        doc = json.loads(blob)
        if not isinstance(doc, dict) or doc.get("format") != 1:
            raise ValueError("not a format-1 key object")
        if not isinstance(doc.get("id"), str) or not _KEY_ID.fullmatch(doc["id"]):
            raise ValueError("its id is not 16 hex digits")
        if not isinstance(doc.get("created", ""), str):
            raise ValueError("created is not a string")
        _check_kdf(doc["kdf"])
        wrap = doc["wrap"]
        if not isinstance(wrap, dict) or wrap.get("cipher") != "aes-256-gcm":
            raise ValueError("unknown wrapping cipher")
        _b64(wrap, "nonce", 12, 12)
        _b64(wrap, "key", MASTER_BYTES + 16, MASTER_BYTES + 16)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError, binascii.Error) as exc:
        raise RepositoryCorrupt(f"{what} is not a fleece key ({exc})") from None
    return KeyDocument(doc, bytes(blob))


def unwrap_key(doc: dict[str, Any], passphrase: bytes) -> MasterKey | None:
    """The master key ``doc`` (from :func:`parse_key`) wraps, or None when ``passphrase`` does not
    open it."""
    try:
        _check_kdf(doc["kdf"])  # never derive at a cost parse_key did not bound
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise RepositoryCorrupt(f"key {doc.get('id')} is not a fleece key ({exc})") from None
    wrap = doc["wrap"]
    try:
        material = AESGCM(_derive(passphrase, doc["kdf"])).decrypt(
            base64.b64decode(wrap["nonce"]), base64.b64decode(wrap["key"]),
            b"fleece key " + str(doc["id"]).encode())
    except InvalidTag:
        return None
    if len(material) != MASTER_BYTES:
        return None
    return MasterKey(material, getattr(doc, "blob", None))


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
        self.cipher = cipher
        self.cipher_id = CIPHERS[cipher]
        self._aead_class = _AEADS[self.cipher_id]
        self._v1 = self._aead_class(master.subkey("objects"))
        """Envelope version 1: one key for every object (read only)."""
        self._object_keys = master.subkey("objects 2")
        """Envelope version 2: what each object's own key is derived from (with its salt)."""
        self._siv = AESSIV(master.subkey("names") + master.subkey("names 2"))
        self.id_key = master.subkey("ids")
        """Keys the hash that names chunks and packs (:func:`fleece.codec.digest_function`)."""

    def _object_aead(self, salt: bytes) -> Aead:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
                   info=b"fleece object " + bytes([self.cipher_id])).derive(self._object_keys)
        return self._aead_class(key)

    def _opener(self, key: str, header_bytes: bytes | memoryview) -> tuple[envelope.Header, Aead]:
        header = envelope.parse_header(header_bytes, f"object {key}")
        if header.cipher != self.cipher_id:
            raise RepositoryCorrupt(f"object {key} is sealed with cipher {header.cipher}, not this "
                                    f"repository's {self.cipher}")
        if header.version == 1:
            return header, self._v1
        return header, self._object_aead(header.nonce_material)

    def sealed_size(self, length: int, *, ranged: bool = False) -> int:
        """Bytes :meth:`seal` writes for ``length`` bytes of plaintext."""
        return envelope.sealed_size_v2(length, ranged)

    def seal(self, key: str, plaintext: bytes | bytearray | memoryview, *, ranged: bool = False,
             into: memoryview | None = None) -> bytes | memoryview:
        """The sealed object for logical ``key`` (envelope version 2, a fresh salt and object key).

        ``ranged``: the object will be read in ranges (packs): 64 KiB segments.
        ``into``: seal into this buffer (at least :meth:`sealed_size`) and return a view of
        what was written; otherwise new bytes.
        """
        view = memoryview(plaintext).cast("B")
        salt = secrets.token_bytes(envelope.SALT)
        out = into if into is not None else memoryview(bytearray(self.sealed_size(len(view), ranged=ranged)))
        size = envelope.seal_v2_into(out, view, key, self.cipher_id, salt, self._object_aead(salt), ranged)
        return out[:size] if into is not None else bytes(out[:size])

    def open(self, key: str, blob: bytes) -> bytes:
        """The plaintext of a whole sealed object (either version); :class:`RepositoryCorrupt` if
        anything is off."""
        header, aead = self._opener(key, memoryview(blob)[:HEADER_MAX])
        return envelope.open_whole(blob, key, header, aead)

    def segment_span(self, header: bytes, key: str, offset: int, length: int) -> tuple[int, int, int, int]:
        """For plaintext ``[offset, offset + length)``: ``(first segment, last segment, sealed
        start, sealed length)`` to fetch; ``header`` is the object's first :data:`HEADER_MAX` bytes."""
        parsed = envelope.parse_header(header, f"object {key}")
        return envelope.span(parsed, offset, length)

    def open_range(self, key: str, header: bytes, sealed: bytes, first: int, last: int,
                   offset: int, length: int) -> bytes:
        """Decrypt segments ``first..last`` (``sealed``) and return plaintext ``[offset, +length)``."""
        parsed, aead = self._opener(key, header)
        return envelope.open_segments(sealed, key, parsed, aead, first, last, offset, length)

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


def new_key_id() -> str:
    """16 random hex digits: a key object's name."""
    return os.urandom(8).hex()
