"""How one restore point's objects travel from one repository to another (``fleece copy``).

Three ways, chosen by whether the two repositories name chunks alike:

* :class:`SameNames` — both plain with the same hash: chunks, packs and
  indexes keep their names and bytes; each chunk is decoded and checked
  against its digest, each pack against its name, on the way.
* :class:`Sealed` — both encrypted with one master key (the destination was
  made by a copy, :meth:`~fleece.repo.repository.Repository.init_sharing_key`):
  chunk names, name tokens and seals agree, so every object moves as the
  store holds it, never decrypted or sealed again; each one's outer sha256
  is checked on the way (what ``verify --outer`` checks), and the indexes
  and the point were authenticated when they were read.
* :class:`Renamed` — different keys, plain and encrypted, or another hash:
  a chunk's name in the destination is the destination's (keyed) hash of
  its plaintext, so each chunk is opened, decoded and checked with the
  source's key, named and sealed with the destination's; deltas are packed
  anew under their new digests, and each index (and so its point, which
  records the index's digest) is rewritten to the new names. Names already
  known — from this run, or from the VM's newest point both repositories
  hold, read side by side — are not fetched again.

Every way stores chunks and packs with conditional creates and the indexes
before the point, which :func:`fleece.maintenance.replication.copy_points`
writes last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fleece.errors import RepositoryCorrupt, RepositoryError
from fleece.machine.record import machine_of
from fleece.repo.backends.base import ObjectMissing
from fleece.repo.format import keys
from fleece.repo.format.codec import decode_chunk
from fleece.repo.format.crypto import check_outer
from fleece.repo.format.delta import DeltaRef, PackWriter, decode_delta
from fleece.repo.format.index import INDEX_VERSION_PAGED, ChunkIndex
from fleece.repo.format.point import DiskRecord, RestorePoint
from fleece.repo.needs import PointObjects, point_objects
from fleece.repo.object_lock import lock_clock
from fleece.repo.repository import Repository
from fleece.testing import Phase, pause_point

T = TypeVar("T")
_BATCH = 64  # objects in flight per batch: memory stays bounded whatever the point's size


@dataclass
class CopyReport:
    """What a copy did."""

    copied: list[str] = field(default_factory=list)
    """Ids of the points written to the destination."""
    skipped: list[str] = field(default_factory=list)
    """Ids of the points the destination already held."""
    chunks_copied: int = 0
    chunks_present: int = 0
    """Chunks (and packs) the points need that the destination already held (not sent)."""
    bytes_copied: int = 0
    objects_written: int = 0
    """Chunks, packs, indexes and points written to the destination."""
    renamed: bool = False
    """Whether chunks were renamed for the destination (another key or hash; see :class:`Renamed`)."""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The ``copy --json`` object."""
        return {"copied": self.copied, "skipped": self.skipped, "chunks_copied": self.chunks_copied,
                "chunks_present": self.chunks_present, "bytes_copied": self.bytes_copied,
                "objects_written": self.objects_written, "renamed": self.renamed,
                "seconds": round(self.seconds, 3)}


def batched(items: Iterable[T], n: int = _BATCH) -> Iterator[list[T]]:
    """``items`` in lists of at most ``n``."""
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def names_agree(source: Repository, dest: Repository) -> bool:
    """Whether a chunk has the same name in both repositories (same hash, same key or none)."""
    if source.config.hash != dest.config.hash:
        return False
    if (source.config.format >= 3) != (dest.config.format >= 3):
        return False  # format 3 names chunks by their sparse form (docs/format.md "Chunks")
    if source.master is None or dest.master is None:
        return source.master is None and dest.master is None
    return source.shares_key(dest.config)


