"""Find what a killed fleece run left in QEMU.

A leftover is any node, export, job or QOM object (a TCP export's TLS
credentials and authorization) whose name starts with ``fleece-``, a
device still reading through a fleece filter, any non-checkpoint ``fleece-``
bitmap (the frozen copies), an NBD server that an unfinished export's state
file says fleece started, and, on a node with more than one checkpoint
bitmap, every checkpoint but the oldest (a commit that was cut short;
docs/design.md §3.3 explains why the oldest is the one to keep).

Bitmaps are read per node from ``query-named-block-nodes``, not from
``query-block``: while a device points at a filter, ``query-block`` shows the
filter's bitmaps, and the format node's checkpoints would be missed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fleece.fleecing.graph import BlockGraph, export_states, read_graph
from fleece.fleecing.names import checkpoint_of, is_fleece_name
from fleece.qmp import Disk, QmpSession


@dataclass
class Leftovers:
    """What a previous run left behind (or what a clean-up removed); empty when none."""

    nodes: list[str] = field(default_factory=list)
    exports: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    bitmaps: list[tuple[str, str]] = field(default_factory=list)
    """(node, bitmap) pairs: frozen copies and surplus checkpoints."""
    attached: list[tuple[str, str]] = field(default_factory=list)
    """(device QOM path, fleece node) pairs: a device still pointing at a filter."""
    nbd_server: list[str] = field(default_factory=list)
    """Socket (or TCP address) of an NBD server that fleece started and did not stop."""
    objects: list[str] = field(default_factory=list)
    """QOM objects (``/objects/fleece-…``): a TCP export's TLS credentials and authorization."""

    def __bool__(self) -> bool:
        return bool(self.nodes or self.exports or self.jobs or self.bitmaps or self.attached
                    or self.nbd_server or self.objects)

    def describe(self) -> str:
        """One line naming every leftover."""
        parts = []
        if self.exports:
            parts.append("exports " + ", ".join(self.exports))
        if self.nbd_server:
            parts.append("NBD server on " + ", ".join(self.nbd_server))
        if self.objects:
            parts.append("objects " + ", ".join(self.objects))
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
            "nbd_server": self.nbd_server,
            "objects": self.objects,
        }


def leftovers_in(graph: BlockGraph) -> Leftovers:
    """The leftovers visible in ``graph`` (without reading state files)."""
    found = Leftovers()
    found.nodes = graph.fleece_nodes()
    found.exports = [e for e in graph.exports if is_fleece_name(e)]
    found.jobs = [j for j in graph.jobs if is_fleece_name(j)]
    found.objects = list(graph.objects)
    for name, node in sorted(graph.nodes.items()):
        found.bitmaps.extend(
            (name, b.name) for b in node.bitmaps if is_fleece_name(b.name) and not checkpoint_of(b.name)
        )
        found.bitmaps.extend((name, b) for b in node.checkpoints[1:])
    found.attached = [(d.qdev, d.node_name) for d in graph.disks if is_fleece_name(d.node_name)]
    return found


async def find_leftovers(session: QmpSession, disks: list[Disk] | None = None) -> Leftovers:
    """Scan QEMU (and the state files its reverse deltas lead to) for leftovers.

    ``disks`` is accepted for callers that already listed them; the scan
    reads its own consistent view.
    """
    del disks
    graph = await read_graph(session)
    found = leftovers_in(graph)
    found.nbd_server = [s.server.address for s in export_states(graph) if s.nbd_server]
    return found
