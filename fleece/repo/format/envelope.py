"""The envelope of a sealed object: header, AEAD segments, outer checksum (docs/format.md, "Sealed objects").

Two versions, both read; new objects are written in version 2.

* **Version 1** (32-byte header): every object under the repository's one
  ``objects`` subkey, nonce = 8 random bytes (in the header) ‖ segment number,
  64 KiB segments, a sha256 outer checksum. Random 64-bit nonce prefixes under
  one key for a repository's whole life: by the birthday bound two objects
  share one with a chance of ~5·10⁻⁴ after 2²⁷ seals and ~3 % after 2³⁰, and
  under GCM that leaks plaintext and allows forgeries. Read, never written.
* **Version 2** (48-byte header): a random 192-bit salt per object and a key
  of its own derived from it (HKDF-SHA256), so every object key seals exactly
  one plaintext and the nonces are simply the segment numbers; one segment
  for objects read whole, 64 KiB segments for those read in ranges (packs);
  a BLAKE3 outer checksum (the same job as sha256, at three times its speed).

Sealing writes straight into one buffer the caller may supply (the backend
hands a page-aligned one, which the file backend writes with ``O_DIRECT``
without a copy), and opening a one-segment object is one AEAD call that
returns the plaintext: no segment list, no join, no copy of the object.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import blake3
from cryptography.exceptions import InvalidTag

from fleece.errors import RepositoryCorrupt

MAGIC = b"FLEN"
HEADER_V1 = struct.Struct("<4sBBBxQ8s8x")
"""magic, version 1, cipher id, log2 of the segment size (16), (1 reserved), plaintext length,
nonce prefix, (8 reserved)."""
HEADER_V2 = struct.Struct("<4sBBBxQ24s8x")
"""magic, version 2, cipher id, log2 of the segment size, (1 reserved), plaintext length,
salt, (8 reserved)."""
HEADER_MAX = HEADER_V2.size
"""Bytes a ranged reader fetches to learn any version's header (every sealed object is longer)."""
WRITE_VERSION = 2
"""The envelope version new objects are sealed in."""
READ_VERSIONS = (1, 2)
TAG = 16
TRAILER = 32
SALT = 24
RANGED_SEGMENT_LOG2 = 16
"""Segments of objects read in ranges (packs): a ranged read decrypts at most 64 KiB it did not ask for."""
WHOLE_SEGMENT_LOG2_MAX = 30
"""One segment holds up to 1 GiB (well inside both AEADs' per-nonce limits)."""
_SEGMENT_LOG2_RANGE = (12, 40)
"""What a reader accepts in a header (a damaged field must not make it allocate or loop)."""


class Aead(Protocol):
    """What :mod:`cryptography`'s AESGCM and ChaCha20Poly1305 offer and this module uses."""

    def encrypt_into(self, nonce: bytes, data: memoryview, associated_data: bytes,
                     buf: memoryview) -> int: ...

    def decrypt(self, nonce: bytes, data: memoryview, associated_data: bytes) -> bytes: ...


