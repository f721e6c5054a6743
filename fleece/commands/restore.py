"""``fleece restore``: write one disk of a restore point to a file."""

from __future__ import annotations

import argparse
from pathlib import Path

from fleece.errors import BadInput
from fleece.repo.repository import Repository
from fleece.repo.url import open_backend
from fleece.restore import DEFAULT_WORKERS, restore_raw


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``restore`` command."""
    p = subparsers.add_parser("restore", help="write a disk of a restore point to an image file")
    p.add_argument("--repo", required=True, metavar="URL",
                   help="directory, file:///abs/path or s3://bucket/prefix")
    p.add_argument("point", metavar="POINT", help="point id, a unique prefix of one, or 'latest'")
    p.add_argument("--drive", metavar="NAME", help="the disk to restore (needed if several)")
    p.add_argument("--output", "-o", required=True, metavar="PATH", help="image file to write")
    p.add_argument("--format", choices=("raw", "qcow2"), default="raw", help="image format")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, metavar="N",
                   help=f"chunks fetched in parallel (default {DEFAULT_WORKERS})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Restore; exit 2 for an unknown point or drive or an unusable output."""
    if args.format != "raw":
        raise BadInput("restoring to qcow2 is not supported yet; use --format raw "
                       "(and qemu-img convert)")
    if args.workers < 1:
        raise BadInput("--workers must be at least 1")
    repo = Repository.open(open_backend(args.repo))
    point = repo.find_point(args.point)
    result = restore_raw(repo, point, args.drive, Path(args.output), force=args.force,
                         workers=args.workers)
    print(f"restored disk {result.disk} of {result.point} ({result.size} bytes, "
          f"{result.chunks_written} chunks written, {result.zero_chunks} zero) to {args.output}")
    return 0