class Transfer:
    """Moves the objects of points from ``source`` to ``dest``; one per copy run."""

    def __init__(self, source: Repository, dest: Repository, pool: ThreadPoolExecutor,
                 report: CopyReport) -> None:
        self.source, self.dest, self.pool, self.report = source, dest, pool, report
        self.present: set[bytes] = set()
        """Chunks and packs known to be in the destination, this run."""

    def seed(self, vm: str, held: list[str]) -> None:
        """Learn from ``held``, ids of points of ``vm`` both repositories hold (only :class:`Renamed`
        does)."""

    def objects(self, point: RestorePoint) -> RestorePoint:
        """Store everything ``point`` needs that ``dest`` lacks; the point to commit there."""
        raise NotImplementedError

    def commit(self, point: RestorePoint) -> None:
        """Write the point (last, with a conditional create)."""
        self.dest.write_point(point)

    # -- shared steps ------------------------------------------------------------------------

    def _missing_source(self, key: str, point: RestorePoint) -> RepositoryCorrupt:
        what = ("chunk" if key.startswith(keys.CHUNKS_PREFIX) else
                "page" if key.startswith(keys.PAGES_PREFIX) else "pack")
        return RepositoryCorrupt(f"{what} {key} of point {point.id} is missing from {self.source.url}; "
                                 "the point was not copied")

    def _damaged(self, key: str, point: RestorePoint, why: str) -> RepositoryCorrupt:
        return RepositoryCorrupt(f"{self.source.url}: {key}: {why}; point {point.id} was not copied "
                                 "(see fleece verify)")

    def _count(self, sent: int, page: bool = False) -> None:
        """Count one chunk or pack (``chunks_copied``/``chunks_present``) or index page (objects
        and bytes only) that was sent (``sent`` bytes) or found present (-1)."""
        if sent < 0:
            if not page:
                self.report.chunks_present += 1
        else:
            if not page:
                self.report.chunks_copied += 1
            self.report.objects_written += 1
            self.report.bytes_copied += sent

    def _check_deltas_fit(self, point: RestorePoint, needs: PointObjects) -> None:
        if not self.dest.has_deltas and any(i.deltas for i in needs.indexes.values()):
            raise RepositoryError(f"point {point.id} holds deltas (format 2) and {self.dest.url} is "
                                  "format 1; copy it into a format-2 repository; the point was not copied")


class SameNames(Transfer):
    """Objects keep their names and bytes: fetched, checked and stored as they are."""

    def objects(self, point: RestorePoint) -> RestorePoint:
        """Chunks, packs, then indexes, each checked; the point itself unchanged."""
        needs = point_objects(self.source, point)
        self._check_deltas_fit(point, needs)
        if (self.dest.index_version < INDEX_VERSION_PAGED
                and any(i.version >= INDEX_VERSION_PAGED for i in needs.indexes.values())):
            raise RepositoryError(f"point {point.id} has paged indexes (format 3) and {self.dest.url} "
                                  f"is format {self.dest.config.format}; copy it into a format-3 "
                                  "repository; the point was not copied")
        missing = needs.chunks - self.present
        self.report.chunks_present += len(needs.chunks) - len(missing)  # sent for an earlier point
        for kind, names in ((keys.chunk_key, sorted(missing)),
                            (keys.pack_key, sorted(needs.packs - self.present)),
                            (keys.page_key, sorted(needs.pages - self.present))):
            for batch in batched(names):
                for digest, sent in zip(batch, self.pool.map(
                        lambda d, k=kind: self._copy_object(k(d), d, point), batch), strict=True):
                    self.present.add(digest)
                    self._count(sent, page=kind is keys.page_key)
        for disk in point.disks:
            self._copy_index(point, disk, needs.indexes[disk.name])
        return point

    def _copy_object(self, key: str, digest: bytes, point: RestorePoint) -> int:
        """Copy one chunk, pack or page unless the destination holds it; bytes sent, or -1."""
        if self.dest.backend.exists(key):
            return -1
        try:
            blob = self.source.backend.get(key)
        except ObjectMissing:
            raise self._missing_source(key, point) from None
        if key.startswith(keys.CHUNKS_PREFIX):
            try:
                decode_chunk(blob, digest, self.source.chunk_name)  # checked on the way: never copy damage
            except RepositoryCorrupt as exc:
                raise self._damaged(key, point, str(exc)) from None
            self.dest.put_chunk(digest, blob)
        else:
            if self.source.digest(blob) != digest:  # packs and pages are named by their bytes
                raise self._damaged(key, point, "the object does not match its name")
            self.dest.create(key, blob)
        return len(blob)

    def _copy_index(self, point: RestorePoint, disk: DiskRecord, index: ChunkIndex) -> None:
        blob = index.to_bytes()
        if hashlib.sha256(blob).hexdigest() != disk.index_digest:
            raise RepositoryError(f"index {disk.index_key} of point {point.id} does not re-encode to "
                                  "the bytes its point names; the point was not copied")
        key, _ = self.dest.write_index(point.id, disk.name, index)
        if key != disk.index_key:
            raise RepositoryError(f"index of disk {disk.name} of point {point.id} would land at {key}, "
                                  f"not {disk.index_key}; the point was not copied")
        self.report.objects_written += 1


