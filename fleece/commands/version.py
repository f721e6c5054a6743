"""``fleece version`` (and ``fleece --version``): the versions a bug report needs.

fleece's own version, then every component whose behaviour fleece depends on:
QEMU (from the VM's QMP monitor with ``--qmp``, which is the QEMU that
matters, else from ``qemu-system-x86_64 --version``), libnbd, nbdkit, Python
and the S3 stack. A component that is missing says so instead of failing
the command: the report is most wanted on a machine where something is off.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from importlib import metadata
from typing import Any

from fleece import __version__

# Python distributions whose versions change what fleece does, in report order.
_PYTHON_PACKAGES = ("boto3", "botocore", "zstandard", "blake3", "cryptography", "qemu.qmp")


def _first_version(argv: list[str]) -> str | None:
    """The first dotted version number a tool prints, or None if it is absent or fails."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"\d+\.\d+(?:\.\d+)?", out)
    return found.group(0) if found else None


def _libnbd_version() -> str | None:
    try:
        import nbd  # Debian's binding, linked into the venv
    except ImportError:
        return None
    return str(nbd.NBD().get_version())


def _qemu_from_qmp(socket: str) -> str:
    """``query-version`` of the QEMU behind ``socket``."""
    from fleece.commands.common import run_async
    from fleece.qmp.session import QmpSession

    async def ask() -> str:
        async with QmpSession.open(socket) as qmp:
            answer: Any = await qmp.execute("query-version")
        q = answer["qemu"]
        return f"{q['major']}.{q['minor']}.{q['micro']}{answer.get('package', '')}".strip()

    return str(run_async(ask()))


def report(qmp_socket: str | None = None) -> dict[str, str | None]:
    """Every component's version (None: not installed here)."""
    versions: dict[str, str | None] = {"fleece": __version__}
    if qmp_socket:
        versions["qemu"] = _qemu_from_qmp(qmp_socket)
        versions["qemu_source"] = "qmp"
    else:
        versions["qemu"] = _first_version(["qemu-system-x86_64", "--version"])
        versions["qemu_source"] = "qemu-system-x86_64"
    versions["libnbd"] = _libnbd_version()
    versions["nbdkit"] = _first_version(["nbdkit", "--version"])
    import platform  # only here: the version report is the one user

    versions["python"] = platform.python_version()
    for name in _PYTHON_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def format_report(versions: dict[str, str | None]) -> str:
    """The human form: ``fleece X.Y.Z`` then one ``name: version`` line per component."""
    lines = [f"fleece {versions['fleece']}"]
    for name, value in versions.items():
        if name in ("fleece", "qemu_source"):
            continue
        shown = value or "not found"
        if name == "qemu" and value:
            shown += f" (from {versions['qemu_source']})"
        lines.append(f"  {name}: {shown}")
    return "\n".join(lines)


class VersionAction(argparse.Action):
    """``fleece --version``: the whole report, then exit 0 (as argparse's own action does)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        sys.stdout.write(format_report(report()) + "\n")
        parser.exit(0)


def run(args: argparse.Namespace) -> int:
    """Print the report, as text or ``--json``."""
    versions = report(args.qmp)
    if args.json:
        sys.stdout.write(json.dumps(versions, indent=2) + "\n")
    else:
        sys.stdout.write(format_report(versions) + "\n")
    return 0


def register(sub: Any) -> None:
    """Add ``fleece version``."""
    p = sub.add_parser(
        "version", help="print the versions of fleece and of what it uses (for bug reports)",
        description="Print fleece's version and those of QEMU, libnbd, nbdkit, Python and the S3 "
                    "stack. With --qmp, QEMU's is the running VM's own.",
)
    p.add_argument("--qmp", metavar="SOCKET", help="ask this VM's QEMU for its version")
    p.add_argument("--json", action="store_true", help="print the versions as one JSON object")
    p.set_defaults(func=run)
