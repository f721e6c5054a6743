"""``fleece status``: the VM's disks, their dirty bitmaps and any fleece leftovers."""

from __future__ import annotations

import argparse
from typing import Any

from fleece.commands.common import add_json_option, add_qmp_option, human_size, print_json, run
from fleece.fleecing.leftovers import find_leftovers
from fleece.fleecing.names import checkpoint_of
from fleece.qmp import QmpSession, list_disks


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``status`` to the command line."""
    p = sub.add_parser("status", help="show a VM's disks, dirty bitmaps and fleece leftovers")
    add_qmp_option(p)
    add_json_option(p)
    p.set_defaults(func=cmd_status)


async def collect_status(qmp: str) -> dict[str, Any]:
    """Everything ``status`` reports, as a JSON-ready dict."""
    async with QmpSession.open(qmp) as session:
        version = await session.qemu_version()
        name = (await session.execute("query-name")).get("name")
        runstate = (await session.execute("query-status"))["status"]
        disks = await list_disks(session)
        leftovers = await find_leftovers(session, disks)
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
                    for b in d.bitmaps
                ],
            }
            for d in disks
        ],
        "leftovers": leftovers.as_dict(),
    }


def cmd_status(args: argparse.Namespace) -> int:
    """Print the status, human-readable or as JSON."""
    status = run(collect_status(args.qmp))
    if args.json:
        print_json(status)
        return 0
    print(f"VM {status['vm'] or '(unnamed)'}: QEMU {status['qemu']}, {status['status']}")
    for d in status["disks"]:
        print(
            f"  {d['drive']}: node {d['node']}, {d['format']}, {human_size(d['size'])}"
            f" ({d['size']} bytes), {d['file']}"
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
    if any(left.values()):
        items = "; ".join(f"{k}: {', '.join(v)}" for k, v in left.items() if v)
        print(f"  leftovers of an interrupted fleece run: {items} (run 'fleece cleanup')")
    else:
        print("  no fleece leftovers")
    return 0
