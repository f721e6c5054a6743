"""``fleece mount POINT --vm VM DIR``: every file system of a point read-only under DIR (FUSE).

The point is served from the repository and read by one libguestfs
appliance; its file systems appear as DIR/sda1, DIR/vg0-home … until
``fusermount -u DIR``, Ctrl-C or SIGTERM; then the mount, the appliance,
nbdkit and the scratch directory are gone.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fleece.commands.common import say
from fleece.commands.files import _common, _open, _scratch
from fleece.errors import BadInput
from fleece.guest import files as gf
from fleece.guest.scratch import Interrupted


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``mount``."""
    p = subparsers.add_parser("mount", help="every file system of a point read-only under DIR (FUSE)")
    _common(p)
    p.add_argument("directory", metavar="DIR", nargs="?", help="an empty directory to mount on")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Mount until unmounted or stopped."""
    words = ([args.directory] if args.directory else []) + list(getattr(args, "extra", []))
    if len(words) != 1 or words[0].startswith("-"):
        raise BadInput("mount takes one DIR")
    directory = Path(words[0])
    if not directory.is_dir() or os.listdir(directory):
        raise BadInput(f"{directory} is not an empty directory")
    if not Path("/dev/fuse").exists():
        raise BadInput("/dev/fuse is missing (FUSE: modprobe fuse, or apt install fuse3)")
    point, secret = _open(args)
    try:
        with gf.point_appliance(args.repo, point, drives=args.drive, passphrase=secret,
                                scratch_parent=_scratch(args), say=say) as app:
            gf.serve_fuse(app, directory.resolve(), say)
    except (KeyboardInterrupt, Interrupted):
        pass  # the way to stop it: everything was torn down on the way out
    say(f"{directory} unmounted; nothing of point {point.id} is left running")
    return 0
