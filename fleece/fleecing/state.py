"""The export's state file: what one export set up, for whoever tears it down.

``fleece export start`` leaves the export up and exits; ``fleece export stop``
and ``fleece cleanup`` run later, in other processes. Most of what they need
QEMU shows itself (every object is named ``fleece-…``), but not which
checkpoint bitmap is the new one, whether fleece started QEMU's NBD server,
or where the scratch directory is. So the set-up writes this small JSON file
into the scratch directory, before it changes anything in QEMU, and tear-down
deletes it last. It is found again through QEMU: the reverse-delta node's
file lives next to it.

Format (version 1)::

    {"version": 1, "checkpoint": ID, "scratch": DIR, "socket": PATH,
     "nbd_server": true, "outcome": null | "commit" | "abort",
     "owner": "export" | "session", "pid": N, "host": NAME,
     "boot_id": ID, "pid_ns": N, "start_time": N, "machine_id": ID,
     "transport": null | {"socket", "host", "port", "tls", "creds", "authz"},
     "disks": [{"drive", "key", "qdev", "src", "format", "size",
                "persistent", "parent", "level", "reason", "discard"}]}

``pid`` … ``machine_id`` name the process that wrote the file
(:class:`fleece.liveness.Owner`); files written before ``boot_id`` and the
fields after it existed lack them and are judged by host and pid alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from socket import gethostname
from typing import TYPE_CHECKING, Any, ClassVar, cast

from fleece.errors import ExportError
from fleece.fleecing.names import STATE_FILE
from fleece.fleecing.transport import ServerTransport
from fleece.liveness import IDENTITY_FIELDS, Owner

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


class StateFile:
    """Base of every state file fleece keeps beside a live operation (an export, a libvirt job,
    a live restore), so that another process can finish or resume it.

    A dataclass deriving from it says where it lives (``path``) and its
    format version (``VERSION``). It is written atomically as
    ``{"version": …, <fields>}`` JSON: a reader sees the old state or the new
    one, never half.
    """

    VERSION: ClassVar[int] = 1

    @property
    def path(self) -> Path:
        """Where this state is stored."""
        raise NotImplementedError

    def save(self) -> None:
        """Write the file atomically."""
        tmp = self.path.with_suffix(".tmp")
        try:
            fields = asdict(cast("DataclassInstance", self))  # every subclass is a dataclass
            tmp.write_text(json.dumps({"version": self.VERSION, **fields}, indent=1))
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def read(cls, path: Path, what: str) -> dict[str, Any] | None:
        """The fields stored at ``path``, its version checked and dropped; None if there is no file.

        An unreadable file, or one of another version, is an ``ExportError`` naming ``what``.
        """
        try:
            raw: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ExportError(f"cannot read {what} {path}: {exc}; nothing was changed") from None
        if raw.pop("version", None) != cls.VERSION:
            raise ExportError(f"{path} is not a version {cls.VERSION} {what}; nothing was changed")
        return raw


class ScratchState(StateFile):
    """The state of an export, kept in its scratch directory and held by an owner:
    ``export`` (left up by ``export start``) or ``session`` (process ``pid`` on ``host``)."""

    FILE_NAME: ClassVar[str]
    scratch: str
    owner: str
    pid: int
    host: str

    @property
    def path(self) -> Path:
        """``FILE_NAME`` in the scratch directory."""
        return Path(self.scratch) / self.FILE_NAME

    @property
    def process(self) -> Owner:
        """The process that wrote the state (``boot_id`` and the rest where the file has them).

        A record with a field of the wrong type names nobody who could be certainly dead.
        """
        try:
            return Owner.from_json({f: getattr(self, f, None) for f in ("host", "pid", *IDENTITY_FIELDS)})
        except ValueError:
            return Owner(str(getattr(self, "host", "")), 0)

    def owner_gone(self) -> bool:
        """Whether this is a session's export whose process has certainly exited
        (:meth:`fleece.liveness.Owner.certainly_dead`)."""
        return self.owner == "session" and self.process.certainly_dead()


def _me() -> Owner:
    return Owner.current()


@dataclass
class DiskState:
    """One exported disk: the names it was given and what fleece made for it."""

    drive: str
    """The name the user gave (``--drive``)."""
    key: str
    """The node-name-safe key in every ``fleece-…-<key>`` name, and the NBD export name."""
    qdev: str
    src: str
    """The format node the device was attached to, and goes back to."""
    format: str
    size: int
    persistent: bool
    """Whether the new checkpoint bitmap is persistent (not on raw images)."""
    parent: str | None
    level: str
    reason: str | None
    discard: bool


@dataclass
class ExportState(ScratchState):
    """One point-in-time export of one or more disks."""

    FILE_NAME: ClassVar[str] = STATE_FILE

    checkpoint: str
    scratch: str
    socket: str
    nbd_server: bool = False
    """True once fleece has started QEMU's NBD server (and so must stop it)."""
    outcome: str | None = None
    """``commit`` or ``abort`` once tear-down has decided; a cut-short tear-down finishes the same way."""
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=gethostname)
    boot_id: str | None = field(default_factory=lambda: _me().boot_id)
    pid_ns: int | None = field(default_factory=lambda: _me().pid_ns)
    start_time: int | None = field(default_factory=lambda: _me().start_time)
    machine_id: str | None = field(default_factory=lambda: _me().machine_id)
    owner: str = "export"
    """``export``: left up on purpose (``export start``), ended by ``export stop``;
    ``session``: held by the process ``pid`` (a backup or the Python API) for as long as it runs."""
    disks: list[DiskState] = field(default_factory=list)
    transport: dict[str, Any] | None = None
    """Where QEMU's NBD server listens and how it is secured (``ServerTransport.as_dict``);
    None: the unix socket ``socket`` (and state files written before TCP exports existed)."""

    @property
    def server(self) -> ServerTransport:
        """The NBD server's transport."""
        if self.transport:
            return ServerTransport.from_dict(self.transport)
        return ServerTransport(socket=self.socket)

    @classmethod
    def load(cls, scratch: str | Path) -> ExportState | None:
        """The state in ``scratch``, or None if there is none."""
        raw = cls.read(Path(scratch) / STATE_FILE, "fleece export state")
        if raw is None:
            return None
        disks = [DiskState(**d) for d in raw.pop("disks", [])]
        # An older file does not say: unknown, never this process's identity.
        identity = {f: raw.pop(f, None) for f in IDENTITY_FIELDS}
        return cls(disks=disks, **identity, **raw)

    def remove(self) -> None:
        """Delete the file (the last step of a tear-down)."""
        self.path.with_suffix(".tmp").unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)

