"""``fleece cleanup``: remove what a killed fleece run left in QEMU, as an abort; with
``--stale``, also the scratch directories of exports whose QEMU and fleece are both gone, and
those of ``verify --fsck``/``--boot`` runs whose fleece is gone."""

from __future__ import annotations

import argparse
from pathlib import Path

from fleece.commands import on_libvirt
from fleece.commands.common import add_json_option, add_vm_options, print_json, run_async, say
from fleece.errors import BadInput
from fleece.fleecing import Leftovers, cleanup
from fleece.fleecing.stale_scratch import ScratchDir, scratch_parents, sweep
from fleece.guest import scratch as guest_scratch
from fleece.qmp import QmpSession


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cleanup`` to the command line."""
    p = sub.add_parser("cleanup", help="remove the nodes, exports and bitmaps a killed fleece run left")
    add_vm_options(p, required=False)
    p.add_argument("--stale", action="store_true",
                   help="also remove fleece-* scratch directories whose QEMU and fleece are gone")
    p.add_argument("--scratch-dir", metavar="DIR", action="append", type=Path,
                   help="where to look for them (repeatable; default $TMPDIR and /var/tmp)")
    add_json_option(p)
    p.set_defaults(func=run)


async def _cleanup(qmp: str) -> Leftovers:
    async with QmpSession.open(qmp) as session:
        return await cleanup(session, log=say)


def run(args: argparse.Namespace) -> int:
    """Remove leftovers and say what was removed."""
    on_libvirt.check_connect(args)
    if args.libvirt:
        return on_libvirt.cleanup(args)
    if not args.qmp and not args.stale:
        raise BadInput("cleanup needs --qmp SOCKET (or --libvirt DOMAIN), --stale, or both")
    if args.scratch_dir and not args.stale:
        raise BadInput("--scratch-dir goes with --stale")
    for d in args.scratch_dir or []:
        if not d.is_dir():
            raise BadInput(f"--scratch-dir {d} is not a directory; nothing was removed")
    removed = run_async(_cleanup(args.qmp)) if args.qmp else None
    swept = None
    if args.stale:
        parents = scratch_parents(args.scratch_dir)
        # Exports' scratch directories, then those of verify --fsck/--boot runs (fleece.guest).
        swept = sweep(parents) + [ScratchDir(s.path, s.stale, s.why)
                                  for s in guest_scratch.sweep(parents)]
    if args.json:
        doc: dict[str, object] = {}
        if removed is not None:
            doc["removed"] = removed.as_dict()
        if swept is not None:
            doc["stale_scratch"] = {
                "removed": [s.path for s in swept if s.stale],
                "kept": [{"path": s.path, "why": s.why} for s in swept if not s.stale],
            }
        print_json(doc)
        return 0
    if removed is not None:
        print(f"removed {removed.describe()}" if removed else "nothing to clean up")
    for s in swept or []:
        print(f"removed stale scratch directory {s.path} ({s.why})" if s.stale
              else f"kept scratch directory {s.path}: {s.why}")
    if swept is not None and not swept:
        print("no fleece scratch directories")
    return 0
