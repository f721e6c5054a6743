"""Pieces several commands share: option definitions, JSON output, running async code."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def add_qmp_option(parser: argparse.ArgumentParser) -> None:
    """``--qmp SOCKET``: QEMU's QMP unix socket or HOST:PORT."""
    parser.add_argument(
        "--qmp", required=True, metavar="SOCKET", help="QEMU's QMP unix socket path or HOST:PORT"
    )


def add_vm_options(parser: argparse.ArgumentParser) -> None:
    """``--qmp SOCKET`` or ``--libvirt DOMAIN [--connect URI]``: the VM, reached one way or the other."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--qmp", metavar="SOCKET", help="QEMU's QMP unix socket path or HOST:PORT")
    which.add_argument("--libvirt", metavar="DOMAIN", help="a libvirt domain (name or UUID)")
    parser.add_argument("--connect", metavar="URI",
                        help="libvirt connection URI with --libvirt (default $LIBVIRT_DEFAULT_URI, else "
                             "qemu:///system)")


def add_repo_option(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--repo URL``: the repository (not required where ``--config`` may give it)."""
    parser.add_argument(
        "--repo", required=required, metavar="URL",
        help="repository: a directory, file:///abs/path or s3://bucket/prefix",
    )


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """``--json``: one JSON object on stdout and nothing else there."""
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout and nothing else"
    )


def print_json(obj: Any) -> None:
    """Write ``obj`` as the single JSON document on stdout."""
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
    sys.stdout.flush()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine to completion on a fresh event loop."""
    return asyncio.run(coro)


def human_size(n: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
