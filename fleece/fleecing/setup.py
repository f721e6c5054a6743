"""Set up a point-in-time export of one or more disks (docs/design.md §2.2).

Preflight changes nothing and refuses early: unknown drives, leftovers, an
export already up, an incremental that cannot be honoured. Then, for every
disk: a sparse reverse-delta file, a ``copy-before-write`` filter on the
format node writing into it (``on-cbw-error: break-snapshot``: a full delta
breaks the snapshot, never the guest's write), the new checkpoint bitmap,
the snapshot point (every device's ``qom-set`` inside one ``stop``…``cont``),
the frozen copy of the parent checkpoint, a ``snapshot-access`` node and one
NBD export. QEMU's NBD server is started first: if one is already running,
fleece did not start it, and nothing has been changed yet.

A failure at any step undoes exactly what was done, through the same
tear-down that ``fleece export stop`` uses, and re-raises.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fleece.errors import BadInput, ExportError, FleeceError, LeftoversPresent, QmpCommandError
from fleece.fleecing.checkpoints import ParentOk, add_checkpoints, can_persist, choose_level, freeze_parents
from fleece.fleecing.graph import BlockGraph, export_states, read_graph
from fleece.fleecing.leftovers import leftovers_in
from fleece.fleecing.names import (
    CHECKPOINT_RE,
    SOCKET_FILE,
    cbw_node,
    checkpoint_bitmap,
    delta_file,
    delta_node,
    export_id,
    frozen_bitmap,
    new_point_id,
    node_key,
    snapshot_node,
)
from fleece.fleecing.qga import GuestAgent
from fleece.fleecing.request_bound import refuse_unbounded_reader
from fleece.fleecing.state import DiskState, ExportState
from fleece.fleecing.teardown import tear_down
from fleece.fleecing.transport import ServerTransport, link_psk
from fleece.fleecing.vm_checks import refuse_inactive_disks, refuse_unsafe_iothreads
from fleece.qmp import Disk, QmpSession, resolve_drive
from fleece.qmp.answers import query_status
from fleece.testing import Phase, pause_point

MIN_QEMU = (7, 1, 0)
"""``snapshot-access`` and ``on-cbw-error`` appeared in QEMU 7.1."""
CBW_TIMEOUT_SINCE = (9, 1, 0)
"""First QEMU whose ``cbw-timeout`` is safe above 4 s."""
CBW_TIMEOUT_SECONDS = 10
"""How long a guest write may wait for its old data to reach the reverse delta before the
snapshot breaks instead (the backup then fails; the guest never sees an error). Well below
the 30 s after which a Linux guest starts its own SCSI error handling."""
MAX_SOCKET_PATH = 107
"""Longest unix socket path (sun_path is 108 bytes with the NUL)."""

Log = Callable[[str], None]
_log = logging.getLogger(__name__)


@dataclass
class SetUp:
    """What a successful set-up made: the state, the disks as found, the pause."""

    state: ExportState
    disks: list[Disk]
    pause_ms: float | None
    qemu_version: tuple[int, int, int]


def default_scratch_parent() -> Path:
    """``$TMPDIR`` or ``/var/tmp``: reverse deltas can grow large, ``/tmp`` is often a small tmpfs."""
    return Path(os.environ.get("TMPDIR") or "/var/tmp")


async def set_up(
    session: QmpSession,
    drives: list[str],
    *,
    checkpoint: str | None,
    level: str,
    parent_ok: ParentOk | None,
    discard: bool,
    scratch_dir: Path | None,
    qga: str | None,
    log: Log,
    owner: str = "export",
    transport: ServerTransport | None = None,
    bounded_requests: bool = False,
) -> SetUp:
    """Make the export live; on failure undo everything and raise.

    ``transport`` is where QEMU's NBD server listens (default: a unix socket
    in the scratch directory; see :mod:`fleece.fleecing.transport`).
    ``bounded_requests``: the reader keeps every request inside one
    ``max_request`` block; QEMU < 8.0 is refused without it
    (:mod:`fleece.fleecing.request_bound`).
    """
    version = await session.qemu_version()
    if version < MIN_QEMU:
        raise ExportError(f"QEMU {'.'.join(map(str, version))} is too old: fleece needs 7.1 or later "
                          "(snapshot-access); nothing was changed")
    refuse_unbounded_reader(version, bounded_requests)
    graph = await read_graph(session)
    _refuse_leftovers(graph)
    point = checkpoint or new_point_id()
    if not CHECKPOINT_RE.match(checkpoint_bitmap(point)):
        raise BadInput(f"checkpoint id {point!r} is not of the form 20261123T073600.123456Z-3f9a1c")
    disks = await _preflight_disks(session, graph, drives)
    await refuse_unsafe_iothreads(session, disks, version)
    plans = _plan(graph, disks, drives, point, level, parent_ok, discard, log)

    scratch = _make_scratch(scratch_dir)
    state = ExportState(checkpoint=point, scratch=str(scratch), socket=str(scratch / SOCKET_FILE),
                        owner=owner, disks=plans,
                        transport=transport.as_dict() if transport and transport.is_tcp else None)
    agent = None
    try:
        # Reached before any change in QEMU, so that a wrong socket changes nothing.
        agent = await GuestAgent.connect(qga) if qga else None
        state.save()
        await _start_nbd_server(session, state)
        for d in plans:
            await _insert_filter(session, state, d, version)
        await add_checkpoints(session, plans, point)
        pause_ms = await _snapshot_point(session, plans, agent, log)
        await freeze_parents(session, plans)
        for d in plans:
            await _add_export(session, d)
    except BaseException as exc:
        # Undo exactly what was done: every fleece object in QEMU is ours
        # (the preflight found none), and abort removes only fleece-NEW.
        try:
            await tear_down(session, state=state, commit=False, log=log)
        except FleeceError as undo:
            exc.add_note(f"undo incomplete: {undo}")
            log(f"undo of the failed set-up incomplete: {undo}")
        raise
    finally:
        if agent:
            await agent.close()
    # Said once the export is live: a failed set-up has only its error to say.
    _announce(plans, point, log)
    return SetUp(state, disks, pause_ms, version)


async def preflight(session: QmpSession, drives: list[str], scratch_dir: Path | None) -> None:
    """Refuse now what :func:`set_up` would refuse before changing anything; changes nothing.

    For a caller that must make a change of its own first, but only if the
    export can be set up (``fleece backup`` creating a repository).
    """
    graph = await read_graph(session)
    _refuse_leftovers(graph)
    disks = await _preflight_disks(session, graph, drives)
    await refuse_unsafe_iothreads(session, disks, await session.qemu_version())
    _make_scratch(scratch_dir).rmdir()


def _refuse_leftovers(graph: BlockGraph) -> None:
    if graph.live_restore_nodes():
        raise ExportError(
            "a live restore (fleece restore --live) is streaming into this VM (nodes "
            f"{', '.join(graph.live_restore_nodes())}); back it up once the stream has finished; "
            "nothing was changed")
    left = leftovers_in(graph)
    if not left:
        return
    for state in export_states(graph):
        if state.outcome is None and graph.exports:
            drives = ", ".join(d.drive for d in state.disks)
            if state.owner_gone():
                raise LeftoversPresent(
                    f"fleece pid {state.pid}, which has exited, left its export up (checkpoint "
                    f"{state.checkpoint}, drives {drives}); remove it with 'fleece cleanup' "
                    "first; nothing was changed")
            if state.owner == "session":
                raise ExportError(
                    f"fleece pid {state.pid} on {state.host} is exporting this VM now (checkpoint "
                    f"{state.checkpoint}, drives {drives}), probably a backup; wait for it to end, "
                    "or if it is gone run 'fleece cleanup'; nothing was changed")
            raise ExportError(
                f"a fleece export is already up in this QEMU (checkpoint {state.checkpoint}, drives "
                f"{drives}); end it with 'fleece export stop' first; nothing was changed")
    raise LeftoversPresent(f"an earlier fleece run left {left.describe()}; remove them with "
                           "'fleece cleanup' first; nothing was changed")


async def _preflight_disks(session: QmpSession, graph: BlockGraph, drives: list[str]) -> list[Disk]:
    if not drives:
        raise BadInput("no --drive given")
    disks = [resolve_drive(graph.disks, name) for name in drives]
    seen: dict[str, str] = {}
    for name, disk in zip(drives, disks, strict=True):
        if disk.qdev in seen:
            raise BadInput(f"--drive {name} and --drive {seen[disk.qdev]} are the same disk")
        seen[disk.qdev] = name
        attached = await session.execute("qom-get", {"path": disk.qdev, "property": "drive"})
        if attached != disk.node_name or disk.node_name not in graph.nodes:
            raise ExportError(f"device {disk.qdev} is attached to {attached!r}, not to {disk.node_name!r} "
                              "as query-block says; nothing was changed")
    await refuse_inactive_disks(session, graph, disks)
    return disks


def _plan(graph: BlockGraph, disks: list[Disk], drives: list[str], point: str, level: str,
          parent_ok: ParentOk | None, discard: bool, log: Log) -> list[DiskState]:
    """Decide, per disk, every name and the level; raise before any change if ``incremental`` cannot be."""
    plans: list[DiskState] = []
    keys: set[str] = set()
    refused = []
    for name, disk in zip(drives, disks, strict=True):
        key = node_key(name)
        while key in keys:
            key += "_"
        keys.add(key)
        src = graph.nodes[disk.node_name]
        choice = choose_level(name, src, disk.format, level, parent_ok)
        if choice.parent and choice.parent >= point:
            raise BadInput(f"checkpoint id {point} does not sort after {name}'s parent {choice.parent}")
        if level == "incremental" and choice.reason:
            refused.append(choice.reason)
        plans.append(DiskState(
            drive=name, key=key, qdev=disk.qdev, src=disk.node_name, format=disk.format,
            size=src.size or disk.virtual_size, persistent=can_persist(disk.format),
            parent=choice.parent, level=choice.level, reason=choice.reason, discard=discard,
        ))
    if refused:
        raise ExportError(f"incremental export impossible: {'; '.join(refused)}; nothing was changed")
    return plans


def _announce(plans: list[DiskState], point: str, log: Log) -> None:
    """Say loudly which disks go full and why, and where a chain cannot outlive QEMU."""
    for d in plans:
        if d.reason:
            log(f"full because {d.reason}")
        if not d.persistent:
            log(f"{d.drive}: a {d.format} image cannot hold persistent bitmaps: its checkpoint "
                f"{checkpoint_bitmap(point)} lives only while this QEMU process runs")


def _make_scratch(parent: Path | None) -> Path:
    """A private (0700) directory for the reverse deltas, the NBD socket and the state file."""
    parent = parent or default_scratch_parent()
    try:
        scratch = Path(tempfile.mkdtemp(prefix="fleece-", dir=parent))
    except OSError as exc:
        raise BadInput(f"cannot make a scratch directory in {parent}: {exc.strerror}; "
                       "nothing was changed") from None
    socket = scratch / SOCKET_FILE
    if len(os.fsencode(socket)) > MAX_SOCKET_PATH:
        scratch.rmdir()
        raise BadInput(f"scratch directory {parent} is too deep for a unix socket path "
                       f"({len(os.fsencode(socket))} > {MAX_SOCKET_PATH} bytes); nothing was changed")
    return scratch


async def _start_nbd_server(session: QmpSession, state: ExportState) -> None:
    server = state.server
    # The TLS objects are named fleece-…: a failure from here on, or a kill,
    # leaves them for the tear-down and `fleece cleanup` to find.
    for obj in server.qemu_objects(link_psk(server, Path(state.scratch))):
        await session.execute("object-add", obj)
    try:
        await session.execute("nbd-server-start", server.nbd_server_start())
    except QmpCommandError as exc:
        if "already running" in exc.desc:
            # QEMU has one NBD server; fleece's own would have been found as a leftover.
            raise ExportError("an NBD server that fleece did not start is already running in this QEMU; "
                              "fleece will not take it over; nothing was changed") from None
        if "No such file or directory" in exc.desc and os.path.isdir(state.scratch):
            # It exists for us: QEMU looks at another /tmp (a systemd unit's PrivateTmp=yes).
            raise ExportError(
                f"QEMU cannot see the scratch directory {state.scratch} that fleece made: they run "
                "in different mount namespaces (a systemd unit with PrivateTmp=yes?); set "
                "scratch_dir (--scratch-dir) to a directory both see, outside /tmp and /var/tmp; "
                "nothing was changed") from None
        raise
    state.nbd_server = True
    state.save()


async def _insert_filter(session: QmpSession, state: ExportState, d: DiskState,
                         version: tuple[int, int, int]) -> None:
    """The reverse-delta file and node, and the copy-before-write filter on ``SRC`` (not yet attached)."""
    path = Path(state.scratch) / delta_file(d.key)
    try:
        # Sparse: only clusters the guest overwrites during the export take space.
        with open(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), "wb") as f:
            f.truncate(d.size)
    except OSError as exc:
        raise ExportError(f"cannot create reverse delta {path}: {exc.strerror}") from None
    await session.execute("blockdev-add", {"driver": "file", "node-name": delta_node(d.key),
                                           "filename": str(path), "discard": "unmap"})
    await session.execute("blockdev-add", copy_before_write_options(d, version))


def copy_before_write_options(d: DiskState, version: tuple[int, int, int]) -> dict[str, object]:
    """``blockdev-add`` arguments of ``d``'s copy-before-write filter on QEMU ``version``.

    From 9.1 on, ``cbw-timeout``: a guest write waits at most that long for
    its copy into the reverse delta (a stalled scratch disk), then the
    snapshot breaks and the write goes on. Older QEMU (7.2 included) keeps it
    unset: its timeout arithmetic wraps around above 4 s.
    """
    # discard: unmap passes the guest's discards on to SRC (whose own discard
    # option then decides, as without the filter), after the filter has
    # copied the old data away; QEMU's default (ignore) would drop them
    # silently while the export is up (docs/design.md §2.4).
    options: dict[str, object] = {"driver": "copy-before-write", "node-name": cbw_node(d.key),
                                  "file": d.src, "target": delta_node(d.key),
                                  "on-cbw-error": "break-snapshot", "discard": "unmap"}
    if version >= CBW_TIMEOUT_SINCE:
        options["cbw-timeout"] = CBW_TIMEOUT_SECONDS
    return options


async def _snapshot_point(session: QmpSession, plans: list[DiskState], agent: GuestAgent | None,
                          log: Log) -> float | None:
    """Attach every device to its filter at one point in time; the guest pause in ms, if any."""
    try:
        if agent:
            log(f"froze {await agent.freeze()} guest filesystems")
            pause_point(Phase.GUEST_FROZEN)
        running = (await query_status(session)).get("status") == "running"
        started = time.perf_counter()
        stopped = False
        try:
            if running:
                # Never resume a VM we did not pause: stop/cont only when it was running.
                await session.execute("stop")
                stopped = True
            for d in plans:
                # The device is on SRC (checked in preflight); qom-set to the node
                # it already has would abort QEMU 7.2, to the filter is safe.
                await session.execute("qom-set", {"path": d.qdev, "property": "drive",
                                                  "value": cbw_node(d.key)})
        finally:
            if stopped:
                await session.execute("cont")
        return (time.perf_counter() - started) * 1000 if stopped else None
    finally:
        if agent:
            await _thaw(agent, log)


async def _thaw(agent: GuestAgent, log: Log) -> None:
    for attempt in (1, 2):
        try:
            log(f"thawed {await agent.thaw()} guest filesystems")
            return
        except ExportError as exc:
            if attempt == 2:
                raise ExportError(f"{exc}: the guest's filesystems may still be frozen; run "
                                  "'guest-fsfreeze-thaw' through the guest agent") from None


async def _add_export(session: QmpSession, d: DiskState) -> None:
    snap: dict[str, object] = {"driver": "snapshot-access", "node-name": snapshot_node(d.key),
                               "file": cbw_node(d.key)}
    if d.discard:
        snap["discard"] = "unmap"
    await session.execute("blockdev-add", snap)
    export: dict[str, object] = {"type": "nbd", "id": export_id(d.key), "node-name": snapshot_node(d.key),
                                 "name": d.key, "writable": d.discard}
    if d.parent:
        # The exported bitmap must be disabled and named as {node, name} (docs/design.md §2.4).
        export["bitmaps"] = [{"node": d.src, "name": frozen_bitmap(d.key)}]
    await session.execute("block-export-add", export)
