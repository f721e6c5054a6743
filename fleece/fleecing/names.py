"""The names fleece gives what it creates in QEMU.

Everything carries the ``fleece-`` prefix so that leftovers of a killed run
can be found and removed. Checkpoint bitmaps are ``fleece-<point-id>``;
point ids start with a digit, which no other fleece name does.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

PREFIX = "fleece-"
LIVE_PREFIX = "fleece-live-"
"""Objects of a live restore (``fleece restore --live``): its own, resumed by ``--resume``,
never taken for an export's leftovers (see ``fleece.restore.live``)."""
STATE_FILE = "fleece-export.json"
"""The export's state file in its scratch directory (see ``fleece.fleecing.state``)."""
SOCKET_FILE = "nbd.sock"
"""QEMU's NBD server socket in the scratch directory; short, unix socket paths are ≤ 107 bytes."""
TLS_CREDS_OBJECT = PREFIX + "tls-creds"
"""The ``tls-creds-x509``/``tls-creds-psk`` object of a TCP export (QEMU has one NBD server)."""
AUTHZ_OBJECT = PREFIX + "tls-authz"
"""The ``authz-simple`` object that lets only one client identity in."""
CHECKPOINT_RE = re.compile(r"^fleece-(\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6})$")


def new_point_id(now: datetime | None = None) -> str:
    """A fresh point id: UTC to the microsecond, then 6 random hex digits.

    ``20261123T073600.123456Z-3f9a1c``. Ids sort by time (the tail only
    breaks ties between hosts), which is what picks the older checkpoint.
    """
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ") + "-" + secrets.token_hex(3)


def checkpoint_bitmap(point_id: str) -> str:
    """The persistent bitmap that records writes since restore point ``point_id``."""
    return PREFIX + point_id


def checkpoint_of(bitmap: str) -> str | None:
    """The point id a checkpoint bitmap name stands for, or None if it is not one."""
    m = CHECKPOINT_RE.match(bitmap)
    return m.group(1) if m else None


def node_key(disk_name: str) -> str:
    """A node-name-safe form of a disk name (QEMU node names: letters, digits, -, _, .)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", disk_name)[:24]


def delta_node(key: str) -> str:
    """The ``file`` node of the reverse-delta image of disk ``key``."""
    return f"{PREFIX}delta-{key}"


def cbw_node(key: str) -> str:
    """The copy-before-write filter above disk ``key``."""
    return f"{PREFIX}cbw-{key}"


def snapshot_node(key: str) -> str:
    """The snapshot-access node that the NBD export of disk ``key`` reads."""
    return f"{PREFIX}snap-{key}"


def frozen_bitmap(key: str) -> str:
    """The disabled, transient copy of the parent checkpoint that an incremental export shows."""
    return f"{PREFIX}tmp-{key}"


def export_id(key: str) -> str:
    """The ``block-export-add`` id of disk ``key`` (the NBD export name is ``key`` itself)."""
    return f"{PREFIX}export-{key}"


def delta_file(key: str) -> str:
    """File name of the reverse-delta image of disk ``key`` in the scratch directory."""
    return f"delta-{key}.raw"


def dirty_bitmap_context(bitmap: str) -> str:
    """The NBD meta-context under which QEMU exports ``bitmap``."""
    return f"qemu:dirty-bitmap:{bitmap}"


def is_fleece_name(name: str | None) -> bool:
    """Whether QEMU object ``name`` was made by fleece's export (a live restore's are not)."""
    return bool(name) and str(name).startswith(PREFIX) and not is_live_name(name)


def is_live_name(name: str | None) -> bool:
    """Whether QEMU object ``name`` belongs to a live restore in progress."""
    return bool(name) and str(name).startswith(LIVE_PREFIX)
