"""The reader and the pipeline on a plain QEMU NBD export (no fleecing layer involved).

The guest writes patterns; block status must turn them into the right chunk
plan; the pipeline must store exactly the chunks that hold data, dedup the
rest, and the index must restore to the bytes QEMU serves.
"""

from __future__ import annotations

from typing import Any, cast

import pytest

from fleece.backup.pipeline import DiskBackup, PipelineSettings
from fleece.backup.reader import (
    BASE_ALLOCATION,
    READ_SPLIT,
    ChunkPlan,
    connect,
    disconnect,
    plan_chunks,
    pread_chunk,
    pread_into,
)
from fleece.errors import ExportError
from fleece.repo.backends.file import FileBackend
from fleece.repo.format.index import ChunkIndex
from fleece.repo.repository import Repository
from fleece.testing.memory_backend import MemoryBackend

MiB = 1 << 20
CHUNK = 1 * MiB


def export(vm: Any, *, bitmap: str | None = None, writable: bool = False) -> str:
    """Export vda's format node over QEMU's NBD server; return the URI."""
    sock = str(vm.dir / "nbd.sock")
    vm.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    args = {"type": "nbd", "id": "t", "node-name": "fmt-vda", "name": "vda", "writable": writable}
    if bitmap:
        args["bitmaps"] = [bitmap]
    vm.qmp("block-export-add", **args)
    return f"nbd+unix:///vda?socket={sock}"


def whole_disk(uri: str) -> bytes:
    h = connect(uri)
    try:
        return pread_chunk(h, 0, int(h.get_size()))
    finally:
        disconnect(h)


def test_full_plan_reads_only_chunks_with_data(make_vm: Any) -> None:
    vm = make_vm([("qcow2", "16M")])
    vm.write("vda", 0, 4096, 0x11)              # chunk 0
    vm.write("vda", 3 * MiB - 512, 1024, 0x22)  # straddles chunks 2 and 3
    vm.qemu_io("vda", f"write -z {9 * MiB} {MiB}")  # written as zeroes: QEMU knows
    vm.write("vda", 11 * MiB, 4096, 0x00)  # zero bytes written as data: must be read
    uri = export(vm)
    h = connect(uri, (BASE_ALLOCATION,))
    plan = plan_chunks(h, CHUNK)
    disconnect(h)
    assert plan.n_chunks == 16
    assert list(plan.to_read()) == [0, 2, 3, 11]
    assert 9 in set(plan.zero())
    assert plan.bytes_to_read == 4 * CHUNK


def test_reads_go_out_at_once_in_pieces_the_server_can_stream(make_vm: Any) -> None:
    """A chunk's extents leave as requests of at most READ_SPLIT, every one before the first wait.

    QEMU's NBD server reads a request whole before it sends it: one 4 MiB
    request leaves nothing to overlap; several smaller ones in flight do.
    libnbd is told not to zero the buffer before each read (fleece fills it).
    """
    vm = make_vm([("qcow2", "16M")])
    vm.write("vda", 0, 3 * MiB + 4096, 0x31)
    vm.write("vda", 8 * MiB, 512 * 1024, 0x32)
    uri = export(vm)
    h = connect(uri)
    sizes: list[int] = []
    polled_after: list[int] = []

    class Recording:
        def aio_pread(self, buf: Any, offset: int) -> Any:
            sizes.append(len(memoryview(buf)) if not hasattr(buf, "size") else buf.size())
            return h.aio_pread(buf, offset)

        def poll(self, timeout: int) -> Any:
            polled_after.append(len(sizes))
            return h.poll(timeout)

        def __getattr__(self, name: str) -> Any:
            return getattr(h, name)

    try:
        assert cast(Any, h).get_pread_initialize() is False
        buf = bytearray(b"\xee" * (4 * MiB + 512 * 1024))
        first = 3 * MiB + 4096
        pread_into(Recording(), buf, [(0, first, 0), (8 * MiB, 512 * 1024, first)])
        expected = pread_chunk(h, 0, first) + pread_chunk(h, 8 * MiB, 512 * 1024)
    finally:
        disconnect(h)
    assert bytes(buf[: len(expected)]) == expected
    assert buf[len(expected):] == b"\xee" * (len(buf) - len(expected))  # nothing written past the reads
    assert sum(sizes) == first + 512 * 1024 and max(sizes) <= READ_SPLIT <= MiB
    assert polled_after and set(polled_after) == {len(sizes)}  # all in flight before any wait


