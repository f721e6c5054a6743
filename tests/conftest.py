"""Shared fixtures: real QEMU VMs, a real S3 server (moto) on loopback, the CLI.

Every VM is ``qemu-system-x86_64 -M q35 -accel tcg -nodefaults`` with
virtio-blk disks ``vda``, ``vdb``, … and two QMP sockets: ``vm.qmp_path`` for
the code under test and a private one the test uses itself (``vm.qmp``,
``vm.hmp``, ``vm.write`` — the "guest"). VMs end by their own pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

VENV_BIN = Path(sys.executable).parent
FLEECE = str(VENV_BIN / "fleece")
QEMU = "qemu-system-x86_64"
DEVICE_MODELS = {
    # name → (-device driver, extra controller device or None)
    "virtio": ("virtio-blk-pci", None),
    "scsi": ("scsi-hd", "virtio-scsi-pci,id=scsi0"),
    "ide": ("ide-hd", None),
    "nvme": ("nvme", None),
}


@dataclass
class DiskSpec:
    """One disk of a test VM."""

    id: str
    path: Path
    fmt: str
    size: int
    model: str = "virtio"
    shadow: Path | None = None
    """A sparse raw file the test keeps equal to the disk by applying every write to it."""


def parse_size(size: int | str) -> int:
    """``"64M"`` → 67108864."""
    if isinstance(size, int):
        return size
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(size[:-1]) * units[size[-1].upper()] if size[-1].isalpha() else int(size)


@dataclass
class TestVM:
    """A running ``qemu-system-x86_64`` under test."""

    __test__ = False  # not a test class, despite the name

    dir: Path
    disks: list[DiskSpec]
    qmp_path: str
    test_qmp_path: str
    proc: subprocess.Popen[bytes]
    running: bool
    name: str | None = None
    _monitor: QEMUMonitorProtocol | None = field(default=None, repr=False)

    # -- the test's own QMP connection -------------------------------------------
    def _mon(self) -> QEMUMonitorProtocol:
        if self._monitor is None:
            # QEMU creates the socket file at bind(), a moment before listen().
            deadline = time.monotonic() + 10
            while True:
                mon = QEMUMonitorProtocol(self.test_qmp_path)
                try:
                    mon.connect()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            self._monitor = mon
        return self._monitor

    def qmp(self, command: str, **args: Any) -> Any:
        """Run a QMP command on the test's socket; raise on error."""
        reply = self._mon().cmd_raw(command, args or None)
        if "error" in reply:
            raise RuntimeError(f"{command}: {reply['error']['desc']}")
        return reply["return"]

    def hmp(self, command_line: str) -> str:
        """Run an HMP command; return its output."""
        return str(self.qmp("human-monitor-command", **{"command-line": command_line}))

    def qdev(self, drive: str) -> str:
        """QOM path of device ``drive`` as qemu-io -d wants it."""
        for b in self.qmp("query-block"):
            q = b.get("qdev") or ""
            if q == drive or q.startswith(f"/machine/peripheral/{drive}/"):
                return q if q.startswith("/") else f"/machine/peripheral/{q}"
        raise KeyError(drive)

    def qemu_io(self, drive: str, command: str) -> str:
        """Run a qemu-io command through the device's block backend (guest I/O)."""
        out = self.hmp(f'qemu-io -d {self.qdev(drive)} "{command}"')
        if "error" in out.lower() or "failed" in out.lower():
            raise RuntimeError(f"qemu-io {command!r} on {drive}: {out.strip()}")
        return out

    def write(self, drive: str, offset: int, length: int, pattern: int) -> None:
        """The guest writes ``length`` bytes of ``pattern`` at ``offset`` (mirrored in the shadow)."""
        self.qemu_io(drive, f"write -P 0x{pattern:02x} {offset} {length}")
        self._shadow_write(drive, offset, bytes([pattern]) * length)

    def _shadow_write(self, drive: str, offset: int, data: bytes) -> None:
        spec = self.disk(drive)
        if spec.shadow is not None:
            with open(spec.shadow, "r+b") as f:
                f.seek(offset)
                f.write(data)

    def disk(self, drive: str) -> DiskSpec:
        """The spec of disk ``drive``."""
        return next(d for d in self.disks if d.id == drive)

    def shadow(self, drive: str) -> Path:
        """A raw image equal to what the guest sees on ``drive`` now (every write mirrored)."""
        spec = self.disk(drive)
        assert spec.shadow is not None, "the shadow needs a VM made from fresh images"
        return spec.shadow

    def snapshot_shadow(self, drive: str, dest: Path) -> Path:
        """Copy the shadow of ``drive`` (sparse) to ``dest``: the disk as it is now."""
        subprocess.run(["cp", "--sparse=always", str(self.shadow(drive)), str(dest)], check=True)
        return dest

    def discard(self, drive: str, offset: int, length: int) -> None:
        """The guest zeroes a range, unmapping it where it can (reads as zeroes afterwards).

        A plain ``discard`` would be ignored: the test VMs' nodes have QEMU's
        default ``discard=ignore``, and even unmapped ranges need not read as zero.
        """
        self.qemu_io(drive, f"write -z -u {offset} {length}")
        self._shadow_write(drive, offset, bytes(length))

    def bitmaps(self, drive: str) -> dict[str, dict[str, Any]]:
        """Named dirty bitmaps on the format node of ``drive``, by name."""
        node = self.format_node(drive)
        for n in self.qmp("query-named-block-nodes", flat=True):
            if n["node-name"] == node:
                return {b["name"]: b for b in n.get("dirty-bitmaps", []) if b.get("name")}
        raise KeyError(drive)

    def format_node(self, drive: str) -> str:
        return f"fmt-{drive}"

    def attached_node(self, drive: str) -> str:
        """The node the device ``drive`` currently reads and writes through."""
        return str(self.qmp("qom-get", path=self.qdev(drive), property="drive"))

    def block_graph(self) -> dict[str, Any]:
        """Everything a test compares to prove QEMU was left as found."""
        nodes = sorted(n["node-name"] for n in self.qmp("query-named-block-nodes", flat=True))
        return {
            "nodes": nodes,
            "exports": sorted(e["id"] for e in self.qmp("query-block-exports")),
            "jobs": self.qmp("query-jobs"),
            "attached": {d.id: self.attached_node(d.id) for d in self.disks},
            "bitmaps": {
                d.id: sorted(
                    (b["name"], b.get("persistent"), b.get("recording"))
                    for b in self.bitmaps(d.id).values()
                )
                for d in self.disks
            },
            "status": self.qmp("query-status")["status"],
        }

    # -- life cycle ------------------------------------------------------------------
    def close_monitor(self) -> None:
        if self._monitor is not None:
            with contextlib.suppress(Exception):
                self._monitor.close()
            self._monitor = None

    def kill(self) -> None:
        """SIGKILL QEMU (by its own pid): persistent bitmaps are not written."""
        self.close_monitor()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def shutdown(self) -> None:
        """Quit QEMU cleanly so that persistent bitmaps are stored in the images."""
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.qmp("quit")
            self.close_monitor()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.close_monitor()


