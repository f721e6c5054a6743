"""Instant recovery: run a VM on a local image backed by a restore point, and stream the point in.

The VM is started paused (``-S``) with each device on a placeholder node of
the point's disk size. For every disk fleece then

1. serves the point's disk on a private unix socket (nbdkit with fleece's
   plugin, as ``fleece serve``),
2. creates the output qcow2 with the point's zero chunks already marked as
   zero clusters (so nothing reads them from the point), its header naming
   the NBD socket as backing file (so that an image cut off mid-stream never
   passes for a whole one), and ``blockdev-add``\\ s an NBD node
   ``fleece-live-nbd-<key>-<n>`` and the qcow2 node on top of it (backing:
   the NBD node),
3. points the device at the qcow2 node (``qom-set drive``, as fleecing does;
   the VM is paused, so the guest never sees the swap),
4. starts ``block-stream`` (job ``fleece-live-<key>``, copy-on-read filter
   ``fleece-live-cor-<key>``, ``on-error: stop``) and resumes the VM.

Guest writes go to the qcow2 image and are never overwritten (the stream
only fills clusters the image does not have); guest reads of what is not
streamed yet are copied in on the way. When a job concludes the image has
no backing (QEMU rewrites its header), and fleece deletes the NBD node and
the placeholder nodes and stops the server: the VM runs on local images only.

The server speaks NBD without structured replies, so QEMU never asks it for
block status. That matters: QEMU's copy-on-read filter (which the stream job
puts above the image) treats a failed block-status query as "nothing left
to read" and completes the guest's read without data (QEMU 7.2, seen here),
so with a dead server the guest would read stale memory instead of failing.
Without block status the read itself is sent, fails, and the failure policy
below applies. The stream skips the zero chunks all the same: they are
already allocated (as zeroes) in the image.

Failure policy. Until its stream is done a disk depends on fleece's server.
If fleece or the server dies, or a read fails, the stream job pauses, fleece
(if alive) exits 1, and the guest's next read of a region not streamed yet
fails: a device with ``rerror=stop,werror=stop`` pauses the VM (``io-error``)
instead of handing the guest an I/O error. Nothing streamed or written is
lost. ``fleece restore --live --resume`` serves the point again on a new
socket, cancels the stopped job, re-points the qcow2 node's backing at a new
NBD node (``blockdev-reopen``), starts a new stream (it skips what is
already there) and resumes a VM that the failure paused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleece.errors import BadInput, FleeceError
from fleece.fleecing.graph import BlockGraph, read_graph
from fleece.fleecing.names import LIVE_PREFIX, is_fleece_name, is_live_name, node_key
from fleece.live_state import LiveDisk, socket_of
from fleece.liveness import process_gone
from fleece.qmp import QmpSession, resolve_drive
from fleece.repo.point import RestorePoint
from fleece.restore import DiskImage
from fleece.serve.server import NbdkitServer, nbd_uri

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
PAUSED_STATES = ("prelaunch", "paused")
"""Run states in which a device may be moved onto the restored image."""
CANCEL_TIMEOUT = 60.0

Emit = Callable[..., None]
"""``emit(event, **fields)``: progress and milestones for the command line."""


@dataclass
class LiveRequest:
    """Everything a live restore needs, checked by the command line."""

    repo_url: str
    point: RestorePoint
    disks: list[tuple[DiskImage, str, Path]]
    """(disk of the point, device name, output path) per ``--drive``."""
    qmp: str
    start: bool = True
    """``cont`` the VM once its devices run on the new images (not with ``--no-start``)."""
    force: bool = False
    speed: int = 0
    """Stream rate limit in bytes/s (0: none)."""
    scratch_parent: Path | None = None


def job_id(key: str) -> str:
    """The ``block-stream`` job of disk ``key``."""
    return f"{LIVE_PREFIX}{key}"


def cor_node(key: str) -> str:
    """The copy-on-read filter the stream job puts above the qcow2 node."""
    return f"{LIVE_PREFIX}cor-{key}"


def new_nbd_node(key: str) -> str:
    """A fresh name for the NBD node of disk ``key`` (each resume adds a new one)."""
    return f"{LIVE_PREFIX}nbd-{key}-{secrets.token_hex(2)}"


# -- preflight: nothing changes until every check has passed ---------------------------

def _plan(graph: BlockGraph, req: LiveRequest, scratch: Path) -> list[LiveDisk]:
    plans: list[LiveDisk] = []
    taken = set(graph.nodes)
    seen: dict[str, str] = {}
    for image, device, output in req.disks:
        disk = resolve_drive(graph.disks, device)
        if disk.qdev in seen:
            raise BadInput(f"--device {device} and --device {seen[disk.qdev]} are the same device; "
                           "nothing was changed")
        seen[disk.qdev] = device
        if is_live_name(disk.node_name) or _backing_is_live(graph, disk.node_name):
            raise BadInput(f"device {device} is being live-restored already; carry on with --resume; "
                           "nothing was changed")
        if is_fleece_name(disk.node_name):
            raise BadInput(f"device {device} is being exported by fleece now; nothing was changed")
        node = graph.nodes.get(disk.node_name)
        size = (node.size if node else 0) or disk.virtual_size
        if size != image.size:
            raise BadInput(
                f"device {device} is attached to {disk.node_name!r} of {size} bytes, but disk "
                f"{image.disk.name} of point {req.point.id} holds {image.size} bytes: give the "
                f"device a placeholder of exactly that size; nothing was changed")
        key = node_key(image.disk.name)
        while any(p.key == key for p in plans):
            key += "_"
        target = _free_name(taken, f"restored-{key}")
        file_node = _free_name(taken, f"{target}-file")
        plans.append(LiveDisk(
            drive=image.disk.name, key=key, qdev=disk.qdev, output=str(output), size=image.size,
            node=target, file_node=file_node, nbd_node=new_nbd_node(key),
            placeholder=_subtree(graph, disk.node_name), vm=req.point.vm, point=req.point.id,
            socket=str(scratch / f"{key}.sock")))
    return plans


def _free_name(taken: set[str], base: str) -> str:
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    taken.add(name)
    return name


def _subtree(graph: BlockGraph, top: str) -> list[str]:
    """``top`` and the named nodes below it, parents first."""
    order, todo = [top], list(graph.nodes[top].children if top in graph.nodes else ())
    while todo:
        _, name = todo.pop(0)
        if name in order or name not in graph.nodes:
            continue
        order.append(name)
        todo.extend(graph.nodes[name].children)
    return order


def _backing_is_live(graph: BlockGraph, node: str) -> bool:
    info = graph.nodes.get(node)
    return bool(info and is_live_name(info.child("backing")))


async def _run_state(session: QmpSession) -> str:
    return str((await session.execute("query-status"))["status"])


def make_scratch(parent: Path | None) -> Path:
    """A private (0700) directory for the servers' sockets and the state files."""
    parent = parent or Path(os.environ.get("TMPDIR") or "/var/tmp")
    try:
        return Path(tempfile.mkdtemp(prefix="fleece-live-", dir=parent))
    except OSError as exc:
        raise BadInput(f"cannot make a scratch directory in {parent}: {exc.strerror}; "
                       "nothing was changed") from None