def test_incremental_plan_reads_only_dirty_chunks_and_zeroes_dirty_holes(make_vm: Any) -> None:
    vm = make_vm([("qcow2", "16M")])
    vm.write("vda", 0, 8 * MiB, 0x11)  # old data everywhere in the first half
    vm.qmp("block-dirty-bitmap-add", node="fmt-vda", name="b0")
    vm.write("vda", 5 * MiB + 4096, 4096, 0x33)   # dirty: chunk 5
    vm.write("vda", 12 * MiB, 512, 0x44)          # dirty: chunk 12
    vm.qemu_io("vda", f"write -z {6 * MiB} {MiB}")  # dirty, now zero: chunk 6
    vm.qmp("block-dirty-bitmap-disable", node="fmt-vda", name="b0")
    uri = export(vm, bitmap="b0")
    ctx = "qemu:dirty-bitmap:b0"
    h = connect(uri, (BASE_ALLOCATION, ctx))
    plan = plan_chunks(h, CHUNK, ctx)
    disconnect(h)
    assert list(plan.to_read()) == [5, 12]
    assert list(plan.zero()) == [6]
    assert plan.read.count(0) == 13  # everything else keeps the parent's digest


def test_plan_handles_a_short_tail_chunk() -> None:
    plan = ChunkPlan(CHUNK, 2 * CHUNK + 100, bytes([1, 0, 1]))
    assert plan.n_chunks == 3
    assert plan.chunk_range(2) == (2 * CHUNK, 100)
    assert plan.bytes_to_read == CHUNK + 100


@pytest.mark.parametrize("readers,storers", [(1, 1), (4, 3)])
def test_pipeline_stores_dedups_and_restores_what_qemu_serves(
        make_vm: Any, tmp_path: Any, readers: Any, storers: Any) -> None:
    vm = make_vm([("qcow2", "24M")])
    vm.write("vda", 0, 2 * MiB, 0x5A)               # chunks 0,1 identical → one object
    vm.write("vda", 7 * MiB, 3 * MiB, 0x6B)         # chunks 7,8,9 identical → dedup
    vm.write("vda", 15 * MiB + 123, 10_000, 0x7C)   # chunk 15, partial
    vm.write("vda", 20 * MiB, 4096, 0x00)           # chunk 20: read, found zero, not stored
    uri = export(vm)
    repo = Repository.init(FileBackend(tmp_path / "repo"), chunk_size=CHUNK, hash="sha256")
    h = connect(uri, (BASE_ALLOCATION,))
    plan = plan_chunks(h, CHUNK)
    disconnect(h)
    index = ChunkIndex.empty(CHUNK, 24 * MiB)
    done: list[int] = []
    settings = PipelineSettings(readers=readers, storers=storers, queue_depth=2)
    stats = DiskBackup(repo, uri, plan, index, set(), settings, done.append).run()

    # Only the data extents (64 KiB qcow2 clusters) are read: chunks 0, 1, 7, 8, 9
    # whole, one cluster each of chunks 15 and 20; the rest of those chunks are holes.
    assert stats.bytes_read == 5 * CHUNK + 2 * 64 * 1024 == sum(done)
    assert stats.chunks_new == 3                # 0x5A, 0x6B, the partial chunk
    assert stats.chunks_reused == 3
    assert stats.chunks_zero == 24 - 6
    assert len(list(repo.backend.list("chunks/"))) == 3
    assert stats.bytes_stored < 3 * CHUNK       # patterns compress
    expected = whole_disk(uri)
    for i in range(index.n_chunks):
        chunk = expected[i * CHUNK:(i + 1) * CHUNK]
        want = None if chunk == bytes(len(chunk)) else repo.chunk_name(chunk)
        assert index.get(i) == want, f"chunk {i}"

    # The same disk again with what we stored as "known": nothing new is written.
    again = ChunkIndex.empty(CHUNK, 24 * MiB)
    stats2 = DiskBackup(repo, uri, plan, again, index.digests(), settings).run()
    assert stats2.chunks_new == 0 and stats2.bytes_stored == 0
    assert again == index


def test_pipeline_restores_through_the_repository(make_vm: Any, tmp_path: Any) -> None:
    vm = make_vm([("raw", "8M")])
    vm.write("vda", MiB, 512 * 1024, 0x42)
    uri = export(vm)
    repo = Repository.init(MemoryBackend(), chunk_size=CHUNK, compression_level=None, hash="sha256")
    h = connect(uri, (BASE_ALLOCATION,))
    plan = plan_chunks(h, CHUNK)
    disconnect(h)
    index = ChunkIndex.empty(CHUNK, 8 * MiB)
    DiskBackup(repo, uri, plan, index, set(), PipelineSettings()).run()
    expected = whole_disk(uri)
    for i in range(index.n_chunks):
        d = index.get(i)
        got = repo.get_chunk(d) if d else bytes(CHUNK)
        assert got == expected[i * CHUNK:(i + 1) * CHUNK]
    assert len(list(repo.backend.list("chunks/"))) == 1


