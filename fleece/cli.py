"""The ``fleece`` command line: argument parsing and error-to-exit-code mapping.

Each command lives in its own module under ``fleece.commands`` and exposes
``register(subparsers)``, which adds its sub-parser and sets ``func`` to a
callable taking the parsed ``argparse.Namespace`` and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from fleece.commands.config import apply_repository_settings
from fleece.commands.version import VersionAction
from fleece.errors import FleeceError

# One entry per command module; each adds its own sub-parser(s).
COMMAND_MODULES = [
    "fleece.commands.status",
    "fleece.commands.export",
    "fleece.commands.cleanup",
    "fleece.commands.backup",
    "fleece.commands.list",
    "fleece.commands.restore",
    "fleece.commands.show",
    "fleece.commands.verify",
    "fleece.commands.serve",
    "fleece.commands.prune",
    "fleece.commands.gc",
    "fleece.commands.protect",
    "fleece.commands.unlock",
    "fleece.commands.init",
    "fleece.commands.key",
    "fleece.commands.copy",
    "fleece.commands.version",
    "fleece.commands.files",
]


# Each command's --help (and man page) ends with these: the commonest way to run it.
EXAMPLES = {
    "status": "fleece status --qmp /run/qemu/web1/fleece-qmp.sock",
    "export": "fleece export start --qmp /run/qemu/web1/fleece-qmp.sock --json > export.json\n"
              "fleece export stop --qmp /run/qemu/web1/fleece-qmp.sock",
    "cleanup": "fleece cleanup --qmp /run/qemu/web1/fleece-qmp.sock",
    "backup": "fleece backup --config /etc/fleece/web1.toml\n"
              "fleece backup --qmp /run/qemu/web1/fleece-qmp.sock --vm web1 --repo /srv/fleece",
    "list": "fleece list --config /etc/fleece/web1.toml\n"
            "FLEECE_REPOSITORY=s3://backups/fleece fleece list --vm web1 --json",
    "restore": "fleece restore --config /etc/fleece/web1.toml latest --drive vda -o /var/tmp/vda.raw",
    "verify": "fleece verify --config /etc/fleece/web1.toml --deep latest",
    "serve": "fleece serve --config /etc/fleece/web1.toml latest --drive vda --socket /run/fleece/web1.sock",
    "prune": "fleece prune --config /etc/fleece/web1.toml --dry-run",
    "gc": "fleece gc --config /etc/fleece/web1.toml",
    "protect": "fleece protect --config /etc/fleece/web1.toml latest --note 'before the upgrade'",
    "unprotect": "fleece unprotect --config /etc/fleece/web1.toml 20261123T073600",
    "unlock": "fleece unlock --repo /srv/fleece --vm web1",
    "init": "fleece init --repo s3://backups/fleece --encryption aes-256-gcm "
            "--passphrase-file /etc/fleece/passphrase",
    "key": "fleece key list --repo s3://backups/fleece --passphrase-file /etc/fleece/passphrase",
    "copy": "fleece copy --from /srv/fleece --to s3://offsite/fleece --vm web1",
    "show": "fleece show --repo /srv/fleece latest --vm web1",
    "version": "fleece version --qmp /run/qemu/web1/fleece-qmp.sock --json",
    "files": "fleece files ls --config /etc/fleece/web1.toml latest --vm web1 /etc\n"
             "fleece files get --config /etc/fleece/web1.toml latest --vm web1 /etc/hosts -o /var/tmp/back",
}

# What --json prints, per command: the shape of docs/design.md §4.4, shown in --help and the man
# pages (tests/test_cli_contract.py holds the two together).
JSON_OUTPUT = {
    "status": "{vm, qemu, status, disks: [{drive, device, qdev, node, filter, backend, format, size,\n"
              "  file, bitmaps: [{name, granularity, count, recording, persistent, inconsistent,\n"
              "  checkpoint}]}], export: null | {checkpoint, drives, socket, owner, pid, host,\n"
              "  owner_exited, end_with}, leftovers: {nodes, exports, jobs, bitmaps, attached,\n"
              "  nbd_server, objects}, cleanup, stale_scratch}",
    "export": "export start: {checkpoint, disks: [{drive, uri, size, dirty_bitmap, checkpoint, since,\n"
              "  level, reason, discard, export, node, persistent}], pause_ms, socket, trim_alignment,\n"
              "  max_request}",
    "cleanup": "{removed: {nodes, exports, jobs, bitmaps, attached, nbd_server, objects}, kept,\n"
               " stale_scratch: {removed, kept: [{path, why}]}}",
    "backup": "{point, vm, parent, disks: [{drive, level, size, bytes_read, bytes_stored, bytes_dirty,\n"
              "  bytes_metadata, objects_written, deltas, bitmap_granularity, chunks_new, chunks_reused,\n"
              "  chunks_zero, chunks_unchanged, bytes_trimmed, seconds, reason, audit: {candidates,\n"
              "  sampled, mismatched, bytes_read, first_mismatch_offset}}], pause_ms, seconds,\n"
              " bytes_stored, objects_written, bytes_metadata,\n"
              " object_lock: {mode, repository, horizon, locks_extended}}",
    "list": "{points: [{id, vm, created, parent, disks: [{name, level, size}], stats, labels,\n"
            "  verification: null | {kind, ok, summary, at, time_to_ready}}],\n"
            " damaged: [ids]}",
    "verify": "{points: [{id, vm, ok, lock_until, damage: [{disk, ranges, objects, problem, detail}]}],\n"
              " ok, deep, chunks_checked, bytes_checked, seconds, object_lock: {days, mode, horizon}}\n"
              "--fsck: {mode, vm, point, ok, summary, seconds, time_to_ready, record, accel,\n"
              "  appliance_seconds, partition_tables: [{device, disk, type, ok, findings}],\n"
              "  filesystems: [{device, disk, type, label, uuid, size, used, clean, checker, findings}]}\n"
              "--boot: {mode, vm, point, ok, summary, seconds, time_to_ready, record (or null), accel,\n"
              "  shape: {memory, cpus, machine, firmware, bus, extra}, agent: {ping, osinfo},\n"
              "  serial_match, commands: [{command, exitcode, signal, stdout, stderr, error}],\n"
              "  read_errors, bytes_read, console, firmware_log, screendump}\n"
              "--unverified: {mode, ok, points: [one of the above per point]}",
    "prune": "{dry_run, policy: {last, hourly, daily, weekly, monthly, yearly, within},\n"
             " kept: [{vm, id, reasons}], removed: [{vm, id, reason}], skipped: [{vm, reason}],\n"
             " locked: [{vm, id, until}]}",
    "gc": "{dry_run, points, chunks_kept, chunks_deleted, indexes_deleted, indexes_spared,\n"
          " records_deleted, temporaries_deleted, objects_deleted, bytes_freed, running_backups,\n"
          " seconds, packs_kept, packs_deleted, pages_kept, pages_deleted, pack_bytes_unreferenced,\n"
          " objects_locked}",
    "show": "{id, vm, created, parent, disks: [{name, level, size}], machine: null | {kind, name, uuid,\n"
            "  machine_type, arch, cpus, memory_bytes, firmware, loader, nvram, nvram_template,\n"
            "  tpm: null | {model, backend, version, state_dir}, disks: [{target, device, bus, serial}],\n"
            "  nics: [{type, mac, model, source}], secure_info, capture_ms, disk_sizes, moments,\n"
            "  files: {ROLE: {size, sha256, chunks}}}}",
    "restore": "--machine: {point, vm, dir, files, disks: {NAME: image}, domain, uuid, started,\n"
               "  definition, omitted}; --live: JSON progress events, one object per line",
    "init": "{repo, id, format, encryption, hash, chunk_size, key, object_lock: null | {days, mode}}",
    "files": "files ls: {point, device, path, entries: [{name, type, size, mode, uid, gid, mtime,\n"
             "  target}]}; PATH /: {point, filesystems: [{device, disk, type, label, size, used, error}]}\n"
             "files get: {point, output, copied: [{device, path, type}], entries}",
    "version": "{fleece, qemu, qemu_source, libnbd, nbdkit, python, boto3, botocore, zstandard, blake3,\n"
               " cryptography, qemu.qmp}",
}


def _add_examples(sub: argparse._SubParsersAction[_Parser]) -> None:
    """End each command's --help (and so its man page) with its --json shape and an example."""
    for name, parser in sub.choices.items():
        parts = []
        if name in JSON_OUTPUT:
            shape = JSON_OUTPUT[name].splitlines()
            parts.append("--json prints:\n" + "\n".join(f"  {line}" for line in shape))
        if name in EXAMPLES:
            parts.append("example:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name].splitlines()))
        if parts and not parser.epilog:
            parser.epilog = "\n\n".join(parts)
            parser.formatter_class = argparse.RawDescriptionHelpFormatter


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"fleece: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def command_module(argv: Sequence[str]) -> str | None:
    """The one command module ``argv`` needs, or None when it needs them all (help, errors).

    Importing every command costs a run tens of milliseconds of imports it
    does not use (restore, serve, rich…); a small incremental pays them each time.
    """
    for arg in argv:
        if arg == "--verbose" or (arg.startswith("-") and arg[1:] and set(arg[1:]) == {"v"}):
            continue
        if arg.startswith("-"):
            return None
        name = f"fleece.commands.{'protect' if arg == 'unprotect' else arg}"
        return name if name in COMMAND_MODULES else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every registered command, or only the module ``only``."""
    parser = _Parser(prog="fleece", description="Pull-mode backup agent for running QEMU VMs.")
    parser.add_argument("--version", action=VersionAction,
                        help="print the versions of fleece, QEMU, libnbd, nbdkit, Python and the S3 stack")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in [only] if only else COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    _add_examples(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fleece`` console script."""
    if argv is None:
        argv = sys.argv[1:]
    # No child of this process may inherit a passphrase through its environment.
    from fleece.commands.common import take_passphrases_from_environment

    take_passphrases_from_environment()
    parser = build_parser(command_module(argv))
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "intermixed_paths", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # `files ls|get POINT --vm VM PATH…`: PATHs after an option are left over by argparse.
    args.extra = extra
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="fleece: %(message)s", stream=sys.stderr)
    # qemu.qmp logs its own copy of every connection error; ours is the one line.
    logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if args.verbose > 2 else logging.CRITICAL)
    try:
        apply_repository_settings(args)
        rc = args.func(args)
    except FleeceError as exc:
        sys.stderr.write(f"fleece: error: {exc}\n")
        return exc.exit_code
    except BrokenPipeError:
        # stdout closed early (`fleece list | head`): not an error of ours.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        sys.stderr.write("fleece: interrupted\n")
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
