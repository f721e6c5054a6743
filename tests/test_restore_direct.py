"""A raw restore writes with direct I/O around the page cache, and falls back where it cannot.

The disks here have an unaligned tail (the last write cannot be direct),
zero blocks inside chunks (they must stay holes) and a damaged chunk (the
restore must still name it): every path of :mod:`fleece.restore.output`.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleece.errors import RepositoryCorrupt
from fleece.repo.format.keys import chunk_key
from fleece.repo.repository import Repository
from fleece.restore import output
from fleece.restore.image import restore_raw
from fleece.testing.memory_backend import MemoryBackend

KiB = 1024
MiB = 1 << 20
CHUNK = 1 * MiB
POINT = "20261130T000000.000000Z-000001"


@pytest.fixture
def disk_dir() -> Iterator[Path]:
    """A directory on the root file system (``/var/tmp``): tmpfs keeps every page in memory,
    so only a disk-backed file system shows whether the page cache was bypassed."""
    d = Path(tempfile.mkdtemp(prefix="fleece-test-direct-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _disk() -> bytes:
    # 6 MiB of data in 1 MiB chunks, a 64 KiB hole inside chunk 1, a zero
    # chunk, and an unaligned 1000-byte tail.
    disk = bytearray(os.urandom(6 * MiB + 1000))
    disk[CHUNK + 256 * KiB : CHUNK + 320 * KiB] = bytes(64 * KiB)
    disk[3 * CHUNK : 4 * CHUNK] = bytes(CHUNK)
    return bytes(disk)


def _cached_bytes(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def test_a_restore_bypasses_the_page_cache_keeps_holes_and_its_unaligned_tail(
        disk_dir: Path, store_point: Any) -> None:
    disk = _disk()
    repo = Repository.init(MemoryBackend(), chunk_size=CHUNK, hash="sha256")
    point = store_point(repo, POINT, {"vda": disk})
    out = disk_dir / "vda.raw"
    restore_raw(repo, point, "vda", out)
    # Only the tail went through the page cache (written buffered): not the
    # 6 MiB of data, which a buffered restore leaves there until reclaimed.
    assert _cached_bytes(out) <= 64 * KiB, _cached_bytes(out)
    assert out.read_bytes() == disk
    assert out.stat().st_size == len(disk)
    holes = 64 * KiB + CHUNK
    assert out.stat().st_blocks * 512 <= len(disk) - holes + 64 * KiB, out.stat().st_blocks


def test_where_direct_io_is_refused_at_open_the_restore_is_the_same(
        disk_dir: Path, store_point: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A file system without O_DIRECT (tmpfs before Linux 6.6): the open fails.
    real_open = os.open

    def no_direct(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr("fleece.restore.output.os.open", no_direct)
    disk = _disk()
    repo = Repository.init(MemoryBackend(), chunk_size=CHUNK, hash="sha256")
    point = store_point(repo, POINT, {"vda": disk})
    out = disk_dir / "vda.raw"
    restore_raw(repo, point, "vda", out)
    assert out.read_bytes() == disk
    assert out.stat().st_blocks * 512 <= len(disk) - CHUNK, out.stat().st_blocks


def test_a_direct_write_refused_midway_falls_back_to_the_page_cache(
        disk_dir: Path, store_point: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # O_DIRECT accepted at open but a write refused (a stacked driver with a
    # larger block size): that chunk and every later one go buffered.
    real_pwrite = os.pwrite
    direct_fds: set[int] = set()
    real_open_direct = output.open_direct
    refused: list[int] = []

    def open_direct(fd: int) -> int | None:
        d = real_open_direct(fd)
        assert d is not None, "the test file system takes O_DIRECT"
        direct_fds.add(d)
        return d

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if fd in direct_fds and offset >= 2 * CHUNK:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr("fleece.restore.image.open_direct", open_direct)
    monkeypatch.setattr("fleece.restore.output.os.pwrite", pwrite)
    disk = _disk()
    repo = Repository.init(MemoryBackend(), chunk_size=CHUNK, hash="sha256")
    point = store_point(repo, POINT, {"vda": disk})
    out = disk_dir / "vda.raw"
    restore_raw(repo, point, "vda", out, workers=1)
    assert out.read_bytes() == disk
    assert len(refused) == 1, refused  # after the first refusal no direct write is tried


def test_a_damaged_chunk_is_named_and_with_allow_damage_reads_as_zeroes(
        disk_dir: Path, store_point: Any) -> None:
    disk = _disk()
    backend = MemoryBackend()
    repo = Repository.init(backend, chunk_size=CHUNK, hash="sha256")
    point = store_point(repo, POINT, {"vda": disk})
    key = chunk_key(repo.chunk_name(disk[2 * CHUNK : 3 * CHUNK]))
    blob = bytearray(backend.get(key))
    blob[-1] ^= 1
    backend.put(key, bytes(blob))
    out = disk_dir / "vda.raw"
    with pytest.raises(RepositoryCorrupt, match=f"bytes {2 * CHUNK}-{3 * CHUNK} "):
        restore_raw(repo, point, "vda", out)
    assert not out.exists()
    result = restore_raw(repo, point, "vda", out, allow_damage=True)
    assert result.damaged == [(2 * CHUNK, 3 * CHUNK)]
    expected = bytearray(disk)
    expected[2 * CHUNK : 3 * CHUNK] = bytes(CHUNK)
    assert out.read_bytes() == expected