class VMFactory:
    """Makes test VMs in one scratch directory and ends them all at teardown."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.vms: list[TestVM] = []

    def __call__(
        self,
        disks: list[tuple[str, int | str]] | None = None,
        *,
        running: bool = False,
        name: str | None = None,
        models: list[str] | None = None,
        bitmaps: dict[str, list[str]] | None = None,
        contents: dict[str, Path] | None = None,
        extra_args: list[str] | None = None,
    ) -> TestVM:
        """Create images and start a VM.

        ``contents`` seeds a disk (by device id) from a raw file of its size.

        ``disks`` are (format, size) pairs, default one 64 MiB qcow2; ``models``
        picks the device per disk (virtio, scsi, ide, nvme); ``bitmaps`` adds
        persistent bitmaps to qcow2 images before start (by device id).
        """
        disks = disks or [("qcow2", "64M")]
        d = self.base / f"vm{len(self.vms)}"
        d.mkdir(parents=True)
        specs = []
        for i, (fmt, size) in enumerate(disks):
            dev_id = "vd" + chr(ord("a") + i)
            path = d / f"{dev_id}.{fmt}"
            seed = (contents or {}).get(dev_id)
            if seed is not None:
                subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt,
                                str(seed), str(path)], check=True)
            else:
                subprocess.run(
                    ["qemu-img", "create", "-q", "-f", fmt, str(path), str(parse_size(size))],
                    check=True,
                )
            for bm in (bitmaps or {}).get(dev_id, []):
                subprocess.run(["qemu-img", "bitmap", "--add", str(path), bm], check=True)
            model = (models or [])[i] if models and i < len(models) else "virtio"
            shadow = d / f"{dev_id}.shadow.raw"
            if seed is not None:
                subprocess.run(["cp", "--sparse=always", str(seed), str(shadow)], check=True)
            else:
                with open(shadow, "wb") as f:
                    f.truncate(parse_size(size))
            specs.append(DiskSpec(dev_id, path, fmt, parse_size(size), model, shadow))
        return self.start(d, specs, running=running, name=name, extra_args=extra_args)

    def start(
        self,
        d: Path,
        specs: list[DiskSpec],
        *,
        running: bool = False,
        name: str | None = None,
        extra_args: list[str] | None = None,
    ) -> TestVM:
        """Start QEMU on existing images (also used to restart after a kill)."""
        n = len(self.vms)
        qmp_path = str(d / f"qmp{n}.sock")
        test_qmp_path = str(d / f"test{n}.sock")
        for p in (qmp_path, test_qmp_path):
            if os.path.exists(p):
                os.unlink(p)
        args = [QEMU, "-M", "q35", "-accel", "tcg", "-nodefaults", "-display", "none",
                "-m", "64", "-serial", "none", "-monitor", "none"]
        if not running:
            args.append("-S")
        if name:
            args += ["-name", name]
        controllers = set()
        for spec in specs:
            driver, controller = DEVICE_MODELS[spec.model]
            if controller and controller not in controllers:
                args += ["-device", controller]
                controllers.add(controller)
            args += [
                "-blockdev", f"driver=file,filename={spec.path},node-name=file-{spec.id}",
                "-blockdev", f"driver={spec.fmt},file=file-{spec.id},node-name=fmt-{spec.id}",
            ]
            extra = ",serial=fleece" + spec.id if spec.model == "nvme" else ""
            args += ["-device", f"{driver},drive=fmt-{spec.id},id={spec.id}{extra}"]
        args += ["-qmp", f"unix:{qmp_path},server=on,wait=off",
                 "-qmp", f"unix:{test_qmp_path},server=on,wait=off"]
        args += extra_args or []
        log = open(d / f"qemu{n}.log", "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not (os.path.exists(qmp_path) and os.path.exists(test_qmp_path)):
            if proc.poll() is not None:
                raise RuntimeError(f"QEMU exited: {(d / f'qemu{n}.log').read_text()}")
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("QEMU did not create its QMP sockets in 30 s")
            time.sleep(0.02)
        vm = TestVM(d, specs, qmp_path, test_qmp_path, proc, running, name)
        self.vms.append(vm)
        return vm

    def restart(self, vm: TestVM, *, kill: bool = True, running: bool | None = None) -> TestVM:
        """End ``vm`` (SIGKILL by default, else a clean quit) and start it again on its images."""
        vm.kill() if kill else vm.shutdown()
        return self.start(vm.dir, vm.disks, running=vm.running if running is None else running,
                          name=vm.name)

    def close(self) -> None:
        for vm in self.vms:
            vm.kill()


@pytest.fixture
def make_vm(tmp_path: Path) -> Iterator[VMFactory]:
    """Factory of real QEMU VMs; every one is killed by pid at teardown."""
    factory = VMFactory(tmp_path / "vms")
    yield factory
    factory.close()


@pytest.fixture
def vm(make_vm: VMFactory) -> TestVM:
    """One VM in prelaunch (-S) with a single 64 MiB qcow2 disk ``vda``."""
    return make_vm()


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """An empty scratch directory."""
    p = tmp_path / "scratch"
    p.mkdir()
    return p


# -- the CLI, as a user runs it -----------------------------------------------------
@dataclass
class Result:
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def fleece() -> Any:
    """Run the installed ``fleece`` console script in a subprocess."""

    def run(*args: str | Path, timeout: float = 300, env: dict[str, str] | None = None) -> Result:
        p = subprocess.run(
            [FLEECE, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        return Result(p.returncode, p.stdout, p.stderr)

    return run


# -- S3: a moto server on loopback --------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen[bytes]

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    @contextlib.contextmanager
    def checking_credentials(self) -> Iterator[None]:
        """Inside the block, the (shared) server authenticates every request against its IAM."""
        import urllib.request

        def free_actions(count: str) -> None:
            urllib.request.urlopen(urllib.request.Request(
                f"{self.endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
                headers={"Content-Type": "text/plain"}), timeout=10).read()

        free_actions("0")
        try:
            yield
        finally:
            free_actions("inf")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One ``moto_server`` process on 127.0.0.1 and a random port for the session."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    yield S3Server(f"http://127.0.0.1:{port}", proc)
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point boto3 (in-process and in subprocesses) at the moto server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env: S3Server) -> str:
    """A fresh, empty bucket on the moto server; its name."""
    name = f"fleece-test-{uuid.uuid4().hex[:12]}"
    s3_env.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_proxy(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A fault-injecting HTTP proxy in front of the moto server (``S3FaultProxy``).

    AWS_ENDPOINT_URL points at it, in-process and in subprocesses. Its
    ``plan`` may be changed while requests flow; ``plan.requests`` counts
    the HTTP attempts per S3 operation. A stalled request (``timeouts``)
    hangs 1.5 s: set FLEECE_S3_READ_TIMEOUT below that.
    """
    from fleece.repo.s3_faults import S3FaultProxy

    with S3FaultProxy(s3_env.endpoint, hang=1.5) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        yield proxy


