"""Reading a disk back out of a restore point: random access and raw restore.

:class:`DiskImage` answers "the bytes at offset X of disk D at point P" with
one index lookup and one chunk fetch, for ``restore``, ``verify`` and
``serve`` alike. :func:`restore_raw` writes a whole disk as a sparse raw
image: zero chunks stay holes, stored chunks are fetched and decoded by a
thread pool (hashlib, zstd and file I/O release the GIL) with a bounded
number in flight, so memory does not grow with the disk.
"""

from __future__ import annotations

import logging
import os
import stat
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from fleece.errors import BadInput, FleeceError, RepositoryCorrupt
from fleece.repo.index import ChunkIndex
from fleece.repo.point import DiskRecord, RestorePoint
from fleece.repo.repository import Repository

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 8


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
        """The plaintext of chunk ``i`` (all zeroes for a zero chunk), length-checked."""
        length = self.index.chunk_length(i)
        digest = self.index.get(i)
        if digest is None:
            return bytes(length)
        data = self.repo.get_chunk(digest)
        if len(data) != length:
            raise RepositoryCorrupt(
                f"chunk {digest.hex()} at chunk {i} of {self.disk.name} in point "
                f"{self.point.id} holds {len(data)} bytes, expected {length}"
            )
        return data

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


def _open_output(output: Path, force: bool) -> int:
    """Open ``output`` for a fresh image; refuse to clobber without ``force``."""
    try:
        st = os.stat(output)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise BadInput(f"cannot use output {output}: {exc.strerror}; nothing was written") from None
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise BadInput(
                f"output {output} exists and is not a regular file (restoring onto block "
                "devices is not supported yet); nothing was written"
            )
        if not force:
            raise BadInput(f"output {output} exists; use --force to overwrite it")
    # O_EXCL without --force: a file appearing meanwhile is never clobbered.
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if force else os.O_EXCL)
    try:
        return os.open(output, flags, 0o644)
    except FileExistsError:
        raise BadInput(f"output {output} exists; use --force to overwrite it") from None
    except OSError as exc:
        raise BadInput(f"cannot create output {output}: {exc.strerror}; nothing was written") from None


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def restore_raw(
    repo: Repository,
    point: RestorePoint,
    drive: str | None,
    output: Path,
    *,
    force: bool = False,
    workers: int = DEFAULT_WORKERS,
) -> RestoreResult:
    """Write disk ``drive`` of ``point`` to ``output`` as a sparse raw image.

    On failure the output file is removed (it was created or truncated by us)
    and the error says so.
    """
    image = DiskImage(repo, point, drive)
    fd = _open_output(output, force)
    written = 0
    try:
        # A fresh file of the right size is all holes; only data is written.
        os.ftruncate(fd, image.size)
        written = _write_chunks(image, fd, workers)
        os.fsync(fd)
    except BaseException as exc:
        os.close(fd)
        _remove_partial(output)
        if isinstance(exc, OSError):
            raise FleeceError(
                f"writing {output} failed: {exc.strerror or exc}; the partial output was removed"
            ) from None
        if isinstance(exc, FleeceError):
            exc.args = (f"{exc}; restore aborted and the partial output {output} was removed",)
        raise
    os.close(fd)
    result = RestoreResult(
        point=point.id,
        disk=image.disk.name,
        size=image.size,
        chunks_written=written,
        zero_chunks=image.index.n_chunks - written,
    )
    log.info("restored %s disk %s to %s", point.id, image.disk.name, output)
    return result


def _remove_partial(output: Path) -> None:
    try:
        os.unlink(output)
    except OSError as exc:
        log.warning("could not remove the partial output %s: %s", output, exc.strerror)


def _write_chunks(image: DiskImage, fd: int, workers: int) -> int:
    """Fetch, decode and write every stored chunk; returns how many were written."""
    chunk_size = image.chunk_size
    max_in_flight = 2 * workers

    def restore_one(i: int) -> None:
        _pwrite_all(fd, image.read_chunk(i), i * chunk_size)

    count = 0
    pending: set[Future[None]] = set()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fleece-restore") as pool:
        try:
            for i, _digest in image.index.stored():
                if len(pending) >= max_in_flight:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()
                pending.add(pool.submit(restore_one, i))
                count += 1
            for future in pending:
                future.result()
        except BaseException:
            # Leave the pool's exit to wait for the few chunks still running,
            # so nothing writes to fd after the caller closes it.
            for future in pending:
                future.cancel()
            raise
    return count
