"""SIGTERM and SIGHUP stop a command that changes QEMU the way Ctrl-C does.

``systemctl stop``, a unit's timeout and a host shutdown send SIGTERM; a
closed terminal sends SIGHUP. Left to Python's default they end the process
on the spot, and whatever fleece had put into QEMU (the copy-before-write
filter in the guest's write path) stays there. Inside
:func:`abort_on_stop_signals` the first of them is turned into SIGINT, which
``asyncio.run`` answers by cancelling the command: the export is torn down
as an abort (or, once the restore point is written, its commit is finished:
:func:`fleece.fleecing.teardown.tear_down` runs to its end), the locks are
released, and the command exits ``128 + signal`` with one line.

The stop is bounded: if the process has not ended :data:`STOP_DEADLINE`
seconds after the signal (a store that does not answer), it exits at once,
and so does a second SIGTERM or SIGHUP. Then what it put into QEMU may
still be there, and the line says the command that removes it (the systemd
unit runs it in ``ExecStopPost=``; the next backup does it too).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from fleece.errors import FleeceError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
STOP_DEADLINE = 90.0
"""Seconds from a stop signal to the end of the process, tear-down included (docs/design.md §3.4).
The shipped units' ``TimeoutStopSec=`` is above it."""


class Stopped(FleeceError):
    """The command was stopped by SIGTERM or SIGHUP and has undone what it started."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


@contextmanager
def abort_on_stop_signals(what: str, cleanup_hint: str,
                          left_behind: Callable[[], str | None] | None = None,
                          note: str = "") -> Iterator[None]:
    """Handle SIGTERM and SIGHUP like Ctrl-C inside the block (in the main thread only).

    ``what`` names the work ("the backup"), ``cleanup_hint`` the exact
    command that removes what a process stopped half-way left in QEMU.
    :class:`Stopped` is raised when the block was left by the signal, saying
    what ``left_behind()`` (a fresh look at QEMU) still finds there, and ``note``.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def exit_now(signum: int, why: str) -> None:
        sys.stderr.write(f"fleece: error: {why}; exiting now: what {what} put into QEMU may "
                         f"still be there; remove it with: {cleanup_hint}\n")
        sys.stderr.flush()
        os._exit(128 + signum)

    def watchdog(signum: int) -> None:
        exit_now(signum, f"{signal.Signals(signum).name}: the stop did not finish within "
                         f"{STOP_DEADLINE:g} s")

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        if received:
            exit_now(signum, f"{signal.Signals(signum).name} again")
        received.append(signum)
        # os.write: the handler may have interrupted a write to sys.stderr.
        os.write(2, f"fleece: {signal.Signals(signum).name}: stopping {what}: undoing what it put "
                    f"into QEMU (at most {STOP_DEADLINE:g} s; another signal exits at once)\n".encode())
        timer = threading.Timer(STOP_DEADLINE, watchdog, args=(signum,))
        timer.daemon = True
        timer.start()
        # asyncio.run's SIGINT handler cancels the main task: every `async
        # with` undoes its part. Outside a running loop this raises
        # KeyboardInterrupt right here.
        signal.raise_signal(signal.SIGINT)

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        yield
    except KeyboardInterrupt:
        if not received:
            raise
        name = signal.Signals(received[0]).name
        left = left_behind() if left_behind is not None else None
        raise Stopped(received[0], f"stopped by {name}: {what} was interrupted; " + (
            f"left in QEMU: {left}; remove it with: {cleanup_hint}" if left
            else "nothing of it is left in QEMU") + (f"; {note}" if note else "")) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
