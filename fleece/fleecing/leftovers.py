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

:func:`ownership` says who left them (docs/design.md §3.2): the export state
files name their owner, and only leftovers of a ``session`` whose process
has certainly exited may be removed without being asked to
(:func:`fleece.fleecing.teardown.heal_dead_run`). Every refusal names the
command that ends what it found, shell-quoted (:func:`cleanup_command`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from fleece.errors import ExportError, FleeceError, LeftoversPresent
from fleece.fleecing.graph import BlockGraph, export_states, read_graph
from fleece.fleecing.names import (
    cbw_node,
    checkpoint_of,
    delta_node,
    export_id,
    is_fleece_name,
    snapshot_node,
)
from fleece.fleecing.state import ExportState
from fleece.qmp import Disk, QmpSession
from fleece.qmp.session import Address


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


def qmp_spec(address: Address) -> str:
    """``--qmp``'s spelling of a QMP address (a unix path, or ``HOST:PORT``)."""
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


def cleanup_command(qmp: Address) -> str:
    """``fleece cleanup --qmp SOCKET``, ready to paste into a shell."""
    return shlex.join(["fleece", "cleanup", "--qmp", qmp_spec(qmp)])


def stop_command(qmp: Address, *more: str) -> str:
    """``fleece export stop --qmp SOCKET …``, ready to paste into a shell."""
    return shlex.join(["fleece", "export", "stop", "--qmp", qmp_spec(qmp), *more])


@dataclass
class Ownership:
    """Who left the leftovers in one QEMU, as the export state files say."""

    left: Leftovers
    states: list[ExportState]
    """Every export state the reverse-delta nodes lead to."""
    unexplained: list[str]
    """Leftovers no state file accounts for (a run that left no readable state)."""
    exporting: bool
    """Whether an NBD export is up (the export is live, not a tear-down cut short)."""

    @property
    def live_owner(self) -> ExportState | None:
        """A ``session`` (a backup, the Python API) that may still be running."""
        return next((s for s in self.states if s.owner == "session" and not s.owner_gone()), None)

    @property
    def left_up(self) -> ExportState | None:
        """An export left up on purpose by ``fleece export start``."""
        return next((s for s in self.states if s.owner == "export"), None)

    @property
    def certainly_dead(self) -> bool:
        """Everything here was left by sessions whose processes have certainly exited."""
        return bool(self.left and self.states and not self.unexplained
                    and all(s.owner == "session" and s.owner_gone() for s in self.states))

    def refusal(self, qmp: Address) -> FleeceError:
        """The error for finding all this in the way: what it is, whose, and the command that ends it."""
        live = self.live_owner
        if live is not None:
            return ExportError(
                f"fleece pid {live.pid} on {live.host} is exporting this VM now (checkpoint "
                f"{live.checkpoint}, drives {_drives(live)}), probably a backup: wait for it to end; "
                f"if that process is gone, run: {cleanup_command(qmp)}; nothing was changed")
        up = self.left_up
        if up is not None and up.outcome is None and self.exporting:
            return ExportError(
                f"a fleece export is already up in this QEMU (checkpoint {up.checkpoint}, drives "
                f"{_drives(up)}), left up by 'fleece export start'; end it with: {stop_command(qmp)}; "
                "nothing was changed")
        dead = next((s for s in self.states if s.owner == "session"), None)
        if dead is not None:
            return LeftoversPresent(
                f"fleece pid {dead.pid} on {dead.host}, which has exited, left its export in QEMU "
                f"(checkpoint {dead.checkpoint}, drives {_drives(dead)}); remove it with: "
                f"{cleanup_command(qmp)}"
                + ("" if self.unexplained else " (the next fleece backup does that by itself)")
                + "; nothing was changed")
        return LeftoversPresent(f"an earlier fleece run left {self.left.describe()}; remove them "
                                f"with: {cleanup_command(qmp)}; nothing was changed")


def ownership(graph: BlockGraph) -> Ownership:
    """Who left what ``graph`` shows (nothing is changed)."""
    left = leftovers_in(graph)
    states = export_states(graph)
    left.nbd_server = [s.server.address for s in states if s.nbd_server]
    keys = {d.key for s in states for d in s.disks}
    names = {n for k in keys for n in (delta_node(k), cbw_node(k), snapshot_node(k))}
    srcs = {d.src for s in states for d in s.disks}
    qdevs = {d.qdev for s in states for d in s.disks}
    unexplained = [n for n in left.nodes if n not in names]
    unexplained += [e for e in left.exports if e not in {export_id(k) for k in keys}]
    unexplained += [f"{n}/{b}" for n, b in left.bitmaps if n not in srcs]
    unexplained += [d for d, _ in left.attached if d not in qdevs]
    unexplained += left.jobs + ([] if states else left.objects)
    return Ownership(left, states, unexplained, exporting=bool(left.exports))


def _drives(state: ExportState) -> str:
    return ", ".join(d.drive for d in state.disks)
