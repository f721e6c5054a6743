"""A restore writes a chunk's data, not the zeroes between its extents (fragmented disks)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fleece.repo.repository import Repository
from fleece.restore.image import restore_raw
from fleece.testing.memory_backend import MemoryBackend

KiB = 1024
MiB = 1 << 20
CHUNK = 1 * MiB


def test_zero_blocks_inside_chunks_stay_holes_in_a_restored_file(tmp_path: Path, store_point: Any) -> None:
    # Two chunks, each one 64 KiB extent of data among zeroes, and a data
    # byte at an unaligned place: the copy holds 3 blocks, reads identical.
    disk = bytearray(3 * CHUNK)
    disk[128 * KiB : 192 * KiB] = os.urandom(64 * KiB)
    disk[CHUNK + 700 * KiB + 5] = 1
    disk[2 * CHUNK - 64 * KiB :] = b"\x07" * 64 * KiB
    repo = Repository.init(MemoryBackend(), chunk_size=CHUNK, hash="sha256")
    point = store_point(repo, "20261130T000000.000000Z-000001", {"vda": bytes(disk)})
    out = tmp_path / "vda.raw"
    restore_raw(repo, point, "vda", out)
    assert out.read_bytes() == disk
    assert out.stat().st_size == len(disk)
    assert out.stat().st_blocks * 512 <= 3 * 64 * KiB, out.stat().st_blocks
