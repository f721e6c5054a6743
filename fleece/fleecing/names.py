"""The names fleece gives what it creates in QEMU.

Everything carries the ``fleece-`` prefix so that leftovers of a killed run
can be found and removed. Checkpoint bitmaps are ``fleece-<point-id>``;
point ids start with a digit, which no other fleece name does.
"""

from __future__ import annotations

import re

PREFIX = "fleece-"
CHECKPOINT_RE = re.compile(r"^fleece-(\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6})$")


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
    return f"{PREFIX}delta-{key}"


def cbw_node(key: str) -> str:
    return f"{PREFIX}cbw-{key}"


def snapshot_node(key: str) -> str:
    return f"{PREFIX}snap-{key}"


def frozen_bitmap(key: str) -> str:
    return f"{PREFIX}tmp-{key}"


def export_id(key: str) -> str:
    return f"{PREFIX}export-{key}"


def is_fleece_name(name: str | None) -> bool:
    """Whether QEMU object ``name`` was made by fleece."""
    return bool(name) and str(name).startswith(PREFIX)
