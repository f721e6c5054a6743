"""``fleece serve``: a restore point as a read-only NBD export that real clients read."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from fleece.repo.backends.file import FileBackend
from fleece.repo.repository import Repository
from fleece.restore.image import DiskImage
from fleece.serve.cache import CachedDisk
from fleece.testing.memory_backend import MemoryBackend

KiB = 1024
MiB = 1 << 20
CHUNK = 64 * KiB
FLEECE = str(Path(sys.executable).parent / "fleece")
P1 = "20260101T000000.000001Z-aaaaaa"


@contextlib.contextmanager
def serving(*args: str | Path, timeout: float = 30) -> Iterator[str]:
    """Run ``fleece serve ARGS`` until the block ends; yield the URI it prints.

    On exit it is stopped with SIGTERM and must exit 0, leaving no socket.
    """
    proc = subprocess.Popen([FLEECE, "serve", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline().strip() if ready else ""
        assert line.startswith("nbd+unix:///?socket="), proc.stderr.read() if proc.stderr else ""
        yield line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not Path(line.split("socket=", 1)[1]).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def backup(fleece: Any, vm: Any, repo: Path, *extra: str) -> str:
    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, "--json", *extra)
    assert res.rc == 0, res.err
    return str(res.json()["point"])


def nbd_map(uri: str) -> list[tuple[int, int, str]]:
    out = subprocess.run(["nbdinfo", "--map", "--json", uri], capture_output=True, check=True).stdout
    return [(e["offset"], e["length"], e["description"]) for e in json.loads(out)]


@pytest.fixture
def served_vm(make_vm: Any, fleece: Any, tmp_path: Path) -> tuple[Any, Path, str]:
    vm = make_vm([("qcow2", "32M")])
    vm.write("vda", 0, MiB, 0x11)
    vm.write("vda", 7 * MiB, 100 * KiB, 0x12)
    vm.write("vda", 32 * MiB - 512, 512, 0x13)
    repo = tmp_path / "repo"
    return vm, repo, backup(fleece, vm, repo, "--chunk-size", "64K")


@pytest.mark.qemu
def test_served_point_is_identical_to_its_source_and_reports_holes(
        served_vm: tuple[Any, Path, str], short_tmp: Path, tmp_path: Path) -> None:
    vm, repo, point = served_vm
    vm.shutdown()  # the source image, as it is on disk
    sock = short_tmp / "p.sock"
    with serving("--repo", repo, point, "--socket", sock) as uri:
        assert uri == f"nbd+unix:///?socket={sock}"
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        res = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                              str(vm.disks[0].path), uri], capture_output=True, text=True)
        assert res.returncode == 0 and res.stdout.strip() == "Images are identical.", res.stdout
        assert nbd_map(uri) == [
            (0, MiB, "data"),
            (MiB, 6 * MiB, "hole,zero"),
            (7 * MiB, 2 * CHUNK, "data"),
            (7 * MiB + 2 * CHUNK, 25 * MiB - 3 * CHUNK, "hole,zero"),
            (32 * MiB - CHUNK, CHUNK, "data"),
        ]
        copy = tmp_path / "copy.raw"
        subprocess.run(["nbdcopy", uri, str(copy)], check=True)
        assert copy.read_bytes() == vm.shadow("vda").read_bytes()
        h = nbd.NBD()
        h.connect_uri(uri)
        assert h.is_read_only() and h.can_multi_conn() and h.get_size() == 32 * MiB
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * 512, 0)
        h.shutdown()


@pytest.mark.qemu
def test_qemu_reads_a_served_point_as_a_guest_disk(served_vm: tuple[Any, Path, str],
                                                    short_tmp: Path) -> None:
    _, repo, _ = served_vm
    with serving("--repo", repo, "latest", "--drive", "vda", "--socket", short_tmp / "s") as uri:
        qmp = short_tmp / "q"
        out = short_tmp / "qemu.out"
        with open(out, "wb") as log:
            qemu = subprocess.Popen(
                ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-nodefaults", "-display",
                 "none", "-S", "-drive", f"file={uri},format=raw,if=none,id=d0,snapshot=on",
                 "-device", "virtio-blk-pci,drive=d0,id=vda",
                 "-qmp", f"unix:{qmp},server=on,wait=off"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while not qmp.exists():
                assert qemu.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            mon = QEMUMonitorProtocol(str(qmp))
            mon.connect()

            def io(cmd: str) -> str:
                """Run qemu-io on the guest's disk; QEMU 7.2 prints its output on stdout."""
                before = out.stat().st_size
                mon.cmd_raw("human-monitor-command", {"command-line": f'qemu-io d0 "{cmd}"'})
                return out.read_bytes()[before:].decode()

            try:
                assert io("read -P 0x11 0 1M").startswith("read 1048576/1048576 bytes at offset 0")
                assert io("read -P 0x12 7M 100k").startswith("read 102400/102400 bytes")
                assert io("read -P 0x11 1M 4k").startswith("Pattern verification failed")
                assert io("read -P 0x00 1M 4k").startswith("read 4096/4096 bytes")
                # snapshot=on: the guest may write; the restore point is untouched.
                assert io("write -P 0x77 0 64k").startswith("wrote 65536/65536 bytes")
                assert io("read -P 0x77 0 64k").startswith("read 65536/65536 bytes")
            finally:
                mon.close()
        finally:
            qemu.kill()
            qemu.wait()
        h = nbd.NBD()
        h.connect_uri(uri)
        assert h.pread(64 * KiB, 0) == b"\x11" * 64 * KiB
        h.shutdown()


