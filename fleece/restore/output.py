"""A raw restore's output: a fresh sparse file or a block device, written with direct I/O.

Restored chunks go to the device with ``O_DIRECT`` from page-aligned
buffers the restore reuses (:func:`aligned_buffer`): copying every byte into
the page cache cost more CPU than decompressing and hashing it, and left
gigabytes of dirty pages for the final ``fsync`` to write. Writes that
cannot be direct (an unaligned tail, a file system that refuses
``O_DIRECT``) go through an ordinary descriptor of the same file; one
``fsync`` at the end covers both. On a fresh file, aligned all-zero blocks
are never written, so the copy is as sparse as the disk.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from fleece.errors import BadInput
from fleece.repo.backends.file import SPARSE_BLOCK, is_aligned, sparse_runs

log = logging.getLogger(__name__)

ALIGN = 4096
"""Offset, length and address alignment of a direct write (the largest logical block size in use)."""
BLKZEROOUT = 0x127F  # _IO(0x12, 127), linux/fs.h
HOLE_BLOCK = SPARSE_BLOCK
"""A fresh output gets no write for an aligned all-zero block of this size."""

Buffer = bytes | bytearray | memoryview


def aligned_buffer(size: int) -> memoryview:
    """A writable ``size``-byte buffer at a page-aligned address (anonymous memory)."""
    return memoryview(mmap.mmap(-1, max(size, 1)))[:size]


def data_runs(data: Buffer, offset: int) -> Iterator[tuple[int, memoryview]]:
    """``(offset, bytes)`` of ``data`` at ``offset`` without its aligned all-zero blocks.

    A chunk of a fragmented disk is mostly the zeroes between its extents:
    writing them cost as much as the data, and made the copy less sparse
    than the disk. The blocks are the file backend's (:func:`sparse_runs`).
    """
    view = memoryview(data)
    if offset % HOLE_BLOCK:
        yield offset, view
        return
    for start, end in sparse_runs(view):
        yield offset + start, view[start:end]


class FdTarget:
    """A file descriptor: a fresh sparse file, or a block device that must be zeroed.

    ``direct_fd``, if given, is a second descriptor of the same file opened
    with ``O_DIRECT`` (:func:`open_direct`): aligned writes of aligned
    buffers go there. The caller closes both.
    """

    def __init__(self, fd: int, fresh: bool, direct_fd: int | None = None) -> None:
        self.fd = fd
        self.fresh = fresh
        self.direct_fd = direct_fd

    def write(self, offset: int, data: Buffer) -> None:
        """Write all of ``data`` at ``offset``; on a fresh file, aligned all-zero blocks stay holes."""
        if not self.fresh:
            self._pwrite(memoryview(data), offset)
            return
        for off, run in data_runs(data, offset):
            self._pwrite(run, off)

    def _pwrite(self, view: memoryview, offset: int) -> None:
        direct = self.direct_fd
        if direct is not None and offset % ALIGN == 0 and is_aligned(view, ALIGN):
            whole = len(view) - len(view) % ALIGN
            try:
                offset, view = self._pwrite_all(direct, view, offset, whole)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # The file system takes O_DIRECT at open but not this write
                # (a larger block size, a stacked driver): no direct writes.
                log.debug("direct write refused (%s); writing through the page cache", exc)
                self.direct_fd = None
        self._pwrite_all(self.fd, view, offset, len(view))

    @staticmethod
    def _pwrite_all(fd: int, view: memoryview, offset: int, length: int) -> tuple[int, memoryview]:
        """pwrite the first ``length`` bytes of ``view``; returns what is left, and where."""
        done = 0
        while done < length:
            done += os.pwrite(fd, view[done:length], offset + done)
        return offset + done, view[done:]

    def zero(self, offset: int, length: int) -> None:
        """BLKZEROOUT (the device zeroes, or unmaps where that reads back as zeroes)."""
        try:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("=QQ", offset, length))
            return
        except OSError:
            pass  # not a block device, or the driver refuses: write the zeroes
        zeros = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self.write(offset, zeros[:n])
            offset += n


def open_direct(fd: int) -> int | None:
    """A second descriptor of the file ``fd`` is open on, with ``O_DIRECT``; None if refused.

    Reopened through ``/proc/self/fd``, so it is the same file even if its
    name was replaced meanwhile (never ``O_EXCL``: on a block device the
    first descriptor holds the exclusive claim).
    """
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
    except OSError as exc:
        log.debug("no direct I/O for the output (%s); writing through the page cache", exc)
        return None


OUTPUT_MODE = 0o600
"""A restored image is a VM's disk: only its owner reads it (0640 with ``group_access``)."""


def output_mode(group_access: bool = False) -> int:
    """The mode of a new restore output: 0600, or 0640 when the config says ``group_access``."""
    return 0o640 if group_access else OUTPUT_MODE


def open_output(output: Path, force: bool, mode: int = OUTPUT_MODE) -> tuple[int, bool]:
    """Open ``output``; ``(fd, is block device)``. Refuse to clobber without ``force``.

    A new file gets ``mode`` whatever the umask; an existing one keeps its own.
    """
    try:
        st = os.stat(output)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise BadInput(f"cannot use output {output}: {exc.strerror}; nothing was written") from None
    if st is not None:
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise BadInput(f"output {output} exists and is not a regular file or block device; "
                           "nothing was written")
        if not force:
            raise BadInput(f"output {output} exists; use --force to overwrite it")
        if stat.S_ISBLK(st.st_mode):
            try:
                return os.open(output, os.O_WRONLY | os.O_CLOEXEC | os.O_EXCL), True
            except OSError as exc:
                raise BadInput(f"cannot open block device {output}: {exc.strerror} (mounted or "
                               "in use?); nothing was written") from None
    # O_EXCL without --force: a file appearing meanwhile is never clobbered.
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(output, flags, mode)
        if st is None:
            os.fchmod(fd, mode)  # past a umask that would take the group's bits
        return fd, False
    except FileExistsError:
        raise BadInput(f"output {output} exists; use --force to overwrite it") from None
    except OSError as exc:
        raise BadInput(f"cannot create output {output}: {exc.strerror}; nothing was written") from None