class Sealed(SameNames):
    """Both encrypted with one key: every object moves as the store holds it (see the module)."""

    def _raw(self, key: str, point: RestorePoint) -> bytes:
        """The sealed bytes of logical ``key`` in the source, their outer checksum checked."""
        stored = self.source.stored_key(key)
        try:
            blob = self.source.raw_backend.get(stored)
        except ObjectMissing:
            raise self._missing_source(key, point) from None
        if not check_outer(blob):
            raise self._damaged(stored, point, "the sealed object fails its outer checksum")
        return blob

    def _copy_object(self, key: str, digest: bytes, point: RestorePoint) -> int:
        stored = self.dest.stored_key(key)
        if self.dest.raw_backend.exists(stored):
            return -1
        blob = self._raw(key, point)
        if self.dest.lock is None and key.startswith(keys.CHUNKS_PREFIX):
            self.dest.raw_backend.stage(stored, blob)  # made durable before any index names it
            pause_point(Phase.CHUNK_STORED)
        else:
            self._create_sealed(key, blob)
        return len(blob)

    def _create_sealed(self, key: str, blob: bytes) -> bool:
        """The sealed object of logical ``key`` created as it is; False when it existed.

        An Object Lock destination gets it locked N + S days (noted by ``key``).
        """
        stored = self.dest.stored_key(key)
        if self.dest.lock is None:
            return self.dest.raw_backend.put(stored, blob, if_absent=True)
        retention = self.dest.lock.retention(lock_clock())
        if not self.dest.raw_backend.put_locked(stored, blob, retention):
            return False
        self.dest.lock_ledger.note(key, retention.until)
        return True

    def _copy_index(self, point: RestorePoint, disk: DiskRecord, index: ChunkIndex) -> None:
        # The index was read and authenticated (point_objects); its sealed bytes go as they are.
        if keys.index_key(point.id, disk.name) != disk.index_key:
            raise RepositoryError(f"index of disk {disk.name} of point {point.id} is not at "
                                  f"{keys.index_key(point.id, disk.name)}; the point was not copied")
        blob = self._raw(disk.index_key, point)
        self.dest.flush()  # every chunk the index names is durable before the index exists
        if self.dest.lock is not None:
            # One a resumed copy finds came from the same source bytes: its lock is kept.
            if (not self._create_sealed(disk.index_key, blob)
                    and self.dest.raw_backend.get(self.dest.stored_key(disk.index_key)) != blob):
                raise RepositoryError(f"index {disk.index_key} exists already; nothing was written over it")
        else:
            self.dest.raw_backend.put(self.dest.stored_key(disk.index_key), blob)
        self.report.objects_written += 1

    def commit(self, point: RestorePoint) -> None:
        """The sealed point object as it is, with a conditional create."""
        key = keys.point_key(point.vm, point.id)
        blob = self._raw(key, point)
        self.dest.flush()
        if not self._create_sealed(key, blob):
            raise RepositoryError(f"restore point {key} already exists; nothing was written")


