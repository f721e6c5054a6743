"""Write tests/data/sample-repo-v3 (plain) and sample-repo-v3-encrypted: format 3, checked in.

Run once (``.venv/bin/python tests/data/make_sample_repo_v3.py --force``) when
the format is introduced, never to "fix" a failing format test: the
checked-in bytes are what this fleece writes, and later versions must still
read them. The plain sample is deterministic (fixed ids, fixed data); the
encrypted one holds a random master key and nonces (passphrase ``sample``).

Contents: VM ``web3``, chunk size 64 KiB, sha256, zstd level 3, one disk
``vda`` of 800 positions (50 MiB): pages of 256 positions, so pages 0-2 are
whole and page 3 holds 32 positions.
- point 1 (full): position 0 = A, 256 = A (pages 0 and 1 are equal: one
  page object), 515 = B, 700 = H (a chunk with holes: 8 KiB of 0x77, then
  zeroes); page 3 is all zero (zero marker, no object).
- point 2 (incremental on 1): position 3 gets delta d1 = {4096: E} over its
  zero base (page 0 changes; pages 1 and 2 keep their names).
- point 3 (incremental on 2): position 515 is rewritten whole as C (page 2
  changes).
A = 0x55 repeated, B = shake_256 stream (incompressible), C = b"fleece!\\n"
repeated, E = b"delta!\\n\\0" repeated.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from make_sample_repo import CHUNK, A, B, C
from make_sample_repo_v2 import D1

from fleece.repo.backends.file import FileBackend
from fleece.repo.format.codec import encode_chunk
from fleece.repo.format.delta import PackWriter, encode_delta, encode_delta_body
from fleece.repo.format.index import ChunkIndex
from fleece.repo.format.point import DiskRecord, RestorePoint
from fleece.repo.repository import Repository

HERE = Path(__file__).resolve().parent
TARGET = HERE / "sample-repo-v3"
TARGET_ENCRYPTED = HERE / "sample-repo-v3-encrypted"
POSITIONS = 800
H = b"\x77" * 8192 + bytes(CHUNK - 8192)
P1 = "20261207T010203.000001Z-bb0001"
P2 = "20261208T010203.000002Z-bb0002"
P3 = "20261209T010203.000003Z-bb0003"


def record(repo: Repository, point_id: str, index: ChunkIndex, level: str) -> DiskRecord:
    key, digest_hex = repo.write_index(point_id, "vda", index)
    return DiskRecord(name="vda", level=level, virtual_size=index.disk_size, index_key=key,
                      index_digest=digest_hex, bitmap=f"fleece-{point_id}", stats={})


def put_chunk(repo: Repository, data: bytes) -> bytes:
    digest = repo.chunk_name(data)  # format 3: the hash of the chunk's sparse form
    repo.put_chunk(digest, encode_chunk(data, 3))
    return digest


def pack(repo: Repository, deltas: list[tuple[int, list[tuple[int, bytes]]]], index: ChunkIndex) -> None:
    """Store ``(position, [(offset, bytes)])`` deltas in one pack and add them to ``index``."""
    writer = PackWriter(repo.put_pack)
    for position, extents in deltas:
        body = encode_delta_body([(off, len(b)) for off, b in extents], b"".join(b for _, b in extents))
        writer.add(position, encode_delta(body, 3), sum(len(b) for _, b in extents), repo.digest(body))
    for position, ref in writer.close():
        index.add_delta(position, ref)


def point(point_id: str, created: str, parent: str | None, disk: DiskRecord) -> RestorePoint:
    return RestorePoint(id=point_id, vm="web3", created=created, parent=parent, chunk_size=CHUNK,
                        disks=[disk], fleece_version="0.3.0", qemu_version="7.2.0", labels={},
                        stats={})


def write(repo: Repository) -> None:
    """The three points of the module docstring."""
    index = ChunkIndex.empty(CHUNK, POSITIONS * CHUNK, repo.index_version)
    index.set(0, put_chunk(repo, A))
    index.set(256, put_chunk(repo, A))
    index.set(515, put_chunk(repo, B))
    index.set(700, put_chunk(repo, H))
    repo.write_point(point(P1, "2026-12-07T01:02:03.000001Z", None, record(repo, P1, index, "full")))
    index = repo.read_index(repo.load_point("web3", P1), "vda").copy()
    pack(repo, [(3, D1)], index)
    repo.write_point(point(P2, "2026-12-08T01:02:03.000002Z", P1,
                           record(repo, P2, index, "incremental")))
    index = repo.read_index(repo.load_point("web3", P2), "vda").copy()
    index.set(515, put_chunk(repo, C))
    repo.write_point(point(P3, "2026-12-09T01:02:03.000003Z", P2,
                           record(repo, P3, index, "incremental")))


def main() -> None:
    """Regenerate both samples."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--force", action="store_true", help="replace existing samples")
    args = ap.parse_args()
    for target in (TARGET, TARGET_ENCRYPTED):
        if target.exists():
            if not args.force:
                raise SystemExit(f"{target} exists; pass --force to regenerate it")
            shutil.rmtree(target)
    write(Repository.init(FileBackend(TARGET), chunk_size=CHUNK, compression_level=3,
                          repository_id="00000000000000000000000000000003", hash="sha256",
                          format=3))
    write(Repository.init(FileBackend(TARGET_ENCRYPTED), chunk_size=CHUNK, compression_level=3,
                          repository_id="00000000000000000000000000000033", hash="sha256",
                          encryption="aes-256-gcm", passphrase=b"sample"))
    print(f"wrote {TARGET} and {TARGET_ENCRYPTED}")


if __name__ == "__main__":
    main()