@pytest.mark.qemu
def test_a_damaged_chunk_is_an_io_error_and_the_rest_still_reads(
        served_vm: tuple[Any, Path, str], short_tmp: Path) -> None:
    _, repo, point = served_vm
    # Named as the repository names chunks (format 3: the hash of the sparse form).
    digest = Repository.open(FileBackend(repo)).chunk_name(b"\x12" * CHUNK).hex()
    chunk = repo / "chunks" / digest[:2] / digest
    blob = bytearray(chunk.read_bytes())
    blob[-1] ^= 1
    chunk.write_bytes(bytes(blob))
    with serving("--repo", repo, point, "--socket", short_tmp / "d") as uri:
        h = nbd.NBD()
        h.connect_uri(uri)
        with pytest.raises(nbd.Error) as err:
            h.pread(4096, 7 * MiB + 10)
        assert err.value.errno == "EIO"
        assert h.pread(4096, 0) == b"\x11" * 4096
        h.shutdown()


def test_bad_input_is_refused_before_nbdkit_starts(tmp_path: Path, short_tmp: Path,
                                                    store_point: Any, fleece: Any) -> None:

    repo_dir = tmp_path / "repo"
    repo = Repository.init(FileBackend(repo_dir), chunk_size=CHUNK, hash="sha256")
    store_point(repo, P1, {"vda": b"\x01" * CHUNK, "vdb": bytes(CHUNK)})
    sock = short_tmp / "x.sock"
    cases = [
        (["20990101", "--socket", sock], "no restore point '20990101'"),
        ([P1, "--socket", sock], "has several disks (vda, vdb); choose one with --drive"),
        ([P1, "--drive", "vdz", "--socket", sock], "has no disk 'vdz'"),
        ([P1, "--drive", "vda", "--socket", short_tmp / ("s" * 120)], "longer than 107 bytes"),
        ([P1, "--drive", "vda", "--socket", short_tmp / "no" / "s"], "does not exist"),
        ([P1, "--drive", "vda", "--socket", repo_dir / "config"], "exists and is not a socket"),
    ]
    for args, message in cases:
        res = fleece("serve", "--repo", repo_dir, *args, timeout=30)
        assert res.rc == 2, (args, res.err)
        assert message in res.err and res.err.count("\n") == 1 and res.out == ""
    assert not sock.exists()
    # A corrupt index is damage: exit 1, still before nbdkit starts.
    index = repo_dir / "indexes" / P1 / "vda"
    index.write_bytes(index.read_bytes()[:-1] + b"\x00")
    res = fleece("serve", "--repo", repo_dir, P1, "--drive", "vda", "--socket", sock)
    assert res.rc == 1 and "does not match the digest" in res.err


@pytest.mark.s3
@pytest.mark.parametrize("s3_server", ["moto", "ceph-https"], indirect=True)
def test_serve_from_s3(s3_env: Any, s3_bucket: str, store_point: Any, short_tmp: Path,
                       tmp_path: Path) -> None:
    from fleece.repo.backends.url import open_backend

    url = f"s3://{s3_bucket}/r"
    repo = Repository.init(open_backend(url), chunk_size=CHUNK, hash="sha256")
    data = bytearray(3 * MiB + 100)
    data[CHUNK : 3 * CHUNK] = os.urandom(2 * CHUNK)
    data[-100:] = b"t" * 100
    store_point(repo, P1, {"vda": bytes(data)})
    with serving("--repo", url, P1, "--socket", short_tmp / "s3.sock") as uri:
        copy = tmp_path / "copy.raw"
        subprocess.run(["nbdcopy", uri, str(copy)], check=True)
        assert copy.read_bytes() == bytes(data)


