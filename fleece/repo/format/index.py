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
from fleece.repo.format.codec import decode_chunk, encode_chunk
from fleece.repo.format.delta import MAX_DEPTH, DeltaRef

INDEX_MAGIC = b"FLIX"
INDEX_VERSION = 1
INDEX_VERSION_DELTAS = 2
INDEX_VERSION_PAGED = 3
"""Format 3: a small top table naming content-named pages of entries (docs/format.md)."""
TOP_MAGIC = b"FLIT"
"""The frame of a version-3 index object (the top table), framed like a chunk."""
PAGE_MAGIC = b"FLPG"
"""The frame of an index page (format 3), framed like a chunk."""
PAGE_POSITIONS = 256
"""Positions per page that writers use (1 GiB of disk at 4 MiB chunks)."""
MAX_PAGE_POSITIONS = 65536
METADATA_ZSTD_LEVEL = 3
"""Top tables and pages are always zstd level 3 when smaller: their bytes (and so a page's
name) do not depend on the repository's chunk compression setting."""
TOP_GEOMETRY = struct.Struct("<II")
"""Version 3, after the header: positions per page, reserved (zero)."""
PAGE_HEADER = struct.Struct("<II")
"""A page's plaintext starts with: positions in the page, delta references in the page."""
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
        """The index format written by :meth:`to_bytes`: 1, 2 where deltas are allowed, 3 paged."""
        self.page_positions = PAGE_POSITIONS
        """Version 3: positions per page."""
        self.page_names: list[bytes | None] | None = None
        """Version 3: per page, the name of the stored page that holds exactly what this index
        holds there (the zero marker for a page that :meth:`page_is_zero`), or None where it
        changed since the index was read (or for every page, when not read from a version-3
        index). Only the pages with no name are written again (:meth:`unnamed_pages`)."""

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
        self._touch(i)

    def _touch(self, i: int) -> None:
        if self.page_names is not None:
            self.page_names[i // self.page_positions] = None

    def add_delta(self, i: int, ref: DeltaRef) -> None:
        """Apply ``ref`` on top of what position ``i`` holds now."""
        self._check(i)
        if self.version < INDEX_VERSION_DELTAS:
            raise ValueError("a format-1 index holds no deltas")
        layers = (*self.deltas.get(i, ()), ref)
        if len(layers) > MAX_DEPTH:
            raise ValueError(f"position {i} would carry {len(layers)} deltas, more than {MAX_DEPTH}")
        self.deltas[i] = layers
        self._touch(i)

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
        other = ChunkIndex(self.chunk_size, self.disk_size, bytearray(self._entries), self.deltas,
                           self.version)
        other.page_positions = self.page_positions
        other.page_names = None if self.page_names is None else list(self.page_names)
        return other

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

    # -- pages (version 3) ----------------------------------------------------------------

    @property
    def n_pages(self) -> int:
        """Number of pages of :attr:`page_positions` positions (the last possibly shorter)."""
        return -(-self.n_chunks // self.page_positions)

    def page_span(self, p: int) -> range:
        """The positions of page ``p``."""
        if not 0 <= p < self.n_pages:
            raise IndexError(f"page {p} is outside a {self.n_pages}-page index")
        first = p * self.page_positions
        return range(first, min(first + self.page_positions, self.n_chunks))

    def page_is_zero(self, p: int) -> bool:
        """Whether every position of page ``p`` :meth:`is_zero` (its top-table entry is the zero
        marker and no page object exists)."""
        return all(self.is_zero(i) for i in self.page_span(p))

    def encode_page(self, p: int) -> bytes:
        """Page ``p``'s object: its plaintext (entries, then references) framed ``FLPG``."""
        span = self.page_span(p)
        entries = self._entries
        parts: list[bytes] = []
        refs: list[bytes] = []
        for i in span:
            layers = self.deltas.get(i, ())
            parts.append(ENTRY_V2.pack(bytes(entries[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]),
                                       len(refs), len(layers), 0))
            refs.extend(REF.pack(r.pack, r.offset, r.length, r.covered, r.digest) for r in layers)
        plain = b"".join([PAGE_HEADER.pack(len(span), len(refs)), *parts, *refs])
        return encode_chunk(plain, METADATA_ZSTD_LEVEL, magic=PAGE_MAGIC)

    def unnamed_pages(self) -> Iterator[int]:
        """The pages whose stored name is not known: those a writer stores (or finds zero)."""
        names = self.page_names
        return iter(range(self.n_pages)) if names is None else (
            p for p in range(self.n_pages) if names[p] is None)

    def name_page(self, p: int, name: bytes | None) -> None:
        """Record that page ``p`` is stored as ``name`` (None: it is all zero, no object)."""
        if self.page_names is None:
            self.page_names = [None] * self.n_pages
        self.page_names[p] = ZERO_MARKER if name is None else name

    def stored_pages(self) -> builtins.set[bytes]:
        """The names of every page object this (version-3) index names (what gc marks)."""
        if self.version < INDEX_VERSION_PAGED or self.page_names is None:
            return builtins.set()
        return {n for n in self.page_names if n is not None and n != ZERO_MARKER}

    def load_page(self, p: int, blob: bytes, what: str) -> None:
        """Fill page ``p`` from its stored object (checked against its name by the caller)."""
        plain = decode_chunk(blob, magic=PAGE_MAGIC, what=what)
        span = self.page_span(p)
        if len(plain) < PAGE_HEADER.size:
            raise RepositoryCorrupt(f"{what} is truncated")
        n, n_refs = PAGE_HEADER.unpack_from(plain)
        refs_at = PAGE_HEADER.size + n * ENTRY_V2.size
        if n != len(span) or len(plain) != refs_at + n_refs * REF.size:
            raise RepositoryCorrupt(f"{what} holds {n} positions and {n_refs} references in "
                                    f"{len(plain)} bytes; page {p} has {len(span)} positions")
        first_pos = span.start
        for k, (digest, first, count, _) in enumerate(
                ENTRY_V2.iter_unpack(plain[PAGE_HEADER.size:refs_at])):
            i = first_pos + k
            self._entries[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] = digest
            if not count:
                continue
            if count > MAX_DEPTH or first + count > n_refs:
                raise RepositoryCorrupt(f"{what}: chunk {i} names {count} deltas from reference {first}")
            self.deltas[i] = tuple(DeltaRef(*REF.unpack_from(plain, refs_at + (first + j) * REF.size))
                                   for j in range(count))

    def _top_bytes(self) -> bytes:
        names = self.page_names
        if names is None or any(n is None for n in names):
            raise ValueError("a version-3 index names its pages: store them first (write_index)")
        body = b"".join([HEADER.pack(INDEX_MAGIC, INDEX_VERSION_PAGED, self.chunk_size,
                                     self.disk_size, self.n_chunks),
                         TOP_GEOMETRY.pack(self.page_positions, 0), *(n or b"" for n in names)])
        return encode_chunk(body + hashlib.sha256(body).digest(), METADATA_ZSTD_LEVEL,
                            magic=TOP_MAGIC)

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
        if self.version == INDEX_VERSION_PAGED:
            return self._top_bytes()
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
        """Parse and verify an index object; damage raises ``RepositoryCorrupt``.

        Versions 1 and 2 come back whole. Version 3 (a top table) comes back
        with its :attr:`page_names` and every position zero: the caller loads
        each named page with :meth:`load_page` (``Repository.read_index``).
        """
        if blob[:4] == TOP_MAGIC:
            return cls._from_top(decode_chunk(blob, magic=TOP_MAGIC, what=what), what)
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

    @classmethod
    def _from_top(cls, plain: bytes, what: str) -> ChunkIndex:
        if len(plain) < HEADER.size + TOP_GEOMETRY.size + DIGEST_SIZE:
            raise RepositoryCorrupt(f"{what} is truncated ({len(plain)} bytes)")
        body, checksum = plain[:-DIGEST_SIZE], plain[-DIGEST_SIZE:]
        if hashlib.sha256(body).digest() != checksum:
            raise RepositoryCorrupt(f"{what} fails its checksum (content damaged)")
        magic, version, chunk_size, disk_size, count = HEADER.unpack_from(body)
        per_page, reserved = TOP_GEOMETRY.unpack_from(body, HEADER.size)
        if magic != INDEX_MAGIC or version != INDEX_VERSION_PAGED:
            raise RepositoryCorrupt(f"{what}: a top table holds magic {magic!r} version {version}")
        if chunk_size == 0 or chunk_size & (chunk_size - 1):
            raise RepositoryCorrupt(f"{what} has invalid chunk size {chunk_size}")
        if not 1 <= per_page <= MAX_PAGE_POSITIONS or per_page & (per_page - 1) or reserved:
            raise RepositoryCorrupt(f"{what} has invalid page geometry ({per_page} positions)")
        if count != chunk_count(chunk_size, disk_size):
            raise RepositoryCorrupt(
                f"{what} holds {count} entries but a {disk_size}-byte disk needs "
                f"{chunk_count(chunk_size, disk_size)}"
            )
        n_pages = -(-count // per_page)
        start = HEADER.size + TOP_GEOMETRY.size
        if len(body) != start + n_pages * DIGEST_SIZE:
            raise RepositoryCorrupt(f"{what} has {len(body)} bytes, not the {n_pages} pages it says")
        index = cls.empty(chunk_size, disk_size, INDEX_VERSION_PAGED)
        index.page_positions = per_page
        index.page_names = [bytes(body[start + p * DIGEST_SIZE : start + (p + 1) * DIGEST_SIZE])
                            for p in range(n_pages)]
        return index
