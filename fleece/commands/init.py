"""``fleece init``: create a repository explicitly, encrypted or not."""

from __future__ import annotations

import argparse

from fleece.commands.backup import parse_size
from fleece.commands.common import (
    add_json_option,
    add_repo_option,
    local_state,
    passphrase_source,
    print_json,
)
from fleece.errors import BadInput
from fleece.repo.backends.url import open_backend
from fleece.repo.format.codec import HASHES, parse_compression
from fleece.repo.format.crypto import CIPHERS
from fleece.repo.format.defaults import DEFAULT_CHUNK_SIZE, DEFAULT_HASH, DEFAULT_ZSTD_LEVEL
from fleece.repo.object_lock import MODES, ObjectLock, check_lock_days
from fleece.repo.repository import Repository, check_chunk_size, plaintext_refused


def lock_days(text: str) -> int:
    """argparse type of ``--object-lock-days``."""
    try:
        return check_lock_days(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of days: {text!r}") from None
    except BadInput as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--object-lock-days ")) from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``init`` to the command line."""
    p = sub.add_parser("init", help="create a repository (encrypted with --encryption)")
    add_repo_option(p)
    p.add_argument("--encryption", required=True, choices=[*CIPHERS, "none"],
                   help="seal every object with this AEAD (the passphrase comes from "
                        "FLEECE_PASSPHRASE, --passphrase-file or FLEECE_PASSPHRASE_COMMAND), or none")
    p.add_argument("--hash", choices=HASHES, default=DEFAULT_HASH,
                   help=f"the hash that names chunks (keyed when encrypted; default {DEFAULT_HASH}, "
                        "as for a repository a backup creates)")
    p.add_argument("--chunk-size", metavar="SIZE",
                   help=f"chunk size, a power of two (default {DEFAULT_CHUNK_SIZE >> 20}M)")
    p.add_argument("--compress", metavar="zstd[:LEVEL]|none",
                   help=f"zstd[:LEVEL] (default zstd:{DEFAULT_ZSTD_LEVEL}) or none")
    p.add_argument("--object-lock-days", type=lock_days, metavar="N",
                   help="immutable restore points: S3 Object Lock keeps every object a point needs "
                        "for at least N days after the newest point that uses it (the bucket must "
                        "have Object Lock enabled)")
    p.add_argument("--object-lock-mode", choices=MODES, default=None,
                   help="governance (default: s3:BypassGovernanceRetention may still delete) or "
                        "compliance (nobody can, not even the root account)")
    add_json_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Create the repository; exit 2 if the location holds one already."""
    chunk_size = check_chunk_size(parse_size(args.chunk_size) if args.chunk_size else DEFAULT_CHUNK_SIZE)
    level = parse_compression(args.compress) if args.compress else DEFAULT_ZSTD_LEVEL
    if args.object_lock_mode is not None and args.object_lock_days is None:
        raise BadInput("--object-lock-mode needs --object-lock-days N")
    lock = (None if args.object_lock_days is None
            else ObjectLock(args.object_lock_days, args.object_lock_mode or "governance"))
    source = passphrase_source(args)
    if args.encryption != "none" and source is None:
        raise BadInput("--encryption needs a passphrase: FLEECE_PASSPHRASE, --passphrase-file or "
                       "FLEECE_PASSPHRASE_COMMAND (never on the command line)")
    if args.encryption == "none" and source is not None:
        raise plaintext_refused(args.repo, "create")  # a passphrase means encrypted: fail closed
    passphrase = None if source is None else source()
    repo = Repository.init(open_backend(args.repo), chunk_size, level, hash=args.hash,
                           encryption=args.encryption, passphrase=passphrase, object_lock=lock)
    # A deliberate new repository: this host remembers it as made, whatever the location held.
    repo.remember(local_state(), accept_change=True)
    if args.json:
        print_json({"repo": repo.url, "id": repo.config.id, "format": repo.config.format,
                    "encryption": repo.config.encryption, "hash": repo.config.hash,
                    "chunk_size": repo.config.chunk_size, "key": repo.key_id,
                    "object_lock": None if lock is None else lock.document()})
    else:
        how = "not encrypted" if repo.master is None else f"encrypted with {repo.config.encryption}"
        print(f"created repository {repo.url} ({how}, format {repo.config.format})")
        if lock is not None:
            print(f"every object a restore point needs stays locked ({lock.mode}) for at least "
                  f"{lock.days} days after the newest point that uses it")
        if repo.master is not None:
            print("keep the passphrase safe: without it nothing in the repository can be read "
                  "('fleece key export' makes a copy of the wrapped key)")
    return 0
