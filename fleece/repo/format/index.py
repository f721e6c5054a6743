"""The chunk index: per chunk of a virtual disk, its base chunk and deltas (docs/format.md).

The base digests are held in one ``bytearray`` of 32 bytes per chunk (8 MiB
for 1 TiB at 4 MiB chunks) rather than a list of objects, so memory stays
small and the binary form is a single copy. All-zero chunks carry the zero
marker (32 zero bytes) and are never stored. Format 2 adds, for the few
positions an incremental changed a little, the deltas that apply on top of
the base (:mod:`fleece.repo.format.delta`), kept in a dict by position.
"""

from __future__ import annotations

import builtins
import hashlib
import struct
from collections.abc import Iterator

from fleece.errors import RepositoryCorrupt
from fleece.repo.format.delta import MAX_DEPTH, DeltaRef

INDEX_MAGIC = b"FLIX"
INDEX_VERSION = 1
INDEX_VERSION_DELTAS = 2
HEADER = struct.Struct("<4sB3xIQQ")
"""magic, version, (3 reserved), chunk size, disk size, entry count."""
REF_COUNT = struct.Struct("<Q")
"""Version 2: after the header, the number of delta references."""
ENTRY_V2 = struct.Struct("<32sIHH")
"""Version 2 entry: base digest, first reference, reference count, reserved."""
REF = struct.Struct("<32sQII32s")
"""Version 2 delta reference: pack digest, offset, encoded length, bytes covered, delta digest."""
DIGEST_SIZE = 32
ZERO_MARKER = bytes(DIGEST_SIZE)