@dataclass(frozen=True)
class Header:
    """A parsed envelope header."""

    version: int
    cipher: int
    segment_log2: int
    length: int
    """Plaintext bytes."""
    nonce_material: bytes
    """Version 1: the 8-byte nonce prefix; version 2: the 24-byte salt the object key comes from."""
    raw: bytes
    """The header bytes (part of every segment's associated data)."""

    @property
    def segment(self) -> int:
        """Plaintext bytes per segment (the last may be shorter)."""
        return 1 << self.segment_log2

    @property
    def segments(self) -> int:
        """Segments in the object (one, empty, for an empty object)."""
        return max(1, -(-self.length // self.segment))

    @property
    def sealed_size(self) -> int:
        """The whole sealed object's size."""
        return len(self.raw) + self.length + self.segments * TAG + TRAILER

    def nonce(self, n: int) -> bytes:
        """Segment ``n``'s nonce."""
        if self.version == 1:
            return self.nonce_material + n.to_bytes(4, "big")
        return n.to_bytes(12, "big")


def parse_header(data: bytes | memoryview, what: str) -> Header:
    """The header at the start of ``data`` (at least :data:`HEADER_MAX` bytes, or the whole object)."""
    view = memoryview(data)
    if len(view) < HEADER_V1.size or bytes(view[:4]) != MAGIC:
        raise RepositoryCorrupt(f"{what} is not sealed (no envelope header)")
    version = view[4]
    if version == 1:
        _, _, cipher, log2, length, prefix = HEADER_V1.unpack_from(view)
        raw = bytes(view[: HEADER_V1.size])
        if log2 != 16:
            raise RepositoryCorrupt(f"{what} has envelope segment size 2^{log2} (version 1 uses 2^16)")
        return Header(1, cipher, log2, length, prefix, raw)
    if version == 2:
        if len(view) < HEADER_V2.size:
            raise RepositoryCorrupt(f"{what} is truncated (no whole envelope header)")
        _, _, cipher, log2, length, salt = HEADER_V2.unpack_from(view)
        if not _SEGMENT_LOG2_RANGE[0] <= log2 <= _SEGMENT_LOG2_RANGE[1]:
            raise RepositoryCorrupt(f"{what} has envelope segment size 2^{log2}, out of range")
        return Header(2, cipher, log2, length, salt, bytes(view[: HEADER_V2.size]))
    raise RepositoryCorrupt(f"{what} has envelope version {version}; this fleece reads "
                            f"{', '.join(map(str, READ_VERSIONS))} (written by a newer fleece?)")


def segment_log2_for(length: int, ranged: bool) -> int:
    """The segment size (log2) version 2 gives an object of ``length`` bytes."""
    if ranged:
        return RANGED_SEGMENT_LOG2
    return min(max(RANGED_SEGMENT_LOG2, (length - 1).bit_length()), WHOLE_SEGMENT_LOG2_MAX)


def sealed_size_v2(length: int, ranged: bool) -> int:
    """How many bytes :func:`seal_v2_into` writes for ``length`` plaintext bytes."""
    segment = 1 << segment_log2_for(length, ranged)
    return HEADER_V2.size + length + max(1, -(-length // segment)) * TAG + TRAILER


def seal_v2_into(out: memoryview, plaintext: memoryview, key: str, cipher: int, salt: bytes,
                 object_aead: Aead, ranged: bool) -> int:
    """Seal ``plaintext`` (logical ``key``) into ``out`` in version 2; the bytes written.

    ``object_aead`` is keyed with the object key derived from ``salt``; ``out``
    holds at least :func:`sealed_size_v2` bytes.
    """
    length = len(plaintext)
    log2 = segment_log2_for(length, ranged)
    raw = HEADER_V2.pack(MAGIC, 2, cipher, log2, length, salt)
    header = Header(2, cipher, log2, length, salt, raw)
    size = header.sealed_size
    if len(out) < size:
        raise ValueError(f"buffer of {len(out)} bytes for a {size}-byte sealed object")
    out[: len(raw)] = raw
    ad = raw + key.encode()
    seg, pos = header.segment, len(raw)
    for n in range(header.segments):
        part = plaintext[n * seg : (n + 1) * seg]
        object_aead.encrypt_into(header.nonce(n), part, ad, out[pos : pos + len(part) + TAG])
        pos += len(part) + TAG
    out[pos : pos + TRAILER] = blake3.blake3(out[:pos]).digest()
    return size


def open_whole(blob: bytes | memoryview, key: str, header: Header, aead: Aead) -> bytes:
    """The plaintext of a whole sealed object whose ``header`` was parsed; ``aead`` keyed for it."""
    view = memoryview(blob)
    if len(view) != header.sealed_size:
        raise RepositoryCorrupt(f"object {key} is truncated or padded (sealed size does not match)")
    body = view[len(header.raw) : len(view) - TRAILER]
    if header.segments == 1:
        return decrypt(aead, header, key, 0, body)
    seg = header.segment + TAG
    return b"".join(decrypt(aead, header, key, n, body[n * seg : (n + 1) * seg])
                    for n in range(header.segments))


def span(header: Header, offset: int, length: int) -> tuple[int, int, int, int]:
    """For plaintext ``[offset, offset + length)``: ``(first segment, last segment, sealed start,
    sealed length)`` to fetch."""
    end = min(offset + length, header.length)
    if offset >= end:
        return 0, -1, 0, 0
    seg = header.segment
    first, last = offset // seg, (end - 1) // seg
    start = len(header.raw) + first * (seg + TAG)
    stop = len(header.raw) + min((last + 1) * seg, header.length) + (last + 1) * TAG
    return first, last, start, stop - start


def open_segments(sealed: bytes, key: str, header: Header, aead: Aead, first: int, last: int,
                  offset: int, length: int) -> bytes:
    """Decrypt segments ``first..last`` (``sealed``, as :func:`span` said) and return plaintext
    ``[offset, offset + length)``."""
    view = memoryview(sealed)
    parts, pos, seg = [], 0, header.segment
    for n in range(first, last + 1):
        size = min(seg, header.length - n * seg) + TAG
        if pos + size > len(view):
            raise RepositoryCorrupt(f"object {key} is truncated (a ranged read came back short)")
        parts.append(decrypt(aead, header, key, n, view[pos : pos + size]))
        pos += size
    skip = offset - first * seg
    return b"".join(parts)[skip : skip + length]


def decrypt(aead: Aead, header: Header, key: str, n: int, ct: memoryview) -> bytes:
    """Segment ``n`` of the object at logical ``key``, authenticated against both."""
    try:
        return aead.decrypt(header.nonce(n), ct, header.raw + key.encode())
    except InvalidTag:
        raise RepositoryCorrupt(f"object {key} fails authentication (damaged, truncated, swapped "
                                "for another object, or from another repository)") from None


_OUTER: dict[int, Callable[[memoryview], bytes]] = {
    1: lambda body: hashlib.sha256(body).digest(),
    2: lambda body: blake3.blake3(body).digest(),
}


def check_outer(blob: bytes | memoryview) -> bool:
    """Whether a sealed object is whole, checked without the key: its size agrees with its
    header and its trailing checksum (sha256 in version 1, BLAKE3 in version 2) with its bytes."""
    view = memoryview(blob)
    try:
        header = parse_header(view[:HEADER_MAX], "object")
    except RepositoryCorrupt:
        return False
    if len(view) != header.sealed_size:
        return False
    return _OUTER[header.version](view[:-TRAILER]) == bytes(view[-TRAILER:])
