"""``fleece status``: the VM's disks, their dirty bitmaps and any fleece leftovers."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from fleece.commands import on_libvirt
from fleece.commands.common import add_json_option, add_vm_options, human_size, print_json, run_async
from fleece.fleecing.graph import BlockGraph, export_states, format_node, read_graph
from fleece.fleecing.leftovers import cleanup_command, find_leftovers, stop_command
from fleece.fleecing.names import checkpoint_of, is_fleece_name
from fleece.fleecing.stale_scratch import scratch_parents, survey
from fleece.fleecing.state import ExportState
from fleece.qmp import DirtyBitmap, Disk, QmpSession
from fleece.qmp.answers import query_name, query_status
from fleece.repo.backends.base import ObjectMissing
from fleece.repo.backends.store_check import CHECK_KEY, StoreCheck
from fleece.repo.backends.url import open_backend
from fleece.repo.format.point import iso_utc


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``status`` to the command line."""
    p = sub.add_parser("status", help="show a VM's disks, dirty bitmaps and fleece leftovers")
    add_vm_options(p)
    p.add_argument("--repo", metavar="URL", default=None,
                   help="also show what the repository's store guarantees (S3: the cached store check)")
    add_json_option(p)
    p.set_defaults(func=run)


async def collect_status(qmp: str) -> dict[str, Any]:
    """Everything ``status`` reports, as a JSON-ready dict."""
    async with QmpSession.open(qmp) as session:
        version = await session.qemu_version()
        name = (await query_name(session)).get("name")
        runstate = (await query_status(session))["status"]
        graph = await read_graph(session)
        leftovers = await find_leftovers(session)
    live = [s for s in export_states(graph) if s.outcome is None]
    export = live[0] if live and graph.exports else None
    leftovers_hint = cleanup_command(qmp) if leftovers else None
    disks = [_disk_view(d, graph) for d in graph.disks]
    return {
        "vm": name,
        "qemu": ".".join(map(str, version)),
        "status": runstate,
        "disks": [
            {
                "drive": d.name,
                "device": d.device_id,
                "qdev": d.qdev,
                "node": d.node_name,
                "filter": on_filter,
                "backend": d.backend or None,
                "format": d.format,
                "size": d.virtual_size,
                "file": d.filename,
                "bitmaps": [
                    {
                        "name": b.name,
                        "granularity": b.granularity,
                        "count": b.count,
                        "recording": b.recording,
                        "persistent": b.persistent,
                        "inconsistent": b.inconsistent,
                        "checkpoint": checkpoint_of(b.name),
                    }
                    for b in bitmaps
                ],
            }
            for d, on_filter, bitmaps in disks
        ],
        "export": None if export is None else _export_view(export, qmp),
        "leftovers": leftovers.as_dict(),
        "cleanup": None if export is not None else leftovers_hint,
        "stale_scratch": [d.path for d in survey(scratch_parents()) if d.stale],
    }


def _export_view(export: ExportState, qmp: str) -> dict[str, Any]:
    """The live export and who holds it (what ends it); a TCP one also says where it listens
    and whether that is insecure."""
    server = export.server
    exited = export.owner_gone()
    if export.owner == "export":
        end_with: str | None = stop_command(qmp)
    else:
        end_with = cleanup_command(qmp) if exited else None  # a live holder ends it itself
    view: dict[str, Any] = {"checkpoint": export.checkpoint, "drives": [d.drive for d in export.disks],
                            "socket": None if server.is_tcp else export.socket,
                            "owner": export.owner, "pid": export.pid, "host": export.host,
                            "owner_exited": exited, "end_with": end_with}
    if server.is_tcp:
        view["listen"] = server.address
        view["tls"] = server.tls
        view["insecure"] = server.insecure
    return view


def _disk_view(disk: Disk, graph: BlockGraph) -> tuple[Disk, str | None, tuple[DirtyBitmap, ...]]:
    """The disk as the user knows it: while fleece's filter is attached, the format node below it."""
    node = format_node(graph, disk)
    if not is_fleece_name(disk.node_name) or node is None:
        return disk, None, node.bitmaps if node else disk.bitmaps
    shown = Disk(device_id=disk.device_id, qdev=disk.qdev, backend=disk.backend, node_name=node.name,
                 format=node.driver, virtual_size=disk.virtual_size, filename=disk.filename,
                 bitmaps=node.bitmaps)
    return shown, disk.node_name, node.bitmaps