# -- the cache behind the plugin, without nbdkit ---------------------------------------

class SlowBackend(MemoryBackend):
    """Counts chunk reads and makes each take a while, so concurrent readers overlap."""

    def __init__(self) -> None:
        super().__init__()
        self.chunk_gets = 0
        self.lock = threading.Lock()

    def get(self, key: str) -> bytes:
        if key.startswith("chunks/"):
            with self.lock:
                self.chunk_gets += 1
            time.sleep(0.05)
        return super().get(key)


@pytest.fixture
def cached_disk(store_point: Any) -> Iterator[tuple[CachedDisk, bytes, SlowBackend]]:
    backend = SlowBackend()
    repo = Repository.init(backend, chunk_size=CHUNK, hash="sha256")
    data = bytearray(os.urandom(20 * CHUNK + 1000))
    data[5 * CHUNK : 8 * CHUNK] = bytes(3 * CHUNK)  # three zero chunks
    store_point(repo, P1, {"vda": bytes(data)})
    image = DiskImage(repo, repo.find_point(P1))
    disk = CachedDisk(image, cache_bytes=8 * CHUNK, readahead=2, fetchers=2)
    yield disk, bytes(data), backend
    disk.close()


def test_cached_reads_cross_chunks_and_holes(cached_disk: tuple[CachedDisk, bytes, Any]) -> None:
    disk, data, _ = cached_disk
    for offset, length in [(0, 1), (CHUNK - 7, 20), (4 * CHUNK + 3, 5 * CHUNK),
                           (20 * CHUNK, 1000), (0, len(data))]:
        buf = bytearray(length)
        disk.read_into(buf, offset)
        assert bytes(buf) == data[offset : offset + length], (offset, length)
    with pytest.raises(ValueError):
        disk.read_into(bytearray(2), len(data) - 1)
    assert disk.extents(0, len(data)) == [(0, 5 * CHUNK, False), (5 * CHUNK, 3 * CHUNK, True),
                                          (8 * CHUNK, 12 * CHUNK + 1000, False)]
    assert disk.extents(6 * CHUNK + 5, 10) == [(6 * CHUNK + 5, 10, True)]
    assert disk.extents(0, len(data), max_extents=1) == [(0, 5 * CHUNK, False)]


def test_cache_is_bounded_and_concurrent_readers_share_one_fetch(
        cached_disk: tuple[CachedDisk, bytes, SlowBackend]) -> None:
    disk, data, backend = cached_disk
    threads = [threading.Thread(target=disk.chunk, args=(10,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert backend.chunk_gets == 1  # chunk 9 was not read, so no read-ahead either
    for i in range(21):
        if not disk.is_zero(i):
            disk.chunk(i)
    assert len(disk._lru) <= disk.capacity == 2 * 2 + 2 + 2
    assert disk.chunk(20) == data[20 * CHUNK :]


def test_sequential_reads_trigger_read_ahead(cached_disk: tuple[CachedDisk, bytes, SlowBackend]
                                             ) -> None:
    disk, _, backend = cached_disk

    def settle(fetches: int) -> set[int]:
        # chunk() queues every read-ahead it starts (in _loading) before it returns: once none is
        # loading, nothing more can come. No fixed wait that a slow host could outlast.
        deadline = time.monotonic() + 60
        while True:
            with disk._lock:
                if not disk._loading:
                    break
            assert time.monotonic() < deadline, "read-ahead never finished"
            time.sleep(0.01)
        assert disk.fetches == backend.chunk_gets == fetches
        return set(disk._lru)

    disk.chunk(0)  # the start of the disk counts as a sequential stream
    assert settle(3) == {0, 1, 2}  # 1 and 2 fetched ahead
    disk.chunk(1)
    assert settle(4) == {0, 1, 2, 3}
    disk.chunk(2)
    disk.chunk(3)
    disk.chunk(4)
    assert settle(5) == {0, 1, 2, 3, 4}  # 5-7 are zero chunks: never fetched
    disk.chunk(15)  # a random read (14 not cached): no read-ahead
    assert settle(6) == {0, 1, 2, 3, 4, 15}
