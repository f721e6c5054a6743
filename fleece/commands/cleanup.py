"""``fleece cleanup``: remove what a killed fleece run left in QEMU, as an abort; with
``--stale``, also the scratch directories of exports whose QEMU and fleece are both gone, and
those of ``verify --fsck``/``--boot`` runs whose fleece is gone.

``--dead-only`` (what the systemd unit runs after every stop) removes only
what a fleece process that has certainly exited left, and leaves anything a
live process or ``export start`` holds. This module also has the pieces the
commands that put things into QEMU share: the exact clean-up command for
their VM, a look at what is left, the stop-signal guard and the healing of
a dead run's leftovers before a backup.

``--stale`` also removes the scratch directories of guest-level runs
(``verify --fsck``/``--boot``, ``files``, ``mount``) whose fleece is gone.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fleece.commands import on_libvirt
from fleece.commands.common import add_json_option, add_vm_options, print_json, run_async, say
from fleece.commands.config import apply_config
from fleece.commands.stop_signals import abort_on_stop_signals
from fleece.errors import BadInput, FleeceError
from fleece.fleecing import Leftovers, cleanup
from fleece.fleecing.graph import read_graph
from fleece.fleecing.leftovers import cleanup_command, find_leftovers, ownership
from fleece.fleecing.stale_scratch import ScratchDir, scratch_parents, sweep
from fleece.fleecing.teardown import heal_dead_run
from fleece.guest import scratch as guest_scratch
from fleece.qmp import QmpSession


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cleanup`` to the command line."""
    p = sub.add_parser("cleanup", help="remove the nodes, exports and bitmaps a killed fleece run left")
    add_vm_options(p, required=False)
    p.add_argument("--config", metavar="FILE",
                   help="the VM's backup config: its qmp (or libvirt and connect) says which VM")
    p.add_argument("--dead-only", action="store_true",
                   help="remove only what a fleece process that has certainly exited left; leave "
                        "exports of live processes and of 'export start' (what the systemd unit runs)")
    p.add_argument("--stale", action="store_true",
                   help="also remove fleece-* scratch directories whose QEMU and fleece are gone")
    p.add_argument("--scratch-dir", metavar="DIR", action="append", type=Path,
                   help="where to look for them (repeatable; default $TMPDIR and /var/tmp)")
    add_json_option(p)
    p.set_defaults(func=run)


def vm_cleanup_command(args: argparse.Namespace) -> str:
    """The exact ``fleece cleanup`` command for the VM ``args`` name, shell-quoted."""
    if getattr(args, "libvirt", None):
        words = ["fleece", "cleanup", "--libvirt", args.libvirt]
        if getattr(args, "connect", None):
            words += ["--connect", args.connect]
        return shlex.join(words)
    return cleanup_command(args.qmp)


def left_in_qemu(qmp: str) -> str | None:
    """What fleece objects QEMU holds now (None: none); a failed look says so."""
    async def look() -> Leftovers:
        async with QmpSession.open(qmp) as session:
            return await find_leftovers(session)
    try:
        left = run_async(look())
    except FleeceError as exc:
        return f"unknown (QEMU could not be asked: {exc})"
    return left.describe() if left else None


@contextmanager
def stop_guard(args: argparse.Namespace, what: str, note: str = "") -> Iterator[None]:
    """SIGTERM/SIGHUP abort ``what`` like Ctrl-C (:mod:`fleece.commands.stop_signals`) on this VM."""
    qmp = None if getattr(args, "libvirt", None) else args.qmp
    with abort_on_stop_signals(what, vm_cleanup_command(args),
                               (lambda: left_in_qemu(qmp)) if qmp else None, note):
        yield


def heal_before_backup(qmp: str) -> None:
    """Remove what a certainly dead earlier run left in QEMU (saying so), or refuse what another owns."""
    async def heal() -> None:
        async with QmpSession.open(qmp) as session:
            await heal_dead_run(session, say)
    run_async(heal())


async def _cleanup(qmp: str, dead_only: bool) -> tuple[Leftovers, str | None]:
    async with QmpSession.open(qmp) as session:
        if not dead_only:
            return await cleanup(session, log=say), None
        owned = ownership(await read_graph(session))
        if not owned.left:
            return Leftovers(), None
        if not owned.certainly_dead:
            return Leftovers(), str(owned.refusal(session.address))
        removed = await heal_dead_run(session, say)
        return removed or Leftovers(), None


def run(args: argparse.Namespace) -> int:
    """Remove leftovers and say what was removed."""
    if args.config:
        # A backup's config file: its qmp (or libvirt, connect) say which VM; the rest is not ours.
        from fleece.commands.backup import CONFIG_KEYS

        found = argparse.Namespace(config=args.config)
        apply_config(found, CONFIG_KEYS, "cleanup")
        found.qmp, found.libvirt, found.connect = (getattr(found, k, None)
                                                   for k in ("qmp", "libvirt", "connect"))
        if not args.qmp and not args.libvirt:
            args.qmp, args.libvirt = found.qmp, found.libvirt
            args.connect = args.connect or found.connect
        if not args.qmp and not args.libvirt:
            raise BadInput(f"config file {args.config} names no qmp socket (or libvirt domain)")
        if args.qmp and args.libvirt:
            raise BadInput(f"config file {args.config} names both qmp and libvirt")
    on_libvirt.check_connect(args)
    if args.libvirt and args.dead_only:
        # libvirt's own job state says who holds a backup job; the next
        # `fleece backup --libvirt` recovers from a dead run. Touch nothing here.
        print(f"left alone: --dead-only looks only at QMP-direct VMs; the next "
              f"{shlex.join(['fleece', 'backup', '--libvirt', args.libvirt])} cleans up after a dead run")
        return 0
    if args.libvirt:
        return on_libvirt.cleanup(args)
    if not args.qmp and not args.stale:
        raise BadInput("cleanup needs --qmp SOCKET (or --libvirt DOMAIN, or --config FILE), --stale, "
                       "or both")
    if args.dead_only and not args.qmp:
        raise BadInput("--dead-only goes with --qmp SOCKET (or --config FILE)")
    if args.scratch_dir and not args.stale:
        raise BadInput("--scratch-dir goes with --stale")
    for d in args.scratch_dir or []:
        if not d.is_dir():
            raise BadInput(f"--scratch-dir {d} is not a directory; nothing was removed")
    removed, kept = run_async(_cleanup(args.qmp, args.dead_only)) if args.qmp else (None, None)
    swept = None
    if args.stale:
        parents = scratch_parents(args.scratch_dir)
        # Exports' scratch directories, then those of guest-level runs (fleece.guest).
        swept = sweep(parents) + [ScratchDir(s.path, s.stale, s.why)
                                  for s in guest_scratch.sweep(parents)]
    if args.json:
        doc: dict[str, object] = {}
        if removed is not None:
            doc["removed"] = removed.as_dict()
        if args.dead_only:
            doc["kept"] = kept
        if swept is not None:
            doc["stale_scratch"] = {
                "removed": [s.path for s in swept if s.stale],
                "kept": [{"path": s.path, "why": s.why} for s in swept if not s.stale],
            }
        print_json(doc)
        return 0
    if kept is not None:
        print(f"left alone: {kept}")
    elif removed is not None:
        print(f"removed {removed.describe()}" if removed else "nothing to clean up")
    for s in swept or []:
        print(f"removed stale scratch directory {s.path} ({s.why})" if s.stale
              else f"kept scratch directory {s.path}: {s.why}")
    if swept is not None and not swept:
        print("no fleece scratch directories")
    return 0
