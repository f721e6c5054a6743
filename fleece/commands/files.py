"""``fleece files ls|get``: a point's files back, read through a libguestfs appliance.

Everything is checked before anything starts (exit 2: missing point, VM or
drive, bad PATH syntax, an output directory that is not one); then the
point is served from the repository, one appliance boots over it, the
command runs, and all of it is torn down (``fleece.guest``).
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

from fleece.commands.common import (
    add_repo_option,
    human_size,
    open_repository,
    passphrase_source,
    print_json,
    say,
)
from fleece.errors import BadInput, FleeceError
from fleece.guest import files as gf
from fleece.repo.format.point import RestorePoint


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``files ls`` and ``files get``."""
    p = subparsers.add_parser("files", help="list and copy out a point's files (libguestfs, read-only)")
    sub = p.add_subparsers(dest="files_command", metavar="ls|get", required=True)
    ls = sub.add_parser("ls", help="the point's file systems (PATH /) or a directory of one")
    _common(ls)
    ls.add_argument("path", metavar="PATH", nargs="*",
                    help="/ (the file systems; the default), /path (in the guest's root file system) "
                         "or DEVICE:/path")
    ls.add_argument("--long", "-l", action="store_true", help="mode, owner, size and mtime too")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    ls.set_defaults(func=run_ls)
    get = sub.add_parser("get", help="copy files and directories of a point out")
    _common(get)
    get.add_argument("paths", metavar="PATH", nargs="*", help="/path or DEVICE:/path (one or more)")
    get.add_argument("-o", "--output", metavar="DIR", required=True,
                     help="an existing directory to write into, or - for one file on stdout")
    get.add_argument("--force", action="store_true", help="replace files that exist in DIR")
    get.add_argument("--json", action="store_true", help="print one JSON object")
    get.set_defaults(func=run_get)


def _common(p: argparse.ArgumentParser) -> None:
    add_repo_option(p)
    # POINT and the PATHs are split by hand: options may stand between them (POINT --vm VM PATH).
    p.add_argument("point", metavar="POINT", help="point id, a unique prefix of one, or 'latest'")
    p.set_defaults(intermixed_paths=True)
    p.add_argument("--vm", metavar="NAME", required=True, help="the VM whose points POINT names")
    p.add_argument("--drive", metavar="NAME", action="append",
                   help="only this disk of the point (repeatable; default every disk)")
    p.add_argument("--scratch-dir", metavar="DIR", default=None,
                   help="where the run's scratch directory goes (default $TMPDIR or /var/tmp)")


def _open(args: argparse.Namespace) -> tuple[RestorePoint, bytes | None]:
    if args.scratch_dir and not Path(args.scratch_dir).is_dir():
        raise BadInput(f"--scratch-dir {args.scratch_dir} is not a directory")
    source = passphrase_source(args)
    passphrase = source() if source is not None else None
    repo = open_repository(args, passphrase=passphrase)
    if not repo.point_refs(args.vm):
        raise BadInput(f"no restore points of VM {args.vm} in {repo.url}")
    point = repo.find_point(args.point, args.vm)
    names = [d.name for d in point.disks]
    for drive in args.drive or []:
        if drive not in names:
            raise BadInput(f"point {point.id} has no disk {drive!r} (it has {', '.join(names)})")
    from fleece.guest.appliance import require

    require()
    return point, passphrase if repo.master is not None else None


def _scratch(args: argparse.Namespace) -> Path | None:
    return Path(args.scratch_dir) if args.scratch_dir else None


