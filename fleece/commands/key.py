"""``fleece key list|add|remove|change-passphrase|export|import``: an encrypted repository's passphrases."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fleece.commands.common import (
    add_json_option,
    add_repo_option,
    open_repository,
    passphrase_source,
    print_json,
    read_passphrase_file,
    secret_env,
)
from fleece.errors import BadInput
from fleece.repo import keyring
from fleece.repo.backends.url import open_backend
from fleece.repo.repository import Passphrase

NEW_PASSPHRASE_ENV = "FLEECE_NEW_PASSPHRASE"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``key`` and its subcommands to the command line."""
    p = sub.add_parser("key", help="manage the passphrases of an encrypted repository")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    actions.required = True

    def action(name: str, what: str) -> argparse.ArgumentParser:
        a = actions.add_parser(name, help=what)
        add_repo_option(a)
        return a

    a = action("list", "list the key objects (one per passphrase)")
    add_json_option(a)
    a.set_defaults(func=cmd_list)
    for name, what in (("add", "add a passphrase"),
                       ("change-passphrase", "replace the passphrase given by a new one")):
        a = action(name, what)
        a.add_argument("--new-passphrase-file", metavar="FILE",
                       help=f"the new passphrase (or set {NEW_PASSPHRASE_ENV})")
        add_json_option(a)
        a.set_defaults(func=cmd_add if name == "add" else cmd_change)
    a = action("remove", "remove a passphrase (never the last one)")
    a.add_argument("key_id", metavar="KEY", help="the key id 'fleece key list' shows")
    a.set_defaults(func=cmd_remove)
    a = action("export", "write the wrapped key the passphrase opens to FILE (a paper or vault copy)")
    a.add_argument("file", metavar="FILE", help="where to write it (must not exist; '-' for stdout)")
    a.set_defaults(func=cmd_export)
    a = action("import", "store a key exported with 'fleece key export' again")
    a.add_argument("file", metavar="FILE", help="the exported key ('-' for stdin)")
    a.set_defaults(func=cmd_import)


def _new_passphrase(args: argparse.Namespace) -> bytes:
    if args.new_passphrase_file:
        return read_passphrase_file(args.new_passphrase_file)
    new = secret_env(NEW_PASSPHRASE_ENV)
    if new:
        return new.encode()
    raise BadInput(f"the new passphrase comes from --new-passphrase-file or {NEW_PASSPHRASE_ENV}")


def _needed(args: argparse.Namespace) -> Passphrase:
    source = passphrase_source(args)
    if source is None:
        raise BadInput("give the repository's passphrase with FLEECE_PASSPHRASE, --passphrase-file "
                       "or FLEECE_PASSPHRASE_COMMAND")
    return source


def cmd_list(args: argparse.Namespace) -> int:
    """One line per key; the one the passphrase opened is marked."""
    keys = keyring.list_keys(open_repository(args))
    if args.json:
        print_json({"keys": [k.as_dict() for k in keys]})
    else:
        for k in keys:
            print(f"{'*' if k.current else ' '} {k.id}  created {k.created}")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    """Add a key under the new passphrase."""
    new = _new_passphrase(args)
    _needed(args)
    key_id = keyring.add_key(open_repository(args), new)
    if args.json:
        print_json({"added": key_id})
    else:
        print(f"added key {key_id}")
    return 0


def cmd_change(args: argparse.Namespace) -> int:
    """Add a key under the new passphrase, then remove the one the old passphrase opened."""
    new = _new_passphrase(args)
    _needed(args)
    repo = open_repository(args)
    added = keyring.add_key(repo, new)
    assert repo.key_id is not None
    keyring.remove_key(repo, repo.key_id)
    if args.json:
        print_json({"added": added, "removed": repo.key_id})
    else:
        print(f"passphrase changed: key {repo.key_id} replaced by {added}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    """Remove one key (exit 2 for the last or an unknown one)."""
    keyring.remove_key(open_repository(args), args.key_id)
    print(f"removed key {args.key_id}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write the wrapped key the passphrase opens."""
    blob = keyring.export_key(open_repository(args))
    if args.file == "-":
        sys.stdout.buffer.write(blob)
        return 0
    try:
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise BadInput(f"{args.file} exists; nothing was written") from None
    except OSError as exc:
        raise BadInput(f"cannot create {args.file}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    print(f"wrote the wrapped key to {args.file}", file=sys.stderr)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Store an exported key again (its passphrase must open it)."""
    try:
        blob = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read {args.file}: {exc.strerror}") from None
    key_id = keyring.import_key(open_backend(args.repo), blob, _needed(args)())
    print(f"imported key {key_id}")
    return 0
