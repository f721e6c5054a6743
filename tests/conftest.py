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
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from guarantee_check import (  # noqa: F401 - hooks: a skipped guarantee test fails the run
    pytest_collection_modifyitems,
    pytest_deselected,
    pytest_report_teststatus,
    pytest_sessionfinish,
)
from qemu.qmp.legacy import QEMUMonitorProtocol

from fleece.testing.ceph import CephCluster, start_ceph
from fleece.testing.certificates import self_signed_certificate

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
    node_opts: str = ""
    """Extra ``-blockdev`` options of both its nodes, e.g. ``,read-only=on``."""
    device_opts: str = ""
    """Extra ``-device`` options, e.g. ``,iothread=io0``."""


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
        nodes = {n["node-name"]: n for n in self.qmp("query-named-block-nodes", flat=True)}
        # After a live restore the device runs on a new node and fmt-<drive> is gone.
        n = nodes.get(self.format_node(drive)) or nodes.get(self.attached_node(drive))
        if n is None:
            raise KeyError(drive)
        return {b["name"]: b for b in n.get("dirty-bitmaps", []) if b.get("name")}

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
        node_opts: dict[str, str] | None = None,
        device_opts: dict[str, str] | None = None,
        device_options: str = "",
    ) -> TestVM:
        """Create images and start a VM.

        ``node_opts`` and ``device_opts`` append options (``",read-only=on"``,
        ``",iothread=io0"``) to a disk's ``-blockdev`` nodes and ``-device``.
        ``device_options`` is appended to every disk's ``-device`` (e.g.
        ``rerror=stop,werror=stop``); blank images serve as live restores' placeholders.

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
            specs.append(DiskSpec(dev_id, path, fmt, parse_size(size), model, shadow,
                                  (node_opts or {}).get(dev_id, ""),
                                  (device_opts or {}).get(dev_id, "")))
        return self.start(d, specs, running=running, name=name, extra_args=extra_args,
                          device_options=device_options)

    def start(
        self,
        d: Path,
        specs: list[DiskSpec],
        *,
        running: bool = False,
        name: str | None = None,
        extra_args: list[str] | None = None,
        device_options: str = "",
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
                "-blockdev",
                f"driver=file,filename={spec.path},node-name=file-{spec.id}{spec.node_opts}",
                "-blockdev",
                f"driver={spec.fmt},file=file-{spec.id},node-name=fmt-{spec.id}{spec.node_opts}",
            ]
            extra = ",serial=fleece" + spec.id if spec.model == "nvme" else ""
            extra += f",{device_options}" if device_options else ""
            args += ["-device", f"{driver},drive=fmt-{spec.id},id={spec.id}{extra}{spec.device_opts}"]
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


TEST_PASSPHRASE = "fleece test passphrase: correct horse battery staple"
ENCRYPTION_UNDER_TEST = "FLEECE_TEST_REPO_ENCRYPTION"
"""Set by :func:`repo_encryption`: every repository a ``backup`` of the ``fleece`` fixture creates
is then encrypted (the passphrase is in the environment), and checked to be."""


@pytest.fixture(scope="session", autouse=True)
def session_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The fleece state directory of module- and session-scoped fixtures: never the machine's."""
    before = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("session-state"))
    yield
    if before is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = before


@pytest.fixture(autouse=True)
def local_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test its own fleece state directory (what a host remembers of repositories), never the
    machine's ``/var/lib/fleece``."""
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    return state / "fleece"


