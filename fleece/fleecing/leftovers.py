"""Find what a killed fleece run left in QEMU.

A leftover is any node, export or job whose name starts with ``fleece-``, any
non-checkpoint ``fleece-`` bitmap (the frozen copies), and, on a disk with
more than one checkpoint bitmap, every checkpoint but the oldest (a commit
that was cut short; DESIGN.md explains why the oldest is the one to keep).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fleece.fleecing.names import checkpoint_of, is_fleece_name
from fleece.qmp import Disk, QmpSession, list_disks


@dataclass
class Leftovers:
    """What a previous run left behind; empty when QEMU is clean."""

    nodes: list[str] = field(default_factory=list)
    exports: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    bitmaps: list[tuple[str, str]] = field(default_factory=list)
    """(node, bitmap) pairs: frozen copies and surplus checkpoints."""
    attached: list[tuple[str, str]] = field(default_factory=list)
    """(device QOM path, fleece node) pairs: a device still pointing at a filter."""

    def __bool__(self) -> bool:
        return bool(self.nodes or self.exports or self.jobs or self.bitmaps or self.attached)

    def describe(self) -> str:
        """One line naming every leftover."""
        parts = []
        if self.exports:
            parts.append("exports " + ", ".join(self.exports))
        if self.nodes:
            parts.append("nodes " + ", ".join(self.nodes))
        if self.jobs:
            parts.append("jobs " + ", ".join(self.jobs))
        if self.bitmaps:
            parts.append("bitmaps " + ", ".join(f"{n}/{b}" for n, b in self.bitmaps))
        if self.attached:
            parts.append("devices on filters " + ", ".join(d for d, _ in self.attached))
        return "; ".join(parts) or "none"

    def as_dict(self) -> dict[str, list[str]]:
        """JSON-friendly form."""
        return {
            "nodes": self.nodes,
            "exports": self.exports,
            "jobs": self.jobs,
            "bitmaps": [f"{n}/{b}" for n, b in self.bitmaps],
            "attached": [d for d, _ in self.attached],
        }


def surplus_checkpoints(disk: Disk) -> list[str]:
    """Checkpoint bitmaps on ``disk`` other than the oldest (ids sort by time)."""
    names = sorted(b.name for b in disk.bitmaps if checkpoint_of(b.name))
    return names[1:]


async def find_leftovers(session: QmpSession, disks: list[Disk] | None = None) -> Leftovers:
    """Scan QEMU for everything a previous fleece run may have left."""
    found = Leftovers()
    if disks is None:
        disks = await list_disks(session)
    for node in await session.execute("query-named-block-nodes", {"flat": True}):
        name = node.get("node-name")
        if is_fleece_name(name):
            found.nodes.append(name)
        for bm in node.get("dirty-bitmaps", []):
            bname = bm.get("name")
            if is_fleece_name(bname) and not checkpoint_of(bname):
                found.bitmaps.append((name, bname))
    for export in await session.execute("query-block-exports"):
        if is_fleece_name(export.get("id")):
            found.exports.append(export["id"])
    for job in await session.execute("query-jobs"):
        if is_fleece_name(job.get("id")):
            found.jobs.append(job["id"])
    for disk in disks:
        if is_fleece_name(disk.node_name):
            found.attached.append((disk.qdev, disk.node_name))
        found.bitmaps.extend((disk.node_name, b) for b in surplus_checkpoints(disk))
    found.nodes.sort()
    return found
