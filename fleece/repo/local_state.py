"""What this host remembers of each repository it opened, so a store cannot quietly turn it back.

A store with write access can replace ``config`` (an encrypted repository's
``config`` is in clear; a plain one carries no MAC at all) and can hide
objects. Nothing in the repository can prove that it was not swapped or
rolled back, so this host keeps its own record, per repository id, of what
it saw last (docs/format.md "Threat model", docs/guarantees.md):

* ``locations/<sha256 of the location>.json``: which repository id a
  location held;
* ``repositories/<sha256 of the id>.json``: its encryption, the identity of its master
  key (``config``'s ``auth``, a MAC only that key can make), the key
  objects that opened it, and the newest point id seen per VM.

Opening a repository compares it with that record first: a location that
now holds another repository id, a repository that lost (or changed) its
encryption or its master key, or a VM whose newest point is older than the
newest this host saw (a store hiding the newest points, so that ``latest``
would silently be an old one) is refused with :class:`RepositoryChanged`,
which says what changed. ``--accept-change`` (``accept_change``) records the
repository as it is now, after a deliberate change.

The directory is ``$XDG_STATE_HOME/fleece``, else ``/var/lib/fleece`` for
root and ``~/.local/state/fleece`` for anyone else; directories are 0700,
files 0600, each written whole (temporary file + rename) under an
``flock`` so that concurrent runs (two VMs backing up into one repository)
never lose each other's update.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fleece.errors import FleeceError, RepositoryChanged

STATE_VERSION = 1
ACCEPT_HINT = "if the change was deliberate, run again with --accept-change"


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/fleece``, else ``/var/lib/fleece`` (root) or ``~/.local/state/fleece``."""
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "fleece"
    if os.geteuid() == 0:
        return Path("/var/lib/fleece")
    return Path.home() / ".local" / "state" / "fleece"


def location_name(url: str) -> str:
    """The location a repository URL names, spelled one way (local paths made absolute)."""
    if "://" not in url:
        return os.path.abspath(url)
    return url.rstrip("/")


def _file_name(text: str) -> str:
    """A record's file name: a hash, for an id or a location comes from the store or the user
    (``config``'s ``id`` is whatever the store says; never a path)."""
    return hashlib.sha256(text.encode()).hexdigest()


