"""Run nbdkit with the fleece plugin on a unix socket (or TCP with TLS), and stop it again.

nbdkit is a real NBD server (handshake, multi-conn, block status, structured
replies), so every client works — QEMU, qemu-img, nbdcopy, nbdfuse. fleece
only supplies the data: :mod:`fleece.serve.plugin` runs inside nbdkit's
embedded Python. The socket is created with umask 077 (mode 0600), so only
the serving user can connect. On TCP, nbdkit requires TLS and verifies the
client's certificate (:mod:`fleece.fleecing.transport` builds its options).

nbdkit (1.32, Debian 12) cannot let in only one client identity, so with
``--tls-authz`` nbdkit listens on a unix socket in the private directory and
QEMU's ``qemu-nbd`` fronts it on TCP: TLS with the same credentials plus an
``authz-simple`` object naming the one DN (or PSK user) that may connect —
the same check ``fleece export start --tls-authz`` has QEMU make. It dies
with fleece (``PR_SET_PDEATHSIG``), as nbdkit does (``--exit-with-parent``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType

import fleece
from fleece.errors import BadInput, FleeceError
from fleece.fleecing.transport import ServerTransport, link_psk
from fleece.repo.format.point import RestorePoint
from fleece.serve.cache import DEFAULT_CACHE_BYTES, DEFAULT_READAHEAD

PLUGIN = Path(__file__).with_name("plugin.py")
NBDKIT = "nbdkit"
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes including the NUL


def nbd_uri(sock: Path) -> str:
    """``nbd+unix:///?socket=PATH``: the default export on a unix socket."""
    return ServerTransport(socket=str(sock)).uri()


