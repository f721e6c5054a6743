"""QEMU's block graph as fleece needs to see it, read in one go.

``query-block`` describes a disk by the node its device is attached to; while
an export is up that is fleece's copy-before-write filter, and the format
node's bitmaps only show in ``query-named-block-nodes``. The filter's child
(the format node, ``SRC``) is only named by ``x-debug-query-block-graph``,
which every QEMU since 4.0 has; where it fails, the export's state file names
``SRC`` instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from fleece.errors import ExportError, QmpCommandError
from fleece.fleecing.names import PREFIX, checkpoint_of, is_fleece_name, is_live_name
from fleece.fleecing.state import ExportState
from fleece.qmp import DirtyBitmap, Disk, QmpSession, list_disks
from fleece.qmp.answers import (
    qom_list,
    query_block_exports,
    query_block_graph,
    query_jobs,
    query_named_block_nodes,
)


@dataclass(frozen=True)
class Node:
    """One named block node."""

    name: str
    driver: str
    filename: str
    size: int
    bitmaps: tuple[DirtyBitmap, ...] = ()
    children: tuple[tuple[str, str], ...] = ()
    """(role, child node name) pairs, e.g. ``("file", "fmt-vda")``; empty if unknown."""
    active: bool = True
    """False for a node QEMU inactivated (after a migration); QEMU < 10 does not say."""

    def bitmap(self, name: str) -> DirtyBitmap | None:
        """The named bitmap on this node, if present."""
        return next((b for b in self.bitmaps if b.name == name), None)

    def child(self, role: str) -> str | None:
        """The node attached as ``role`` (``file``, ``target``…), if known."""
        return next((c for r, c in self.children if r == role), None)

    @property
    def checkpoints(self) -> list[str]:
        """Names of the fleece checkpoint bitmaps on this node, oldest first."""
        return sorted(b.name for b in self.bitmaps if checkpoint_of(b.name))


@dataclass
class BlockGraph:
    """Nodes, disks (device → attached node), exports and jobs at one moment."""

    nodes: dict[str, Node]
    disks: list[Disk]
    exports: list[str]
    jobs: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)
    """fleece's QOM objects under ``/objects``: the TLS credentials and authorization of a TCP export."""

    def fleece_nodes(self, kind: str = "") -> list[str]:
        """Our nodes, optionally only ``fleece-<kind>-…`` ones, sorted (a live restore's are not ours)."""
        return sorted(n for n in self.nodes if n.startswith(PREFIX + kind) and not is_live_name(n))

    def live_restore_nodes(self) -> list[str]:
        """Nodes of a live restore in progress (``fleece restore --live``), sorted."""
        return sorted(n for n in self.nodes if is_live_name(n))

    def scratch_dirs(self) -> list[str]:
        """Scratch directories of fleece exports, found through the reverse-delta files."""
        dirs = {os.path.dirname(self.nodes[n].filename) for n in self.fleece_nodes("delta-")}
        return sorted(d for d in dirs if d)


async def read_graph(session: QmpSession) -> BlockGraph:
    """Read the block graph, devices, exports and jobs from QEMU."""
    edges = await _edges(session)
    nodes: dict[str, Node] = {}
    for info in await query_named_block_nodes(session, flat=True):
        name = info.get("node-name")
        if not name:
            continue
        image = info.get("image", {})
        nodes[name] = Node(
            name=name,
            driver=info.get("drv", ""),
            filename=info.get("file", image.get("filename", "")),
            size=int(image.get("virtual-size", 0)),
            # QEMU's own bitmaps (copy-before-write's, for example) have no name.
            bitmaps=tuple(DirtyBitmap.from_qmp(b) for b in info.get("dirty-bitmaps", []) if b.get("name")),
            children=tuple(edges.get(name, ())),
            active=info.get("active", True) is not False,
        )
    exports = sorted(e["id"] for e in await query_block_exports(session))
    jobs = [j["id"] for j in await query_jobs(session)]
    objects = sorted(o["name"] for o in await qom_list(session, "/objects")
                     if is_fleece_name(o.get("name")) and str(o.get("type", "")).startswith("child<"))
    return BlockGraph(
        nodes=nodes,
        disks=await list_disks(session),
        exports=exports,
        jobs=jobs,
        objects=objects,
    )


async def _edges(session: QmpSession) -> dict[str, list[tuple[str, str]]]:
    """node name → [(role, child name)], from the debug graph; empty if QEMU lacks it."""
    try:
        graph = await query_block_graph(session)
    except QmpCommandError:
        return {}
    names = {n["id"]: n["name"] for n in graph.get("nodes", []) if n.get("type") == "block-driver"}
    edges: dict[str, list[tuple[str, str]]] = {}
    for e in graph.get("edges", []):
        parent, child = names.get(e["parent"]), names.get(e["child"])
        if parent and child:
            edges.setdefault(parent, []).append((e["name"], child))
    return edges


def filter_source(graph: BlockGraph, cbw: str) -> str | None:
    """The format node below fleece filter ``cbw`` (the disk's ``SRC``), if QEMU says."""
    node = graph.nodes.get(cbw)
    child = node.child("file") if node else None
    return child if child and not is_fleece_name(child) else None


def format_node(graph: BlockGraph, disk: Disk) -> Node | None:
    """The node a disk's checkpoints live on: its attached node, or the one below fleece's filter."""
    name = filter_source(graph, disk.node_name) if is_fleece_name(disk.node_name) else disk.node_name
    return graph.nodes.get(name) if name else None


def export_states(graph: BlockGraph) -> list[ExportState]:
    """The state files of the exports whose reverse deltas are in QEMU (unreadable ones skipped)."""
    states = []
    for scratch in graph.scratch_dirs():
        try:
            state = ExportState.load(scratch)
        except ExportError:
            continue
        if state:
            states.append(state)
    return states
