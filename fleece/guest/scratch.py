"""One scratch directory per guest-level run, its owner file, and the sweep of stale ones.

A run (``verify --fsck``/``--boot``) keeps everything it makes in
``$TMPDIR`` (or ``/var/tmp``) ``/fleece-guest-XXXXXXXX/`` (0700): NBD sockets,
nbdkit's private directories, qcow2 overlays, libguestfs's own temporary
files, the QMP socket and console log of a throwaway QEMU. Its owner file
names the host, pid and the pid's start time, so ``fleece cleanup --stale``
can tell a directory whose run was killed (SIGKILL) from one in use.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

from fleece.errors import FleeceError

PREFIX = "fleece-guest-"
NAME = re.compile(r"^fleece-guest-[A-Za-z0-9_]{8}$")
OWNER_FILE = "owner.json"


class Interrupted(FleeceError):
    """SIGTERM (or SIGINT) arrived: the run stops and tears down what it started."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of ``/proc/PID/stat``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def default_parent() -> Path:
    """``$TMPDIR``, else ``/var/tmp`` (overlays may grow: not a RAM-backed ``/tmp``)."""
    return Path(os.environ.get("TMPDIR") or "/var/tmp")


class Scratch:
    """A fresh private directory for one run; :meth:`remove` deletes it and everything in it."""

    def __init__(self, parent: Path | None = None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent or default_parent()))
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}
        (self.path / OWNER_FILE).write_text(json.dumps(owner) + "\n")

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def remove(self) -> None:
        """Delete the directory (idempotent)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGTERM into :class:`Interrupted` for the ``with`` block, so tear-downs run.

    Ctrl-C already raises ``KeyboardInterrupt``. A blocking C call (a
    libguestfs launch) sees the exception when it returns.
    """
    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(f"stopped by signal {signal.Signals(signum).name}; everything it started "
                          "was torn down")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class StaleRun:
    """A guest-level scratch directory and what the sweep decided."""

    path: str
    stale: bool
    why: str


def _owner_gone(d: Path) -> tuple[bool, str]:
    try:
        owner = json.loads((d / OWNER_FILE).read_text())
        host, pid, start = str(owner["host"]), int(owner["pid"]), owner.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        return False, "no readable owner file (a run being set up?)"
    if host != socket.gethostname():
        return False, f"made on host {host}"
    now = _start_time(pid)
    if now is not None and now == start:
        return False, f"fleece process {pid} is still running"
    return True, f"its fleece process {pid} is gone"


def sweep(parents: list[Path], delete: bool = True) -> list[StaleRun]:
    """Remove the guest-level scratch directories under ``parents`` whose run is gone.

    Only real directories named ``fleece-guest-XXXXXXXX`` owned by this user,
    whose owner file names this host and a process that no longer exists
    (pid and start time) are removed; the processes they held (nbdkit, QEMU,
    libguestfs's appliance) died with their parent.
    """
    found = []
    for parent in parents:
        try:
            entries = sorted(os.scandir(parent), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if not NAME.match(entry.name) or not entry.is_dir(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                found.append(StaleRun(entry.path, False, "owned by another user"))
                continue
            gone, why = _owner_gone(Path(entry.path))
            if gone and delete:
                shutil.rmtree(entry.path, ignore_errors=True)
            found.append(StaleRun(entry.path, gone, why))
    return found
