"""Reading a disk back out of a restore point: random access and raw restore.

:class:`DiskImage` answers "the bytes at offset X of disk D at point P" with
one index lookup, one chunk fetch and (format 2) at most ``MAX_DEPTH`` delta
reads, for ``restore``, ``verify`` and ``serve`` alike. :func:`restore_raw`
writes a whole disk as a sparse raw image: zero chunks stay holes, stored
chunks are fetched, decoded and checked by a thread pool (zstd, the hashes
and file I/O release the GIL) straight into a few reused aligned buffers,
which go to the output with direct I/O (:mod:`fleece.restore.output`), so
memory does not grow with the disk and no byte is copied more than needed.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

from fleece.errors import BadInput, FleeceError, RepositoryCorrupt
from fleece.maintenance.damage import ByteRange, chunk_ranges, describe_ranges
from fleece.repo.format.index import ChunkIndex
from fleece.repo.format.point import DiskRecord, RestorePoint
from fleece.repo.repository import Repository
from fleece.restore.output import (
    OUTPUT_MODE,
    Buffer,
    FdTarget,
    aligned_buffer,
    open_direct,
    open_output,
)

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 8
"""Chunks in flight: cores decoding while others wait on object reads (S3) and writes."""
ZERO_RUN_MAX = 1 << 30


def select_disk(point: RestorePoint, drive: str | None) -> DiskRecord:
    """The disk ``drive`` names; it may be omitted only when the point has one disk."""
    names = ", ".join(d.name for d in point.disks)
    if drive is None:
        if len(point.disks) == 1:
            return point.disks[0]
        raise BadInput(f"restore point {point.id} has several disks ({names}); choose one with --drive")
    record = point.disk(drive)
    if record is None:
        raise BadInput(f"restore point {point.id} has no disk {drive!r} (it has: {names})")
    return record


class DiskImage:
    """Random read access to one disk of one restore point."""

    def __init__(self, repo: Repository, point: RestorePoint, drive: str | None = None) -> None:
        self.repo = repo
        self.point = point
        self.disk = select_disk(point, drive)
        self.index: ChunkIndex = repo.read_index(point, self.disk.name)
        self.size = self.disk.virtual_size
        self.chunk_size = self.index.chunk_size

    def read_chunk(self, i: int) -> bytes:
        """The plaintext of chunk ``i`` (base and deltas; zeroes for a zero chunk), length-checked."""
        try:
            return self.repo.read_position(self.index, i)
        except RepositoryCorrupt as exc:
            raise RepositoryCorrupt(f"{exc} (chunk {i} of {self.disk.name} in point "
                                    f"{self.point.id})") from None

    def read_chunk_into(self, i: int, out: memoryview) -> None:
        """:meth:`read_chunk` into ``out``, which is exactly the chunk's length."""
        try:
            self.repo.read_position_into(self.index, i, out)
        except RepositoryCorrupt as exc:
            raise RepositoryCorrupt(f"{exc} (chunk {i} of {self.disk.name} in point "
                                    f"{self.point.id})") from None

    def chunk_at(self, offset: int) -> tuple[int, bytes]:
        """``(chunk start offset, chunk bytes)`` of the chunk holding byte ``offset``."""
        if not 0 <= offset < self.size:
            raise BadInput(f"offset {offset} is outside the {self.size}-byte disk")
        i = offset // self.chunk_size
        return i * self.chunk_size, self.read_chunk(i)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (within the disk), crossing chunks as needed."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BadInput(f"range {offset}+{length} is outside the {self.size}-byte disk")
        out = bytearray()
        while length:
            start, data = self.chunk_at(offset)
            piece = data[offset - start : offset - start + length]
            out += piece
            offset += len(piece)
            length -= len(piece)
        return bytes(out)


@dataclass
class RestoreResult:
    """What a restore wrote."""

    point: str
    disk: str
    size: int
    chunks_written: int
    zero_chunks: int
    damaged: list[ByteRange] = field(default_factory=list)
    """Byte ranges written as zeroes because their chunks are missing or damaged."""


class ChunkTarget(Protocol):
    """Where restored chunks go: a file, a block device, an NBD export."""

    fresh: bool
    """Whether the target reads as zeroes already, so zero chunks need no write."""

    def write(self, offset: int, data: Buffer) -> None:
        """Write ``data`` at ``offset`` (called from several threads at once).

        ``data`` is a buffer the caller reuses once this returns.
        """
        ...

    def zero(self, offset: int, length: int) -> None:
        """Make ``[offset, offset + length)`` read as zeroes."""
        ...


