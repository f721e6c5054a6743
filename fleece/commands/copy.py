"""``fleece copy``: replicate restore points to a second repository (e.g. local → S3)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from fleece.commands.backup import CONFIG_KEYS as BACKUP_KEYS
from fleece.commands.backup import INIT_KEYS as BACKUP_INIT_KEYS
from fleece.commands.common import (
    TO_PASSPHRASE_COMMAND_ENV,
    TO_PASSPHRASE_ENV,
    add_accept_change_option,
    add_passphrase_option,
    add_recorded_run,
    human_size,
    limited_backend,
    local_state,
    no_repository_message,
    open_repository,
    print_json,
    to_passphrase_source,
)
from fleece.commands.config import apply_config, read_table
from fleece.commands.init import lock_days
from fleece.commands.metrics import Run, recorded
from fleece.errors import BadInput, NotARepository
from fleece.maintenance.replication import DEFAULT_WORKERS, copy_points, open_destination, settings_like
from fleece.repo.backends.url import open_backend
from fleece.repo.format.point import RestorePoint
from fleece.repo.object_lock import MODES, ObjectLock, check_lock_days
from fleece.repo.repository import InitSettings, Repository, plaintext_refused

CONFIG_KEYS: dict[str, type] = {**BACKUP_KEYS, "to_passphrase_file": str, "to_plaintext": bool}
INIT_KEYS: dict[str, type] = {**BACKUP_INIT_KEYS, "object_lock": bool}
"""The ``[init]`` table of ``copy --config``: create the destination if it is empty; its Object
Lock settings if not the source's (``object_lock = false``: none). The destination is made like
the source, so backup's other keys are accepted (one file serves both) and must agree with it."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``copy`` to the command line."""
    p = sub.add_parser("copy", help="copy restore points, with all they need, to another repository")
    p.add_argument("--config", metavar="FILE",
                   help="read settings from a TOML file ([copy] table; unsafe_locks, limits, metrics)")
    p.add_argument("--from", dest="source", required=True, metavar="URL", help="the source repository")
    p.add_argument("--to", dest="dest", required=True, metavar="URL",
                   help="the destination repository (must exist, unless --init)")
    p.add_argument("--init", action="store_true", default=None,
                   help="create the destination if the location is empty, like the source: its "
                        "encryption (its key) and its Object Lock settings unless told otherwise")
    p.add_argument("--to-plaintext", action="store_true", default=None,
                   help="allow copying an encrypted source's points into a plaintext destination "
                        "(with --init: create the destination plaintext)")
    p.add_argument("--object-lock-days", type=lock_days, metavar="N",
                   help="with --init: lock the new destination's objects N days (instead of the "
                        "source's setting)")
    p.add_argument("--object-lock-mode", choices=MODES, default=None,
                   help="with --init: governance or compliance (needs --object-lock-days)")
    p.add_argument("--no-object-lock", action="store_true", default=None,
                   help="with --init: create the destination without Object Lock, whatever the source")
    add_accept_change_option(p)
    p.add_argument("--vm", metavar="NAME", help="only this VM's points")
    p.add_argument("points", nargs="*", metavar="POINT",
                   help="point ids, unique prefixes or 'latest' (default: every point)")
    add_passphrase_option(p)
    p.add_argument("--to-passphrase-file", metavar="FILE",
                   help="the destination's passphrase, when it is encrypted with another key than the "
                        f"source (or set {TO_PASSPHRASE_ENV} or {TO_PASSPHRASE_COMMAND_ENV})")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, metavar="N",
                   help=f"chunks copied in parallel (default {DEFAULT_WORKERS})")
    add_recorded_run(p, run)


def run(args: argparse.Namespace) -> int:
    """Resolve the points, copy what the destination lacks, report."""
    apply_config(args, CONFIG_KEYS, "copy")
    with recorded(args.metrics_file, "copy", args.dest, args.vm) as record:
        return _copy(args, record)


