"""``fleece export start`` and ``fleece export stop``: a point-in-time NBD export that outlives the command.

``start`` returns once every disk's export is live and leaves it up for any
NBD reader; ``stop``, from another process, tears it down and commits (or,
with ``--abort``, aborts) the checkpoint bitmaps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fleece.commands import on_libvirt
from fleece.commands.cleanup import stop_guard
from fleece.commands.common import (
    add_json_option,
    add_vm_options,
    human_size,
    print_json,
    run_async,
    say,
)
from fleece.errors import BadInput, ExportError
from fleece.fleecing import PointInTimeExport, cleanup, start_export, stop_export
from fleece.fleecing.checkpoints import LEVELS
from fleece.fleecing.graph import read_graph
from fleece.fleecing.leftovers import ownership, stop_command
from fleece.fleecing.transport import ServerTransport, server_transport
from fleece.qmp import QmpSession


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``export start`` and ``export stop`` to the command line."""
    p = sub.add_parser("export", help="a point-in-time NBD export of a running VM's disks")
    commands = p.add_subparsers(dest="export_command", metavar="start|stop", parser_class=type(p))
    commands.required = True

    start = commands.add_parser("start", help="export disks at one point in time and leave the export up")
    add_vm_options(start)
    start.add_argument("--drive", action="append", metavar="NAME",
                       help="device id, node name or block backend name (with --libvirt: target dev, "
                            "default every disk); repeat for several disks")
    start.add_argument("--level", choices=LEVELS, default="auto",
                       help="auto: incremental where the checkpoint allows, else full (the reason is "
                            "printed); incremental: fail rather than go full")
    start.add_argument("--discard", action="store_true",
                       help="allow NBD trims of whole 64 KiB-aligned chunks (shrinks the reverse delta)")
    start.add_argument("--scratch-dir", type=Path, metavar="DIR",
                       help="where to make the private directory for reverse deltas and the NBD socket "
                            "(default $TMPDIR or /var/tmp)")
    start.add_argument("--qga", metavar="SOCKET", nargs="?", const="",
                       help="guest agent socket: freeze the guest's filesystems around the snapshot "
                            "point (with --libvirt: no SOCKET, libvirt reaches the agent)")
    start.add_argument("--checkpoint", metavar="ID", help="the new point id (default: a fresh one)")
    start.add_argument("--bounded-requests", action="store_true",
                       help="the reader keeps every read and block-status request inside one aligned "
                            "block of max_request (64 KiB on QEMU < 8.0, which refuses the export "
                            "without this; docs/export.md)")
    add_listen_options(start, authz=True)
    add_json_option(start)
    start.set_defaults(func=cmd_start)

    stop = commands.add_parser("stop", help="tear the export down and commit the checkpoint bitmaps")
    add_vm_options(stop)
    outcome = stop.add_mutually_exclusive_group()
    outcome.add_argument("--abort", action="store_true",
                         help="drop the new checkpoint instead: the next export covers these writes again")
    outcome.add_argument("--commit", action="store_true",
                         help="commit even the export of a fleece process that has exited (by default "
                              "it is aborted: nobody may have read it all)")
    stop.set_defaults(func=cmd_stop)


def add_listen_options(parser: argparse.ArgumentParser, *, authz: bool) -> None:
    """``--listen tcp:HOST:PORT`` and its TLS options (default: a private unix socket)."""
    parser.add_argument("--listen", metavar="tcp:HOST:PORT",
                        help="listen on TCP for another host (needs --tls-creds or --tls-psk)")
    parser.add_argument("--tls-creds", metavar="DIR",
                        help="x509 TLS: DIR holds ca-cert.pem, server-cert.pem, server-key.pem (0600); "
                             "clients must present a certificate signed by that CA")
    parser.add_argument("--tls-psk", metavar="FILE",
                        help="TLS with a pre-shared key: FILE (0600) of USERNAME:HEXKEY lines (psktool)")
    if authz:
        parser.add_argument("--tls-authz", metavar="IDENTITY",
                            help="let only this client in: its certificate's DN (e.g. "
                                 "'CN=backup1,O=Example') or its PSK user name")
    parser.add_argument("--insecure-tcp", action="store_true",
                        help="listen on TCP WITHOUT TLS: anyone who reaches the port reads the disks")


