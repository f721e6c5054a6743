"""What a live restore calls what it makes in QEMU, and what it made, kept for ``--resume``.

A live restore (:mod:`fleece.restore.live`) may be cut short with the VM
already running on its new image: fleece killed, its NBD server gone, a
read error. QEMU shows most of what is left (every node it added is named,
the NBD node names the server's socket), but not which nodes were the
placeholder to delete at the end, nor which point and output belong to the
disk. So each disk has a small JSON file beside its server's socket, in the
live restore's private (0700) scratch directory: ``<dir>/<key>.sock`` and
``<dir>/<key>.json``. It is found again through QEMU: the socket path of the
``fleece-live-nbd-…`` node leads to it.

Format (version 1)::

    {"version": 1, "drive", "key", "qdev", "output", "size", "node",
     "file_node", "nbd_node", "placeholder": [NODE, …], "vm", "point",
     "socket", "pid", "host"}
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from socket import gethostname
from typing import Any
from urllib.parse import unquote

from fleece.errors import FleeceError
from fleece.fleecing.names import LIVE_PREFIX
from fleece.fleecing.state import StateFile


def job_id(key: str) -> str:
    """The ``block-stream`` job of disk ``key``."""
    return f"{LIVE_PREFIX}{key}"


def cor_node(key: str) -> str:
    """The copy-on-read filter the stream job puts above the qcow2 node."""
    return f"{LIVE_PREFIX}cor-{key}"


def new_nbd_node(key: str) -> str:
    """A fresh name for the NBD node of disk ``key`` (each resume adds a new one)."""
    return f"{LIVE_PREFIX}nbd-{key}-{secrets.token_hex(2)}"


@dataclass
class LiveDisk(StateFile):
    """One disk being live-restored: its names in QEMU and where its data comes from."""

    drive: str
    """The disk's name in the restore point."""
    key: str
    """Node-name-safe key in every ``fleece-live-…-<key>`` name and in the state file's name."""
    qdev: str
    """QOM path of the device that runs on the new image."""
    output: str
    """Absolute path of the qcow2 image being filled."""
    size: int
    node: str
    """The qcow2 node of the output (stays when the stream is done)."""
    file_node: str
    """Its ``file`` node (stays too)."""
    nbd_node: str
    """The NBD node reading the point (the qcow2 node's backing until the stream is done)."""
    placeholder: list[str]
    """Nodes the device was attached to before, top first; deleted at the end."""
    vm: str
    point: str
    socket: str
    """The unix socket of the server of this disk's point (nbdkit)."""
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=gethostname)

    @property
    def server_dir(self) -> Path:
        """nbdkit's private directory (its pid file), beside the socket."""
        return Path(self.socket).with_suffix(".nbdkit")

    @property
    def path(self) -> Path:
        """Where this state is stored: beside the socket."""
        return Path(self.socket).with_suffix(".json")

    def remove(self) -> None:
        """Delete the file (and a socket its dead server left), then the scratch directory once empty."""
        self.path.unlink(missing_ok=True)
        Path(self.socket).unlink(missing_ok=True)
        shutil.rmtree(self.server_dir, ignore_errors=True)  # left by a server killed with fleece
        with contextlib.suppress(OSError):  # other disks' files are still there
            self.path.parent.rmdir()

    @classmethod
    def load(cls, path: Path) -> LiveDisk:
        """Read a state file; a missing or foreign one is a :class:`FleeceError`."""
        raw = cls.read(path, "fleece live-restore state")
        if raw is None:
            raise FleeceError(f"cannot read the live restore's state {path}: it is gone; "
                              "nothing was changed")
        return cls(**raw)


_SOCKET_RE = re.compile(r"[?&]socket=([^&]+)")


def socket_of(filename: str) -> str | None:
    """The unix socket an NBD node connects to, from its ``query-named-block-nodes`` filename.

    QEMU shows ``nbd+unix://?socket=PATH`` (7.2) or a ``json:{…}`` description.
    """
    if filename.startswith("json:"):
        try:
            opts: dict[str, Any] = json.loads(filename[5:])
        except ValueError:
            return None
        path = opts.get("server.path") or (opts.get("server") or {}).get("path")
        return str(path) if path else None
    m = _SOCKET_RE.search(filename)
    return unquote(m.group(1)) if m else None
