"""``fleece serve``: a restore point's disk as a read-only NBD export, until stopped."""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType

from fleece.commands.backup import parse_size
from fleece.commands.common import add_repo_option, open_repository, passphrase_source
from fleece.commands.export import add_listen_options, transport_from
from fleece.errors import BadInput, FleeceError
from fleece.repo.backends.ratelimit import parse_rate
from fleece.restore.image import DiskImage
from fleece.serve.cache import DEFAULT_CACHE_BYTES, DEFAULT_READAHEAD
from fleece.serve.server import NbdkitServer, prepare_socket


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``serve`` command."""
    p = subparsers.add_parser(
        "serve", help="export a disk of a restore point read-only over NBD (nbdkit)")
    add_repo_option(p)
    p.add_argument("point", metavar="POINT", help="point id, a unique prefix of one, or 'latest'")
    p.add_argument("--vm", metavar="NAME", help="the VM whose points POINT names")
    p.add_argument("--drive", metavar="NAME", help="the disk to serve (needed if several)")
    p.add_argument("--socket", metavar="PATH", help="unix socket to listen on")
    add_listen_options(p, authz=True)
    p.add_argument("--cache-size", default=None, metavar="SIZE",
                   help=f"decoded chunks kept in memory (default {DEFAULT_CACHE_BYTES >> 20}M)")
    p.add_argument("--readahead", type=int, default=DEFAULT_READAHEAD, metavar="N",
                   help=f"chunks fetched ahead of sequential reads (default {DEFAULT_READAHEAD})")
    p.add_argument("--limit-download", metavar="RATE", default=None,
                   help="at most RATE bytes/s from the repository (20M = 20 MiB/s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate everything, start nbdkit, print the NBD URI, serve until SIGTERM/SIGINT."""
    cache = parse_size(args.cache_size) if args.cache_size else DEFAULT_CACHE_BYTES
    if cache < 0 or not 0 <= args.readahead <= 64:
        raise BadInput("--cache-size must be positive and --readahead between 0 and 64")
    if (args.socket is None) == (args.listen is None):
        raise BadInput("serve needs one of --socket PATH and --listen tcp:HOST:PORT")
    transport = transport_from(args, socket_path=args.socket)
    source = passphrase_source(args)
    passphrase = source() if source is not None else None
    repo = open_repository(args, passphrase=passphrase)
    limit = parse_rate(args.limit_download, "--limit-download") if args.limit_download else None
    point = repo.find_point(args.point, args.vm)
    # Reads and checks the index too: a bad point fails here, not in a client.
    image = DiskImage(repo, point, args.drive)
    sock = prepare_socket(args.socket) if args.socket else None
    if sock is not None:
        transport = transport_from(args, socket_path=str(sock))
    elif transport.insecure:
        sys.stderr.write(f"fleece: warning: serving on {transport.describe()}: anyone who can "
                         "reach that port can read this disk\n")
    server = NbdkitServer(args.repo, point, image.disk.name, sock, cache_bytes=cache,
                          readahead=args.readahead, verbose=args.verbose > 1, transport=transport,
                          passphrase=passphrase if repo.master is not None else None,
                          limit_download=limit)
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        server.signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        print(server.uri, flush=True)
        sys.stderr.write(f"fleece: serving disk {image.disk.name} of {point.id} "
                         f"({image.size} bytes) read-only on {server.uri}; stop with Ctrl-C\n")
        rc = server.wait()
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if rc != 0 and not stopping:
        raise FleeceError(f"nbdkit exited with status {rc}; the export is gone")
    return 0
