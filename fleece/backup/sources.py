"""Where a backup takes its point in time from: QEMU over QMP, or libvirt.

A backup (``fleece.backup.job``) needs four things from the hypervisor side and
nothing else: the VM's name, the QEMU version, a check of the drives before
the repository is touched, and a point-in-time export — per disk an NBD URI,
its size, the dirty-bitmap meta context (None for a full) and the parent
point — that commits its checkpoint when the block is left normally and
aborts it on an exception. :class:`PointInTimeSource` is that seam;
:class:`QmpSource` (fleece's own image fleecing over QMP) and
``fleece.libvirt.LibvirtSource`` (libvirt's pull-mode backup job) implement it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from fleece.fleecing import point_in_time_export
from fleece.fleecing.setup import preflight
from fleece.qmp import QmpSession, list_disks, resolve_drive
from fleece.qmp.answers import query_name, query_uuid

ParentOk = Callable[[str, str], bool]
Log = Callable[[str], None]


class ExportedDisk(Protocol):
    """One disk of a live point-in-time export, as a backup reads it."""

    @property
    def drive(self) -> str:
        """The name the user gave (``--drive``); the disk's name in the restore point."""
    @property
    def uri(self) -> str:
        """``nbd+unix:///<export>?socket=<path>``."""
    @property
    def size(self) -> int:
        """Virtual size in bytes."""
    @property
    def dirty_bitmap(self) -> str | None:
        """NBD meta context of the writes since ``since``; None for a full."""
    @property
    def since(self) -> str | None:
        """The parent point id of an incremental; None for a full."""
    @property
    def level(self) -> str:
        """``full`` or ``incremental``."""
    @property
    def reason(self) -> str | None:
        """Why the disk is full though an incremental was wanted."""
    @property
    def discard(self) -> bool:
        """Whether aligned NBD trims of what was read are allowed (they shrink the scratch space)."""
    @property
    def bitmap_granularity(self) -> int | None:
        """The dirty bitmap's granularity in bytes (incremental), where the source knows it."""


class PointInTime(Protocol):
    """A live export of one or more disks at one point in time."""

    @property
    def checkpoint(self) -> str:
        """The new point id, shared by every disk."""
    @property
    def disks(self) -> Sequence[ExportedDisk]:
        """One per drive, in the order asked."""
    @property
    def pause_ms(self) -> float | None:
        """The guest's pause around the snapshot point, if fleece measured one."""
    @property
    def trim_alignment(self) -> int:
        """Trims (when ``discard``) must be aligned to this."""


class PointInTimeSource(Protocol):
    """A connection to one VM that can export its disks at a point in time.

    Used as ``async with source:`` — entering connects, leaving disconnects.
    """

    async def __aenter__(self) -> PointInTimeSource: ...

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None: ...

    async def vm_name(self) -> str:
        """The VM's name in the repository when ``--vm`` is not given."""

    async def qemu_version(self) -> str:
        """``7.2.22``: recorded in each restore point."""

    async def check_drives(self, drives: list[str]) -> None:
        """Raise ``BadInput`` for a drive the VM does not have; changes nothing."""

    async def preflight(self, drives: list[str], scratch_dir: Path | None) -> None:
        """Raise if an export of ``drives`` cannot be set up now; changes nothing.

        Called before a fresh repository location is initialized.
        """

    def export(self, drives: list[str], *, level: str, parent_ok: ParentOk, discard: bool,
               scratch_dir: Path | None, qga: str | None, log: Log, known_point: str | None = None
               ) -> AbstractAsyncContextManager[PointInTime]:
        """The export: commits its checkpoint on normal exit, aborts it on an exception.

        ``known_point`` is the newest restore point of the VM in the
        repository: a source that lost its checkpoint record may re-create it.
        """


async def qmp_vm_name(session: QmpSession) -> str:
    """The VM's name as docs/design.md §4.2 defines it: ``-name``, else its UUID, else the socket."""
    name = (await query_name(session)).get("name")
    if name:
        return str(name)
    uuid = (await query_uuid(session)).get("UUID", "")
    if uuid and uuid.strip("0-"):
        return str(uuid)
    address = session.address
    # Absolute, so that the same VM reached from another directory keeps its name.
    return os.path.abspath(address) if isinstance(address, str) else f"{address[0]}:{address[1]}"


class QmpSource:
    """fleece's own image fleecing of a QEMU reached over its QMP socket."""

    MACHINE_BEFORE_EXPORT = True
    """Its machine record is QEMU's shape, read before the export's filters change the graph."""

    def __init__(self, qmp: str) -> None:
        self.qmp = qmp
        self._open: AbstractAsyncContextManager[QmpSession] | None = None
        self._session: QmpSession | None = None

    @property
    def session(self) -> QmpSession:
        """The open QMP session (inside ``async with``)."""
        if self._session is None:
            raise RuntimeError("QmpSource used outside 'async with'")
        return self._session

    async def __aenter__(self) -> QmpSource:
        self._open = QmpSession.open(self.qmp)
        self._session = await self._open.__aenter__()
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._open is not None
        self._session = None
        await self._open.__aexit__(et, ev, tb)

    async def vm_name(self) -> str:
        """``-name``, else the UUID, else the socket path (docs/design.md §4.2)."""
        return await qmp_vm_name(self.session)

    async def qemu_version(self) -> str:
        """QEMU's version as QMP reports it."""
        return ".".join(map(str, await self.session.qemu_version()))

    async def record_machine(self) -> tuple[str, dict[str, Any], dict[str, bytes], dict[str, str]]:
        """What QEMU says about the machine, and its command line: :mod:`fleece.machine.qemu`."""
        from fleece.machine.qemu import capture_qemu
        summary, files, moments = await capture_qemu(self.session)
        return "qemu", summary, files, moments

    async def check_drives(self, drives: list[str]) -> None:
        """Every drive names a block device of this QEMU."""
        disks = await list_disks(self.session)
        for drive in drives:
            resolve_drive(disks, drive)

    async def preflight(self, drives: list[str], scratch_dir: Path | None) -> None:
        """The export's own checks, without setting anything up."""
        await preflight(self.session, drives, scratch_dir)

    def export(self, drives: list[str], *, level: str, parent_ok: ParentOk, discard: bool,
               scratch_dir: Path | None, qga: str | None, log: Log, known_point: str | None = None
               ) -> AbstractAsyncContextManager[PointInTime]:
        """``fleece.fleecing.point_in_time_export`` on this session (QEMU keeps its own bitmaps:
        ``known_point`` is not needed)."""
        # fleece's reader bounds its requests where QEMU needs it (fleece.backup.reader).
        return point_in_time_export(self.session, drives, level=level, parent_ok=parent_ok,
                                    discard=discard, scratch_dir=scratch_dir, qga=qga, log=log,
                                    bounded_requests=True)
