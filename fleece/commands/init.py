"""``fleece init``: create a repository explicitly, encrypted or not."""

from __future__ import annotations

import argparse

from fleece.commands.backup import DEFAULT_CHUNK_SIZE, parse_size
from fleece.commands.common import add_json_option, add_repo_option, passphrase_source, print_json
from fleece.errors import BadInput
from fleece.repo.backends.url import open_backend
from fleece.repo.format.codec import DEFAULT_ZSTD_LEVEL, parse_compression
from fleece.repo.format.crypto import CIPHERS
from fleece.repo.repository import Repository, check_chunk_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``init`` to the command line."""
    p = sub.add_parser("init", help="create a repository (encrypted with --encryption)")
    add_repo_option(p)
    p.add_argument("--encryption", required=True, choices=[*CIPHERS, "none"],
                   help="seal every object with this AEAD (the passphrase comes from "
                        "FLEECE_PASSPHRASE, --passphrase-file or FLEECE_PASSPHRASE_COMMAND), or none")
    p.add_argument("--hash", choices=["sha256", "blake3"], default="sha256",
                   help="the hash that names chunks (keyed when encrypted; default sha256)")
    p.add_argument("--chunk-size", metavar="SIZE", help="chunk size, a power of two (default 4M)")
    p.add_argument("--compress", metavar="CODEC",
                   help=f"zstd[:LEVEL] (default zstd:{DEFAULT_ZSTD_LEVEL}) or none")
    add_json_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Create the repository; exit 2 if the location holds one already."""
    chunk_size = check_chunk_size(parse_size(args.chunk_size) if args.chunk_size else DEFAULT_CHUNK_SIZE)
    level = parse_compression(args.compress) if args.compress else DEFAULT_ZSTD_LEVEL
    passphrase = None
    if args.encryption != "none":
        source = passphrase_source(args)
        if source is None:
            raise BadInput("--encryption needs a passphrase: FLEECE_PASSPHRASE, --passphrase-file or "
                           "FLEECE_PASSPHRASE_COMMAND (never on the command line)")
        passphrase = source()
    repo = Repository.init(open_backend(args.repo), chunk_size, level, hash=args.hash,
                           encryption=args.encryption, passphrase=passphrase)
    if args.json:
        print_json({"repo": repo.url, "id": repo.config.id, "format": repo.config.format,
                    "encryption": repo.config.encryption, "hash": repo.config.hash,
                    "chunk_size": repo.config.chunk_size, "key": repo.key_id})
    else:
        how = "not encrypted" if repo.master is None else f"encrypted with {repo.config.encryption}"
        print(f"created repository {repo.url} ({how}, format {repo.config.format})")
        if repo.master is not None:
            print("keep the passphrase safe: without it nothing in the repository can be read "
                  "('fleece key export' makes a copy of the wrapped key)")
    return 0
