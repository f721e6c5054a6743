"""Sub-chunk deltas and the packs that hold them (repository format 2, docs/format.md).

An incremental backup that changed a few 64 KiB blocks of a 4 MiB chunk
stores only those blocks: a *delta* lists the changed extents of one chunk
position (offsets inside the chunk) and their bytes. It applies on top of
what that position held in the parent point, and the index keeps, per
position, the base chunk plus at most :data:`MAX_DEPTH` deltas in the order
they apply, so any offset of any point resolves with at most
``1 + MAX_DEPTH`` object reads, and no chain is replayed.

Deltas are small, so one backup packs them together: a *pack* is one object
of up to :data:`PACK_TARGET` bytes holding many encoded deltas and a table of
them, named by the repository hash of its bytes and written once. An index
names a delta by :class:`DeltaRef`: the pack, where in it, and the digest of
the delta's plaintext, which a reader checks after a ranged read.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from fleece.errors import RepositoryCorrupt
from fleece.repo.format.codec import DELTA_MAGIC, Buffer, decode_chunk, encode_chunk

MAX_DEPTH = 4
"""Deltas one chunk position may carry before the next change rewrites it as a full chunk."""
MAX_DELTA_FRACTION = 0.5
"""A position whose deltas would cover more than this share of the chunk is rewritten whole."""
PACK_TARGET = 32 << 20
"""A pack is sealed once it holds this many bytes (the last one of a backup is smaller)."""

Extent = tuple[int, int]
"""``(offset, length)``: inside a chunk for deltas, on the disk for reads."""

_COUNT = struct.Struct("<I")
_EXTENT = struct.Struct("<II")

PACK_MAGIC = b"FLPK"
PACK_VERSION = 1
PACK_HEADER = struct.Struct("<4sB11x")
"""magic, version, 11 reserved bytes (zero; room for an envelope, docs/format.md)."""
PACK_ENTRY = struct.Struct("<QII32s")
"""offset, encoded length, kind (1 = delta), plaintext digest."""
PACK_FOOTER = struct.Struct("<II32s")
"""entry count, reserved, sha256 of the table."""
KIND_DELTA = 1
PACK_OVERHEAD = PACK_HEADER.size + PACK_FOOTER.size
"""Bytes of a pack that are neither deltas nor table rows."""


class DeltaRef(NamedTuple):
    """Where one delta lives: what an index entry names (80 bytes in the index)."""

    pack: bytes
    """Digest naming the pack object."""
    offset: int
    """Byte offset of the encoded delta inside the pack."""
    length: int
    """Encoded length (header + payload)."""
    covered: int
    """Bytes of the chunk the delta rewrites (the sum of its extents)."""
    digest: bytes
    """Repository hash of the delta's plaintext."""


# -- the delta body ----------------------------------------------------------------------

def encode_delta_body(extents: Sequence[Extent], data: Buffer) -> bytes:
    """The plaintext of a delta: extent count, extents, then their bytes back to back."""
    if sum(n for _, n in extents) != len(data):
        raise ValueError("delta data does not match its extents")
    table = b"".join(_EXTENT.pack(off, n) for off, n in extents)
    return _COUNT.pack(len(extents)) + table + bytes(data)


def decode_delta_body(body: bytes, what: str) -> tuple[list[Extent], memoryview]:
    """Parse a delta's plaintext: its extents (sorted, disjoint) and the bytes they get."""
    if len(body) < _COUNT.size:
        raise RepositoryCorrupt(f"{what} is truncated")
    (count,) = _COUNT.unpack_from(body)
    table_end = _COUNT.size + count * _EXTENT.size
    if table_end > len(body):
        raise RepositoryCorrupt(f"{what} claims {count} extents in {len(body)} bytes")
    extents = [_EXTENT.unpack_from(body, _COUNT.size + k * _EXTENT.size) for k in range(count)]
    end = 0
    for off, n in extents:
        if off < end or n == 0:
            raise RepositoryCorrupt(f"{what} has overlapping, unsorted or empty extents")
        end = off + n
    data = memoryview(body)[table_end:]
    if len(data) != sum(n for _, n in extents):
        raise RepositoryCorrupt(f"{what} holds {len(data)} bytes for extents of "
                                f"{sum(n for _, n in extents)}")
    return extents, data