# -- reading a fleece export as an NBD client would -------------------------------
GRANULE = 64 * 1024


class NbdExport:
    """One libnbd connection to an export: reads, and the dirty granules of its bitmap."""

    def __init__(self, uri: str, dirty_bitmap: str | None = None) -> None:
        import nbd

        self.h = nbd.NBD()
        self.h.add_meta_context("base:allocation")
        self.dirty_bitmap = dirty_bitmap
        if dirty_bitmap:
            self.h.add_meta_context(dirty_bitmap)
        self.h.connect_uri(uri)
        self.size = int(self.h.get_size())

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.h.pread(length, offset))

    def trim(self, offset: int, length: int) -> None:
        self.h.trim(length, offset)

    def dirty_granules(self, granule: int = GRANULE) -> set[int]:
        """Offsets of every ``granule`` the exported dirty bitmap marks (flag 1)."""
        assert self.dirty_bitmap and self.h.can_meta_context(self.dirty_bitmap)
        dirty: set[int] = set()
        offset = 0
        while offset < self.size:
            ended: list[int] = []

            def cb(ctx: str, off: int, entries: list[int], err: Any, ended: list[int] = ended) -> int:
                if ctx == self.dirty_bitmap:
                    pos = off
                    for length, flags in zip(entries[::2], entries[1::2], strict=True):
                        if flags & 1:
                            dirty.update(range(pos - pos % granule, pos + length, granule))
                        pos += length
                    ended.append(pos)
                return 0

            self.h.block_status(min(self.size - offset, 1 << 30), offset, cb)
            assert ended and ended[0] > offset
            offset = ended[0]
        return dirty

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.h.shutdown()