# -- the QMP steps ------------------------------------------------------------------------

def _serve(req: LiveRequest, d: LiveDisk) -> NbdkitServer:
    # Started from this (the main) thread: nbdkit's --exit-with-parent follows the
    # thread that forked it, and it must die with fleece, never outlive it.
    server = NbdkitServer(req.repo_url, req.point, d.drive, Path(d.socket), block_status=False)
    server.start()
    return server


async def _add_nbd_node(session: QmpSession, d: LiveDisk) -> None:
    # reconnect-delay stays 0: with the server gone, reads fail at once, so the
    # stream job stops and a device with rerror=stop pauses the VM right away.
    await session.execute("blockdev-add", {
        "driver": "nbd", "node-name": d.nbd_node, "read-only": True,
        "server": {"type": "unix", "path": d.socket}})


def _qcow2_options(d: LiveDisk) -> dict[str, Any]:
    """The qcow2 node's options, the same for ``blockdev-add`` and ``blockdev-reopen``."""
    return {"driver": "qcow2", "node-name": d.node, "file": d.file_node, "backing": d.nbd_node}


def create_image(d: LiveDisk, image: DiskImage) -> None:
    """The output qcow2: the point's zero chunks as zero clusters, its header naming the point's
    socket as backing file; built under a temporary name and renamed into place whole."""
    output = Path(d.output)
    tmp = output.with_name(f".{output.name}.fleece-{secrets.token_hex(4)}")
    zeroes = "".join(f"write -z {start} {length}\n" for start, length in _zero_runs(image))
    try:
        _tool(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp), str(d.size)], output)
        if zeroes:
            # Offline, before QEMU opens it: later these would be guest-visible writes.
            _tool(["qemu-io", "-f", "qcow2", str(tmp)], output, stdin=zeroes + "quit\n")
        _tool(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", nbd_uri(Path(d.socket)), "-F", "raw",
               str(tmp)], output)
        os.replace(tmp, output)  # --force replaces an old file only now, whole
    finally:
        tmp.unlink(missing_ok=True)


