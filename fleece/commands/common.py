"""Pieces several commands share: option definitions, JSON output, running async code."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from fleece.errors import BadInput, FleeceError
from fleece.repo.backends.base import Backend
from fleece.repo.backends.ratelimit import limit_backend, parse_rate
from fleece.repo.backends.url import open_backend
from fleece.repo.repository import Passphrase, Repository

T = TypeVar("T")


def add_vm_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--qmp SOCKET`` or ``--libvirt DOMAIN [--connect URI]``: the VM, reached one way or the other."""
    which = parser.add_mutually_exclusive_group(required=required)
    which.add_argument("--qmp", metavar="SOCKET", help="QEMU's QMP unix socket path or HOST:PORT")
    which.add_argument("--libvirt", metavar="DOMAIN", help="a libvirt domain (name or UUID)")
    parser.add_argument("--connect", metavar="URI",
                        help="libvirt connection URI with --libvirt (default $LIBVIRT_DEFAULT_URI, else "
                             "qemu:///system)")


def add_repo_option(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--config FILE``, ``--repo URL`` and the passphrase options, the same on every command.

    The repository is ``--repo``, else ``repo`` in ``--config``, else
    ``$FLEECE_REPOSITORY`` (``config.apply_repository_settings`` resolves it
    before the command runs; ``required`` makes its absence an error there).
    """
    if "--config" not in parser._option_string_actions:
        parser.add_argument("--config", metavar="FILE",
                            help="read settings from a TOML file (see configs/): here repo, "
                                 "passphrase_file and vm")
    parser.add_argument(
        "--repo", metavar="URL", default=None,
        help="repository: a directory, file:///abs/path or s3://bucket/prefix "
             "(default: repo in --config, else $FLEECE_REPOSITORY)",
    )
    parser.set_defaults(repo_required=required)
    add_passphrase_option(parser)


def add_client_tls_options(parser: argparse.ArgumentParser) -> None:
    """``--tls-creds DIR`` / ``--tls-psk FILE``: this side's credentials for an ``nbds://`` URI."""
    parser.add_argument(
        "--tls-creds", metavar="DIR",
        help="client x509 credentials for nbds://: DIR holds ca-cert.pem, client-cert.pem and "
             "client-key.pem (0600)",
    )
    parser.add_argument(
        "--tls-psk", metavar="FILE", help="pre-shared key file (0600, USERNAME:HEXKEY) for nbds://"
    )


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    """``--limit-upload RATE`` and ``--limit-download RATE`` (config ``limit_upload``/``limit_download``)."""
    parser.add_argument("--limit-upload", metavar="RATE", default=None,
                        help="at most RATE bytes/s to the repository (20M = 20 MiB/s)")
    parser.add_argument("--limit-download", metavar="RATE", default=None,
                        help="at most RATE bytes/s from the repository (20M = 20 MiB/s)")


def limited_backend(backend: Backend, args: argparse.Namespace) -> Backend:
    """``backend`` paced by the command's ``--limit-upload``/``--limit-download`` (if given)."""
    up, down = getattr(args, "limit_upload", None), getattr(args, "limit_download", None)
    return limit_backend(backend, parse_rate(up, "--limit-upload") if up else None,
                         parse_rate(down, "--limit-download") if down else None)


def add_metrics_option(parser: argparse.ArgumentParser) -> None:
    """``--metrics-file PATH`` (config ``metrics_file``): see :mod:`fleece.commands.metrics`."""
    parser.add_argument("--metrics-file", metavar="PATH", default=None,
                        help="after the run, update this Prometheus text-format file (node_exporter's "
                             "textfile collector)")


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """``--json``: one JSON object on stdout and nothing else there."""
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout and nothing else"
    )


def add_recorded_run(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int]) -> None:
    """The tail of a command that moves data and records its run.

    The limits, ``--metrics-file`` and ``--json``, and ``run`` as the handler;
    ``unsafe_locks`` comes only from the command's config file.
    """
    add_limit_options(parser)
    add_metrics_option(parser)
    add_json_option(parser)
    parser.set_defaults(func=run, unsafe_locks=None)