def chunk_count(chunk_size: int, disk_size: int) -> int:
    """How many chunks cover ``disk_size`` bytes (the last one may be short)."""
    return -(-disk_size // chunk_size)


class ChunkIndex:
    """The digests of every chunk of one disk at one restore point."""

    def __init__(self, chunk_size: int, disk_size: int, entries: bytearray,
                 deltas: dict[int, tuple[DeltaRef, ...]] | None = None,
                 version: int = INDEX_VERSION) -> None:
        if chunk_size <= 0 or disk_size < 0:
            raise ValueError(f"bad index geometry: chunk {chunk_size}, disk {disk_size}")
        if len(entries) != chunk_count(chunk_size, disk_size) * DIGEST_SIZE:
            raise ValueError("index entries do not match the disk size")
        self.chunk_size = chunk_size
        self.disk_size = disk_size
        self._entries = entries
        self.deltas: dict[int, tuple[DeltaRef, ...]] = dict(deltas or {})
        """Position → the deltas that apply over its base, oldest first (format 2)."""
        self.version = version
        """The index format written by :meth:`to_bytes`: 1, or 2 where deltas are allowed."""

    @classmethod
    def empty(cls, chunk_size: int, disk_size: int, version: int = INDEX_VERSION) -> ChunkIndex:
        """An index whose every chunk is zero (the start of a full backup)."""
        entries = bytearray(chunk_count(chunk_size, disk_size) * DIGEST_SIZE)
        return cls(chunk_size, disk_size, entries, version=version)

    @property
    def n_chunks(self) -> int:
        """Number of chunks, the last possibly shorter than ``chunk_size``."""
        return len(self._entries) // DIGEST_SIZE

    def chunk_length(self, i: int) -> int:
        """Plaintext length of chunk ``i``: ``chunk_size`` except for a short tail."""
        self._check(i)
        return min(self.chunk_size, self.disk_size - i * self.chunk_size)

    def _check(self, i: int) -> None:
        if not 0 <= i < self.n_chunks:
            raise IndexError(f"chunk {i} is outside a {self.n_chunks}-chunk index")

    def get(self, i: int) -> bytes | None:
        """Digest of chunk ``i``'s base, or None when the base is all zeroes.

        Not whether the position reads as zeroes: deltas may lie on a zero
        base (an incremental's writes into a hole). Ask :meth:`is_zero`.
        """
        self._check(i)
        digest = bytes(self._entries[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])
        return None if digest == ZERO_MARKER else digest

    def set(self, i: int, digest: bytes | None) -> None:
        """Record chunk ``i`` as a whole chunk (its deltas go); None marks it all zeroes."""
        self._check(i)
        if digest is None:
            digest = ZERO_MARKER
        elif len(digest) != DIGEST_SIZE or digest == ZERO_MARKER:
            raise ValueError("a chunk digest is 32 bytes and never the zero marker")
        self._entries[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] = digest
        self.deltas.pop(i, None)

    def add_delta(self, i: int, ref: DeltaRef) -> None:
        """Apply ``ref`` on top of what position ``i`` holds now."""
        self._check(i)
        if self.version < INDEX_VERSION_DELTAS:
            raise ValueError("a format-1 index holds no deltas")
        layers = (*self.deltas.get(i, ()), ref)
        if len(layers) > MAX_DEPTH:
            raise ValueError(f"position {i} would carry {len(layers)} deltas, more than {MAX_DEPTH}")
        self.deltas[i] = layers

    def deltas_of(self, i: int) -> tuple[DeltaRef, ...]:
        """The deltas over position ``i``'s base, in the order they apply (oldest first)."""
        return self.deltas.get(i, ())

    def is_zero(self, i: int) -> bool:
        """Whether position ``i`` reads as all zeroes with no object read (no base, no delta).

        The one definition every reader uses (restore, serve, live restore):
        a zero base with deltas on top is data.
        """
        return self.get(i) is None and i not in self.deltas

    def zero_runs(self, max_length: int) -> Iterator[tuple[int, int]]:
        """``(offset, length)`` of the runs of positions that :meth:`is_zero`, in disk order,
        each at most ``max_length`` bytes (a whole number of positions, at least one)."""
        start = length = 0
        for i in range(self.n_chunks):
            if not self.is_zero(i):
                continue
            offset, n = i * self.chunk_size, self.chunk_length(i)
            if length and start + length == offset and length + n <= max_length:
                length += n
                continue
            if length:
                yield start, length
            start, length = offset, n
        if length:
            yield start, length

    def delta_refs(self) -> Iterator[tuple[int, DeltaRef]]:
        """``(position, ref)`` for every delta, in position order."""
        for i in sorted(self.deltas):
            for ref in self.deltas[i]:
                yield i, ref

    def packs(self) -> builtins.set[bytes]:
        """The digests of every pack a delta of this index lives in (what gc marks)."""
        return {ref.pack for layers in self.deltas.values() for ref in layers}

    def copy(self) -> ChunkIndex:
        """An independent copy (the start of an incremental from its parent)."""
        return ChunkIndex(self.chunk_size, self.disk_size, bytearray(self._entries), self.deltas,
                          self.version)

    def stored(self) -> Iterator[tuple[int, bytes]]:
        """``(chunk number, digest)`` for every stored base chunk, in order."""
        entries = self._entries
        for i in range(self.n_chunks):
            digest = bytes(entries[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])
            if digest != ZERO_MARKER:
                yield i, digest

    def digests(self) -> builtins.set[bytes]:
        """Every distinct non-zero digest (what gc marks and dedup consults)."""
        return {digest for _, digest in self.stored()}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChunkIndex):
            return NotImplemented
        return (self.chunk_size, self.disk_size, self._entries, self.deltas) == (
            other.chunk_size,
            other.disk_size,
            other._entries,
            other.deltas,
        )

    def __repr__(self) -> str:
        return f"ChunkIndex(chunk_size={self.chunk_size}, disk_size={self.disk_size})"

    def to_bytes(self) -> bytes:
        """The binary index object: header, entries (and references), sha256 of all before."""
        if self.version == INDEX_VERSION:
            if self.deltas:
                raise ValueError("a format-1 index holds no deltas")
            body = (HEADER.pack(INDEX_MAGIC, INDEX_VERSION, self.chunk_size, self.disk_size,
                                self.n_chunks) + self._entries)
            return body + hashlib.sha256(body).digest()
        parts = [HEADER.pack(INDEX_MAGIC, INDEX_VERSION_DELTAS, self.chunk_size, self.disk_size,
                             self.n_chunks)]
        refs: list[bytes] = []
        entries = self._entries
        for i in range(self.n_chunks):
            layers = self.deltas.get(i, ())
            parts.append(ENTRY_V2.pack(bytes(entries[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]),
                                       len(refs), len(layers), 0))
            refs.extend(REF.pack(r.pack, r.offset, r.length, r.covered, r.digest) for r in layers)
        parts.insert(1, REF_COUNT.pack(len(refs)))
        body = b"".join(parts + refs)
        return body + hashlib.sha256(body).digest()

    @classmethod
    def from_bytes(cls, blob: bytes, what: str = "chunk index") -> ChunkIndex:
        """Parse and verify an index object (version 1 or 2); damage raises ``RepositoryCorrupt``."""
        if len(blob) < HEADER.size + DIGEST_SIZE:
            raise RepositoryCorrupt(f"{what} is truncated ({len(blob)} bytes)")
        body, checksum = blob[:-DIGEST_SIZE], blob[-DIGEST_SIZE:]
        if hashlib.sha256(body).digest() != checksum:
            raise RepositoryCorrupt(f"{what} fails its checksum (content damaged)")
        magic, version, chunk_size, disk_size, count = HEADER.unpack_from(body)
        if magic != INDEX_MAGIC:
            raise RepositoryCorrupt(f"{what} has bad magic {magic!r} (expected {INDEX_MAGIC!r})")
        if version not in (INDEX_VERSION, INDEX_VERSION_DELTAS):
            raise RepositoryCorrupt(f"{what} has unknown index format version {version}")
        if chunk_size == 0 or chunk_size & (chunk_size - 1):
            raise RepositoryCorrupt(f"{what} has invalid chunk size {chunk_size}")
        if count != chunk_count(chunk_size, disk_size):
            raise RepositoryCorrupt(
                f"{what} holds {count} entries but a {disk_size}-byte disk needs "
                f"{chunk_count(chunk_size, disk_size)}"
            )
        if version == INDEX_VERSION:
            if len(body) != HEADER.size + count * DIGEST_SIZE:
                raise RepositoryCorrupt(f"{what} has {len(body)} bytes, not the {count} entries it says")
            return cls(chunk_size, disk_size, bytearray(body[HEADER.size :]))
        return cls._from_v2(body, chunk_size, disk_size, count, what)

    @classmethod
    def _from_v2(cls, body: bytes, chunk_size: int, disk_size: int, count: int,
                 what: str) -> ChunkIndex:
        start = HEADER.size + REF_COUNT.size
        if len(body) < start:
            raise RepositoryCorrupt(f"{what} is truncated")
        (n_refs,) = REF_COUNT.unpack_from(body, HEADER.size)
        refs_at = start + count * ENTRY_V2.size
        if len(body) != refs_at + n_refs * REF.size:
            raise RepositoryCorrupt(f"{what} has {len(body)} bytes, not the {count} entries and "
                                    f"{n_refs} delta references it says")
        entries = bytearray(count * DIGEST_SIZE)
        deltas: dict[int, tuple[DeltaRef, ...]] = {}
        for i, (digest, first, n, _) in enumerate(ENTRY_V2.iter_unpack(body[start:refs_at])):
            entries[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] = digest
            if not n:
                continue
            if n > MAX_DEPTH or first + n > n_refs:
                raise RepositoryCorrupt(f"{what}: chunk {i} names {n} deltas from reference {first}")
            deltas[i] = tuple(DeltaRef(*REF.unpack_from(body, refs_at + (first + k) * REF.size))
                              for k in range(n))
        return cls(chunk_size, disk_size, entries, deltas, INDEX_VERSION_DELTAS)