ZERO_RUN_MAX = 1 << 30
"""qemu-io writes at most 2 GiB at once."""


def _zero_runs(image: DiskImage) -> list[tuple[int, int]]:
    """(offset, length) of the runs of zero chunks, each at most :data:`ZERO_RUN_MAX`."""
    runs: list[tuple[int, int]] = []
    index = image.index
    for i in range(index.n_chunks):
        if index.get(i) is not None:
            continue
        start, length = i * index.chunk_size, index.chunk_length(i)
        if runs and runs[-1][0] + runs[-1][1] == start and runs[-1][1] + length <= ZERO_RUN_MAX:
            runs[-1] = (runs[-1][0], runs[-1][1] + length)
        else:
            runs.append((start, length))
    return runs


def _tool(argv: list[str], output: Path, stdin: str | None = None) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, input=stdin,
                              stdin=None if stdin is not None else subprocess.DEVNULL)
    except FileNotFoundError:
        raise FleeceError(f"{argv[0]} is not installed (Debian: qemu-utils)") from None
    out = proc.stdout.lower()
    failed = proc.returncode != 0 or (argv[0] == "qemu-io" and ("error" in out or "failed" in out))
    if failed:
        message = ((proc.stderr + proc.stdout).strip().splitlines() or ["no message"])[-1]
        raise FleeceError(f"cannot create {output}: {argv[0]}: {message}")


async def _attach(session: QmpSession, d: LiveDisk) -> None:
    await session.execute("blockdev-add", {"driver": "file", "node-name": d.file_node,
                                           "filename": d.output})
    await session.execute("blockdev-add", _qcow2_options(d))
    # qom-set to the node a device already has aborts QEMU 7.2: look first.
    attached = await session.execute("qom-get", {"path": d.qdev, "property": "drive"})
    if attached != d.placeholder[0]:
        raise FleeceError(f"device {d.qdev} moved to {attached!r} while fleece set up; "
                          "nothing is left changed")
    await session.execute("qom-set", {"path": d.qdev, "property": "drive", "value": d.node})


async def _start_stream(session: QmpSession, d: LiveDisk, speed: int) -> None:
    args: dict[str, Any] = {"job-id": job_id(d.key), "device": d.node, "on-error": "stop",
                            "auto-dismiss": False, "filter-node-name": cor_node(d.key)}
    if speed:
        args["speed"] = speed
    await session.execute("block-stream", args)


async def _jobs(session: QmpSession) -> dict[str, dict[str, Any]]:
    """Our jobs by id, ``query-jobs`` merged with ``query-block-jobs`` (its io-status)."""
    jobs = {j["id"]: dict(j) for j in await session.execute("query-jobs")
            if j["id"].startswith(LIVE_PREFIX)}
    for b in await session.execute("query-block-jobs"):
        if b["device"] in jobs:
            jobs[b["device"]]["io-status"] = b.get("io-status", "ok")
    return jobs


