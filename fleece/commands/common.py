"""Pieces several commands share: option definitions, JSON output, running async code."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from fleece.repo.backend import Backend
from fleece.repo.ratelimit import limit_backend, parse_rate

T = TypeVar("T")


def add_qmp_option(parser: argparse.ArgumentParser) -> None:
    """``--qmp SOCKET``: QEMU's QMP unix socket or HOST:PORT."""
    parser.add_argument(
        "--qmp", required=True, metavar="SOCKET", help="QEMU's QMP unix socket path or HOST:PORT"
    )


def add_repo_option(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--repo URL``: the repository (not required where ``--config`` may give it)."""
    parser.add_argument(
        "--repo", required=required, metavar="URL",
        help="repository: a directory, file:///abs/path or s3://bucket/prefix",
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
    """``--metrics-file PATH`` (config ``metrics_file``): see :mod:`fleece.metrics`."""
    parser.add_argument("--metrics-file", metavar="PATH", default=None,
                        help="after the run, update this Prometheus text-format file (node_exporter's "
                             "textfile collector)")


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
