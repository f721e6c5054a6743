"""Scratch directories nothing will ever tear down, and their sweep (``fleece cleanup --stale``).

An export's scratch directory (``fleece-XXXXXXXX`` under ``$TMPDIR`` or
``/var/tmp``) holds the reverse deltas, the NBD socket and the state file.
Its tear-down removes it; ``fleece cleanup --qmp`` does when the fleece
process died. When QEMU itself died (or was killed) with the export up,
nobody is left to ask: the directory stays, and may hold a copy of guest data.

A directory is **stale** only when all of these hold (anything uncertain keeps it):

* it is a real directory (not a symlink) owned by the user sweeping;
* no process of this host has a file in it open, or a unix socket bound in it
  (``/proc/*/fd`` and ``/proc/net/unix``): a live QEMU holds its reverse
  deltas open (even unlinked ones) and listens on its NBD socket, whichever
  process started the export; every process's open files must be visible
  (root, or all processes ours), else nothing is judged stale;
* its state file names this host and a fleece process that has exited — or
  it has no state file and is older than :data:`NO_STATE_GRACE` (a set-up
  writes the state file right after making the directory).

The sweep deletes only what fleece puts there (state file, socket, reverse
deltas), through a descriptor of the directory itself, then the directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from socket import gethostname

from fleece.errors import ExportError
from fleece.fleecing.names import SOCKET_FILE, STATE_FILE
from fleece.fleecing.state import ExportState

SCRATCH_NAME = re.compile(r"^fleece-[A-Za-z0-9_]{8}$")
"""What ``tempfile.mkdtemp(prefix="fleece-")`` names a scratch directory."""
NO_STATE_GRACE = 600.0
"""Seconds a scratch directory without a state file is left alone (one being set up)."""
_OURS = re.compile(r"^(delta-.+\.raw|" + re.escape(SOCKET_FILE) + "|" + re.escape(STATE_FILE)
                   + "|" + re.escape(Path(STATE_FILE).with_suffix(".tmp").name) + ")$")


@dataclass(frozen=True)
class ScratchDir:
    """One scratch directory found, and the verdict on it."""

    path: str
    stale: bool
    why: str

    def as_dict(self) -> dict[str, object]:
        """For ``--json``."""
        return {"path": self.path, "stale": self.stale, "why": self.why}


def scratch_parents(extra: list[Path] | None = None) -> list[Path]:
    """Where scratch directories are made: the given ones, else ``$TMPDIR`` and ``/var/tmp``."""
    found: list[Path] = []
    candidates = extra or [Path(p) for p in (os.environ.get("TMPDIR"), "/var/tmp") if p]
    for p in candidates:
        if p.is_dir() and all(not os.path.samefile(p, q) for q in found):
            found.append(p)
    return found


def survey(parents: list[Path], now: float | None = None) -> list[ScratchDir]:
    """Every scratch directory under ``parents`` with its verdict; changes nothing."""
    now = time.time() if now is None else now
    dirs = []
    for parent in parents:
        try:
            entries = list(os.scandir(parent))
        except OSError:
            continue
        dirs += [e.path for e in entries if SCRATCH_NAME.match(e.name)
                 and e.is_dir(follow_symlinks=False)]
    if not dirs:
        return []
    used, complete = _paths_in_use()
    return sorted((_judge(d, used, complete, now) for d in dirs), key=lambda s: s.path)


def sweep(parents: list[Path]) -> list[ScratchDir]:
    """Remove every stale scratch directory under ``parents``; the survey, as carried out."""
    done = []
    for found in survey(parents):
        if found.stale:
            problem = _remove(found.path)
            if problem:
                found = ScratchDir(found.path, False, f"not removed: {problem}")
        done.append(found)
    return done


def _judge(path: str, used: dict[str, int], complete: bool, now: float) -> ScratchDir:
    try:
        st = os.lstat(path)
    except OSError:
        return ScratchDir(path, False, "gone meanwhile")
    if st.st_uid != os.geteuid():
        return ScratchDir(path, False, f"owned by uid {st.st_uid}, not by us")
    prefix = path.rstrip("/") + "/"
    users = sorted({pid for p, pid in used.items() if p.startswith(prefix)})
    if users and users[-1] > 0:
        return ScratchDir(path, False, f"in use by pid {', '.join(str(u) for u in users if u)}")
    if users:
        return ScratchDir(path, False, "a process listens on its NBD socket")
    if not complete:
        return ScratchDir(path, False, "cannot see every process's open files (run as root)")
    try:
        state = ExportState.load(path)
    except ExportError as exc:
        state = None
        if now - st.st_mtime < NO_STATE_GRACE:
            return ScratchDir(path, False, str(exc))
    if state is None:
        age = now - st.st_mtime
        if age < NO_STATE_GRACE:
            return ScratchDir(path, False, f"no state file yet, made {age:.0f} s ago")
        return ScratchDir(path, True, "no state file and no process uses it")
    if state.host != gethostname():
        return ScratchDir(path, False, f"made on host {state.host}")
    if not state.process.certainly_dead():
        return ScratchDir(path, False, f"its fleece process pid {state.pid} may be alive")
    return ScratchDir(path, True, f"fleece pid {state.pid} has exited (checkpoint "
                                  f"{state.checkpoint}) and no QEMU or other process uses it")


def _paths_in_use() -> tuple[dict[str, int], bool]:
    """Paths open or bound by a process of this host → one such pid; and whether we saw all."""
    used: dict[str, int] = {}
    complete = True
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        fds = f"/proc/{entry.name}/fd"
        try:
            names = os.listdir(fds)
        except FileNotFoundError:
            continue  # exited meanwhile
        except PermissionError:
            complete = False
            continue
        for fd in names:
            with contextlib.suppress(OSError):
                target = os.readlink(f"{fds}/{fd}")
                if target.startswith("/"):
                    used[target.removesuffix(" (deleted)")] = int(entry.name)
    # Bound unix sockets (QEMU's NBD server) show by path here, whoever owns them.
    with contextlib.suppress(OSError), open("/proc/net/unix") as f:
        next(f, None)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7].startswith("/"):
                used.setdefault(fields[7], 0)
    return used, complete


def _remove(path: str) -> str | None:
    """Delete fleece's files in ``path`` and then ``path``; what stopped it, or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        for name in os.listdir(fd):
            if _OURS.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=fd)
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        os.close(fd)
    try:
        os.rmdir(path)
    except OSError as exc:
        return f"{exc.strerror} (it holds files fleece did not make)" \
            if exc.errno == errno.ENOTEMPTY else (exc.strerror or str(exc))
    return None