async def _end_job(session: QmpSession, key: str) -> None:
    """Cancel the job of disk ``key`` if it still runs (or stopped on an error), then dismiss it."""
    deadline = time.monotonic() + CANCEL_TIMEOUT
    cancelled = False
    while (job := (await _jobs(session)).get(job_id(key))) is not None:
        if job["status"] == "concluded":
            await session.execute("job-dismiss", {"id": job_id(key)})
            return
        if not cancelled:
            await session.execute("block-job-cancel", {"device": job_id(key), "force": True})
            cancelled = True
        if time.monotonic() > deadline:
            raise FleeceError(f"job {job_id(key)} did not end within {CANCEL_TIMEOUT:g}s of its cancel")
        await asyncio.sleep(POLL_SECONDS)


async def _delete_node(session: QmpSession, name: str) -> bool:
    try:
        await session.execute("blockdev-del", {"node-name": name})
    except FleeceError as exc:
        log.debug("blockdev-del %s: %s", name, exc)
        return False
    return True


async def _undo(session: QmpSession, plans: list[LiveDisk]) -> list[str]:
    """Put every device back on its placeholder and remove what was added; the errors."""
    errors = []
    graph = await read_graph(session)
    for d in plans:
        try:
            await _end_job(session, d.key)
            attached = await session.execute("qom-get", {"path": d.qdev, "property": "drive"})
            if attached == d.node:
                await session.execute("qom-set", {"path": d.qdev, "property": "drive",
                                                  "value": d.placeholder[0]})
        except FleeceError as exc:
            errors.append(f"{d.drive}: {exc}")
        for node in (d.node, d.file_node, d.nbd_node):
            if node in graph.nodes and not await _delete_node(session, node):
                errors.append(f"node {node} remains")
    return errors


# -- streaming until done -------------------------------------------------------------

class _Streams:
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
            jobs = await _jobs(self.session)
            for key, d in list(self.pending.items()):
                job = jobs.get(job_id(key))
                if job is None or (job["status"] == "concluded" and not job.get("error")):
                    # No job: a resume found the stream already complete.
                    await self._finish(d, job is not None)
                    continue
                total = int(job.get("total-progress") or d.size)
                self.emit("progress", drive=d.drive, done=int(job.get("current-progress", 0)),
                          total=total)
                self._check(d, job)
            if self.pending:
                await asyncio.sleep(POLL_SECONDS)

    def _check(self, d: LiveDisk, job: dict[str, Any]) -> None:
        why = None
        if job.get("error"):
            why = f"the stream job ended with an error: {job['error']}"
        elif job.get("io-status", "ok") != "ok" and job["status"] == "paused":
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
        graph = await read_graph(self.session)
        if graph.nodes.get(d.node) and graph.nodes[d.node].child("backing"):
            raise FleeceError(f"the stream of {d.drive} ended but {d.output} still has a backing node; "
                              "carry on with 'fleece restore --live --resume'")
        for node in graph.live_restore_nodes():
            if node.startswith(f"{LIVE_PREFIX}nbd-{d.key}-"):
                await _delete_node(self.session, node)
        for node in d.placeholder:
            # Nodes the user gave with -blockdev go; a -drive's belong to its backend and stay.
            if node in graph.nodes and not await _delete_node(self.session, node):
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


# -- the two entry points -----------------------------------------------------------------

async def live_restore(req: LiveRequest, emit: Emit) -> list[LiveDisk]:
    """Start a live restore and stream until every disk is local; the disks restored."""
    async with QmpSession.open(req.qmp) as session:
        status = await _run_state(session)
        if status not in PAUSED_STATES:
            raise BadInput(f"the VM is {status}: a live restore replaces its disks, so start QEMU "
                           "with -S (or 'stop' it) first; nothing was changed")
        graph = await read_graph(session)
        scratch = make_scratch(req.scratch_parent)
        try:
            plans = _plan(graph, req, scratch)
        except BaseException:
            scratch.rmdir()
            raise
        servers: dict[str, NbdkitServer] = {}
        created: list[Path] = []
        try:
            for d in plans:
                servers[d.key] = _serve(req, d)
                d.save()
            for d, (image, _, _) in zip(plans, req.disks, strict=True):
                create_image(d, image)
                created.append(Path(d.output))
            for d in plans:
                await _add_nbd_node(session, d)
                await _attach(session, d)
            for d in plans:
                await _start_stream(session, d, req.speed)
            if req.start and status in PAUSED_STATES:
                await session.execute("cont")
        except BaseException as exc:
            errors = await _undo(session, plans)
            if errors:
                exc.add_note("undo incomplete: " + "; ".join(errors))
            stop_servers(servers)
            for path in created:
                path.unlink(missing_ok=True)
            for d in plans:
                d.remove()
            with contextlib.suppress(OSError):
                scratch.rmdir()
            raise
        emit("running", status=await _run_state(session), disks=plans)
        try:
            await _Streams(session, plans, servers, emit).run()
        finally:
            stop_servers(servers)
        return plans


