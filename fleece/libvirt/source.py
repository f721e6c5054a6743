"""A libvirt domain as a backup's point-in-time source (``fleece.sources.PointInTimeSource``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from fleece.errors import BadInput, FleeceError
from fleece.libvirt import export as lv_export
from fleece.libvirt.domain import (
    ConnectionLost,
    bindings,
    command,
    disks_of,
    dotted,
    is_running,
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
            await asyncio.to_thread(_close, conn)

    async def vm_name(self) -> str:
        """The domain's name."""
        return str(self.dom.name())

    async def qemu_version(self) -> str:
        """The hypervisor's version as libvirt reports it (``7.2.22``)."""
        number = await asyncio.to_thread(self._conn.getVersion)
        return dotted(version_tuple(int(number)))

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


def _close(conn: Any) -> None:
    """Close a connection; one that broke (libvirtd restarted) has nothing left to close."""
    with contextlib.suppress(bindings().libvirtError):
        conn.close()


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
        uri = await asyncio.to_thread(lambda: str(dom.connect().getURI()))
        export = await asyncio.to_thread(
            lv_export.start, dom, drives, checkpoint=checkpoint, level=level, parent_ok=parent_ok,
            known_point=known_point, scratch_dir=scratch_dir, qga=qga, log=log, owner="session")
    state = JobState.load(export.scratch_dir)
    assert state is not None
    try:
        yield export
    except BaseException as exc:
        try:
            done = await asyncio.to_thread(_end, dom, uri, state, False, log)
            if not await asyncio.to_thread(_running, dom):
                log(f"domain {state.domain} stopped during the backup; aborted it and removed "
                    f"{', '.join(done) or 'nothing'}; the next backup after the domain starts goes on")
        except FleeceError as undo:
            exc.add_note(str(undo))
            log(str(undo))
        raise
    try:
        await asyncio.to_thread(_end, dom, uri, state, True, log)
    except FleeceError as exc:
        # The point is stored (the block returned): the backup succeeded. The
        # state file says "commit", so whoever comes next finishes it.
        log(f"restore point {state.checkpoint} is stored, but ending libvirt's backup job failed ({exc}); "
            "the next fleece backup of the domain finishes the commit of its checkpoint (or now: "
            + command("fleece", "cleanup", "--libvirt", state.domain) + ")")


def _running(dom: Any) -> bool:
    """Whether the domain still runs (False when libvirt cannot say either)."""
    try:
        return is_running(dom)
    except bindings().libvirtError:
        return False


def _end(dom: Any, uri: str, state: JobState, commit: bool, log: Log) -> list[str]:
    """End the export; when the connection to libvirtd broke (libvirtd restarted), once more on a
    new connection (libvirtd keeps the domain's backup job across its restart)."""
    try:
        with libvirt_errors(state.domain):
            return lv_export.end(dom, state, commit=commit, log=log)
    except ConnectionLost as exc:
        log(f"the connection to libvirtd broke ({exc}); ending the backup job on a new connection")
    conn = open_connection(uri)
    try:
        with libvirt_errors(state.domain):
            return lv_export.end(conn.lookupByUUIDString(state.uuid), state, commit=commit, log=log)
    finally:
        conn.close()
