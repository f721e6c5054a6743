"""Write tests/data/sample-repo-v2: a tiny repository in format 2 (deltas in packs), checked in.

Run once (``.venv/bin/python tests/data/make_sample_repo_v2.py --force``) when
the format is introduced, never to "fix" a failing format test: the
checked-in bytes are what this fleece writes, and later versions must still
read them. Everything is deterministic (fixed ids, fixed data).

Contents: VM ``web2``, chunk size 64 KiB, sha256, zstd level 3.
- point 1 (full): ``vda`` (256 KiB) = [A, zero, B, A]
- point 2 (incremental on 1): chunk 1 gets delta d1 = {4096: E (8192 bytes)} over
  its zero base; chunk 2 gets delta d2 = {0: 0xEE * 100, 65436: 0x11 * 100}
  over B. Both deltas in one pack.
- point 3 (incremental on 2): chunk 2 gets a second delta d3 = {50: 0x22 * 100}
  (applied after d2, in a second pack); chunk 3 is rewritten whole as C.
A = 0x55 repeated, B = shake_256 stream (incompressible), C = b"fleece!\\n"
repeated, E = b"delta!\\n\\0" repeated.
"""

from __future__ import annotations

from pathlib import Path

from make_sample_repo import CHUNK, A, B, C, new_sample

from fleece.repo.format.codec import chunk_digest, encode_chunk
from fleece.repo.format.delta import PackWriter, encode_delta, encode_delta_body
from fleece.repo.format.index import ChunkIndex
from fleece.repo.format.point import DiskRecord, RestorePoint
from fleece.repo.repository import Repository

HERE = Path(__file__).resolve().parent
TARGET = HERE / "sample-repo-v2"
E = b"delta!\n\0" * 1024
D1 = [(4096, E)]
D2 = [(0, b"\xee" * 100), (CHUNK - 100, b"\x11" * 100)]
D3 = [(50, b"\x22" * 100)]
P1 = "20261125T010203.000001Z-aa0001"
P2 = "20261126T010203.000002Z-aa0002"
P3 = "20261127T010203.000003Z-aa0003"


def record(repo: Repository, point_id: str, index: ChunkIndex, level: str) -> DiskRecord:
    """Write ``index`` as disk ``vda`` of ``point_id``."""
    key, digest_hex = repo.write_index(point_id, "vda", index)
    return DiskRecord(name="vda", level=level, virtual_size=index.disk_size, index_key=key,
                      index_digest=digest_hex, bitmap=f"fleece-{point_id}", stats={})


def put_chunk(repo: Repository, data: bytes) -> bytes:
    digest = chunk_digest(data)
    repo.put_chunk(digest, encode_chunk(data, 3))
    return digest


def pack(repo: Repository, deltas: list[tuple[int, list[tuple[int, bytes]]]], index: ChunkIndex) -> None:
    """Store ``(position, [(offset, bytes)])`` deltas in one pack and add them to ``index``."""
    writer = PackWriter(repo.put_pack)
    for position, extents in deltas:
        body = encode_delta_body([(off, len(b)) for off, b in extents], b"".join(b for _, b in extents))
        writer.add(position, encode_delta(body, 3), sum(len(b) for _, b in extents), chunk_digest(body))
    for position, ref in writer.close():
        index.add_delta(position, ref)


def point(point_id: str, created: str, parent: str | None, disk: DiskRecord) -> RestorePoint:
    return RestorePoint(id=point_id, vm="web2", created=created, parent=parent, chunk_size=CHUNK,
                        disks=[disk], fleece_version="0.2.0", qemu_version="7.2.0", labels={},
                        stats={})


def main() -> None:
    """Regenerate the sample repository."""
    repo = new_sample(TARGET, __doc__, "0123456789abcdef0123456789abcdef", format=2)
    index = ChunkIndex.empty(CHUNK, 4 * CHUNK, repo.index_version)
    index.set(0, put_chunk(repo, A))
    index.set(2, put_chunk(repo, B))
    index.set(3, put_chunk(repo, A))
    repo.write_point(point(P1, "2026-11-25T01:02:03.000001Z", None, record(repo, P1, index, "full")))

    index = index.copy()
    pack(repo, [(1, D1), (2, D2)], index)
    repo.write_point(point(P2, "2026-11-26T01:02:03.000002Z", P1,
                           record(repo, P2, index, "incremental")))

    index = index.copy()
    pack(repo, [(2, D3)], index)
    index.set(3, put_chunk(repo, C))
    repo.write_point(point(P3, "2026-11-27T01:02:03.000003Z", P2,
                           record(repo, P3, index, "incremental")))
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
