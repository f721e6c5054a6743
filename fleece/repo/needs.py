"""Which objects a restore point needs: the one answer copy (and, later, Object Lock) builds on.

A point restores only if its point object, the index of each of its disks,
every chunk those indexes name and (format 2) every pack holding one of
their deltas are all present. Every caller (copy, and later Object Lock)
asks here.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleece.repo.format import keys
from fleece.repo.format.index import ChunkIndex
from fleece.repo.format.point import RestorePoint
from fleece.repo.repository import Repository


@dataclass(frozen=True)
class PointObjects:
    """Everything one restore point needs, read and checked from its repository."""

    point: RestorePoint
    indexes: dict[str, ChunkIndex]
    """Disk name → its index (checked against the digest in the point)."""
    chunks: frozenset[bytes]
    """Digests of every chunk the indexes and the machine record name (zero chunks are not stored)."""
    packs: frozenset[bytes] = frozenset()
    """Digests of every pack holding a delta the indexes name (format 2)."""
    pages: frozenset[bytes] = frozenset()
    """Names of every index page the (version-3) indexes name (format 3)."""

    @property
    def point_key(self) -> str:
        """The point object's key (written last by anything that writes points)."""
        return keys.point_key(self.point.vm, self.point.id)


def machine_chunks(point: RestorePoint) -> frozenset[bytes]:
    """The chunks holding the point's machine record (definition, NVRAM, TPM state), if any."""
    from fleece.machine.record import machine_of  # the record module builds on the repository
    record = machine_of(point)
    return frozenset(record.digests()) if record is not None else frozenset()


def point_objects(repo: Repository, point: RestorePoint) -> PointObjects:
    """Read ``point``'s indexes (``RepositoryCorrupt`` if one is missing or damaged) and list its needs."""
    indexes = {disk.name: repo.read_index(point, disk.name) for disk in point.disks}
    chunks = frozenset(d for index in indexes.values() for d in index.digests()) | machine_chunks(point)
    packs = frozenset(p for index in indexes.values() for p in index.packs())
    pages = frozenset(n for index in indexes.values() for n in index.stored_pages())
    return PointObjects(point, indexes, chunks, packs, pages)
