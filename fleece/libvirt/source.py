"""A libvirt domain as a backup's point-in-time source (``fleece.sources.PointInTimeSource``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from fleece.errors import BadInput, FleeceError
from fleece.libvirt import export as lv_export
from fleece.libvirt.domain import (
    disks_of,
    dotted,
    libvirt_errors,
    live_xml,
    lookup,
    open_connection,
    select_disks,
    version_tuple,
)
from fleece.libvirt.export import LibvirtExport
from fleece.libvirt.job import JobState

Log = Callable[[str], None]


class LibvirtSource:
    """Domain ``domain`` at libvirt ``uri``: its disks exported by libvirt's pull-mode backup job."""

    def __init__(self, domain: str, uri: str | None = None) -> None:
        self.domain_name = domain
        self.uri = uri
        self._conn: Any = None
        self._dom: Any = None

    @property
    def dom(self) -> Any:
        """The ``virDomain`` (inside ``async with``)."""
        if self._dom is None:
            raise RuntimeError("LibvirtSource used outside 'async with'")
        return self._dom

    async def __aenter__(self) -> LibvirtSource:
        def connect() -> tuple[Any, Any]:
            conn = open_connection(self.uri)
            try:
                with libvirt_errors(self.domain_name):
                    return conn, lookup(conn, self.domain_name)
            except BaseException:
                conn.close()
                raise
        self._conn, self._dom = await asyncio.to_thread(connect)
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        conn, self._conn, self._dom = self._conn, None, None
        if conn is not None:
            await asyncio.to_thread(conn.close)

    async def vm_name(self) -> str:
        """The domain's name."""
        return str(self.dom.name())

    async def qemu_version(self) -> str:
        """The hypervisor's version as libvirt reports it (``7.2.22``)."""
        number = await asyncio.to_thread(self._conn.getVersion)
        return dotted(version_tuple(int(number)))

    async def record_machine(self) -> tuple[str, dict[str, Any], dict[str, bytes], dict[str, str]]:
        """The domain's machine (definition, UEFI variables, TPM state): :mod:`fleece.machine.capture`."""
        from fleece.machine.capture import capture_libvirt
        with libvirt_errors(self.domain_name):
            summary, files, moments = await asyncio.to_thread(capture_libvirt, self.dom)
        return "libvirt", summary, files, moments

    async def check_drives(self, drives: list[str]) -> None:
        """Every drive is a qcow2 disk of the domain (by target dev)."""
        with libvirt_errors(self.domain_name):
            xml = await asyncio.to_thread(live_xml, self.dom)
        select_disks(self.domain_name, disks_of(xml), drives)

    async def preflight(self, drives: list[str], scratch_dir: Path | None) -> None:
        """The domain runs, the disks qualify, no backup job or leftovers."""
        with libvirt_errors(self.domain_name):
            await asyncio.to_thread(lv_export.preflight, self.dom, drives)

    def export(self, drives: list[str], *, level: str, parent_ok: Callable[[str, str], bool],
               discard: bool, scratch_dir: Path | None, qga: str | None, log: Log,
               known_point: str | None = None) -> AbstractAsyncContextManager[LibvirtExport]:
        """libvirt's pull-mode export of ``drives``; ``qga`` is ``"libvirt"`` to freeze through libvirt.

        ``discard`` is ignored: libvirt's exports are read-only.
        """
        if qga not in (None, "libvirt"):
            raise BadInput("with --libvirt, --qga takes no socket: libvirt talks to the guest agent")
        return libvirt_export(self.dom, drives, level=level, parent_ok=parent_ok,
                              known_point=known_point, scratch_dir=scratch_dir, qga=qga is not None,
                              log=log)


@asynccontextmanager
async def libvirt_export(
    dom: Any,
    drives: list[str],
    *,
    checkpoint: str | None = None,
    level: str = "auto",
    parent_ok: Callable[[str, str], bool] | None = None,
    known_point: str | None = None,
    scratch_dir: Path | None = None,
    qga: bool = False,
    log: Log | None = None,
) -> AsyncIterator[LibvirtExport]:
    """The export of ``drives`` while the block runs: commit on normal exit, abort on an exception.

    The libvirt counterpart of ``fleece.fleecing.point_in_time_export``;
    ``dom`` is a ``libvirt.virDomain``. Notices go to ``log`` (default: logging).
    """
    log = log or logging.getLogger(__name__).warning
    with libvirt_errors(dom.name()):
        export = await asyncio.to_thread(
            lv_export.start, dom, drives, checkpoint=checkpoint, level=level, parent_ok=parent_ok,
            known_point=known_point, scratch_dir=scratch_dir, qga=qga, log=log, owner="session")
    state = JobState.load(export.scratch_dir)
    assert state is not None
    try:
        yield export
    except BaseException as exc:
        try:
            with libvirt_errors(state.domain):
                await asyncio.to_thread(lv_export.end, dom, state, commit=False, log=log)
        except FleeceError as undo:
            exc.add_note(str(undo))
            log(str(undo))
        raise
    with libvirt_errors(state.domain):
        await asyncio.to_thread(lv_export.end, dom, state, commit=True, log=log)
