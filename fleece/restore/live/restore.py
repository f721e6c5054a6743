"""Setting a live restore up, undoing a set-up that failed, and resuming one that stopped.

See :mod:`fleece.restore.live` for the sequence and the failure policy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from socket import gethostname
from typing import Any

from fleece.errors import BadInput, FleeceError
from fleece.fleecing.graph import BlockGraph, read_graph
from fleece.fleecing.names import LIVE_PREFIX, is_fleece_name, is_live_name, node_key
from fleece.liveness import process_gone
from fleece.qmp import QmpSession, resolve_drive
from fleece.qmp.answers import query_status
from fleece.repo.format.point import RestorePoint
from fleece.restore.image import DiskImage
from fleece.restore.live.image import create_image
from fleece.restore.live.jobs import Emit, Streams, backing_filename, delete_node, end_job, stop_servers
from fleece.restore.live.state import LiveDisk, cor_node, job_id, new_nbd_node, socket_of
from fleece.serve.server import NbdkitServer

log = logging.getLogger(__name__)

PAUSED_STATES = ("prelaunch", "paused")
"""Run states in which a device may be moved onto the restored image."""


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
    speed: int = 0
    """Stream rate limit in bytes/s (0: none)."""
    scratch_parent: Path | None = None
    passphrase: bytes | None = None
    """An encrypted repository's passphrase, for the servers (their environment only)."""


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
    return str((await query_status(session))["status"])


async def _warn_of_error_policy(session: QmpSession, d: LiveDisk) -> None:
    """Say so when the device would hand the guest I/O errors rather than pause, should the
    point's server die mid-stream (rerror/werror are fixed when the device is created)."""
    policy: dict[str, object] = {}
    for prop in ("rerror", "werror"):
        with contextlib.suppress(FleeceError):
            policy[prop] = await session.execute("qom-get", {"path": d.qdev, "property": prop})
    if policy.get("rerror") != "stop" or policy.get("werror") != "stop":
        found = ", ".join(f"{k}={v}" for k, v in policy.items()) or "no rerror/werror"
        unless = " (auto: the -drive's policy, report unless it says stop)" if "auto" in found else ""
        log.warning("warning: device %s has %s%s: if the point's server dies mid-stream, the guest "
                    "gets I/O errors instead of pausing (create it with rerror=stop,werror=stop)",
                    d.qdev, found, unless)


def make_scratch(parent: Path | None) -> Path:
    """A private (0700) directory for the servers' sockets and the state files."""
    parent = parent or Path(os.environ.get("TMPDIR") or "/var/tmp")
    try:
        return Path(tempfile.mkdtemp(prefix="fleece-live-", dir=parent))
    except OSError as exc:
        raise BadInput(f"cannot make a scratch directory in {parent}: {exc.strerror}; "
                       "nothing was changed") from None


def _serve(req: LiveRequest, d: LiveDisk) -> NbdkitServer:
    """Launch the server of ``d``'s point (not waiting for it to be ready)."""
    # Started from this (the main) thread: nbdkit's --exit-with-parent follows the
    # thread that forked it, and it must die with fleece, never outlive it.
    server = NbdkitServer(req.repo_url, req.point, d.drive, Path(d.socket), block_status=False,
                          private_dir=d.server_dir, passphrase=req.passphrase)
    server.launch()
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


async def _undo(session: QmpSession, plans: list[LiveDisk]) -> list[str]:
    """Put every device back on its placeholder and remove what was added; the errors."""
    errors = []
    graph = await read_graph(session)
    for d in plans:
        try:
            await end_job(session, d.key)
            attached = await session.execute("qom-get", {"path": d.qdev, "property": "drive"})
            if attached == d.node:
                await session.execute("qom-set", {"path": d.qdev, "property": "drive",
                                                  "value": d.placeholder[0]})
        except FleeceError as exc:
            errors.append(f"{d.drive}: {exc}")
        for node in (d.node, d.file_node, d.nbd_node):
            if node in graph.nodes and not await delete_node(session, node):
                errors.append(f"node {node} remains")
    return errors


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
            for d in plans:
                if "/fleece-live-" in (await backing_filename(session, d.placeholder[0]) or ""):
                    raise BadInput(f"device {d.qdev} is being live-restored already; carry on with "
                                   "--resume; nothing was changed")
        except BaseException:
            scratch.rmdir()
            raise
        for d in plans:
            await _warn_of_error_policy(session, d)
        servers: dict[str, NbdkitServer] = {}
        created: list[Path] = []
        try:
            for d in plans:
                servers[d.key] = _serve(req, d)
                d.save()
            # The images are made while the servers start (each takes a few hundred ms).
            for d, (image, _, _) in zip(plans, req.disks, strict=True):
                create_image(d, image)
                created.append(Path(d.output))
            for server in servers.values():
                server.wait_ready()
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
        return await _stream_to_the_end(session, plans, servers, emit)


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
                d.pid, d.host = os.getpid(), gethostname()
                servers[d.key] = _serve(req, d)
                servers[d.key].wait_ready()
                await _reattach(session, d, req.speed)
                d.save()
                old.remove()
            if req.start and await _run_state(session) == "io-error":
                # Paused by the failed reads of the export, not by anyone else.
                await session.execute("cont")
        except BaseException:
            stop_servers(servers)
            raise
        return await _stream_to_the_end(session, plans, servers, emit)


async def _stream_to_the_end(session: QmpSession, plans: list[LiveDisk],
                             servers: dict[str, NbdkitServer], emit: Emit) -> list[LiveDisk]:
    """Say the VM runs, then stream every disk until its image stands alone; the servers stop
    however that ends."""
    emit("running", status=await _run_state(session), disks=plans)
    try:
        await Streams(session, plans, servers, emit).run()
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
    await end_job(session, d.key)
    graph = await read_graph(session)
    if d.node not in graph.nodes:
        raise FleeceError(f"node {d.node} of {d.output} is gone from QEMU; cannot resume")
    if not await backing_filename(session, d.node):
        return  # the stream had completed; only the clean-up was cut short
    old = d.nbd_node
    d.nbd_node = new_nbd_node(d.key)
    await _add_nbd_node(session, d)
    d.save()  # the new node (and its socket) lead to this state from now on
    # The job is gone, so the chain is no longer frozen and the backing may change.
    await session.execute("blockdev-reopen", {"options": [_qcow2_options(d)]})
    await delete_node(session, old)
    await _start_stream(session, d, speed)
