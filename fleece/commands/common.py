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

from fleece.errors import BadInput, FleeceError, NotARepository
from fleece.repo.backends.base import Backend
from fleece.repo.backends.ratelimit import limit_backend, parse_rate
from fleece.repo.backends.url import open_backend
from fleece.repo.local_state import LocalState
from fleece.repo.repository import InitSettings, Passphrase, Repository

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
    """``--config FILE``, ``--repo URL``, the passphrase options and ``--accept-change``, the same
    on every command.

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
    add_accept_change_option(parser)


def add_accept_change_option(parser: argparse.ArgumentParser) -> None:
    """``--accept-change``: open a repository that changed since this host last saw it."""
    parser.add_argument(
        "--accept-change", action="store_true", default=None,
        help="the repository changed deliberately since this host last opened it (re-created, "
             "restored from an older copy, another key): accept it as it is now and remember that",
    )


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
    parser.set_defaults(func=run, unsafe_locks=None, group_access=None)


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

_taken: dict[str, str] = {}
"""The ``FLEECE_*PASSPHRASE*`` variables :func:`take_passphrases_from_environment` moved here."""


def take_passphrases_from_environment() -> None:
    """Move every ``FLEECE_*PASSPHRASE*`` variable out of ``os.environ`` into this process only.

    Called first thing by the command line: no child fleece starts (qemu-img,
    qemu-nbd, nbdkit, ssh, the passphrase command…) inherits a passphrase in
    its environment, where any process of the same user could read it from
    ``/proc/PID/environ``. nbdkit gets it on a pipe instead
    (:mod:`fleece.serve.server`).
    """
    _taken.clear()  # what this run's environment says, never an earlier run's (in-process callers)
    for name in [n for n in os.environ if n.startswith("FLEECE_") and "PASSPHRASE" in n]:
        _taken[name] = os.environ.pop(name)


def secret_env(name: str) -> str | None:
    """A ``FLEECE_*PASSPHRASE*`` variable, wherever it is now (taken, or still in the environment)."""
    return _taken.get(name, os.environ.get(name))


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
        check_passphrase_file(path)  # refused at once, before anything is opened
        return lambda: read_passphrase_file(path)
    command = secret_env(command_env)
    if command:
        return lambda: run_passphrase_command(command, command_env)
    value = secret_env(env)
    if value is not None:
        return lambda: _non_empty(value.encode(), f"${env}")
    return None


TO_PASSPHRASE_ENV = "FLEECE_TO_PASSPHRASE"
TO_PASSPHRASE_COMMAND_ENV = "FLEECE_TO_PASSPHRASE_COMMAND"


def to_passphrase_source(args: argparse.Namespace) -> Passphrase | None:
    """``copy``'s destination passphrase: ``--to-passphrase-file``, ``$FLEECE_TO_PASSPHRASE_COMMAND``
    or ``$FLEECE_TO_PASSPHRASE`` (the same rules as :func:`passphrase_source`)."""
    return passphrase_source(args, "to_passphrase_file", TO_PASSPHRASE_ENV, TO_PASSPHRASE_COMMAND_ENV)


def check_passphrase_file(path: str) -> None:
    """Refuse a passphrase file that its group or others may read or write (as TLS key files are)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise BadInput(f"cannot read passphrase file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise BadInput(f"passphrase file {path} is open to its group or others (mode "
                       f"{mode & 0o777:04o}): make it 0600 (chmod 600 {shlex.quote(path)}); "
                       "nothing was changed")


def read_passphrase_file(path: str) -> bytes:
    """The passphrase in ``path`` (refused unless only its owner may read it)."""
    check_passphrase_file(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read passphrase file {path}: {exc.strerror}") from None
    return _non_empty(data.removesuffix(b"\n"), f"passphrase file {path}")


def run_passphrase_command(command: str, variable: str = PASSPHRASE_COMMAND_ENV) -> bytes:
    """Run ``$FLEECE_PASSPHRASE_COMMAND`` (or ``variable``); its standard output is the passphrase."""
    try:
        done = subprocess.run(shlex.split(command), capture_output=True, stdin=subprocess.DEVNULL,
                              timeout=120, env=child_environment())
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        raise FleeceError(f"{variable} could not run: {exc}") from None
    if done.returncode != 0:
        raise FleeceError(f"{variable} exited with status {done.returncode}; nothing was changed")
    return _non_empty(done.stdout.removesuffix(b"\n"), variable)


def _non_empty(passphrase: bytes, where: str) -> bytes:
    if not passphrase:
        raise BadInput(f"the passphrase from {where} is empty")
    return passphrase


def child_environment() -> dict[str, str]:
    """The environment for a child process: fleece's own, without any passphrase variable."""
    return {k: v for k, v in os.environ.items()
            if not (k.startswith("FLEECE_") and "PASSPHRASE" in k)}


def local_state() -> LocalState:
    """This host's record of the repositories it opened (:mod:`fleece.repo.local_state`)."""
    return LocalState()


def open_repository(args: argparse.Namespace, backend: Backend | None = None,
                    passphrase: bytes | None = None) -> Repository:
    """Open ``--repo`` (or ``backend``), with the passphrase options (or ``passphrase``) if encrypted.

    Checked against (and recorded in) this host's local state; ``--accept-change``
    accepts a deliberate change. A location with no repository is
    :class:`~fleece.errors.NotARepository` with the command that creates one.
    """
    source = passphrase_source(args) if passphrase is None else (lambda: passphrase)
    if backend is None:
        # Paced below any encryption: the limit counts the bytes that travel.
        backend = limited_backend(open_backend(
            args.repo, unsafe_locks=bool(getattr(args, "unsafe_locks", False)),
            group_access=bool(getattr(args, "group_access", False))), args)
    try:
        return Repository.open(backend, source, state=local_state(),
                               accept_change=bool(getattr(args, "accept_change", False)))
    except NotARepository:
        raise NotARepository(no_repository_message(backend.url, source is not None)) from None


def no_repository_message(url: str, encrypted: bool, init_hint: str = "") -> str:
    """"No repository here", with the command that makes one (and ``init_hint``, e.g. ``--init``)."""
    how = "--encryption aes-256-gcm" if encrypted else "--encryption aes-256-gcm|none"
    return (f"{url} is not a fleece repository (no config): create one with 'fleece init --repo "
            f"{shlex.quote(url)} {how}'{init_hint}; nothing was written")


def open_or_create(args: argparse.Namespace, backend: Backend, settings: InitSettings) -> Repository:
    """Open ``backend``'s repository, creating it with ``settings`` where the location is empty
    (``--init``: the caller was told to)."""
    return Repository.open_or_init(backend, settings, passphrase_source(args), state=local_state(),
                                   accept_change=bool(getattr(args, "accept_change", False)))
