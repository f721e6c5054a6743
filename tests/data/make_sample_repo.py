"""Write tests/data/sample-repo-v1: a tiny repository in format 1, checked in.

Run once (``.venv/bin/python tests/data/make_sample_repo.py --force``) when a
new format version is introduced, never to "fix" a failing format test: the
checked-in bytes are what old fleece versions wrote, and newer code must still
read them. Everything is deterministic (fixed ids, fixed data).

Contents: VM ``web1``, chunk size 64 KiB.
- point 1 (full): disk ``vda`` (256 KiB) = [A, zero, B, A]
- point 2 (incremental on 1): ``vda`` = [A, C, B, zero];
  new disk ``#block7`` (full, 100000 bytes) = [C, D (34464-byte tail)]
A = 0x55 repeated (zstd), B = shake_256 stream (incompressible, stored plain),
C = b"fleece!\\n" repeated (zstd), D = 0xAA repeated (zstd).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

from fleece.repo.backends.file import FileBackend
from fleece.repo.format.codec import chunk_digest, encode_chunk, is_zero
from fleece.repo.format.index import ChunkIndex
from fleece.repo.format.point import DiskRecord, RestorePoint
from fleece.repo.repository import Repository

HERE = Path(__file__).resolve().parent
TARGET = HERE / "sample-repo-v1"
CHUNK = 64 * 1024
A = b"\x55" * CHUNK
B = hashlib.shake_256(b"fleece sample chunk B").digest(CHUNK)
C = b"fleece!\n" * (CHUNK // 8)
D = b"\xaa" * (100_000 - CHUNK)
Z = bytes(CHUNK)
P1 = "20261123T073600.123456Z-3f9a1c"
P2 = "20261124T073600.000001Z-0b7e55"


def store(repo: Repository, point_id: str, name: str, chunks: list[bytes]) -> DiskRecord:
    """Store a disk given as its chunks; return its record."""
    size = sum(len(c) for c in chunks)
    index = ChunkIndex.empty(CHUNK, size, repo.index_version)
    for i, data in enumerate(chunks):
        if is_zero(data):
            continue
        digest = chunk_digest(data)
        repo.put_chunk(digest, encode_chunk(data, 3))
        index.set(i, digest)
    key, digest_hex = repo.write_index(point_id, name, index)
    return DiskRecord(name=name, level="full", virtual_size=size, index_key=key,
                      index_digest=digest_hex, bitmap=f"fleece-{point_id}", stats={})


def new_sample(target: Path, description: str | None, repository_id: str, format: int) -> Repository:
    """Take ``--force`` from the command line, clear ``target`` if it allows, create the sample there."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--force", action="store_true", help="replace an existing sample")
    args = ap.parse_args()
    if target.exists():
        if not args.force:
            raise SystemExit(f"{target} exists; pass --force to regenerate it")
        shutil.rmtree(target)
    return Repository.init(FileBackend(target), chunk_size=CHUNK, compression_level=3,
                           repository_id=repository_id, format=format, hash="sha256")


def main() -> None:
    """Regenerate the sample repository."""
    repo = new_sample(TARGET, __doc__, "00112233445566778899aabbccddeeff", format=1)
    vda1 = store(repo, P1, "vda", [A, Z, B, A])
    vda1.stats = {"bytes_read": 3 * CHUNK, "chunks_new": 2, "chunks_reused": 1}
    repo.write_point(RestorePoint(
        id=P1, vm="web1", created="2026-11-23T07:36:00.123456Z", parent=None,
        chunk_size=CHUNK, disks=[vda1], fleece_version="0.1.0", qemu_version="7.2.0",
        labels={"env": "test"}, stats={"seconds": 1.5},
    ))
    vda2 = store(repo, P2, "vda", [A, C, B, Z])
    vda2.level = "incremental"
    vda2.stats = {"bytes_read": 2 * CHUNK, "chunks_new": 1, "chunks_reused": 0}
    block7 = store(repo, P2, "#block7", [C, D])
    block7.bitmap = None
    repo.write_point(RestorePoint(
        id=P2, vm="web1", created="2026-11-24T07:36:00.000001Z", parent=P1,
        chunk_size=CHUNK, disks=[vda2, block7], fleece_version="0.1.0", qemu_version=None,
        labels={}, stats={"seconds": 0.25},
    ))
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