def _paths(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The PATH words, wherever they stood among the options."""
    for word in extra:
        if word.startswith("-") and word != "-":
            raise BadInput(f"unrecognized argument {word!r}")
    return list(args.path if hasattr(args, "path") else args.paths) + extra


def run_ls(args: argparse.Namespace) -> int:
    """List the file systems, or one directory."""
    paths = _paths(args, getattr(args, "extra", []))
    if len(paths) > 1:
        raise BadInput("files ls takes one PATH")
    where = gf.parse_path(paths[0] if paths else "/")
    point, secret = _open(args)
    with gf.point_appliance(args.repo, point, drives=args.drive, passphrase=secret,
                            scratch_parent=_scratch(args), say=say) as app:
        if where.overview:
            found = gf.filesystems(app)
            if args.json:
                print_json({"point": point.id, "filesystems": [f.as_dict() for f in found]})
                return 0
            for f in found:
                used = "?" if f.used is None else human_size(f.used)
                label = f.label or "-"
                extra = f"  ({f.error})" if f.error else ""
                print(f"{f.device:20} {f.disk:8} {f.type:8} {label:16} {human_size(f.size):>10} "
                      f"{used:>10} used{extra}")
            return 0
        device, entries = gf.listing(app, where)
    if args.json:
        print_json({"point": point.id, "device": device, "path": where.path,
                    "entries": [e.as_dict() for e in entries]})
        return 0
    out = sys.stdout
    for e in entries:
        name = e.name + ("/" if e.type == "dir" else "")
        if e.target is not None:
            name += f" -> {e.target}"
        if args.long:
            mode = stat.filemode(_mode_bits(e.type) | e.mode)
            out.write(f"{mode} {e.uid:>5} {e.gid:>5} {e.size:>12} {e.mtime:>11} {name}\n")
        else:
            out.write(name + "\n")
    return 0


def _mode_bits(kind: str) -> int:
    return {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK, "char": stat.S_IFCHR,
            "block": stat.S_IFBLK, "fifo": stat.S_IFIFO, "socket": stat.S_IFSOCK}.get(kind, 0)


def run_get(args: argparse.Namespace) -> int:
    """Copy the paths out below DIR (or one file to stdout)."""
    paths = _paths(args, getattr(args, "extra", []))
    if not paths:
        raise BadInput("files get needs at least one PATH")
    wheres = [gf.parse_path(p) for p in paths]
    if any(w.overview for w in wheres):
        raise BadInput("'/' alone names the file systems: give /path or DEVICE:/ to copy one out")
    to_stdout = args.output == "-"
    if to_stdout:
        if len(wheres) != 1:
            raise BadInput("-o - streams one file: give one PATH")
        if args.force:
            raise BadInput("--force goes with -o DIR")
    else:
        out = Path(args.output)
        if not out.is_dir():
            raise BadInput(f"-o {args.output} is not a directory")
        if not args.force:
            for w in wheres:
                name = w.path.rsplit("/", 1)[-1] or (w.device or "").rsplit("/", 1)[-1]
                if name and os.path.lexists(out / name):
                    raise BadInput(f"{out / name} exists; nothing was copied (--force replaces it)")
    point, secret = _open(args)
    done = []
    with gf.point_appliance(args.repo, point, drives=args.drive, passphrase=secret,
                            scratch_parent=_scratch(args), say=say) as app:
        if to_stdout:
            device = gf.mount(app, wheres[0])
            st = app.g.lstatns(wheres[0].path) if app.g.exists(wheres[0].path) else None
            if st is None:
                raise gf.NotInPoint(f"{device}:{wheres[0].path}: no such file or directory in the point")
            if not stat.S_ISREG(st["st_mode"]):
                raise FleeceError(f"{device}:{wheres[0].path} is not a regular file; -o - streams one file")
            sys.stdout.flush()
            app.g.download(wheres[0].path, "/dev/stdout")
            return 0
        writer = gf.Writer(Path(args.output), args.force)
        scratch = Path(app.g.get_tmpdir())
        for w in wheres:
            device, kind = gf.get(app, w, writer, scratch, say)
            done.append({"device": device, "path": w.path, "type": kind})
        writer.finish()
    if args.json:
        print_json({"point": point.id, "output": str(args.output), "copied": done,
                    "entries": writer.files})
    else:
        say(f"copied {len(done)} path(s), {writer.files} entries, from point {point.id} to {args.output}")
    return 0
