"""Checkpoint bitmaps: which parent an export may use, and their life cycle.

A persistent bitmap ``fleece-<point-id>`` on a disk's format node records
every write since that restore point. One export, of point ``NEW`` on top of
``PREV``:

1. before the snapshot point, ``fleece-NEW`` is added (it can only
   over-count: writes between it and the snapshot point are marked but are
   already in the snapshot);
2. after the snapshot point, ``fleece-PREV`` is copied into a disabled,
   transient ``fleece-tmp-<key>`` that the NBD export shows (again only
   over-counts);
3. commit removes ``fleece-PREV`` (and any other checkpoint of the disk);
   abort removes ``fleece-NEW``. ``fleece-PREV`` never stops recording, so an
   abort loses no dirty bit.

Raw images cannot hold persistent bitmaps: there ``fleece-NEW`` is transient
and the chain lives only as long as the QEMU process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleece.errors import BadInput
from fleece.fleecing.graph import Node
from fleece.fleecing.names import checkpoint_bitmap, checkpoint_of, frozen_bitmap
from fleece.fleecing.state import DiskState
from fleece.qmp import QmpSession

LEVELS = ("auto", "full", "incremental")
PERSISTENT_FORMATS = ("qcow2",)
"""Formats that can store persistent dirty bitmaps (QEMU 7.2: only qcow2)."""

ParentOk = Callable[[str, str], bool]


@dataclass(frozen=True)
class LevelChoice:
    """What one disk's export will be: full, or incremental since ``parent``."""

    parent: str | None
    reason: str | None
    """Why the disk is full though an incremental was wanted; None when incremental or asked full."""

    @property
    def level(self) -> str:
        """``full`` or ``incremental``."""
        return "incremental" if self.parent else "full"


def can_persist(fmt: str) -> bool:
    """Whether a checkpoint bitmap on a ``fmt`` image survives a clean QEMU restart."""
    return fmt in PERSISTENT_FORMATS


def choose_level(
    drive: str, src: Node, fmt: str, level: str, parent_ok: ParentOk | None
) -> LevelChoice:
    """Full or incremental for one disk, from its checkpoint bitmaps.

    Incremental needs exactly one usable ``fleece-PREV``: persistent (unless
    the image cannot persist bitmaps), recording, consistent, not busy, and
    accepted by ``parent_ok`` (the backup asks: does the repository hold
    that point with this disk?).
    """
    if level not in LEVELS:
        raise BadInput(f"unknown level {level!r} (expected one of {', '.join(LEVELS)})")
    if level == "full":
        return LevelChoice(None, None)
    names = src.checkpoints
    if not names:
        return LevelChoice(None, f"{drive}: no fleece checkpoint bitmap on node {src.name} (first export)")
    # More than one is a leftover; the preflight refuses before we get here.
    prev = names[0]
    bm = src.bitmap(prev)
    assert bm is not None
    point = checkpoint_of(prev)
    assert point is not None
    why = None
    if bm.inconsistent:
        why = "is inconsistent (QEMU was not shut down cleanly while it was in use)"
    elif not bm.persistent and can_persist(fmt):
        why = "is not persistent"
    elif not bm.recording:
        why = "is disabled (not recording)"
    elif bm.busy:
        why = "is busy (another operation uses it)"
    elif parent_ok is not None and not parent_ok(drive, point):
        why = "does not match a restore point of this disk"
    if why:
        return LevelChoice(None, f"{drive}: checkpoint bitmap {prev} on {src.name} {why}")
    return LevelChoice(point, None)


def _action(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": kind, "data": data}


async def add_checkpoints(session: QmpSession, disks: list[DiskState], point: str) -> None:
    """Add ``fleece-<point>`` on every disk in one transaction (all or none)."""
    await session.execute(
        "transaction",
        {
            "actions": [
                _action("block-dirty-bitmap-add", node=d.src, name=checkpoint_bitmap(point),
                        persistent=d.persistent)
                for d in disks
            ]
        },
    )


async def freeze_parents(session: QmpSession, disks: list[DiskState]) -> None:
    """Copy each incremental disk's ``fleece-PREV`` into its disabled ``fleece-tmp-<key>``."""
    actions = []
    for d in disks:
        if d.parent is None:
            continue
        tmp = frozen_bitmap(d.key)
        # The export needs a disabled bitmap: it must not change while it is read.
        actions.append(_action("block-dirty-bitmap-add", node=d.src, name=tmp, persistent=False,
                               disabled=True))
        actions.append(_action("block-dirty-bitmap-merge", node=d.src, target=tmp,
                               bitmaps=[checkpoint_bitmap(d.parent)]))
    if actions:
        await session.execute("transaction", {"actions": actions})


def bitmaps_to_remove(src: Node, point: str, *, commit: bool) -> list[str]:
    """The checkpoint bitmaps on ``src`` that finishing the export of ``point`` removes.

    Commit keeps only ``fleece-<point>``: the parent it replaces and any
    unusable older one (inconsistent, not persistent) go. Abort removes only
    ``fleece-<point>``. A commit whose new bitmap is gone (QEMU restarted
    meanwhile) removes nothing: the old one is then the only record.
    """
    new = checkpoint_bitmap(point)
    if commit:
        return [b for b in src.checkpoints if b != new] if src.bitmap(new) else []
    return [new] if src.bitmap(new) else []