def repository_status(url: str) -> dict[str, Any]:
    """What ``--repo`` adds: the store check cached in the repository (read only, no probe)."""
    backend = open_backend(url)
    out: dict[str, Any] = {"url": backend.url, "store": None}
    if url.startswith("s3://"):
        try:
            check = StoreCheck.from_json(backend.get(CHECK_KEY))
        except ObjectMissing:
            check = None
        if check is not None:
            out["store"] = {k: v for k, v in check.as_dict().items() if k != "unsafe_locks"}
    return out


def run(args: argparse.Namespace) -> int:
    """Print the status, human-readable or as JSON."""
    on_libvirt.check_connect(args)
    if args.libvirt:
        return on_libvirt.status(args)
    status = run_async(collect_status(args.qmp))
    if args.repo:
        status["repository"] = repository_status(args.repo)
    if args.json:
        print_json(status)
        return 0
    print(f"VM {status['vm'] or '(unnamed)'}: QEMU {status['qemu']}, {status['status']}")
    for d in status["disks"]:
        print(
            f"  {d['drive']}: node {d['node']}, {d['format']}, {human_size(d['size'])}"
            f" ({d['size']} bytes), {d['file']}"
            + (f", reading through {d['filter']}" if d["filter"] else "")
        )
        if not d["bitmaps"]:
            print("    no dirty bitmaps")
        for b in d["bitmaps"]:
            flags = [
                "recording" if b["recording"] else "disabled",
                "persistent" if b["persistent"] else "transient",
            ]
            if b["inconsistent"]:
                flags.append("INCONSISTENT")
            print(
                f"    bitmap {b['name']}: granularity {human_size(b['granularity'])},"
                f" {b['count']} dirty bytes, {', '.join(flags)}"
            )
    left = status["leftovers"]
    if status["export"]:
        e = status["export"]
        where = f"socket {e['socket']}" if e["socket"] else f"TCP {e['listen']} TLS {e['tls'] or 'off'}"
        up = f"  a fleece export is up at checkpoint {e['checkpoint']} ({', '.join(e['drives'])}, {where})"
        if e["owner"] == "export":
            print(f"{up}, left up by 'fleece export start': end it with: {e['end_with']} "
                  "(add --abort to drop its checkpoint)")
        elif e["owner_exited"]:
            print(f"{up}, held by fleece pid {e['pid']} on {e['host']}, which has exited: the next "
                  f"fleece backup cleans it up, or run: {e['end_with']}")
        else:
            print(f"{up}, held by fleece pid {e['pid']} on {e['host']} (a backup or a program using "
                  "the Python API), which may be running: it ends the export itself")
        if e.get("insecure"):
            print(f"  WARNING: the export listens on TCP {e['listen']} WITHOUT TLS: anyone who can "
                  "reach that port can read these disks")
    elif any(left.values()):
        items = "; ".join(f"{k}: {', '.join(v)}" for k, v in left.items() if v)
        print(f"  leftovers of an interrupted fleece run: {items}; remove them with: {status['cleanup']}")
    else:
        print("  no fleece leftovers")
    if status["stale_scratch"]:
        print(f"  stale scratch directories of exports whose QEMU and fleece are gone: "
              f"{', '.join(status['stale_scratch'])} (run 'fleece cleanup --stale')")
    repo = status.get("repository")
    if repo is not None:
        store = repo["store"]
        if store is None:
            print(f"repository {repo['url']}: no store check on record")
        else:
            verb = {"enforced": "enforces", "ignored": "ignores",
                    "refuses-valid": "refuses even valid"}.get(store["conditional_create"],
                                                              "does not implement")
            print(f"repository {repo['url']}: the store at {store['endpoint']} "
                  f"{verb} conditional creates (checked "
                  f"{iso_utc(datetime.fromtimestamp(store['checked'], UTC))})")
            for guarantee in store["guarantees_not_held"]:
                print(f"  does not hold: {guarantee}")
    return 0
