"""``fleece status``: the VM's disks, their dirty bitmaps and any fleece leftovers."""

from __future__ import annotations

import argparse
from typing import Any

from fleece.commands import on_libvirt
from fleece.commands.common import add_json_option, add_vm_options, human_size, print_json, run
from fleece.fleecing.graph import BlockGraph, export_states, format_node, read_graph
from fleece.fleecing.leftovers import find_leftovers
from fleece.fleecing.names import checkpoint_of, is_fleece_name
from fleece.qmp import DirtyBitmap, Disk, QmpSession


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``status`` to the command line."""
    p = sub.add_parser("status", help="show a VM's disks, dirty bitmaps and fleece leftovers")
    add_vm_options(p)
    add_json_option(p)
    p.set_defaults(func=cmd_status)


async def collect_status(qmp: str) -> dict[str, Any]:
    """Everything ``status`` reports, as a JSON-ready dict."""
    async with QmpSession.open(qmp) as session:
        version = await session.qemu_version()
        name = (await session.execute("query-name")).get("name")
        runstate = (await session.execute("query-status"))["status"]
        graph = await read_graph(session)
        leftovers = await find_leftovers(session)
    live = [s for s in export_states(graph) if s.outcome is None]
    export = live[0] if live and graph.exports else None
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
        "export": None if export is None else {
            "checkpoint": export.checkpoint, "drives": [d.drive for d in export.disks],
            "socket": export.socket,
        },
        "leftovers": leftovers.as_dict(),
    }


def _disk_view(disk: Disk, graph: BlockGraph) -> tuple[Disk, str | None, tuple[DirtyBitmap, ...]]:
    """The disk as the user knows it: while fleece's filter is attached, the format node below it."""
    node = format_node(graph, disk)
    if not is_fleece_name(disk.node_name) or node is None:
        return disk, None, node.bitmaps if node else disk.bitmaps
    shown = Disk(device_id=disk.device_id, qdev=disk.qdev, backend=disk.backend, node_name=node.name,
                 format=node.driver, virtual_size=disk.virtual_size, filename=disk.filename,
                 bitmaps=node.bitmaps)
    return shown, disk.node_name, node.bitmaps


def cmd_status(args: argparse.Namespace) -> int:
    """Print the status, human-readable or as JSON."""
    on_libvirt.check_connect(args)
    if args.libvirt:
        return on_libvirt.status(args)
    status = run(collect_status(args.qmp))
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
        print(f"  a fleece export is up at checkpoint {e['checkpoint']} ({', '.join(e['drives'])}, "
              f"socket {e['socket']}): end it with 'fleece export stop' (or 'fleece cleanup' if the "
              "process that started it is gone)")
    elif any(left.values()):
        items = "; ".join(f"{k}: {', '.join(v)}" for k, v in left.items() if v)
        print(f"  leftovers of an interrupted fleece run: {items} (run 'fleece cleanup')")
    else:
        print("  no fleece leftovers")
    return 0
