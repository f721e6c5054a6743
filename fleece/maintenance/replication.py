"""``fleece copy``: restore points from one repository into another, with everything they need.

For each point the destination lacks, oldest first: every chunk it needs
that the destination does not hold is fetched, checked against its digest
and stored as it is (the destination's dedup decides what to send), then its
indexes, and the point object last, with a conditional create. So a point
appears in the destination only once all it names is there; a copy that is
interrupted leaves at most chunks and indexes, which the next copy reuses
(or gc collects). Points the destination already holds are skipped: copying
again is idempotent.

The destination is written under the same protocol as a backup: the VM's
lease is held while its points are copied, and a running gc is waited out
(refused, as a backup is). A destination that does not exist yet is created
with the source's chunk size, hash and compression; an existing one must
share the chunk size and hash, since chunks are named by their hash.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fleece.errors import BadInput, NotARepository, RepositoryCorrupt, RepositoryError
from fleece.repo.backends.base import Backend, ObjectMissing
from fleece.repo.format import keys
from fleece.repo.format.codec import decode_chunk
from fleece.repo.format.point import RestorePoint
from fleece.repo.gc_lock import check_no_gc
from fleece.repo.lock import vm_lock
from fleece.repo.needs import point_objects
from fleece.repo.repository import Repository, holds_objects

T = TypeVar("T")
DEFAULT_WORKERS = 8
_BATCH = 64  # chunks in flight per batch: memory stays bounded whatever the point's size


@dataclass
class CopyReport:
    """What a copy did."""

    copied: list[str] = field(default_factory=list)
    """Ids of the points written to the destination."""
    skipped: list[str] = field(default_factory=list)
    """Ids of the points the destination already held."""
    chunks_copied: int = 0
    chunks_present: int = 0
    """Chunks the points need that the destination already held (not sent)."""
    bytes_copied: int = 0
    objects_written: int = 0
    """Chunks, indexes and points written to the destination."""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The ``copy --json`` object."""
        return {"copied": self.copied, "skipped": self.skipped, "chunks_copied": self.chunks_copied,
                "chunks_present": self.chunks_present, "bytes_copied": self.bytes_copied,
                "objects_written": self.objects_written,
                "seconds": round(self.seconds, 3)}


def open_destination(source: Repository, backend: Backend) -> Repository:
    """The destination repository, created like the source if the location is empty."""
    try:
        dest = Repository.open(backend)
    except NotARepository:
        if holds_objects(backend):
            raise
        c = source.config
        dest = Repository.open_or_init(backend, c.chunk_size, c.compression_level, hash=c.hash)
    if (dest.config.chunk_size, dest.config.hash) != (source.config.chunk_size, source.config.hash):
        raise BadInput(
            f"cannot copy from {source.url} (chunk size {source.config.chunk_size}, {source.config.hash})"
            f" to {dest.url} (chunk size {dest.config.chunk_size}, {dest.config.hash}): chunks are "
            "named by their hash, so both must use the same; nothing was copied")
    return dest


def _batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def copy_points(source: Repository, dest: Repository, points: list[RestorePoint], *,
                workers: int = DEFAULT_WORKERS, say: Callable[[str], None] | None = None) -> CopyReport:
    """Copy ``points`` (grouped by VM, oldest first) that ``dest`` lacks; see the module docstring."""
    started = time.monotonic()
    report = CopyReport()
    have = set(dest.point_refs())
    by_vm: dict[str, list[RestorePoint]] = {}
    for p in sorted(points, key=lambda p: p.id):
        by_vm.setdefault(p.vm, []).append(p)
    present: set[bytes] = set()  # chunks known to be in the destination, this run
    with ThreadPoolExecutor(workers, thread_name_prefix="fleece-copy") as pool:
        for vm, vm_points in by_vm.items():
            todo = [p for p in vm_points if (vm, p.id) not in have]
            report.skipped += [p.id for p in vm_points if (vm, p.id) in have]
            if not todo:
                continue
            with vm_lock(dest.backend, vm) as lease:
                check_no_gc(dest.backend)  # the backup protocol: our lease first, then the look
                for point in todo:
                    _copy_one(source, dest, point, pool, present, report)
                    lease.check()
                    dest.write_point(point)
                    report.copied.append(point.id)
                    report.objects_written += 1 + len(point.disks)
                    if say is not None:
                        say(f"copied point {point.id} of VM {vm}")
    report.seconds = time.monotonic() - started
    return report


def _copy_one(source: Repository, dest: Repository, point: RestorePoint, pool: ThreadPoolExecutor,
              present: set[bytes], report: CopyReport) -> None:
    needs = point_objects(source, point)

    def copy_chunk(digest: bytes) -> int:
        key = keys.chunk_key(digest)
        if dest.backend.exists(key):
            return -1
        try:
            blob = source.backend.get(key)
        except ObjectMissing:
            raise RepositoryCorrupt(f"chunk {key} of point {point.id} is missing from {source.url}; "
                                    "the point was not copied") from None
        try:
            decode_chunk(blob, digest, source.digest)  # checked on the way: never copy damage
        except RepositoryCorrupt as exc:
            raise RepositoryCorrupt(f"{source.url}: {key}: {exc}; point {point.id} was not copied "
                                    "(see fleece verify)") from None
        dest.put_chunk(digest, blob)
        return len(blob)

    missing = needs.chunks - present
    report.chunks_present += len(needs.chunks) - len(missing)  # sent for an earlier point of this run
    for batch in _batched(sorted(missing), _BATCH):
        for digest, sent in zip(batch, pool.map(copy_chunk, batch), strict=True):
            present.add(digest)
            if sent < 0:
                report.chunks_present += 1
            else:
                report.chunks_copied += 1
                report.objects_written += 1
                report.bytes_copied += sent
    for pack in sorted(needs.packs - present):
        key = keys.pack_key(pack)
        present.add(pack)
        if dest.backend.exists(key):
            report.chunks_present += 1
            continue
        try:
            blob = source.backend.get(key)
        except ObjectMissing:
            raise RepositoryCorrupt(f"pack {key} of point {point.id} is missing from {source.url}; "
                                    "the point was not copied") from None
        if source.digest(blob) != pack:  # a pack is named by its bytes: never copy damage
            raise RepositoryCorrupt(f"{source.url}: pack {key} does not match its name; point "
                                    f"{point.id} was not copied (see fleece verify)")
        dest.backend.put(key, blob, if_absent=True)
        report.chunks_copied += 1
        report.objects_written += 1
        report.bytes_copied += len(blob)
    for disk in point.disks:
        if needs.indexes[disk.name].deltas and not dest.has_deltas:
            raise RepositoryError(f"point {point.id} holds deltas (format 2) and {dest.url} is format 1; "
                                  "copy it into a format-2 repository; the point was not copied")
        blob = needs.indexes[disk.name].to_bytes()
        if hashlib.sha256(blob).hexdigest() != disk.index_digest:
            raise RepositoryError(f"index {disk.index_key} of point {point.id} does not re-encode to "
                                  "the bytes its point names; the point was not copied")
        key, _ = dest.write_index(point.id, disk.name, needs.indexes[disk.name])
        if key != disk.index_key:
            raise RepositoryError(f"index of disk {disk.name} of point {point.id} would land at {key}, "
                                  f"not {disk.index_key}; the point was not copied")