def apply_delta(chunk: bytearray | memoryview, body: bytes, what: str) -> None:
    """Write a delta's extents over ``chunk`` (the position's content before it)."""
    extents, data = decode_delta_body(body, what)
    pos = 0
    for off, n in extents:
        if off + n > len(chunk):
            raise RepositoryCorrupt(f"{what} writes past the end of its {len(chunk)}-byte chunk")
        chunk[off : off + n] = data[pos : pos + n]
        pos += n


def delta_extent_end(body: bytes, what: str) -> int:
    """The end of the last extent: a delta fits a chunk of at least this many bytes."""
    extents, _ = decode_delta_body(body, what)
    return extents[-1][0] + extents[-1][1] if extents else 0


def encode_delta(body: bytes, level: int | None) -> bytes:
    """Frame a delta's plaintext like a chunk (``FLDT`` header, zstd or plain)."""
    return encode_chunk(body, level, magic=DELTA_MAGIC)


def decode_delta(blob: bytes, ref: DeltaRef, hash: str | Callable[[Buffer], bytes]) -> bytes:
    """A delta's plaintext, checked against the digest its reference records."""
    what = f"delta at {ref.offset}+{ref.length} of pack {ref.pack.hex()}"
    if len(blob) != ref.length:
        raise RepositoryCorrupt(f"{what} is truncated ({len(blob)} of {ref.length} bytes)")
    return decode_chunk(blob, ref.digest, hash, magic=DELTA_MAGIC, what=what)


# -- packs -------------------------------------------------------------------------------

@dataclass
class _Pending:
    """A delta added to a pack that is not sealed yet."""

    position: int
    offset: int
    length: int
    covered: int
    digest: bytes


class PackWriter:
    """Collects encoded deltas into packs and stores each pack once it is full.

    Thread-safe: storer threads :meth:`add` deltas; the one whose delta fills
    a pack seals and stores it (outside the lock). :meth:`close` stores the
    last pack and returns ``(position, DeltaRef)`` for every delta added,
    now that every pack has its name.
    """

    def __init__(self, store: Callable[[bytes], bytes], target: int = PACK_TARGET) -> None:
        self._store = store
        """Stores a sealed pack's bytes, returns the digest that names it."""
        self.target = target
        self._lock = threading.Lock()
        self._parts: list[bytes] = []
        self._entries: list[_Pending] = []
        self._size = PACK_HEADER.size
        self._done: list[tuple[int, DeltaRef]] = []
        self.packs_written = 0
        self.bytes_written = 0

    def add(self, position: int, blob: bytes, covered: int, digest: bytes) -> None:
        """Queue one encoded delta for chunk ``position``."""
        with self._lock:
            self._entries.append(_Pending(position, self._size, len(blob), covered, digest))
            self._parts.append(blob)
            self._size += len(blob)
            full = self._size >= self.target
            if full:
                sealed = self._take()
        if full:
            self._seal(*sealed)

    def close(self) -> list[tuple[int, DeltaRef]]:
        """Store the last pack; every delta's ``(position, ref)``."""
        with self._lock:
            sealed = self._take()
        if sealed[1]:
            self._seal(*sealed)
        return self._done

    def _take(self) -> tuple[list[bytes], list[_Pending]]:
        parts, entries = self._parts, self._entries
        self._parts, self._entries, self._size = [], [], PACK_HEADER.size
        return parts, entries

    def _seal(self, parts: list[bytes], entries: list[_Pending]) -> None:
        blob = build_pack(parts, entries)
        name = self._store(blob)
        with self._lock:
            self.packs_written += 1
            self.bytes_written += len(blob)
            self._done.extend(
                (e.position, DeltaRef(name, e.offset, e.length, e.covered, e.digest)) for e in entries)


def build_pack(parts: Iterable[bytes], entries: Sequence[_Pending]) -> bytes:
    """Header, the encoded deltas, the table, the footer."""
    table = b"".join(PACK_ENTRY.pack(e.offset, e.length, KIND_DELTA, e.digest) for e in entries)
    footer = PACK_FOOTER.pack(len(entries), 0, hashlib.sha256(table).digest())
    return b"".join([PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION), *parts, table, footer])

