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

from fleece import __version__
from fleece.errors import FleeceError

# One entry per command module; each adds its own sub-parser(s).
COMMAND_MODULES = [
    "fleece.commands.status",
    "fleece.commands.export",
    "fleece.commands.cleanup",
    "fleece.commands.backup",
    "fleece.commands.list",
    "fleece.commands.restore",
    "fleece.commands.verify",
    "fleece.commands.serve",
    "fleece.commands.prune",
    "fleece.commands.gc",
    "fleece.commands.protect",
    "fleece.commands.unlock",
    "fleece.commands.init",
    "fleece.commands.key",
    "fleece.commands.copy",
]


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
    parser.add_argument("--version", action="version", version=f"fleece {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in [only] if only else COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fleece`` console script."""
    if argv is None:
        argv = sys.argv[1:]
    # No child of this process may inherit a passphrase through its environment.
    from fleece.commands.common import take_passphrases_from_environment

    take_passphrases_from_environment()
    parser = build_parser(command_module(argv))
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="fleece: %(message)s", stream=sys.stderr)
    # qemu.qmp logs its own copy of every connection error; ours is the one line.
    logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if args.verbose > 2 else logging.CRITICAL)
    try:
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
