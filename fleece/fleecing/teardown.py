"""Tear an export down, from whatever state it is in, and commit or abort its bitmaps.

One routine serves ``fleece export stop``, ``fleece cleanup``, the end of the
Python API's ``async with`` and the undo of a set-up that failed half-way.
It reads what QEMU shows now, and removes every ``fleece-`` object that is
there, in dependency order, each step even if an earlier one failed:
exports (waiting for ``BLOCK_EXPORT_DELETED``), the NBD server if fleece
started it, its TLS and authorization objects, snapshot-access nodes, devices back onto their format node
(only if they point at a filter), filters, frozen bitmaps, the checkpoint
bitmaps committed or aborted, then reverse deltas; last their files, the
state file and the scratch directory go. The commit comes before the
reverse deltas go because their nodes are how a later ``cleanup`` finds the
state file (and so the decision, and the directory) of a run killed here.

Once begun, a tear-down runs to its end even if its caller is cancelled
(Ctrl-C, SIGTERM): stopping half-way would leave the copy-before-write
filter in the guest's write path. The cancellation is raised after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from fleece.errors import ExportError, FleeceError, QmpCommandError
from fleece.fleecing.checkpoints import bitmaps_to_remove
from fleece.fleecing.graph import BlockGraph, export_states, filter_source, read_graph
from fleece.fleecing.leftovers import Leftovers, cleanup_command, leftovers_in, ownership
from fleece.fleecing.names import PREFIX, SOCKET_FILE, checkpoint_of, is_fleece_name
from fleece.fleecing.state import ExportState
from fleece.fleecing.transport import PSK_DIR, PSK_FILE_IN_DIR
from fleece.qmp import QmpSession
from fleece.testing import Phase, pause_point

EXPORT_DELETE_TIMEOUT = 30.0
"""Seconds to wait for ``BLOCK_EXPORT_DELETED``; a hard delete drops clients, so it is quick."""

Log = Callable[[str], None]
_log = logging.getLogger(__name__)


class _Teardown:
    """Runs the steps, remembers what each removed and what failed."""

    def __init__(self, session: QmpSession, log: Log) -> None:
        self.session = session
        self.log = log
        self.removed = Leftovers()
        self.errors: list[str] = []

    async def step(self, what: str, action: Callable[[], Awaitable[object]]) -> bool:
        """Run one step; a failure is recorded and the tear-down goes on."""
        try:
            await action()
        except FleeceError as exc:
            self.errors.append(f"{what}: {exc}")
            _log.debug("tear-down step failed: %s: %s", what, exc)
            return False
        return True

    async def delete_export(self, export_id: str) -> None:
        async with self.session.listen("BLOCK_EXPORT_DELETED") as events:
            # "hard" drops connected clients: stopping means stopping, and a
            # "safe" delete would fail while a reader is still connected.
            await self.session.execute("block-export-del", {"id": export_id, "mode": "hard"})

            async def deleted() -> None:
                while True:
                    event: Any = await events.get()
                    if event.get("data", {}).get("id") == export_id:
                        return

            try:
                await asyncio.wait_for(deleted(), EXPORT_DELETE_TIMEOUT)
            except TimeoutError:
                raise ExportError(f"export {export_id} was not deleted within "
                                  f"{EXPORT_DELETE_TIMEOUT:g}s") from None


async def tear_down(
    session: QmpSession,
    *,
    state: ExportState | None = None,
    commit: bool | None = None,
    log: Log | None = None,
) -> tuple[Leftovers, list[ExportState]]:
    """Remove every fleece object from QEMU; commit or abort checkpoint bitmaps.

    ``state`` is the export being ended (others are found through QEMU).
    ``commit`` True removes the parent checkpoints, False the new one; None
    finishes a tear-down that was cut short the way it had been decided,
    else aborts (what ``cleanup`` does). Returns what was removed and the
    export states that were ended. Raises :class:`ExportError` naming what
    is left if any step failed. A cancellation waits for the tear-down to
    end, then is raised (unless the tear-down failed: its error is raised).
    """
    work = asyncio.ensure_future(_tear_down(session, state=state, commit=commit, log=log))
    cancelled = False
    while not work.done():
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            cancelled = True
    if work.cancelled() or (cancelled and work.exception() is None):
        raise asyncio.CancelledError
    return work.result()


async def _tear_down(
    session: QmpSession,
    *,
    state: ExportState | None,
    commit: bool | None,
    log: Log | None,
) -> tuple[Leftovers, list[ExportState]]:
    run = _Teardown(session, log or _log.info)
    graph = await read_graph(session)
    states = _states(graph, state)
    for st in states:
        if commit is not None:
            st.outcome = "commit" if commit else "abort"
        elif st.outcome is None:
            st.outcome = "abort"
        # Recorded before anything is removed, so that a cleanup after a kill
        # in mid-tear-down finishes it the same way.
        _save(st, run)

    for export_id in graph.exports:
        if is_fleece_name(export_id) and await run.step(
            f"delete export {export_id}", partial(run.delete_export, export_id)
        ):
            run.removed.exports.append(export_id)

    for st in states:
        if st.nbd_server and await run.step("stop the NBD server", lambda: _stop_nbd(session)):
            st.nbd_server = False
            run.removed.nbd_server.append(st.server.address)
            _save(st, run)

    # After the server that uses them: a TCP export's TLS credentials and authorization.
    for obj in graph.objects:
        if await run.step(f"delete object {obj}",
                          partial(session.execute, "object-del", {"id": obj})):
            run.removed.objects.append(obj)

    await _delete_nodes(run, graph, "snap-")
    await _restore_devices(run, graph, states)
    await _delete_nodes(run, graph, "cbw-")

    # Commit or abort while the reverse-delta nodes are still there: they are
    # what leads a later cleanup to the state file, so a run killed from here
    # on is finished the way it had decided, and its scratch directory found.
    pause_point(Phase.BEFORE_COMMIT)
    await _remove_bitmaps(run, await read_graph(session), states)

    deltas = {n: graph.nodes[n].filename for n in graph.fleece_nodes("delta-")}
    # Nothing writes to the reverse deltas any more. Unlink their files while
    # QEMU still holds them open: a kill from here on leaves no guest data on
    # disk, and the nodes (whose filenames lead cleanup to the state file) stay.
    for path in deltas.values():
        if path:
            _unlink(path, run)
    pause_point(Phase.DELTAS_UNLINKED)
    await _delete_nodes(run, graph, "delta-")
    await _delete_nodes(run, graph, "")

    left = leftovers_in(await read_graph(session))
    if run.errors or left:
        problems = "; ".join(run.errors) or "objects remain"
        raise ExportError(
            f"tear-down incomplete ({problems}); left in QEMU: {left.describe()}; "
            f"remove them with: {cleanup_command(session.address)}"
        )
    for st in states:
        _remove_scratch(st, deltas)
    ended = {st.scratch for st in states}
    for path in deltas.values():
        if os.path.dirname(path) not in ended:
            # A reverse delta whose state file was lost: still ours by its node name.
            _unlink(path, run)
    return run.removed, states


async def heal_dead_run(session: QmpSession, log: Log) -> Leftovers | None:
    """Before a backup: remove what an earlier run whose process has certainly exited left.

    Does what ``fleece cleanup`` would (finishing a tear-down the way it had
    been decided, else aborting) and says in one line what it removed and
    why. Leftovers whose owner may be alive, an export left up by ``export
    start``, or leftovers no state file explains are refused with the
    command that ends them, nothing changed. None when there was nothing.
    """
    graph = await read_graph(session)
    if graph.live_restore_nodes():
        return None  # the set-up refuses it, saying why
    owned = ownership(graph)
    if not owned.left:
        return None
    if not owned.certainly_dead:
        raise owned.refusal(session.address)
    removed, ended = await tear_down(session, commit=None, log=log)
    for st in ended:
        how = ("its commit was finished: its checkpoint records writes from its point on"
               if st.outcome == "commit" else
               "aborted: the checkpoint before it still records every write since")
        log(f"fleece pid {st.pid} on {st.host} has exited and left its export of {_drives(st)} "
            f"(checkpoint {st.checkpoint}) in QEMU: cleaned up as 'fleece cleanup' would, {how}; "
            f"removed {removed.describe()}")
    return removed


def _drives(st: ExportState) -> str:
    return ", ".join(d.drive for d in st.disks)


def _states(graph: BlockGraph, state: ExportState | None) -> list[ExportState]:
    if state is None:
        return export_states(graph)
    mine = os.path.realpath(state.scratch)
    return [state, *(s for s in export_states(graph) if os.path.realpath(s.scratch) != mine)]


def _save(st: ExportState, run: _Teardown) -> None:
    """Best effort: the scratch directory may be the full filesystem that broke the snapshot."""
    try:
        st.save()
    except OSError as exc:
        run.log(f"could not update {st.path}: {exc.strerror}")


async def _stop_nbd(session: QmpSession) -> None:
    try:
        await session.execute("nbd-server-stop")
    except QmpCommandError as exc:
        if "not running" not in exc.desc:
            raise


async def _delete_nodes(run: _Teardown, graph: BlockGraph, kind: str) -> None:
    """``blockdev-del`` our nodes of one kind; parents before children, until no progress."""
    pending = [n for n in graph.fleece_nodes(kind) if n not in run.removed.nodes]
    while pending:
        failed = []
        for node in pending:
            try:
                await run.session.execute("blockdev-del", {"node-name": node})
                run.removed.nodes.append(node)
            except FleeceError as exc:
                failed.append((node, exc))
        if len(failed) == len(pending):
            run.errors.extend(f"delete node {n}: {e}" for n, e in failed)
            return
        pending = [n for n, _ in failed]


async def _restore_devices(run: _Teardown, graph: BlockGraph, states: list[ExportState]) -> None:
    """Point every device that reads through a fleece filter back at its format node."""
    by_qdev = {d.qdev: d.src for st in states for d in st.disks}
    for disk in graph.disks:
        node = disk.node_name
        if not is_fleece_name(node):
            continue
        src = filter_source(graph, node) or by_qdev.get(disk.qdev)
        if not src:
            run.errors.append(f"{disk.qdev} reads through {node}, and nothing says which node it had")
            continue

        async def move(qdev: str = disk.qdev, cur: str = node, src: str = src) -> None:
            # qom-set to the node a device already has aborts QEMU 7.2: look first.
            if await run.session.execute("qom-get", {"path": qdev, "property": "drive"}) == cur:
                await run.session.execute("qom-set", {"path": qdev, "property": "drive", "value": src})

        if await run.step(f"put {disk.qdev} back on {src}", move):
            run.removed.attached.append((disk.qdev, node))


async def _remove_bitmaps(run: _Teardown, graph: BlockGraph, states: list[ExportState]) -> None:
    """Frozen copies go; checkpoints are committed or aborted per export state."""
    decided: dict[str, list[str]] = {}
    for st in states:
        for d in st.disks:
            node = graph.nodes.get(d.src)
            if node:
                decided.setdefault(d.src, []).extend(
                    bitmaps_to_remove(node, st.checkpoint, commit=st.outcome == "commit"))
    for name, node in graph.nodes.items():
        doomed = [b.name for b in node.bitmaps if is_fleece_name(b.name) and not checkpoint_of(b.name)]
        # Without a state to say which checkpoint is new, keep the oldest:
        # it has recorded everything since its point (docs/design.md §3.3).
        doomed += decided[name] if name in decided else node.checkpoints[1:]
        for bitmap in doomed:

            async def remove(node: str = name, bitmap: str = bitmap) -> None:
                await run.session.execute("block-dirty-bitmap-remove", {"node": node, "name": bitmap})

            if await run.step(f"remove bitmap {name}/{bitmap}", remove):
                run.removed.bitmaps.append((name, bitmap))


def _remove_scratch(st: ExportState, deltas: dict[str, str]) -> None:
    """Delete the files fleece put in the scratch directory, then the directory."""
    scratch = Path(st.scratch)
    for path in deltas.values():
        if os.path.dirname(path) == st.scratch:
            Path(path).unlink(missing_ok=True)
    (scratch / SOCKET_FILE).unlink(missing_ok=True)
    psk = scratch / PSK_DIR
    (psk / PSK_FILE_IN_DIR).unlink(missing_ok=True)  # a link to the user's key, not the key
    with contextlib.suppress(FileNotFoundError):
        psk.rmdir()
    for leftover in scratch.glob("delta-*.raw"):
        leftover.unlink(missing_ok=True)
    st.remove()
    try:
        scratch.rmdir()
    except OSError as exc:
        _log.warning("scratch directory %s not removed: %s", scratch, exc.strerror)


def _unlink(path: str, run: _Teardown) -> None:
    if os.path.basename(os.path.dirname(path)).startswith(PREFIX.rstrip("-")):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            run.log(f"reverse delta {path} not deleted: {exc.strerror}")