@pytest.fixture(params=["plain", "aes-256-gcm"])
def repo_encryption(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a suite twice: on plain repositories and on encrypted ones (the passphrase in the
    environment, as an operator's job would have it). Opt in with
    ``pytestmark = pytest.mark.usefixtures("repo_encryption")``."""
    if request.param != "plain":
        monkeypatch.setenv("FLEECE_PASSPHRASE", TEST_PASSPHRASE)
        monkeypatch.setenv(ENCRYPTION_UNDER_TEST, request.param)
    return str(request.param)


def open_repo(location: str | Path) -> Any:
    """Open a repository from a test, with the suite's passphrase when it is encrypted."""
    from fleece.repo.backends.url import open_backend
    from fleece.repo.repository import Repository

    secret = os.environ.get("FLEECE_PASSPHRASE")
    return Repository.open(open_backend(str(location)),
                           None if secret is None else (lambda: secret.encode()))


def repository_encryption(location: str | Path) -> str | None:
    """What the ``config`` at ``location`` says of its encryption (None: no repository there)."""
    from fleece.errors import NotARepository
    from fleece.repo.backends.url import open_backend
    from fleece.repo.repository import read_config

    try:
        return read_config(open_backend(str(location))).encryption
    except NotARepository:
        return None


@pytest.fixture
def fleece() -> Any:
    """Run the installed ``fleece`` console script in a subprocess.

    ``backup`` runs as an operator's first-run job does, with ``--init``
    (``init=False`` runs it as given). Under :func:`repo_encryption` the
    repository it made must really be encrypted: its ``config`` is checked.
    """

    def run(*args: str | Path, timeout: float = 300, env: dict[str, str] | None = None,
            init: bool = True) -> Result:
        encryption = os.environ.get(ENCRYPTION_UNDER_TEST)
        words = [str(a) for a in args]
        repo = None
        command = next((n for n, w in enumerate(words) if not w.startswith("-")), 0)  # after -vvv
        if words[command:command + 1] == ["backup"]:
            if "--repo" in words:
                repo = words[words.index("--repo") + 1]
            if init and "--init" not in words:
                words.insert(command + 1, "--init")
        p = subprocess.run(
            [FLEECE, *words],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        if encryption and repo is not None and p.returncode == 0:
            found = repository_encryption(repo)
            assert found == encryption, f"the encrypted variant ran on a repository whose config " \
                                        f"says encryption {found!r}"
        return Result(p.returncode, p.stdout, p.stderr)

    return run


# -- S3: a moto server on loopback --------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


ROOT = Path(__file__).resolve().parent.parent
S3RVER = ROOT / ".s3rver" / "node_modules" / ".bin" / "s3rver"  # installed by scripts/bootstrap
S3_SERVERS = ("moto", "moto-https", "s3rver-http", "s3rver-https", "ceph-http", "ceph-https")
"""Every S3 implementation the suites run against, each over HTTP and HTTPS
(``@pytest.mark.parametrize("s3_server", S3_SERVERS, indirect=True)``); the default
``s3_server`` is moto over HTTP."""


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen[bytes]
    name: str = "moto"
    access_key: str = "testing"
    secret_key: str = "testing"
    ca_bundle: str | None = None
    """The self-signed certificate of an HTTPS server, for AWS_CA_BUNDLE."""
    enforces_conditional_writes: bool = True
    """False for stores that silently ignore If-None-Match (s3rver)."""
    config: Path | None = None
    """A fleece --config file with ``unsafe_locks = true`` where the store needs the opt-in."""
    object_lock: bool = True
    """Whether buckets with S3 Object Lock can be made here (moto, Ceph RGW; not s3rver)."""
    if_match: str = "enforced"
    """What the store does with ``If-Match`` on PutObject (store_check's outcome names)."""

    @property
    def config_args(self) -> tuple[str, ...]:
        """Arguments for commands that take locks (backup, prune, gc) on this store."""
        return ("--config", str(self.config)) if self.config else ()

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            verify=self.ca_bundle if self.ca_bundle else None,
            config=Config(request_checksum_calculation="when_required"),
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


def _wait_for_port(proc: subprocess.Popen[bytes], port: int, what: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.1)


def _start_moto(base: Path, tls: bool) -> tuple[S3Server, Any]:
    port = _free_port()
    args = [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    ca = None
    if tls:
        key, cert = self_signed_certificate(base, "key.pem", "cert.pem")
        args += ["--ssl-cert", str(cert), "--ssl-key", str(key)]
        ca = str(cert)
    log = open(base / "moto.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _wait_for_port(proc, port, "moto_server")
    scheme = "https" if tls else "http"
    return S3Server(f"{scheme}://127.0.0.1:{port}", proc, name="moto-https" if tls else "moto",
                    ca_bundle=ca), log


def _running(start: Callable[..., tuple[S3Server, Any]], base: Path, *, tls: bool) -> Iterator[S3Server]:
    """A server made by ``start`` until the generator is closed (a session fixture's body)."""
    server, log = start(base, tls=tls)
    yield server
    server.proc.terminate()
    server.proc.wait(10)
    log.close()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One ``moto_server`` process on 127.0.0.1 and a random port for the session."""
    yield from _running(_start_moto, tmp_path_factory.mktemp("moto"), tls=False)


@pytest.fixture(scope="session")
def moto_https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """``moto_server`` over HTTPS with a self-signed certificate (``AWS_CA_BUNDLE``), for the session."""
    yield from _running(_start_moto, tmp_path_factory.mktemp("moto-https"), tls=True)


def _start_s3rver(base: Path, tls: bool) -> tuple[S3Server, Any]:
    if not S3RVER.exists():
        raise RuntimeError(f"{S3RVER} is missing: run scripts/bootstrap (it installs s3rver with npm)")
    port = _free_port()
    args = [str(S3RVER), "-d", str(base / "data"), "-a", "127.0.0.1", "-p", str(port), "-s"]
    ca = None
    if tls:
        key, cert = self_signed_certificate(base, "key.pem", "cert.pem")
        args += ["--key", str(key), "--cert", str(cert)]
        ca = str(cert)
    # s3rver's listing past 1000 keys hashes with MD4, which Node 17+ only
    # offers from OpenSSL's legacy provider.
    env = {**os.environ, "NODE_OPTIONS": "--openssl-legacy-provider"}
    log = open(base / "s3rver.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    _wait_for_port(proc, port, "s3rver")
    config = base / "unsafe-locks.toml"
    config.write_text("unsafe_locks = true  # s3rver ignores If-None-Match\n")
    scheme = "https" if tls else "http"
    return S3Server(f"{scheme}://127.0.0.1:{port}", proc, name=f"s3rver-{scheme}",
                    access_key="S3RVER", secret_key="S3RVER", ca_bundle=ca,
                    enforces_conditional_writes=False, config=config, object_lock=False,
                    if_match="ignored"), log


@pytest.fixture(scope="session")
def s3rver_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """s3rver (npm) on 127.0.0.1 over plain HTTP, for the session."""
    yield from _running(_start_s3rver, tmp_path_factory.mktemp("s3rver-http"), tls=False)


@pytest.fixture(scope="session")
def s3rver_https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """s3rver (npm) on 127.0.0.1 over HTTPS with a self-signed certificate, for the session."""
    yield from _running(_start_s3rver, tmp_path_factory.mktemp("s3rver-https"), tls=True)


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephCluster]:
    """A one-node Ceph cluster and RADOS Gateway on loopback (:mod:`fleece.testing.ceph`), for the
    session; its gateway serves HTTP and HTTPS at once."""
    # Short: the daemons' admin sockets live inside it (108-byte limit of a socket path).
    base = Path(tempfile.mkdtemp(prefix="fleece-ceph-"))
    cluster = start_ceph(base)
    print(f"\nCeph {cluster.version} RGW up in {cluster.started_in:.1f} s", file=sys.stderr)
    yield cluster
    cluster.stop()
    shutil.rmtree(base, ignore_errors=True)


def _ceph_server(cluster: CephCluster, tls: bool) -> S3Server:
    return S3Server(cluster.https_endpoint if tls else cluster.http_endpoint, cluster.procs[-1],
                    name="ceph-https" if tls else "ceph-http", access_key=cluster.access_key,
                    secret_key=cluster.secret_key, ca_bundle=str(cluster.ca_bundle) if tls else None,
                    if_match="refuses-valid")


@pytest.fixture(scope="session")
def ceph_http(ceph_cluster: CephCluster) -> S3Server:
    """Ceph RGW's plain HTTP endpoint."""
    return _ceph_server(ceph_cluster, tls=False)


@pytest.fixture(scope="session")
def ceph_https(ceph_cluster: CephCluster) -> S3Server:
    """Ceph RGW's HTTPS endpoint (a self-signed certificate, ``AWS_CA_BUNDLE``)."""
    return _ceph_server(ceph_cluster, tls=True)


S3_SERVER_FIXTURES = {"moto": "moto_server", "moto-https": "moto_https", "s3rver-http": "s3rver_http",
                      "s3rver-https": "s3rver_https", "ceph-http": "ceph_http", "ceph-https": "ceph_https"}
"""Each name of :data:`S3_SERVERS` → the session fixture that runs it."""


@pytest.fixture
def s3_server(request: pytest.FixtureRequest) -> S3Server:
    """The S3 server of this test: moto, or the one named by an indirect parametrization."""
    name = getattr(request, "param", "moto")
    fixture = S3_SERVER_FIXTURES[name]
    server: S3Server = request.getfixturevalue(fixture)
    return server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point boto3 (in-process and in subprocesses) at the test's S3 server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    if s3_server.ca_bundle:
        monkeypatch.setenv("AWS_CA_BUNDLE", s3_server.ca_bundle)
    else:
        monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env: S3Server) -> str:
    """A fresh, empty bucket on the test's S3 server; its name."""
    name = f"fleece-test-{uuid.uuid4().hex[:12]}"
    s3_env.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["file", "s3"])
def repo_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A repository location, once of each kind: a directory, or a prefix in a fresh bucket."""
    if request.param == "file":
        return str(tmp_path / "repo")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/fleece"


@pytest.fixture
def s3_lock_bucket(s3_env: S3Server) -> str:
    """A fresh bucket with S3 Object Lock enabled (and so versioned); its name."""
    assert s3_env.object_lock, f"{s3_env.name} does not implement Object Lock"
    name = f"fleece-lock-{uuid.uuid4().hex[:12]}"
    s3_env.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    return name


@pytest.fixture
def s3_proxy(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A fault-injecting HTTP proxy in front of the moto server (``S3FaultProxy``).

    AWS_ENDPOINT_URL points at it, in-process and in subprocesses. Its
    ``plan`` may be changed while requests flow; ``plan.requests`` counts
    the HTTP attempts per S3 operation. A stalled request (``timeouts``)
    hangs 1.5 s: set FLEECE_S3_READ_TIMEOUT below that.
    """
    from fleece.testing.s3_faults import S3FaultProxy

    assert s3_env.name == "moto", "the fault proxy re-signs nothing: only moto accepts its requests"
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
def tmpfs(short_tmp: Path) -> Iterator[Any]:
    """``tmpfs(name, size)``: a fresh tmpfs of ``size`` (e.g. ``8M``) under ``short_tmp``; unmounted at
    teardown. Needs root (CI runs as root): elsewhere the test skips, and a guarantee test that
    skips fails the whole run (``tests/test_guarantees.py``)."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        mnt = short_tmp / name
        mnt.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        with contextlib.suppress(Exception):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


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
    from fleece.repo.format.codec import encode_chunk
    from fleece.repo.format.index import ChunkIndex
    from fleece.repo.format.point import DiskRecord, RestorePoint, iso_utc

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
                    digest = repo.chunk_name(piece)
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


# -- TLS credentials on loopback (certtool from gnutls-bin) --------------------------
@dataclass
class TlsCredentials:
    """x509 directories in QEMU's/libnbd's layout, and a PSK file, made for one test session.

    ``server``: ca-cert.pem, server-cert.pem, server-key.pem (for 127.0.0.1 and localhost).
    Client directories (ca-cert.pem, client-cert.pem, client-key.pem):
    ``client`` (DN ``client_dn``), ``other_dn`` (same CA, another DN),
    ``other_ca`` (its certificate signed by another CA), ``wrong_ca`` (trusts
    only the other CA, so not the server) and ``no_cert`` (only ca-cert.pem).
    ``psk``/``wrong_psk``: ``USERNAME:HEXKEY`` files. Every key file is 0600.
    """

    root: Path
    server: Path
    client: Path
    other_dn: Path
    other_ca: Path
    wrong_ca: Path
    no_cert: Path
    psk: Path
    wrong_psk: Path
    client_dn: str = "C=GB,O=Fleece Tests,CN=backup1"
    """As QEMU (gnutls_x509_crt_get_dn) writes it for authz: C first, CN last."""
    other_dn_name: str = "C=GB,O=Fleece Tests,CN=intruder"

    def key_material(self) -> list[str]:
        """Secret strings no output may contain: the private keys' bodies, the PSK hex keys."""
        found = []
        for key in self.root.rglob("*key.pem"):
            body = [ln for ln in key.read_text().splitlines() if ln and not ln.startswith("-----")]
            found.extend(body[:3])
        for psk in (self.psk, self.wrong_psk):
            found.append(psk.read_text().strip().split(":", 1)[1])
        return found


def _certtool(*args: str) -> None:
    subprocess.run(["certtool", *args], check=True, capture_output=True, stdin=subprocess.DEVNULL)


def _make_ca(d: Path, name: str) -> tuple[Path, Path]:
    (d / f"{name}.tmpl").write_text(f'cn = "{name}"\norganization = "Fleece Tests"\nca\n'
                                    "cert_signing_key\nexpiration_days = 30\n")
    key, cert = d / f"{name}-key.pem", d / f"{name}-cert.pem"
    _certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", str(key))
    _certtool("--generate-self-signed", "--load-privkey", str(key), "--template",
              str(d / f"{name}.tmpl"), "--outfile", str(cert))
    return key, cert


def _issue(d: Path, ca: tuple[Path, Path], trust: Path, role: str, template: str) -> Path:
    """A directory holding ``trust`` as ca-cert.pem and a ``role`` certificate signed by ``ca``."""
    d.mkdir()
    (d / "ca-cert.pem").write_bytes(trust.read_bytes())
    key = d / f"{role}-key.pem"
    _certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", str(key))
    key.chmod(0o600)
    (d / "cert.tmpl").write_text(template + "encryption_key\nsigning_key\nexpiration_days = 30\n")
    _certtool("--generate-certificate", "--load-privkey", str(key), "--load-ca-certificate",
              str(ca[1]), "--load-ca-privkey", str(ca[0]), "--template", str(d / "cert.tmpl"),
              "--outfile", str(d / f"{role}-cert.pem"))
    (d / "cert.tmpl").unlink()
    return d


@pytest.fixture(scope="session")
def tls_creds(tmp_path_factory: pytest.TempPathFactory) -> TlsCredentials:
    """A CA, a server certificate for 127.0.0.1/localhost, good and bad clients, PSK files."""
    root = tmp_path_factory.mktemp("tls")
    cas = root / "cas"
    cas.mkdir(mode=0o700)
    good, other = _make_ca(cas, "Fleece Test CA"), _make_ca(cas, "Another CA")
    client = 'cn = "backup1"\norganization = "Fleece Tests"\ncountry = "GB"\ntls_www_client\n'
    intruder = 'cn = "intruder"\norganization = "Fleece Tests"\ncountry = "GB"\ntls_www_client\n'
    creds = TlsCredentials(
        root=root,
        server=_issue(root / "server", good, good[1], "server",
                      'cn = "localhost"\ndns_name = "localhost"\nip_address = "127.0.0.1"\n'
                      "tls_www_server\n"),
        client=_issue(root / "client", good, good[1], "client", client),
        other_dn=_issue(root / "other-dn", good, good[1], "client", intruder),
        other_ca=_issue(root / "other-ca", other, good[1], "client", client),
        wrong_ca=_issue(root / "wrong-ca", good, other[1], "client", client),
        no_cert=root / "no-cert",
        psk=root / "keys.psk",
        wrong_psk=root / "wrong.psk",
    )
    creds.no_cert.mkdir()
    (creds.no_cert / "ca-cert.pem").write_bytes(good[1].read_bytes())
    for psk in (creds.psk, creds.wrong_psk):
        subprocess.run(["psktool", "-u", "backup1", "-p", str(psk)], check=True, capture_output=True)
        psk.chmod(0o600)
    return creds


@pytest.fixture
def free_port() -> Any:
    """``free_port()``: a TCP port on 127.0.0.1 nobody listens on now."""
    return _free_port
# -- live restores running in the background (tests/live.py) -------------------------
@pytest.fixture
def live() -> Iterator[Any]:
    """``live(*args)``: ``fleece restore --live --json ARGS`` in the background, its events
    readable as they come (``tests/live.py``); any still running are killed at teardown."""
    from live import LiveRestore

    started: list[LiveRestore] = []

    def start(*args: str | Path) -> LiveRestore:
        lr = LiveRestore(*args)
        started.append(lr)
        return lr

    yield start
    for lr in started:
        lr.kill()
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
