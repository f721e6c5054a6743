"""``fleece protect`` / ``fleece unprotect``: keep a restore point out of prune's reach."""

from __future__ import annotations

import argparse

from fleece.commands.common import add_repo_option, open_repository
from fleece.errors import BadInput
from fleece.repo.format import keys
from fleece.repo.protect import protect, unprotect


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``protect`` and ``unprotect`` to the command line."""
    for name, what in (("protect", "never let prune remove a restore point"),
                       ("unprotect", "let prune remove a protected restore point again")):
        p = sub.add_parser(name, help=what)
        add_repo_option(p)
        p.add_argument("--vm", metavar="NAME", help="the VM, where 'latest' or a prefix needs it")
        p.add_argument("point", metavar="POINT", help="point id, a unique prefix of one, or 'latest'")
        if name == "protect":
            p.add_argument("--note", default="", help="why (stored in the marker)")
        p.set_defaults(func=cmd_protect if name == "protect" else cmd_unprotect)


def cmd_protect(args: argparse.Namespace) -> int:
    """Write the marker; exit 2 for an unknown point."""
    repo = open_repository(args)
    point = repo.find_point(args.point, args.vm)
    fresh = protect(repo, point, args.note)
    print(f"restore point {point.id} of VM {point.vm} "
          + ("is now protected" if fresh else "was already protected"))
    return 0


def cmd_unprotect(args: argparse.Namespace) -> int:
    """Remove the marker; exit 2 for an unknown point without a marker."""
    repo = open_repository(args)
    try:
        point = repo.find_point(args.point, args.vm)
        vm, point_id = point.vm, point.id
    except BadInput:
        # The marker of a point removed by hand may outlive it: still let it go.
        stray = [key.split("/") for key in repo.backend.list(keys.protect_prefix(args.vm))
                 if key.endswith("/" + args.point)]
        if len(stray) != 1:
            raise
        vm, point_id = keys.unescape_name(stray[0][1]), stray[0][2]
    removed = unprotect(repo, vm, point_id)
    print(f"restore point {point_id} of VM {vm} "
          + ("is no longer protected" if removed else "was not protected"))
    return 0