class Renamed(Transfer):
    """Chunks opened with the source's key, renamed and sealed with the destination's (see the module)."""

    def __init__(self, source: Repository, dest: Repository, pool: ThreadPoolExecutor,
                 report: CopyReport) -> None:
        super().__init__(source, dest, pool, report)
        report.renamed = True
        self.names: dict[bytes, bytes] = {}
        """Source chunk name → its name in the destination, for chunks the destination holds."""
        self.deltas: dict[tuple[bytes, int], DeltaRef] = {}
        """Source (pack, offset) of a delta → where the destination holds it."""

    def seed(self, vm: str, held: list[str]) -> None:
        """Pair the newest held point's indexes position by position: names the next points reuse."""
        if not held:
            return
        try:
            point = self.source.load_point(vm, max(held))
            theirs = self.dest.load_point(vm, point.id)
            for disk in point.disks:
                a = self.source.read_index(point, disk.name)
                b = self.dest.read_index(theirs, disk.name)
                if (a.chunk_size, a.disk_size) != (b.chunk_size, b.disk_size):
                    continue
                for i in range(a.n_chunks):
                    old, new = a.get(i), b.get(i)
                    if old is not None and new is not None:
                        self.names[old] = new
                    mine, there = a.deltas_of(i), b.deltas_of(i)
                    if len(mine) == len(there):
                        self.deltas.update(((r.pack, r.offset), s) for r, s in zip(mine, there, strict=True))
        except (RepositoryError, ObjectMissing):
            return  # only a shortcut: without it every chunk is read and named again

    def objects(self, point: RestorePoint) -> RestorePoint:
        """Chunks renamed, deltas packed anew, indexes rewritten; the point naming the new indexes."""
        needs = point_objects(self.source, point)
        self._check_deltas_fit(point, needs)
        known = needs.chunks & self.names.keys()
        self.report.chunks_present += len(known)
        for batch in batched(sorted(needs.chunks - known)):
            for old, (new, sent) in zip(batch, self.pool.map(lambda d: self._rename_chunk(d, point),
                                                             batch), strict=True):
                self.names[old] = new
                self._count(sent)
        self._repack(point, needs)
        disks = []
        for disk in point.disks:
            index = self._renamed_index(needs.indexes[disk.name])
            key, digest, written = self.dest.write_index_counted(point.id, disk.name, index)
            self.report.objects_written += written.objects
            disks.append(dataclasses.replace(disk, index_key=key, index_digest=digest))
        record = machine_of(point)
        machine = record.renamed(self.names.__getitem__).to_dict() if record is not None else None
        return dataclasses.replace(point, disks=disks, machine=machine)

    def _rename_chunk(self, digest: bytes, point: RestorePoint) -> tuple[bytes, int]:
        key = keys.chunk_key(digest)
        try:
            blob = self.source.backend.get(key)
            plaintext = decode_chunk(blob, digest, self.source.chunk_name)
        except ObjectMissing:
            raise self._missing_source(key, point) from None
        except RepositoryCorrupt as exc:  # fails to open, or to decode to its name
            raise self._damaged(key, point, str(exc)) from None
        new = self.dest.chunk_name(plaintext)
        # The encoded bytes (zstd or plain) do not depend on the key: only the name and seal change.
        return new, (len(blob) if self.dest.put_chunk(new, blob) else -1)

    def _repack(self, point: RestorePoint, needs: PointObjects) -> None:
        """Every delta of the point the destination lacks, into new packs, in a fixed order
        (so a copy run again after an interruption makes the same packs, stored once)."""
        todo = sorted({(r.pack, r.offset): r for index in needs.indexes.values()
                       for _, r in index.delta_refs()
                       if (r.pack, r.offset) not in self.deltas}.values())
        if not todo:
            return
        writer = PackWriter(self._store_pack)

        def fetch(ref: DeltaRef) -> tuple[bytes, bytes]:
            key = keys.pack_key(ref.pack)
            try:
                blob = self.source.backend.get_range(key, ref.offset, ref.length)
                body = decode_delta(blob, ref, self.source.digest)
            except ObjectMissing:
                raise self._missing_source(key, point) from None
            except RepositoryCorrupt as exc:
                raise self._damaged(key, point, str(exc)) from None
            return blob, self.dest.digest(body)

        k = 0
        for batch in batched(todo):
            for ref, (blob, digest) in zip(batch, self.pool.map(fetch, batch), strict=True):
                writer.add(k, blob, ref.covered, digest)  # k: the delta's place in todo
                k += 1
        placed = dict(writer.close())
        for k, ref in enumerate(todo):
            self.deltas[(ref.pack, ref.offset)] = placed[k]

    def _store_pack(self, blob: bytes) -> bytes:
        name = self.dest.digest(blob)
        if self.dest.backend.exists(keys.pack_key(name)):
            self._count(-1)
        else:
            self.dest.put_pack(blob)
            self._count(len(blob))
        return name

    def _renamed_index(self, index: ChunkIndex) -> ChunkIndex:
        version = self.dest.index_version  # paged in a format-3 destination
        if version < INDEX_VERSION_PAGED:
            version = min(index.version, version)
        out = ChunkIndex.empty(index.chunk_size, index.disk_size, version)
        for i, digest in index.stored():
            out.set(i, self.names[digest])
        for i, ref in index.delta_refs():
            out.add_delta(i, self.deltas[(ref.pack, ref.offset)])
        return out