def print_json(obj: Any) -> None:
    """Write ``obj`` as the single JSON document on stdout."""
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
    sys.stdout.flush()


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine to completion on a fresh event loop."""
    return asyncio.run(coro)


def say(line: str) -> None:
    """A one-line notice on stderr, in fleece's voice."""
    sys.stderr.write(f"fleece: {line}\n")


def human_size(n: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


PASSPHRASE_ENV = "FLEECE_PASSPHRASE"
PASSPHRASE_COMMAND_ENV = "FLEECE_PASSPHRASE_COMMAND"


def add_passphrase_option(parser: argparse.ArgumentParser) -> None:
    """``--passphrase-file FILE``: an encrypted repository's passphrase (never a value on the line)."""
    parser.add_argument(
        "--passphrase-file", metavar="FILE",
        help="read an encrypted repository's passphrase from FILE (or set FLEECE_PASSPHRASE or "
             "FLEECE_PASSPHRASE_COMMAND)",
    )


def passphrase_source(args: argparse.Namespace, option: str = "passphrase_file",
                      env: str = PASSPHRASE_ENV, command_env: str = PASSPHRASE_COMMAND_ENV
                      ) -> Passphrase | None:
    """Where the passphrase comes from: ``--passphrase-file``, else ``$FLEECE_PASSPHRASE_COMMAND``
    (run, its standard output used), else ``$FLEECE_PASSPHRASE``; None when none is set.

    Read only when an encrypted repository asks for it; one trailing newline is dropped.
    ``option``, ``env`` and ``command_env`` name another set of the three (``copy``'s
    destination: :data:`TO_PASSPHRASE_ENV`…).
    """
    path = getattr(args, option, None)
    if path:
        return lambda: read_passphrase_file(path)
    command = os.environ.get(command_env)
    if command:
        return lambda: run_passphrase_command(command, command_env)
    if env in os.environ:
        return lambda: _non_empty(os.environ[env].encode(), f"${env}")
    return None


TO_PASSPHRASE_ENV = "FLEECE_TO_PASSPHRASE"
TO_PASSPHRASE_COMMAND_ENV = "FLEECE_TO_PASSPHRASE_COMMAND"


def to_passphrase_source(args: argparse.Namespace) -> Passphrase | None:
    """``copy``'s destination passphrase: ``--to-passphrase-file``, ``$FLEECE_TO_PASSPHRASE_COMMAND``
    or ``$FLEECE_TO_PASSPHRASE`` (the same rules as :func:`passphrase_source`)."""
    return passphrase_source(args, "to_passphrase_file", TO_PASSPHRASE_ENV, TO_PASSPHRASE_COMMAND_ENV)


def read_passphrase_file(path: str) -> bytes:
    """The passphrase in ``path``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read passphrase file {path}: {exc.strerror}") from None
    return _non_empty(data.removesuffix(b"\n"), f"passphrase file {path}")


def run_passphrase_command(command: str, variable: str = PASSPHRASE_COMMAND_ENV) -> bytes:
    """Run ``$FLEECE_PASSPHRASE_COMMAND`` (or ``variable``); its standard output is the passphrase."""
    try:
        done = subprocess.run(shlex.split(command), capture_output=True, stdin=subprocess.DEVNULL,
                              timeout=120)
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        raise FleeceError(f"{variable} could not run: {exc}") from None
    if done.returncode != 0:
        raise FleeceError(f"{variable} exited with status {done.returncode}; nothing was changed")
    return _non_empty(done.stdout.removesuffix(b"\n"), variable)


def _non_empty(passphrase: bytes, where: str) -> bytes:
    if not passphrase:
        raise BadInput(f"the passphrase from {where} is empty")
    return passphrase


def open_repository(args: argparse.Namespace, backend: Backend | None = None,
                    passphrase: bytes | None = None) -> Repository:
    """Open ``--repo`` (or ``backend``), with the passphrase options (or ``passphrase``) if encrypted."""
    source = passphrase_source(args) if passphrase is None else (lambda: passphrase)
    if backend is None:
        # Paced below any encryption: the limit counts the bytes that travel.
        backend = limited_backend(open_backend(args.repo, unsafe_locks=bool(getattr(
            args, "unsafe_locks", False))), args)
    return Repository.open(backend, source)
