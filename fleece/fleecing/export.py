"""The point-in-time export, as a Python API: what ``fleece backup`` and vendors use.

::

    async with QmpSession.open("/run/vm.qmp") as qmp:
        async with point_in_time_export(qmp, ["vda", "vdb"]) as export:
            for disk in export.disks:
                read(disk.uri, disk.dirty_bitmap)   # libnbd, many requests in flight
        # normal exit: torn down, fleece-<export.checkpoint> is now each disk's checkpoint

Leaving the ``async with`` normally tears the export down and commits the
checkpoint bitmaps (the parent is removed; the new one records from now on).
An exception, ``KeyboardInterrupt`` or cancellation tears down and aborts (the
new bitmap is removed; the parent never stopped recording), then re-raises.

``start_export`` and ``stop_export`` are the two halves for callers that do
not hold one process open across the export (``fleece export start/stop``);
``cleanup`` removes what a killed run left.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleece.errors import ExportError, FleeceError
from fleece.fleecing.checkpoints import ParentOk
from fleece.fleecing.graph import export_states, read_graph
from fleece.fleecing.leftovers import Leftovers
from fleece.fleecing.names import checkpoint_bitmap, dirty_bitmap_context, export_id, frozen_bitmap
from fleece.fleecing.request_bound import CBW_CLUSTER, max_request, parse_qemu_version
from fleece.fleecing.setup import SetUp, set_up
from fleece.fleecing.state import ExportState
from fleece.fleecing.teardown import tear_down
from fleece.fleecing.transport import ServerTransport
from fleece.qmp import Disk, QmpSession

TRIM_ALIGNMENT = 65536
"""The copy-before-write cluster: an NBD trim not aligned to it aborts QEMU < 9.0 (docs/design.md §2.4).
Kept on later versions too: a smaller trim frees nothing in the reverse delta."""

_log = logging.getLogger(__name__)


@dataclass
class DiskExport:
    """One disk of a live export."""

    drive: str
    """The name the user gave (``--drive``)."""
    disk: Disk
    """The disk as QEMU described it before the export (node name, device, format, size)."""
    uri: str
    """``nbd+unix:///<export name>?socket=<path>``, or ``nbds://HOST:PORT/<export name>`` on TCP."""
    export_name: str
    size: int
    """Virtual size in bytes."""
    dirty_bitmap: str | None
    """NBD meta context of the writes since ``since``: ``qemu:dirty-bitmap:fleece-tmp-<key>``.
    None for full."""
    checkpoint: str
    """The point id of this export; its bitmap ``fleece-<checkpoint>`` records writes from now on."""
    since: str | None
    """The parent checkpoint id of an incremental; None for full."""
    level: str
    """``full`` or ``incremental``."""
    reason: str | None
    """Why this disk is full though an incremental was wanted (also logged)."""
    discard: bool
    """Whether NBD trims of whole, aligned chunks are allowed (they shrink the reverse delta)."""
    export_id: str = ""
    """The ``block-export-add`` id."""
    persistent: bool = True
    """False on raw images: the checkpoint lives only while this QEMU process runs."""

    @property
    def bitmap_granularity(self) -> int | None:
        """The granularity of the parent checkpoint's bitmap (incremental), as QEMU reports it."""
        bitmap = self.disk.bitmap(checkpoint_bitmap(self.since)) if self.since else None
        return bitmap.granularity if bitmap is not None else None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form ``fleece export start --json`` prints."""
        return {
            "drive": self.drive, "uri": self.uri, "size": self.size, "dirty_bitmap": self.dirty_bitmap,
            "checkpoint": self.checkpoint, "since": self.since, "level": self.level,
            "reason": self.reason, "discard": self.discard, "export": self.export_name,
            "node": self.disk.node_name, "persistent": self.persistent,
        }


@dataclass
class PointInTimeExport:
    """A live export of one or more disks, all at one point in time."""

    checkpoint: str
    """Shared by every disk."""
    disks: list[DiskExport]
    pause_ms: float | None
    """The guest's pause around the snapshot point; None if the VM was not running."""
    socket_path: str | None
    """QEMU's NBD server socket; None when it listens on TCP (see ``transport``)."""
    qemu_version: tuple[int, int, int]
    trim_alignment: int = TRIM_ALIGNMENT
    """Trims must be aligned to this and never cover a disk's unaligned tail."""
    scratch_dir: str = ""
    transport: ServerTransport | None = None
    """Where the NBD server listens and the client credentials it wants."""

    @property
    def max_request(self) -> int | None:
        """Every read and block-status request must stay inside one aligned block of this many
        bytes (QEMU < 8.0, docs/design.md §2.4); None: any request is answered right."""
        return max_request(self.qemu_version)

    def disk(self, drive: str) -> DiskExport:
        """The export of ``drive`` (the name it was asked under)."""
        for d in self.disks:
            if d.drive == drive:
                return d
        raise KeyError(drive)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form ``fleece export start --json`` prints."""
        out: dict[str, Any] = {
            "checkpoint": self.checkpoint, "disks": [d.as_dict() for d in self.disks],
            "pause_ms": None if self.pause_ms is None else round(self.pause_ms, 3),
            "socket": self.socket_path, "trim_alignment": self.trim_alignment,
            "max_request": self.max_request}
        if self.transport is not None and self.transport.is_tcp:
            # Paths and names only: which credentials a client needs, never a key.
            out["transport"] = self.transport.client_credentials()
        return out


def _describe(done: SetUp) -> PointInTimeExport:
    st = done.state
    server = st.server
    disks = []
    for d, disk in zip(st.disks, done.disks, strict=True):
        disks.append(DiskExport(
            drive=d.drive, disk=disk, uri=server.uri(d.key),
            export_name=d.key, size=d.size,
            dirty_bitmap=dirty_bitmap_context(frozen_bitmap(d.key)) if d.parent else None,
            checkpoint=st.checkpoint, since=d.parent, level=d.level, reason=d.reason,
            discard=d.discard, export_id=export_id(d.key), persistent=d.persistent,
        ))
    return PointInTimeExport(checkpoint=st.checkpoint, disks=disks, pause_ms=done.pause_ms,
                             socket_path=None if server.is_tcp else st.socket,
                             qemu_version=done.qemu_version, scratch_dir=st.scratch, transport=server)


async def start_export(
    session: QmpSession,
    drives: list[str],
    *,
    checkpoint: str | None = None,
    level: str = "auto",
    parent_ok: ParentOk | None = None,
    discard: bool = False,
    scratch_dir: Path | None = None,
    qga: str | None = None,
    log: Callable[[str], None] | None = None,
    transport: ServerTransport | None = None,
    bounded_requests: bool = False,
) -> PointInTimeExport:
    """Make the export live and leave it up; end it with :func:`stop_export`.

    Arguments as for :func:`point_in_time_export`. On failure nothing is left
    changed in QEMU and the error is raised.
    """
    done = await set_up(session, list(drives), checkpoint=checkpoint, level=level, parent_ok=parent_ok,
                        discard=discard, scratch_dir=scratch_dir, qga=qga, log=log or _log.warning,
                        transport=transport, bounded_requests=bounded_requests)
    return _describe(done)


@asynccontextmanager
async def point_in_time_export(
    session: QmpSession,
    drives: list[str],
    *,
    checkpoint: str | None = None,
    level: str = "auto",
    parent_ok: Callable[[str, str], bool] | None = None,
    discard: bool = False,
    scratch_dir: Path | None = None,
    qga: str | None = None,
    log: Callable[[str], None] | None = None,
    transport: ServerTransport | None = None,
    bounded_requests: bool = False,
) -> AsyncIterator[PointInTimeExport]:
    """Export ``drives`` at one point in time over QEMU's NBD server while the block runs.

    ``drives`` are device ids, node names or block backend names.
    ``checkpoint`` is the new point id (default: a fresh one). ``level``
    ``auto`` exports a disk incrementally when its parent checkpoint is usable
    and ``parent_ok(drive, parent)`` agrees, else full with the reason
    logged; ``full`` always exports everything; ``incremental`` raises
    :class:`ExportError` before any change if a disk cannot be. ``discard``
    makes the exports writable for aligned trims. ``scratch_dir`` is where
    the private scratch directory is made (default ``$TMPDIR`` or
    ``/var/tmp``); ``qga`` a guest agent socket to freeze the guest's
    filesystems around the snapshot point. ``transport`` is where QEMU's NBD
    server listens (default a unix socket in the scratch directory; TCP with
    TLS: :func:`fleece.fleecing.transport.server_transport`).
    ``bounded_requests=True`` says the reader keeps every read and
    block-status request inside one aligned block of the export's
    ``max_request``; on QEMU < 8.0 (where ``max_request`` is 64 KiB) the
    export is refused without it, before any change (docs/export.md,
    "Reading an export").

    Normal exit commits the checkpoints; an exception aborts them; either way
    QEMU is left as found plus one checkpoint bitmap per disk.
    """
    say = log or _log.warning
    # owner "session": this process holds the export for the block's duration,
    # so a later run that finds it with this pid gone knows it was killed
    # (cleanup), not left up on purpose (export stop).
    export = _describe(await set_up(
        session, list(drives), checkpoint=checkpoint, level=level, parent_ok=parent_ok,
        discard=discard, scratch_dir=scratch_dir, qga=qga, log=say, owner="session",
        transport=transport, bounded_requests=bounded_requests))
    state = ExportState.load(export.scratch_dir)
    try:
        yield export
    except BaseException as exc:
        try:
            await tear_down(session, state=state, commit=False, log=say)
        except FleeceError as undo:
            # The original error is what the caller must see; say what is left too.
            exc.add_note(str(undo))
            say(str(undo))
        raise
    await tear_down(session, state=state, commit=True, log=say)


async def stop_export(session: QmpSession, *, abort: bool) -> str:
    """End the export that is up in this QEMU (set up by any process); one line saying what was done."""
    graph = await read_graph(session)
    states = export_states(graph)
    if not states:
        raise ExportError("no fleece export is up in this QEMU; nothing was changed")
    removed, ended = await tear_down(session, state=states[0], commit=not abort)
    parts = []
    for st in ended:
        drives = ", ".join(d.drive for d in st.disks)
        new = checkpoint_bitmap(st.checkpoint)
        if st.outcome == "commit":
            dropped = sorted({b for _, b in removed.bitmaps if b != new and not b.startswith("fleece-tmp-")})
            parts.append(f"stopped the export of {drives}; committed: {new} records writes from now on"
                         + (f" (removed {', '.join(dropped)})" if dropped else ""))
        else:
            parts.append(f"stopped the export of {drives}; aborted: removed {new}, the previous "
                         "checkpoint (if any) still records every write")
    return "; ".join(parts)


async def cleanup(session: QmpSession, log: Callable[[str], None] | None = None) -> Leftovers:
    """Remove whatever a killed fleece run left in QEMU, as an abort; what was removed.

    A tear-down that was cut short after it had decided to commit is
    finished as a commit.
    """
    removed, _ = await tear_down(session, commit=None, log=log)
    return removed


__all__ = [
    "CBW_CLUSTER",
    "DiskExport",
    "PointInTimeExport",
    "cleanup",
    "max_request",
    "parse_qemu_version",
    "point_in_time_export",
    "start_export",
    "stop_export",
]
