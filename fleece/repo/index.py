"""The chunk index: one sha256 per chunk of a virtual disk (docs/format.md).

Held in one ``bytearray`` of 32 bytes per chunk (8 MiB for 1 TiB at 4 MiB
chunks) rather than a list of objects, so memory stays small and the binary
form is a single copy. All-zero chunks carry the zero marker (32 zero bytes)
and are never stored.
"""

from __future__ import annotations

import builtins
import hashlib
import struct
from collections.abc import Iterator

from fleece.errors import RepositoryCorrupt

INDEX_MAGIC = b"FLIX"
INDEX_VERSION = 1
HEADER = struct.Struct("<4sB3xIQQ")
"""magic, version, (3 reserved), chunk size, disk size, entry count."""
DIGEST_SIZE = 32
ZERO_MARKER = bytes(DIGEST_SIZE)


def chunk_count(chunk_size: int, disk_size: int) -> int:
    """How many chunks cover ``disk_size`` bytes (the last one may be short)."""
    return -(-disk_size // chunk_size)


class ChunkIndex:
    """The digests of every chunk of one disk at one restore point."""

    def __init__(self, chunk_size: int, disk_size: int, entries: bytearray) -> None:
        if chunk_size <= 0 or disk_size < 0:
            raise ValueError(f"bad index geometry: chunk {chunk_size}, disk {disk_size}")
        if len(entries) != chunk_count(chunk_size, disk_size) * DIGEST_SIZE:
            raise ValueError("index entries do not match the disk size")
        self.chunk_size = chunk_size
        self.disk_size = disk_size
        self._entries = entries

    @classmethod
    def empty(cls, chunk_size: int, disk_size: int) -> ChunkIndex:
        """An index whose every chunk is zero (the start of a full backup)."""
        return cls(chunk_size, disk_size, bytearray(chunk_count(chunk_size, disk_size) * DIGEST_SIZE))

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
        """Digest of chunk ``i``, or None when the chunk is all zeroes."""
        self._check(i)
        digest = bytes(self._entries[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])
        return None if digest == ZERO_MARKER else digest

    def set(self, i: int, digest: bytes | None) -> None:
        """Record chunk ``i``'s digest; None marks it all zeroes."""
        self._check(i)
        if digest is None:
            digest = ZERO_MARKER
        elif len(digest) != DIGEST_SIZE or digest == ZERO_MARKER:
            raise ValueError("a chunk digest is 32 bytes and never the zero marker")
        self._entries[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] = digest

    def copy(self) -> ChunkIndex:
        """An independent copy (the start of an incremental from its parent)."""
        return ChunkIndex(self.chunk_size, self.disk_size, bytearray(self._entries))

    def resized(self, disk_size: int) -> ChunkIndex:
        """A copy for a disk that grew or shrank to ``disk_size``.

        Chunks past the old end become zero markers; chunks past the new end
        are dropped. The caller must re-read the chunk that was the old tail
        and the one that is the new tail: their lengths changed, and format 1
        requires each chunk's plaintext to be exactly its position's length.
        """
        new = ChunkIndex.empty(self.chunk_size, disk_size)
        keep = min(len(self._entries), len(new._entries))
        new._entries[:keep] = self._entries[:keep]
        return new

    def stored(self) -> Iterator[tuple[int, bytes]]:
        """``(chunk number, digest)`` for every chunk that is not all zeroes, in order."""
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
        return (self.chunk_size, self.disk_size, self._entries) == (
            other.chunk_size,
            other.disk_size,
            other._entries,
        )

    def __repr__(self) -> str:
        return f"ChunkIndex(chunk_size={self.chunk_size}, disk_size={self.disk_size})"

    def to_bytes(self) -> bytes:
        """The binary index object: header, entries, sha256 of both."""
        body = (
            HEADER.pack(INDEX_MAGIC, INDEX_VERSION, self.chunk_size, self.disk_size, self.n_chunks)
            + self._entries
        )
        return body + hashlib.sha256(body).digest()

    @classmethod
    def from_bytes(cls, blob: bytes, what: str = "chunk index") -> ChunkIndex:
        """Parse and verify an index object; any damage raises ``RepositoryCorrupt``."""
        if len(blob) < HEADER.size + DIGEST_SIZE:
            raise RepositoryCorrupt(f"{what} is truncated ({len(blob)} bytes)")
        body, checksum = blob[:-DIGEST_SIZE], blob[-DIGEST_SIZE:]
        if hashlib.sha256(body).digest() != checksum:
            raise RepositoryCorrupt(f"{what} fails its checksum (content damaged)")
        magic, version, chunk_size, disk_size, count = HEADER.unpack_from(body)
        if magic != INDEX_MAGIC:
            raise RepositoryCorrupt(f"{what} has bad magic {magic!r} (expected {INDEX_MAGIC!r})")
        if version != INDEX_VERSION:
            raise RepositoryCorrupt(f"{what} has unknown index format version {version}")
        if chunk_size == 0 or chunk_size & (chunk_size - 1):
            raise RepositoryCorrupt(f"{what} has invalid chunk size {chunk_size}")
        if count != chunk_count(chunk_size, disk_size):
            raise RepositoryCorrupt(
                f"{what} holds {count} entries but a {disk_size}-byte disk needs "
                f"{chunk_count(chunk_size, disk_size)}"
            )
        if len(body) != HEADER.size + count * DIGEST_SIZE:
            raise RepositoryCorrupt(f"{what} has {len(body)} bytes, not the {count} entries it says")
        return cls(chunk_size, disk_size, bytearray(body[HEADER.size :]))