@pytest.fixture
def nbd_connect() -> Iterator[Any]:
    """Open NBD connections to exports; all are closed at teardown."""
    opened: list[NbdExport] = []

    def connect(uri: str, dirty_bitmap: str | None = None) -> NbdExport:
        conn = NbdExport(uri, dirty_bitmap)
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.close()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory under /tmp: unix socket paths must stay under 108 bytes."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="fl-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def scratch_tmpdir(monkeypatch: pytest.MonkeyPatch, short_tmp: Path) -> Path:
    """Point ``$TMPDIR`` (fleece's default scratch parent) at a private directory.

    An export whose QEMU is killed leaves its scratch directory behind; tests
    that do so must not litter ``/var/tmp``.
    """
    monkeypatch.setenv("TMPDIR", str(short_tmp))
    return short_tmp


# -- restore points committed straight through the repository API (no VM) ------------
@pytest.fixture
def store_point() -> Any:
    """``store(repo, point_id, {disk: bytes}, parent=None, vm="vm1")``: commit a point as a
    backup would (zero chunks unstored, index, then the point); returns the RestorePoint."""
    from fleece.codec import encode_chunk
    from fleece.repo.index import ChunkIndex
    from fleece.repo.point import DiskRecord, RestorePoint, iso_utc

    def store(repo: Any, point_id: str, disks: dict[str, bytes], parent: str | None = None,
              vm: str = "vm1", created: str | None = None, labels: dict[str, str] | None = None,
              stats: dict[str, Any] | None = None) -> Any:
        chunk = repo.config.chunk_size
        records = []
        for name, data in disks.items():
            index = ChunkIndex.empty(chunk, len(data))
            for i in range(index.n_chunks):
                piece = data[i * chunk : (i + 1) * chunk]
                if any(piece):
                    digest = repo.digest(piece)
                    repo.put_chunk(digest, encode_chunk(piece, 3))
                    index.set(i, digest)
            key, digest_hex = repo.write_index(point_id, name, index)
            records.append(DiskRecord(name, "full" if parent is None else "incremental",
                                      len(data), key, digest_hex, None, {}))
        point = RestorePoint(point_id, vm, created or iso_utc(), parent, chunk, records, "0.1.0",
                             None, labels or {}, stats or {})
        repo.write_point(point)
        return point

    return store