def restore_raw(
    repo: Repository,
    point: RestorePoint,
    drive: str | None,
    output: Path,
    *,
    force: bool = False,
    workers: int = DEFAULT_WORKERS,
    allow_damage: bool = False,
    mode: int = OUTPUT_MODE,
) -> RestoreResult:
    """Write disk ``drive`` of ``point`` to ``output`` as a sparse raw image or onto a block device.

    A new file is made with ``mode`` (0600: only its owner reads a VM's disk).

    On failure a file output is removed (it was created or truncated by us)
    and the error says so. A damaged point fails, naming the damaged byte
    ranges, unless ``allow_damage``: then they are written as zeroes and
    listed in the result.
    """
    image = DiskImage(repo, point, drive)
    fd, is_device = open_output(output, force, mode)
    direct_fd = open_direct(fd)
    try:
        if is_device:
            device_size = os.lseek(fd, 0, os.SEEK_END)
            if device_size < image.size:
                raise BadInput(f"block device {output} holds {device_size} bytes, the disk needs "
                               f"{image.size}; nothing was written")
        else:
            # A fresh file of the right size is all holes; only data is written.
            os.ftruncate(fd, image.size)
        result = copy_chunks(image, FdTarget(fd, fresh=not is_device, direct_fd=direct_fd),
                             workers=workers, allow_damage=allow_damage)
        # The one flush: direct writes bypassed the page cache, but the
        # file's extents and the device's write cache still need it.
        os.fsync(fd)
    except BaseException as exc:
        _close(direct_fd)
        os.close(fd)
        left = (f"the device {output} holds a partial restore" if is_device
                else f"the partial output {output} was removed")
        if not is_device:
            _remove_partial(output)
        if isinstance(exc, OSError):
            raise FleeceError(f"writing {output} failed: {exc.strerror or exc}; {left}") from None
        if isinstance(exc, BadInput) and is_device:
            raise
        if isinstance(exc, FleeceError):
            exc.args = (f"{exc}; restore aborted and {left}",)
        raise
    _close(direct_fd)
    os.close(fd)
    log.info("restored %s disk %s to %s", point.id, image.disk.name, output)
    return result


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _remove_partial(output: Path) -> None:
    try:
        os.unlink(output)
    except OSError as exc:
        log.warning("could not remove the partial output %s: %s", output, exc.strerror)


def copy_chunks(image: DiskImage, target: ChunkTarget, *, workers: int = DEFAULT_WORKERS,
                allow_damage: bool = False) -> RestoreResult:
    """Fetch, decode, check and write every chunk of ``image`` to ``target`` with a thread pool.

    Each chunk decodes into an aligned buffer taken from a free list (at
    most one per worker, allocated once) and is written from there, so the
    decoding of some chunks overlaps the writing of others with no
    per-chunk allocation. Missing or damaged chunks are collected (the pass
    goes on, so the error names every damaged range); they raise
    :class:`RepositoryCorrupt` at the end unless ``allow_damage``, which
    writes zeroes there instead.
    """
    chunk_size = image.chunk_size
    index = image.index
    damaged: dict[int, str] = {}
    lock = threading.Lock()
    free: list[memoryview] = []

    def restore_one(i: int) -> None:
        with lock:
            buf = free.pop() if free else None
        if buf is None:
            buf = aligned_buffer(chunk_size)
        try:
            view = buf[: index.chunk_length(i)]
            try:
                image.read_chunk_into(i, view)
            except RepositoryCorrupt as exc:
                with lock:
                    damaged[i] = str(exc)
                if not target.fresh:
                    target.zero(i * chunk_size, len(view))
                return
            target.write(i * chunk_size, view)
        finally:
            with lock:
                free.append(buf)

    def tasks() -> Iterator[tuple[Callable[[], None], bool]]:
        """``(work, is a stored chunk)``; zero runs only where the target is not fresh."""
        zero_start: int | None = None
        for i in range(index.n_chunks):
            start = i * chunk_size
            if not index.is_zero(i):
                if zero_start is not None:
                    yield partial(target.zero, zero_start, start - zero_start), False
                    zero_start = None
                yield partial(restore_one, i), True
            elif not target.fresh:
                # One request per run of zero chunks, bounded (NBD lengths are 32-bit).
                if zero_start is None:
                    zero_start = start
                elif start - zero_start >= ZERO_RUN_MAX:
                    yield partial(target.zero, zero_start, start - zero_start), False
                    zero_start = start
        if zero_start is not None:
            yield partial(target.zero, zero_start, image.size - zero_start), False

    written = 0
    max_in_flight = 2 * workers  # the pool's queue stays fed; buffers are taken only when running
    pending: set[Future[None]] = set()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fleece-restore") as pool:
        try:
            for work, is_chunk in tasks():
                if len(pending) >= max_in_flight:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()
                pending.add(pool.submit(work))
                written += is_chunk
            for future in pending:
                future.result()
        except BaseException:
            # Leave the pool's exit to wait for the few chunks still running,
            # so nothing writes to the target after the caller closes it.
            for future in pending:
                future.cancel()
            raise
    ranges = chunk_ranges(damaged, chunk_size, image.size)
    if damaged and not allow_damage:
        first = damaged[min(damaged)]
        raise RepositoryCorrupt(
            f"disk {image.disk.name} of restore point {image.point.id} is damaged at bytes "
            f"{describe_ranges(ranges)} ({len(damaged)} chunk{'s' if len(damaged) > 1 else ''}; "
            f"first: {first}); --allow-damage restores zeroes there instead")
    return RestoreResult(
        point=image.point.id,
        disk=image.disk.name,
        size=image.size,
        chunks_written=written - len(damaged),
        zero_chunks=index.n_chunks - written,
        damaged=ranges,
    )
