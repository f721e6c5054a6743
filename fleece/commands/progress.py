"""Progress display: bars on a terminal (rich), plain log lines otherwise."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fleece.commands.common import human_size

ProgressFactory = Callable[[str, int], Callable[[int], None]]


@contextmanager
def progress_display(enabled: bool = True) -> Iterator[ProgressFactory]:
    """Yield ``start(label, total) -> advance(n)``; bars on a tty stderr, log lines otherwise."""
    if enabled and sys.stderr.isatty():
        # Imported here: rich costs a non-interactive run (cron, systemd) ~50 ms of start-up.
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        with bars:

            def start_bar(label: str, total: int) -> Callable[[int], None]:
                task = bars.add_task(label, total=total)
                return lambda n: bars.advance(task, n)

            yield start_bar
        return

    def start_lines(label: str, total: int) -> Callable[[int], None]:
        if not enabled:
            return lambda n: None
        done = 0
        lock = threading.Lock()
        t0 = last = time.monotonic()

        def advance(n: int) -> None:
            nonlocal done, last
            with lock:
                done += n
                now = time.monotonic()
                if now - last < 5 and not (n == 0 and done == 0):
                    return
                last = now
            rate = done / max(now - t0, 1e-9)
            sys.stderr.write(
                f"fleece: {label}: {human_size(done)} read ({human_size(rate)}/s)\n"
            )

        return advance

    yield start_lines
