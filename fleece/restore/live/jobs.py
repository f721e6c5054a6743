"""The stream jobs of a live restore: watching them, finishing each disk, ending them.

:class:`Streams` polls QEMU's jobs, reports progress, fails on the first
stop (a job error, a job paused on a read error, a server that exited) and
finishes each disk as its job completes: the job dismissed, the NBD node and
the placeholder nodes deleted, the server stopped, the state file removed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from fleece.errors import FleeceError
from fleece.fleecing.graph import read_graph
from fleece.fleecing.names import LIVE_PREFIX
from fleece.qmp import QmpSession
from fleece.qmp.answers import JobInfo, query_block_jobs, query_jobs, query_named_block_nodes
from fleece.restore.live.state import LiveDisk, job_id
from fleece.serve.server import NbdkitServer
from fleece.testing import Phase, pause_point

log = logging.getLogger(__name__)


POLL_SECONDS = 0.2
CANCEL_TIMEOUT = 60.0
"""Seconds a cancelled job has to conclude."""

Emit = Callable[..., None]
"""``emit(event, **fields)``: progress and milestones for the command line."""


@dataclass
class StreamJob:
    """One of our jobs: its ``query-jobs`` entry, and the io-status ``query-block-jobs`` adds."""

    info: JobInfo
    io_status: str = "ok"


async def jobs(session: QmpSession) -> dict[str, StreamJob]:
    """Our jobs by id, ``query-jobs`` merged with ``query-block-jobs`` (its io-status)."""
    found = {j["id"]: StreamJob(j) for j in await query_jobs(session) if j["id"].startswith(LIVE_PREFIX)}
    for b in await query_block_jobs(session):
        if b["device"] in found:
            found[b["device"]].io_status = b.get("io-status", "ok")
    return found


async def end_job(session: QmpSession, key: str) -> None:
    """Cancel the job of disk ``key`` if it still runs (or stopped on an error), then dismiss it."""
    deadline = time.monotonic() + CANCEL_TIMEOUT
    cancelled = False
    while (job := (await jobs(session)).get(job_id(key))) is not None:
        if job.info["status"] == "concluded":
            await session.execute("job-dismiss", {"id": job_id(key)})
            return
        if not cancelled:
            await session.execute("block-job-cancel", {"device": job_id(key), "force": True})
            cancelled = True
        if time.monotonic() > deadline:
            raise FleeceError(f"job {job_id(key)} did not end within {CANCEL_TIMEOUT:g}s of its cancel")
        await asyncio.sleep(POLL_SECONDS)


async def backing_filename(session: QmpSession, node: str) -> str | None:
    """The filename of ``node``'s backing image as QEMU shows it; None when it has none.

    Read from ``query-named-block-nodes`` rather than the debug graph, which a
    QEMU may lack: whether the image still needs the point must never be a guess.
    """
    for info in await query_named_block_nodes(session):
        if info.get("node-name") == node:
            backing = (info.get("image") or {}).get("backing-image")
            return str(backing.get("filename") or "?") if backing else None
    return None


async def delete_node(session: QmpSession, name: str) -> bool:
    """``blockdev-del`` one node; whether QEMU did (it refuses nodes in use or not its monitor's)."""
    try:
        await session.execute("blockdev-del", {"node-name": name})
    except FleeceError as exc:
        log.debug("blockdev-del %s: %s", name, exc)
        return False
    return True


class Streams:
    """Watches the jobs, finishes each disk as its job completes, fails on any stop."""

    def __init__(self, session: QmpSession, disks: list[LiveDisk],
                 servers: dict[str, NbdkitServer], emit: Emit) -> None:
        self.session = session
        self.pending = {d.key: d for d in disks}
        self.servers = servers
        self.emit = emit
        self.done: dict[str, int] = {}

    async def run(self) -> None:
        while self.pending:
            current = await jobs(self.session)
            for key, d in list(self.pending.items()):
                job = current.get(job_id(key))
                if job is None or (job.info["status"] == "concluded" and not job.info.get("error")):
                    # No job: a resume found the stream already complete.
                    await self._finish(d, job is not None)
                    continue
                total = int(job.info.get("total-progress") or d.size)
                self.emit("progress", drive=d.drive, done=int(job.info.get("current-progress", 0)),
                          total=total)
                self._check(d, job)
            if self.pending:
                await asyncio.sleep(POLL_SECONDS)

    def _check(self, d: LiveDisk, job: StreamJob) -> None:
        why = None
        if job.info.get("error"):
            why = f"the stream job ended with an error: {job.info['error']}"
        elif job.io_status != "ok" and job.info["status"] == "paused":
            why = "the stream job stopped on a read or write error"
        else:
            server = self.servers[d.key]
            rc = server.proc.poll() if server.proc else None
            if rc is not None:
                why = f"its server (nbdkit pid {server.proc.pid if server.proc else '?'}) exited " \
                      f"with status {rc}"
        if why:
            raise FleeceError(
                f"live restore of {d.drive} into {d.output} stopped: {why}; the VM keeps its "
                f"writes and what was streamed, and pauses at its next read of a region not "
                f"streamed yet (devices with rerror=stop,werror=stop); carry on with "
                f"'fleece restore --live --resume' and the same arguments")

    async def _finish(self, d: LiveDisk, dismiss: bool) -> None:
        if dismiss:
            await self.session.execute("job-dismiss", {"id": job_id(d.key)})
            pause_point(Phase.LIVE_STREAMED)
        graph = await read_graph(self.session)
        if await backing_filename(self.session, d.node):
            raise FleeceError(f"the stream of {d.drive} ended but {d.output} still has a backing node; "
                              "carry on with 'fleece restore --live --resume'")
        for node in graph.live_restore_nodes():
            if node.startswith(f"{LIVE_PREFIX}nbd-{d.key}-"):
                await delete_node(self.session, node)
        for node in d.placeholder:
            # Nodes the user gave with -blockdev go; a -drive's belong to its backend and stay.
            if node in graph.nodes and not await delete_node(self.session, node):
                log.info("placeholder node %s was left in QEMU", node)
                break
        server = self.servers.pop(d.key, None)
        if server:
            server.stop()
        d.remove()
        del self.pending[d.key]
        self.done[d.drive] = d.size
        self.emit("finished", drive=d.drive, output=d.output, size=d.size)


def stop_servers(servers: dict[str, NbdkitServer]) -> None:
    """Stop every server still running."""
    for server in servers.values():
        server.stop()