def prepare_socket(path: str | Path) -> Path:
    """An absolute, usable socket path; a stale socket nobody listens on is removed."""
    sock = Path(os.path.abspath(path))
    if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
        raise BadInput(f"socket path {sock} is longer than {MAX_SOCKET_PATH} bytes; choose a shorter one")
    if not sock.parent.is_dir():
        raise BadInput(f"directory {sock.parent} of the socket does not exist")
    if sock.is_socket():
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(sock))
            except ConnectionRefusedError:
                sock.unlink()  # left by a server that is gone
                return sock
        raise BadInput(f"socket {sock} is in use by another server")
    if sock.exists() or sock.is_symlink():
        raise BadInput(f"{sock} exists and is not a socket; choose another --socket path")
    return sock


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when fleece dies (qemu-nbd has no --exit-with-parent)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _fleece_sys_path() -> str:
    """Where this interpreter finds fleece and its dependencies, for the plugin."""
    root = Path(fleece.__file__).resolve().parent.parent
    paths = [str(root), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    return os.pathsep.join(dict.fromkeys(paths))


class NbdkitServer:
    """One nbdkit process serving one disk of one restore point, read-only."""

    def __init__(
        self,
        repo_url: str,
        point: RestorePoint,
        drive: str,
        sock: Path | None,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        readahead: int = DEFAULT_READAHEAD,
        verbose: bool = False,
        transport: ServerTransport | None = None,
        passphrase: bytes | None = None,
        block_status: bool = True,
        private_dir: Path | None = None,
        limit_download: float | None = None,
    ) -> None:
        """``passphrase`` opens an encrypted repository in the plugin: it reaches nbdkit on an
        inherited pipe (``passphrase_fd=N``), never in its environment or on its command line,
        where other processes of the user could read it (``/proc/PID/environ``)."""
        self.sock = sock
        self._passphrase = passphrase
        self.transport = transport or ServerTransport(socket=str(sock))
        self.uri = self.transport.uri()
        self.options = ["--verbose"] if verbose else []
        if not block_status:
            # No structured replies, so no base:allocation: clients take every byte
            # as data and never ask the server where holes are (fleece.restore.live).
            self.options.append("--no-sr")
        self.parameters = [
            f"repo={repo_url}", f"vm={point.vm}", f"point={point.id}", f"drive={drive}",
            f"cache={cache_bytes}", f"readahead={readahead}",
        ]
        if limit_download is not None:
            self.parameters.append(f"limit_download={int(limit_download)}")
        self.argv: list[str] = []
        self._private_dir = private_dir
        self._private: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.front: subprocess.Popen[bytes] | None = None
        """``qemu-nbd`` in front of nbdkit when one client identity is allowed (``--tls-authz``)."""

    def start(self, timeout: float = 30) -> None:
        """Start nbdkit and wait until it accepts connections."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start nbdkit without waiting for it (:meth:`wait_ready` does), to overlap its start-up."""
        # A private directory (0700) for the pid file, which signals readiness.
        if self._private_dir is not None:
            self._private_dir.mkdir(mode=0o700)
            self._private = self._private_dir
        else:
            self._private = Path(tempfile.mkdtemp(prefix="fleece-serve-"))
        pidfile = self._private / "nbdkit.pid"
        listen = self.transport
        if self.transport.authz:
            listen = ServerTransport(socket=str(self._private / "nbdkit.sock"))  # qemu-nbd fronts it
        self.argv = [
            NBDKIT, "--foreground", "--exit-with-parent", "--readonly",
            *listen.nbdkit_args(), "--pidfile", str(pidfile), *self.options,
            "python", str(PLUGIN), *self.parameters,
        ]
        env = {k: v for k, v in os.environ.items()
               if not (k.startswith("FLEECE_") and "PASSPHRASE" in k)}
        env["FLEECE_SYS_PATH"] = _fleece_sys_path()
        pass_fds: tuple[int, ...] = ()
        if self._passphrase is not None:
            # The whole passphrase fits the pipe's buffer: written and closed before nbdkit starts.
            read_end, write_end = os.pipe()
            try:
                os.write(write_end, self._passphrase)
            finally:
                os.close(write_end)
            pass_fds = (read_end,)
            self.argv.append(f"passphrase_fd={read_end}")
        try:
            self.proc = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, umask=0o077, pass_fds=pass_fds)
        except FileNotFoundError:
            self._remove_private()
            raise FleeceError("nbdkit is not installed (Debian: apt install nbdkit "
                              "nbdkit-plugin-python); nothing is served") from None
        finally:
            for fd in pass_fds:
                os.close(fd)

    def wait_ready(self, timeout: float = 30) -> None:
        """Wait until the launched nbdkit accepts connections; raise if it exits or is too slow."""
        assert self.proc is not None and self._private is not None
        pidfile = self._private / "nbdkit.pid"
        deadline = time.monotonic() + timeout
        # nbdkit writes the pid file only once it is ready to accept connections.
        while not pidfile.exists():
            rc = self.proc.poll()
            if rc is not None:
                self._remove_private()
                raise FleeceError(f"nbdkit exited with status {rc} before serving "
                                  f"(its messages are above); nothing is served")
            if time.monotonic() > deadline:
                self.stop()
                raise FleeceError(f"nbdkit did not start serving within {timeout:.0f} s; stopped it")
            time.sleep(0.02)
        if self.sock is not None and not self.transport.is_tcp:
            os.chmod(self.sock, 0o600)
        if self.transport.authz:
            self._start_front(deadline)

    def _start_front(self, deadline: float) -> None:
        """``qemu-nbd`` on TCP with TLS and ``authz-simple``, reading nbdkit's private socket."""
        assert self._private is not None
        inner = self._private / "nbdkit.sock"
        pidfile = self._private / "qemu-nbd.pid"
        objects = self.transport.qemu_objects(link_psk(self.transport, self._private))
        argv = ["qemu-nbd", "--read-only", "--persistent", "--shared=0", "--format=raw",
                f"--bind={self.transport.host}", f"--port={self.transport.port}",
                *(f"--object={json.dumps(o)}" for o in objects),
                f"--tls-creds={objects[0]['id']}", f"--tls-authz={objects[-1]['id']}",
                f"--pid-file={pidfile}", ServerTransport(socket=str(inner)).uri()]
        env = {k: v for k, v in os.environ.items()
               if not (k.startswith("FLEECE_") and "PASSPHRASE" in k)}
        try:
            self.front = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, umask=0o077,
                                          preexec_fn=_die_with_parent)
        except FileNotFoundError:
            self.stop()
            raise FleeceError("qemu-nbd is not installed (Debian: qemu-utils); --tls-authz needs it; "
                              "nothing is served") from None
        while not pidfile.exists():
            rc = self.front.poll()
            if rc is not None:
                self.stop()
                raise FleeceError(f"qemu-nbd exited with status {rc} before serving (its messages "
                                  "are above); nothing is served")
            if time.monotonic() > deadline:
                self.stop()
                raise FleeceError("qemu-nbd did not start serving in time; stopped it")
            time.sleep(0.02)

    def wait(self) -> int:
        """Wait for nbdkit to exit; its status."""
        assert self.proc is not None
        try:
            return self.proc.wait()
        finally:
            self._stop_front()
            self._remove_private()

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Ask nbdkit to stop (it finishes requests in progress)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)
        if self.front is not None and self.front.poll() is None:
            self.front.send_signal(signum)

    def stop(self, timeout: float = 10) -> int | None:
        """Stop nbdkit (SIGTERM, then SIGKILL after ``timeout``); its status."""
        self._stop_front(timeout)
        if self.proc is None:
            self._remove_private()
            return None
        self.signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._remove_private()
        with contextlib.suppress(FileNotFoundError):
            if self.sock is not None and not self.transport.is_tcp and self.sock.is_socket():
                self.sock.unlink()
        return rc

    def _stop_front(self, timeout: float = 10) -> None:
        if self.front is None:
            return
        if self.front.poll() is None:
            self.front.terminate()
        try:
            self.front.wait(timeout)
        except subprocess.TimeoutExpired:
            self.front.kill()
            self.front.wait()

    def _remove_private(self) -> None:
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None

    def __enter__(self) -> NbdkitServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