def _copy(args: argparse.Namespace, record: Run) -> int:
    if not 1 <= args.workers <= 64:
        raise BadInput("--workers must be between 1 and 64")
    if args.source.rstrip("/") == args.dest.rstrip("/"):
        raise BadInput("--from and --to name the same repository")
    source = open_repository(args, limited_backend(open_backend(args.source), args))
    points = _select(source, args.points, args.vm)
    dest_backend = limited_backend(open_backend(args.dest, unsafe_locks=bool(args.unsafe_locks),
                                                group_access=bool(args.group_access)), args)
    if dest_backend.url == source.url:  # the same place, however it was spelled
        raise BadInput("--from and --to name the same repository")
    dest_backend.reserve_connections(args.workers + 2)
    to_passphrase = to_passphrase_source(args)
    try:
        dest = open_destination(source, dest_backend, to_passphrase,
                                f"its passphrase with {TO_PASSPHRASE_ENV}, --to-passphrase-file or "
                                f"{TO_PASSPHRASE_COMMAND_ENV}",
                                init=_init_settings(args, source), to_plaintext=bool(args.to_plaintext),
                                state=local_state(), accept_change=bool(args.accept_change))
    except NotARepository:
        raise NotARepository(no_repository_message(
            dest_backend.url, source.master is not None,
            " (or give copy --init to make it like the source)")) from None

    def say(line: str) -> None:
        if not args.json:
            sys.stderr.write(f"fleece: {line}\n")

    report = copy_points(source, dest, points, workers=args.workers, say=say)
    record.values = {"fleece_copy_points_copied": len(report.copied),
                     "fleece_copy_bytes_copied": report.bytes_copied,
                     "fleece_copy_objects_written": report.objects_written}
    if args.json:
        print_json(report.as_dict())
    else:
        print(f"copied {len(report.copied)} point{'s' if len(report.copied) != 1 else ''} "
              f"({report.chunks_copied} chunks, {human_size(report.bytes_copied)} sent, "
              f"{report.chunks_present} chunks already there) in {report.seconds:.1f} s; "
              f"{len(report.skipped)} already in {dest.url}"
              + ("; chunks renamed for the destination (another key or hash)" if report.renamed else ""))
    return 0


def _init_settings(args: argparse.Namespace, source: Repository) -> Callable[[], InitSettings] | None:
    """How to create a missing destination (``--init`` or ``[init]``), or None: it must exist.

    The options are checked at once; what depends on the destination being created (a plaintext
    one refused while a destination passphrase is given) when it is."""
    table = read_table(args, "init", INIT_KEYS)
    lock_given = (args.object_lock_days is not None or args.object_lock_mode is not None
                  or args.no_object_lock)
    if table is None and not args.init:
        if lock_given:
            raise BadInput("--object-lock-days/--object-lock-mode/--no-object-lock are for --init")
        return None
    table = table or {}
    days = args.object_lock_days if args.object_lock_days is not None else table.get("object_lock_days")
    mode = args.object_lock_mode or table.get("object_lock_mode")
    if mode is not None and mode not in MODES:
        raise BadInput(f"[init] object_lock_mode must be one of {', '.join(MODES)}, not {mode!r}")
    off = bool(args.no_object_lock) or table.get("object_lock") is False
    if off and (days is not None or mode is not None):
        raise BadInput("--no-object-lock (object_lock = false) contradicts an Object Lock setting")
    if mode is not None and days is None:
        raise BadInput("--object-lock-mode needs --object-lock-days N")
    lock: ObjectLock | bool | None = True  # the source's
    if off:
        lock = None
    elif days is not None:
        lock = ObjectLock(check_lock_days(days), mode or "governance")
    settings = settings_like(source, to_plaintext=bool(args.to_plaintext), object_lock=lock)
    wanted = table.get("encryption")

    def create() -> InitSettings:
        if wanted is not None and wanted != settings.encryption:
            raise BadInput(f"[init] encryption = {wanted!r}, but copy makes {args.dest} like the "
                           f"source: {settings.encryption} (--to-plaintext: none); nothing was copied")
        if settings.encryption == "none" and to_passphrase_source(args) is not None:
            # A destination passphrase given means an encrypted destination (fail closed).
            raise plaintext_refused(args.dest, "create")
        return settings

    return create


def _select(source: Repository, wanted: list[str], vm: str | None) -> list[RestorePoint]:
    """The points named on the command line, or every point (of ``vm``)."""
    if not wanted:
        points = source.list_points(vm)
        if not points:
            raise BadInput(f"{source.url} holds no restore points"
                           + (f" of VM {vm}" if vm else "") + "; nothing was copied")
        return points
    found: dict[tuple[str, str], RestorePoint] = {}
    for name in wanted:
        point = source.find_point(name, vm)
        found[(point.vm, point.id)] = point
    return list(found.values())
