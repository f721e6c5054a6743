"""``fleece restore``: write one disk of a restore point to a raw or qcow2 image,
a block device, or an NBD export."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fleece.commands.backup import CONFIG_KEYS as BACKUP_KEYS
from fleece.commands.common import (
    add_client_tls_options,
    add_limit_options,
    add_repo_option,
    open_repository,
)
from fleece.commands.config import apply_config
from fleece.commands.live_restore import add_live_options, refuse_live_options, run_live
from fleece.errors import BadInput
from fleece.fleecing.transport import check_client_uri, client_tls
from fleece.maintenance.damage import damaged_bytes, describe_ranges
from fleece.restore.image import DEFAULT_WORKERS, RestoreResult, restore_raw
from fleece.restore.output import output_mode
from fleece.restore.targets import is_nbd_uri, restore_nbd, restore_qcow2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``restore`` command."""
    p = subparsers.add_parser("restore", help="write a disk of a restore point to an image file")
    p.add_argument("--config", metavar="FILE",
                   help="read settings from a TOML file ([restore] table; group_access = true makes "
                        "new outputs 0640 instead of 0600; the backup keys are accepted and ignored)")
    add_repo_option(p)
    add_limit_options(p)
    p.add_argument("point", metavar="POINT", help="point id, a unique prefix of one, or 'latest'")
    p.add_argument("--vm", metavar="NAME", help="the VM, where 'latest' or a prefix needs it")
    p.add_argument("--drive", metavar="NAME", action="append",
                   help="the disk to restore (needed if several; --live takes several)")
    p.add_argument("--output", "-o", required=True, metavar="PATH|URI", action="append",
                   help="image file or block device to write, or an NBD URI (nbd+unix:///…, "
                        "nbds://HOST:PORT/EXPORT); "
                        "with --live one qcow2 image per --drive, in order")
    p.add_argument("--format", choices=("raw", "qcow2"), default=None,
                   help="image format of a file output (default raw; --live: qcow2)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing output file, block device or NBD export")
    p.add_argument("--allow-damage", action="store_true",
                   help="restore a damaged point anyway, with zeroes where chunks are lost")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, metavar="N",
                   help=f"chunks fetched in parallel (default {DEFAULT_WORKERS})")
    add_client_tls_options(p)
    add_live_options(p)
    p.set_defaults(func=run, group_access=None)


def run(args: argparse.Namespace) -> int:
    """Restore; exit 2 for an unknown point or drive or an unusable output, 1 on damage."""
    apply_config(args, BACKUP_KEYS, "restore")
    if args.live:
        return run_live(args)
    refuse_live_options(args)
    if len(args.drive or []) > 1 or len(args.output) > 1:
        raise BadInput("one --drive and one --output at a time (several need --live)")
    args.drive = args.drive[0] if args.drive else None
    args.output = args.output[0]
    args.format = args.format or "raw"
    if args.workers < 1:
        raise BadInput("--workers must be at least 1")
    nbd_output = is_nbd_uri(args.output)
    tls = client_tls(args.tls_creds, args.tls_psk)
    if tls is not None and not nbd_output:
        raise BadInput("--tls-creds/--tls-psk are for an nbds:// output")
    if nbd_output:
        check_client_uri(args.output, tls)
    if nbd_output and args.format != "raw":
        raise BadInput("an NBD export takes the disk's raw bytes; drop --format qcow2")
    if nbd_output and not args.force:
        raise BadInput(f"restoring onto the NBD export {args.output} overwrites it; add --force")
    repo = open_repository(args)
    point = repo.find_point(args.point, args.vm)
    workers, allow_damage = args.workers, args.allow_damage
    result: RestoreResult
    if nbd_output:
        result = restore_nbd(repo, point, args.drive, args.output, workers=workers,
                             allow_damage=allow_damage, tls=tls)
    elif args.format == "qcow2":
        result = restore_qcow2(repo, point, args.drive, Path(args.output), force=args.force,
                               workers=workers, allow_damage=allow_damage,
                               mode=output_mode(bool(args.group_access)))
    else:
        result = restore_raw(repo, point, args.drive, Path(args.output), force=args.force,
                             workers=workers, allow_damage=allow_damage,
                             mode=output_mode(bool(args.group_access)))
    for start, end in result.damaged:
        sys.stderr.write(f"fleece: warning: bytes {start}-{end} of {result.disk} are damaged "
                         "in the repository and were restored as zeroes\n")
    print(f"restored disk {result.disk} of {result.point} ({result.size} bytes, "
          f"{result.chunks_written} chunks written, {result.zero_chunks} zero) to {args.output}"
          f" as {args.format}")
    if result.damaged:
        print(f"  DAMAGED: {damaged_bytes(result.damaged)} bytes restored as zeroes at "
              f"{describe_ranges(result.damaged, limit=len(result.damaged))}")
    return 0