async def resume(req: LiveRequest, emit: Emit) -> list[LiveDisk]:
    """Serve the point again to live restores that stopped, and stream until done."""
    async with QmpSession.open(req.qmp) as session:
        graph = await read_graph(session)
        plans = _found(graph, req)
        scratch = make_scratch(req.scratch_parent)
        servers: dict[str, NbdkitServer] = {}
        try:
            for d in plans:
                old = LiveDisk(**{**d.__dict__})
                d.socket = str(scratch / f"{d.key}.sock")
                d.pid = os.getpid()
                servers[d.key] = _serve(req, d)
                await _reattach(session, d, req.speed)
                d.save()
                old.remove()
            if req.start and await _run_state(session) == "io-error":
                # Paused by the failed reads of the export, not by anyone else.
                await session.execute("cont")
        except BaseException:
            stop_servers(servers)
            raise
        emit("running", status=await _run_state(session), disks=plans)
        try:
            await _Streams(session, plans, servers, emit).run()
        finally:
            stop_servers(servers)
        return plans


def _found(graph: BlockGraph, req: LiveRequest) -> list[LiveDisk]:
    """The state of each requested disk's live restore, checked against the request."""
    states: dict[str, LiveDisk] = {}
    for name in graph.live_restore_nodes():
        if name.startswith(f"{LIVE_PREFIX}nbd-"):
            sock = socket_of(graph.nodes[name].filename)
            if sock:
                with contextlib.suppress(FleeceError):
                    state = LiveDisk.load(Path(sock).with_suffix(".json"))
                    if state.nbd_node == name:
                        states[state.drive] = state
    plans = []
    for image, device, output in req.disks:
        d = states.get(image.disk.name)
        disk = resolve_drive(graph.disks, device)
        if d is None or d.qdev != disk.qdev:
            raise BadInput(f"no live restore of {image.disk.name} onto device {device} to resume in "
                           "this VM; nothing was changed")
        if not process_gone(d.host, d.pid) and d.pid != os.getpid():
            raise BadInput(f"fleece pid {d.pid} on {d.host} is still streaming {d.drive}; "
                           "nothing was changed")
        if d.point != req.point.id:
            raise BadInput(f"the live restore of {d.drive} is of point {d.point}, not {req.point.id}; "
                           "nothing was changed")
        if os.path.realpath(d.output) != os.path.realpath(output):
            raise BadInput(f"the live restore of {d.drive} writes {d.output}, not {output}; "
                           "nothing was changed")
        plans.append(d)
    return plans


async def _reattach(session: QmpSession, d: LiveDisk, speed: int) -> None:
    """End the stopped job; if the image still needs the point, back it by a new NBD node."""
    await _end_job(session, d.key)
    graph = await read_graph(session)
    node = graph.nodes.get(d.node)
    if node is None:
        raise FleeceError(f"node {d.node} of {d.output} is gone from QEMU; cannot resume")
    if not node.child("backing"):
        return  # the stream had completed; only the clean-up was cut short
    old = d.nbd_node
    d.nbd_node = new_nbd_node(d.key)
    await _add_nbd_node(session, d)
    # The job is gone, so the chain is no longer frozen and the backing may change.
    await session.execute("blockdev-reopen", {"options": [_qcow2_options(d)]})
    await _delete_node(session, old)
    await _start_stream(session, d, speed)
