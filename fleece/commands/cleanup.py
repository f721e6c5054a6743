"""``fleece cleanup``: remove what a killed fleece run left in QEMU, as an abort."""

from __future__ import annotations

import argparse
import sys

from fleece.commands import on_libvirt
from fleece.commands.common import add_json_option, add_vm_options, print_json, run
from fleece.fleecing import Leftovers, cleanup
from fleece.qmp import QmpSession


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cleanup`` to the command line."""
    p = sub.add_parser("cleanup", help="remove the nodes, exports and bitmaps a killed fleece run left")
    add_vm_options(p)
    add_json_option(p)
    p.set_defaults(func=cmd_cleanup)


def _say(line: str) -> None:
    sys.stderr.write(f"fleece: {line}\n")


async def _cleanup(qmp: str) -> Leftovers:
    async with QmpSession.open(qmp) as session:
        return await cleanup(session, log=_say)


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Remove leftovers and say what was removed."""
    on_libvirt.check_connect(args)
    if args.libvirt:
        return on_libvirt.cleanup(args)
    removed = run(_cleanup(args.qmp))
    if args.json:
        print_json({"removed": removed.as_dict()})
    elif removed:
        print(f"removed {removed.describe()}")
    else:
        print("nothing to clean up")
    return 0