@pytest.mark.parametrize("compress", [None, 1], ids=["plain", "zstd"])
def test_reused_frames_hold_no_stale_bytes_in_the_holes(make_vm: Any, tmp_path: Any,
                                                        compress: int | None) -> None:
    """Three frames cycle over chunks of ever-changing layouts: full, then sparse, then full.

    A frame zeroes only what its last chunk wrote and this one does not
    read; a byte of the last chunk left in a hole would change the digest.
    """
    vm = make_vm([("qcow2", "16M")])
    k = 64 * 1024
    layouts = [[(0, CHUNK)], [(0, k)], [(CHUNK - k, k)], [(3 * k, 2 * k), (9 * k, k)],
               [(0, CHUNK)], [(8 * k, k)], [(0, CHUNK)], [(k, CHUNK - 2 * k)], [(15 * k, k)]]
    for i, layout in enumerate(layouts):
        for off, n in layout:
            vm.write("vda", i * CHUNK + off, n, 0x21 + i)
    uri = export(vm)
    repo = Repository.init(FileBackend(tmp_path / "repo"), chunk_size=CHUNK, compression_level=compress,
                           hash="sha256")
    h = connect(uri, (BASE_ALLOCATION,))
    plan = plan_chunks(h, CHUNK)
    disconnect(h)
    index = ChunkIndex.empty(CHUNK, 16 * MiB)
    settings = PipelineSettings(readers=1, storers=1, queue_depth=1, compression_level=compress)
    stats = DiskBackup(repo, uri, plan, index, set(), settings).run()
    assert stats.chunks_new == len(layouts)
    assert stats.bytes_read < (len(layouts) - 2) * CHUNK  # the holes were not read
    expected = whole_disk(uri)
    for i in range(index.n_chunks):
        chunk = expected[i * CHUNK:(i + 1) * CHUNK]
        d = index.get(i)
        assert d == (None if i >= len(layouts) else repo.chunk_name(chunk)), f"chunk {i}"
        if d is not None:
            assert repo.get_chunk(d) == chunk, f"chunk {i}"


class FailingRepo:
    """A repository whose stores fail after a few chunks, like a full disk."""

    def __init__(self, inner: Repository, fail_after: int) -> None:
        self.inner, self.left = inner, fail_after
        self.config = inner.config

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def put_chunk(self, digest: bytes, blob: bytes) -> bool:
        self.left -= 1
        if self.left < 0:
            raise OSError(28, "No space left on device")
        return self.inner.put_chunk(digest, blob)


def test_a_failing_store_stops_every_thread_and_raises(make_vm: Any, tmp_path: Any) -> None:
    vm = make_vm([("qcow2", "32M")])
    for i in range(32):
        vm.write("vda", i * MiB, 4096, i + 1)  # 32 distinct chunks
    uri = export(vm)
    repo = FailingRepo(Repository.init(MemoryBackend(), chunk_size=CHUNK, hash="sha256"), fail_after=3)
    h = connect(uri, (BASE_ALLOCATION,))
    plan = plan_chunks(h, CHUNK)
    disconnect(h)
    index = ChunkIndex.empty(CHUNK, 32 * MiB)
    settings = PipelineSettings(readers=3, storers=2)
    backup = DiskBackup(repo, uri, plan, index, set(), settings)  # type: ignore[arg-type]
    with pytest.raises(OSError, match="No space"):
        backup.run()
    assert backup.stats.chunks_new == 3
    assert backup.stats.bytes_read < 32 * CHUNK  # readers stopped early


def test_unreachable_export_is_an_export_error(tmp_path: Any) -> None:
    with pytest.raises(ExportError, match="cannot connect"):
        connect(f"nbd+unix:///vda?socket={tmp_path / 'none.sock'}")


def test_trim_discards_stored_chunks_but_never_the_unaligned_tail(make_vm: Any, tmp_path: Any) -> None:
    vm = make_vm([("qcow2", "8M")])
    # A node no device holds, so the export may be writable (as fleece's
    # snapshot-access node is); 8 MiB + 4 KiB: the last chunk is unaligned.
    img = tmp_path / "spare.qcow2"
    import subprocess

    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(8 * MiB + 4096)], check=True)
    vm.qmp("blockdev-add", driver="qcow2", **{"node-name": "spare", "discard": "unmap"},
           file={"driver": "file", "filename": str(img), "discard": "unmap"})
    sock = str(vm.dir / "nbd.sock")
    vm.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    vm.qmp("block-export-add", type="nbd", id="t", **{"node-name": "spare"}, name="s", writable=True)
    uri = f"nbd+unix:///s?socket={sock}"
    h = connect(uri)
    h.pwrite(b"\x77" * (8 * MiB + 4096), 0)
    disconnect(h)

    repo = Repository.init(MemoryBackend(), chunk_size=CHUNK, hash="sha256")
    h = connect(uri, (BASE_ALLOCATION,))
    plan = plan_chunks(h, CHUNK)
    disconnect(h)
    index = ChunkIndex.empty(CHUNK, 8 * MiB + 4096)
    stats = DiskBackup(repo, uri, plan, index, set(), PipelineSettings(trim_alignment=64 * 1024)).run()
    assert stats.bytes_trimmed == 8 * MiB
    after = whole_disk(uri)
    assert after[: 8 * MiB] == bytes(8 * MiB)  # trimmed chunks now read as zeroes
    assert after[8 * MiB:] == b"\x77" * 4096    # the unaligned tail was left alone
    # Every chunk was stored before it was trimmed.
    assert repo.get_chunk(index.get(0) or b"") == b"\x77" * CHUNK