class LocalState:
    """The state directory: one record per location and one per repository id."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_state_dir()

    def _dir(self, name: str) -> Path:
        d = self.root / name
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for p in (self.root, d):
                p.mkdir(mode=0o700, exist_ok=True)
                if p.stat().st_mode & 0o077:
                    os.chmod(p, 0o700)
        except OSError as exc:
            raise FleeceError(f"cannot use fleece's state directory {self.root}: {exc.strerror} "
                              "(set XDG_STATE_HOME to a writable directory); nothing was changed"
                              ) from None
        return d

    @contextlib.contextmanager
    def _record(self, kind: str, name: str) -> Iterator[dict[str, Any]]:
        """The JSON record ``kind/name.json`` (empty if new), locked; written back if changed."""
        d = self._dir(kind)
        path = d / f"{name}.json"
        lock_fd = os.open(d / f".{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                before = path.read_bytes()
                doc = json.loads(before)
                if not isinstance(doc, dict):
                    raise ValueError("not an object")
            except FileNotFoundError:
                before, doc = b"", {}
            except (OSError, ValueError) as exc:
                raise FleeceError(f"fleece's state file {path} is unreadable ({exc}); move it "
                                  "away to start afresh (this host then forgets what it saw)"
                                  ) from None
            yield doc
            after = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
            if after != before and (doc or before):
                tmp = d / f".{name}.{secrets.token_hex(6)}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    os.write(fd, after)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
        finally:
            os.close(lock_fd)

    def check(self, url: str, repository_id: str, encryption: str, key_identity: str | None,
              *, accept_change: bool = False) -> None:
        """Refuse (:class:`RepositoryChanged`) a repository at ``url`` that is not what this host saw.

        ``key_identity`` is what only the master key can produce (``config``'s
        ``auth``), None for a plain repository. Records nothing.
        """
        if accept_change:
            return
        where = location_name(url)
        with self._record("locations", _file_name(where)) as loc:
            held = loc.get("id")
        if held not in (None, repository_id):
            raise RepositoryChanged(
                f"{url} held repository {held} when this host last used it and now holds "
                f"{repository_id} (replaced, or another repository made there); nothing was "
                f"changed; {ACCEPT_HINT}")
        with self._record("repositories", _file_name(repository_id)) as rec:
            seen_enc, seen_key = rec.get("encryption"), rec.get("key")
        if seen_enc is None:
            return
        if seen_enc != "none" and encryption == "none":
            raise RepositoryChanged(
                f"repository {url} was encrypted ({seen_enc}) when this host last opened it and "
                "its config now says it is not: refusing to read or write it in clear (whoever "
                "can write to the store may have replaced config); nothing was changed; "
                f"{ACCEPT_HINT}")
        if seen_enc != encryption:
            raise RepositoryChanged(
                f"repository {url} was {seen_enc} when this host last opened it and is now "
                f"{encryption}; nothing was changed; {ACCEPT_HINT}")
        if seen_key != key_identity:
            raise RepositoryChanged(
                f"repository {url} is encrypted with another master key than when this host last "
                f"opened it (its config was replaced); nothing was changed; {ACCEPT_HINT}")

    def check_location_empty(self, url: str) -> None:
        """Refuse to create a repository at ``url`` if this host saw one there (the store may hide it)."""
        where = location_name(url)
        with self._record("locations", _file_name(where)) as loc:
            held = loc.get("id")
        if held is not None:
            raise RepositoryChanged(
                f"{url} held repository {held} when this host last used it and now holds none "
                "(deleted, or the store hides it): not creating another there; nothing was "
                f"written; {ACCEPT_HINT}")

    def open_repository(self, url: str, repository_id: str, encryption: str, key_identity: str | None,
                        *, accept_change: bool = False) -> RepositoryMemory:
        """:meth:`check`, then record the location and the repository as they are now; its memory.

        Call it once the repository is authenticated (its key opened it), so
        that only what the key vouches for is remembered.
        """
        self.check(url, repository_id, encryption, key_identity, accept_change=accept_change)
        where = location_name(url)
        with self._record("locations", _file_name(where)) as loc:
            loc.update(version=STATE_VERSION, location=where, id=repository_id)
        memory = RepositoryMemory(self, repository_id, url)
        with memory.record() as rec:
            if rec.get("encryption") != encryption or rec.get("key") != key_identity:
                rec["points"] = {}  # another repository in effect (--accept-change)
            rec.update(version=STATE_VERSION, id=repository_id, encryption=encryption,
                       key=key_identity)
        memory.accept_change = accept_change
        return memory


class RepositoryMemory:
    """What this host saw of one repository: checks and records its newest points."""

    def __init__(self, state: LocalState, repository_id: str, url: str) -> None:
        self.state = state
        self.id = repository_id
        self.url = url
        self.accept_change = False
        """Set by ``--accept-change``: a VM's newest point going back is recorded, not refused."""

    def record(self) -> contextlib.AbstractContextManager[dict[str, Any]]:
        """This repository's record, locked for a read-modify-write."""
        return self.state._record("repositories", _file_name(self.id))

    def note_key(self, key_id: str | None) -> None:
        """Remember that key object ``key_id`` opened the repository here."""
        if key_id is None:
            return
        with self.record() as rec:
            ids = set(rec.get("key_ids") or [])
            if key_id not in ids:
                rec["key_ids"] = sorted(ids | {key_id})

    def check_points(self, refs: Iterable[tuple[str, str]], vm: str | None) -> None:
        """Refuse a listing in which a VM's newest point is older than the newest seen here.

        ``refs`` is the full listing of ``vm``'s points (every VM's if None).
        Point ids sort by time, so "older" is string order. Records the
        newest of each VM listed.
        """
        newest: dict[str, str] = {}
        for v, pid in refs:
            if pid > newest.get(v, ""):
                newest[v] = pid
        with self.record() as rec:
            points: dict[str, str] = dict(rec.get("points") or {})
            for name, seen in sorted(points.items()):
                if vm is not None and name != vm:
                    continue
                now = newest.get(name)
                if (now is None or now < seen) and not self.accept_change:
                    raise RepositoryChanged(
                        f"repository {self.url} lists "
                        + (f"{now} as the newest point of VM {name}" if now else f"no point of VM {name}")
                        + f", but this host saw {seen} there: the store hides the newest points "
                        f"(or they were deleted behind fleece's back); nothing was changed; "
                        f"{ACCEPT_HINT}")
            for name, pid in newest.items():
                if self.accept_change or pid > points.get(name, ""):
                    points[name] = pid
            if vm is not None and self.accept_change and vm not in newest:
                points.pop(vm, None)
            rec["points"] = points

    def note_point(self, vm: str, point_id: str) -> None:
        """A point this host committed: the VM's newest from now on (if it is newer)."""
        with self.record() as rec:
            points: dict[str, str] = dict(rec.get("points") or {})
            if point_id > points.get(vm, ""):
                points[vm] = point_id
                rec["points"] = points

    def forget_point(self, vm: str, point_id: str, remaining: Iterable[str]) -> None:
        """A point this host deleted: if it was the newest seen, the newest of ``remaining`` is."""
        with self.record() as rec:
            points: dict[str, str] = dict(rec.get("points") or {})
            if points.get(vm) == point_id:
                rest = sorted(p for p in remaining if p != point_id)
                if rest:
                    points[vm] = rest[-1]
                else:
                    points.pop(vm)
                rec["points"] = points