def transport_from(args: argparse.Namespace, socket_path: str | None = None) -> ServerTransport:
    """The transport the options ask for; BadInput (exit 2) before anything is changed."""
    return server_transport(socket_path=socket_path, listen=args.listen, tls_creds=args.tls_creds,
                            tls_psk=args.tls_psk, tls_authz=getattr(args, "tls_authz", None),
                            insecure_tcp=args.insecure_tcp)


async def _start(args: argparse.Namespace, transport: ServerTransport) -> PointInTimeExport:
    async with QmpSession.open(args.qmp) as session:
        owned = ownership(await read_graph(session))
        if owned.left:
            raise owned.refusal(session.address)  # with the exact command that ends it
        return await start_export(session, args.drive, checkpoint=args.checkpoint, level=args.level,
                                  discard=args.discard, scratch_dir=args.scratch_dir, qga=args.qga,
                                  log=say, transport=transport if transport.is_tcp else None,
                                  bounded_requests=args.bounded_requests)


def cmd_start(args: argparse.Namespace) -> int:
    """Set the export up, print where it is, and leave it up."""
    on_libvirt.check_connect(args)
    if args.libvirt:
        return on_libvirt.export_start(args)
    if not args.drive:
        raise BadInput("export start --qmp needs at least one --drive NAME")
    if args.qga == "":
        raise BadInput("--qga needs the guest agent's SOCKET (only --libvirt reaches the agent itself)")
    transport = transport_from(args)
    if transport.insecure:
        say(f"warning: the export listens on {transport.describe()}: anyone who can reach "
             "that port can read these disks")
    with stop_guard(args, "the export's set-up"):
        export = run_async(_start(args, transport))
    if args.json:
        print_json(export.as_dict())
        return 0
    pause = ("VM not running, no pause" if export.pause_ms is None
             else f"guest paused {export.pause_ms:.1f} ms")
    print(f"export up at checkpoint {export.checkpoint} ({pause})")
    for d in export.disks:
        what = f"incremental since {d.since}, dirty bitmap {d.dirty_bitmap}" if d.since else "full"
        print(f"  {d.drive}: {d.uri}  {human_size(d.size)} ({d.size} bytes), {what}"
              + ("" if d.persistent else ", checkpoint lives only while QEMU runs"))
    if transport.is_tcp:
        creds = transport.client_credentials()
        print(f"  listening on {transport.describe()}; client: {creds['client']}")
    print(f"end it with: {stop_command(args.qmp)} [--abort]")
    return 0


async def _stop(args: argparse.Namespace) -> str:
    """Who holds the export decides (docs/design.md §3.2); one line saying what was done."""
    async with QmpSession.open(args.qmp) as session:
        owned = ownership(await read_graph(session))
        if not owned.left:
            return "nothing to stop: no fleece export is up in this QEMU"
        live = owned.live_owner
        if live is not None:
            raise ExportError(
                f"the export of {', '.join(d.drive for d in live.disks)} (checkpoint {live.checkpoint}) "
                f"belongs to fleece pid {live.pid} on {live.host}, which may still be running (a backup "
                "or a program using the Python API): it ends the export itself; nothing was changed")
        if not owned.states:
            raise owned.refusal(session.address)
        st = owned.states[0]
        if st.outcome is not None:
            # A tear-down was cut short after it had decided: finish it that way.
            removed = await cleanup(session)
            return (f"finished the cut-short {st.outcome} of checkpoint {st.checkpoint}: "
                    f"removed {removed.describe()}")
        if st.owner == "session":
            said = await stop_export(session, abort=not args.commit)
            return (f"fleece pid {st.pid} on {st.host}, which held this export, has exited; {said}"
                    + ("" if args.commit else " (as 'fleece cleanup' does; --commit would have kept it)"))
        return await stop_export(session, abort=args.abort)


def cmd_stop(args: argparse.Namespace) -> int:
    """Tear the export down; commit or abort, as its owner allows."""
    on_libvirt.check_connect(args)
    if args.libvirt:
        if args.commit:
            raise BadInput("export stop --libvirt has no --commit (it commits unless --abort)")
        return on_libvirt.export_stop(args)
    print(run_async(_stop(args)))
    return 0