# -- backups held at a phase (fleece.testing hooks) ----------------------------------
@pytest.fixture
def hold_backup(tmp_path: Path) -> Iterator[Any]:
    """``hold_backup(vm, repo, phase, *extra_args, env=None)``: a ``fleece backup`` subprocess
    that stops at ``phase`` (see ``tests/backups.py``); any left running are killed at teardown."""
    from backups import HeldBackup

    held: list[HeldBackup] = []

    def start(vm: TestVM, repo: Any, phase: str, *extra: str, env: dict[str, str] | None = None
              ) -> HeldBackup:
        backup = HeldBackup(vm, repo, phase, tmp_path / f"held-{len(held)}.marker", *extra, env=env)
        held.append(backup)
        return backup

    yield start
    for backup in held:
        backup.close()


# -- libvirt: a private libvirtd started and stopped by the fixture ------------------
@pytest.fixture(scope="session")
def libvirt_host() -> Iterator[Any]:
    """A real libvirtd (with virtlogd) in a private mount namespace for the session
    (``tests/libvirt_host.py``); stopped by pid at the end, no system file changed."""
    from libvirt_host import LibvirtHost

    host = LibvirtHost()
    try:
        host.start()
        yield host
    finally:
        host.stop()


@pytest.fixture
def make_domain(libvirt_host: Any, tmp_path: Path) -> Iterator[Any]:
    """Factory of libvirt test domains (TCG, q35, virtio disks, started paused); all
    destroyed and undefined at teardown."""
    from libvirt_host import LibvirtVMFactory

    factory = LibvirtVMFactory(libvirt_host, tmp_path / "domains")
    yield factory
    factory.close()
