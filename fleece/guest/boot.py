"""Judge whether a point boots: a throwaway machine on the served point, and what the guest shows.

Ready means every expectation given holds: the guest agent answers
``guest-ping`` (``expect_agent``), the serial console prints a match of
``serial``. Then each ``--run`` command must exit 0 through ``guest-exec``.
At any moment the verdict is a failure when QEMU exits, when the firmware
says it found nothing to boot (SeaBIOS's debug port), or when the deadline
passes. In every case the guest must have seen no read error on any disk
(``query-blockstats``). The report keeps the console's tail, the firmware's
log, the commands' output, the time to ready (from QEMU's start) and the
bytes the guest read from each disk.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleece.guest.agent import AgentCommandError, AgentUnavailable, GuestAgent
from fleece.guest.machine import Machine, Shape
from fleece.guest.scratch import Scratch, interruptible
from fleece.guest.served import ServedPoint
from fleece.repo.format.point import RestorePoint

NO_BOOT = re.compile(r"No bootable device|Boot failed: not a bootable disk|Boot failed: could not read",
                     re.I)
CONSOLE_KEPT = 8000
"""Characters of the console's end kept in the report."""


@dataclass
class Expectations:
    """What makes the guest ready, and what must hold after."""

    agent: bool = False
    serial: re.Pattern[str] | None = None
    run: list[str] = field(default_factory=list)
    timeout: float = 600.0


@dataclass
class BootRun:
    """The verdict and its evidence."""

    ok: bool
    reason: str
    time_to_ready: float | None
    seconds: float
    report: dict[str, Any]


def _tail(path: Path, keep: int = CONSOLE_KEPT) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-keep:]


def _blockstats(m: Machine) -> tuple[dict[str, int], dict[str, int]]:
    """Per disk: failed read operations, and bytes the guest read (QEMU's device statistics).

    Node-level statistics of the NBD node stay zero (QEMU counts per block
    backend), so the device's reads are the measure: they bound what came
    from the point, since reads of blocks the guest wrote come from the overlay.
    """
    failed: dict[str, int] = {}
    read: dict[str, int] = {}
    for entry in m.qmp("query-blockstats"):
        qdev = str(entry.get("qdev", ""))
        for i, disk in enumerate(m.disks):
            if qdev == f"disk{i}" or qdev.startswith(f"/machine/peripheral/disk{i}/"):
                failed[disk.name] = int(entry["stats"].get("failed_rd_operations", 0))
                read[disk.name] = int(entry["stats"].get("rd_bytes", 0))
    return failed, read


def judge(m: Machine, expect: Expectations, say: Callable[[str], None]) -> BootRun:
    """Watch the running machine until it is ready or fails (see the module docstring)."""
    started = time.monotonic()
    deadline = started + expect.timeout
    agent = GuestAgent(m.qga_path) if expect.agent else None
    report: dict[str, Any] = {"accel": m.accel[1], "shape": vars(m.shape).copy(), "agent": None,
                              "serial_match": None, "commands": []}
    serial_ok = expect.serial is None
    agent_ok = agent is None
    reason = ""
    ready_at: float | None = None
    try:
        while True:
            if not m.running():
                reason = f"QEMU exited (status {m.proc.returncode if m.proc else '?'}) before the " \
                         f"guest was ready: {m.log_tail(2)}".rstrip(": ")
                break
            firmware = _tail(m.firmware_log)
            if NO_BOOT.search(firmware):
                reason = "the firmware found nothing to boot on the point's disks"
                break
            if not serial_ok and expect.serial is not None:
                found = expect.serial.search(_tail(m.console, 1 << 20))
                if found:
                    serial_ok = True
                    report["serial_match"] = found.group(0)
            if not agent_ok and agent is not None:
                try:
                    agent.execute("guest-ping", timeout=2)
                    agent_ok = True
                    info: dict[str, Any] = {"ping": True}
                    try:
                        info["osinfo"] = agent.execute("guest-get-osinfo", timeout=5)
                    except (AgentCommandError, AgentUnavailable):
                        info["osinfo"] = None
                    report["agent"] = info
                except (AgentUnavailable, AgentCommandError, OSError):
                    agent.close()
            if serial_ok and agent_ok:
                ready_at = time.monotonic()
                say(f"the guest is ready after {ready_at - started:.1f} s")
                break
            if time.monotonic() > deadline:
                missing = ([] if agent_ok else ["the guest agent did not answer"]) + \
                          ([] if serial_ok else [f"the console printed no match of {expect.serial.pattern!r}"
                                                 if expect.serial else ""])
                reason = f"not ready within {expect.timeout:.0f} s: " + " and ".join(missing)
                break
            time.sleep(0.5)
        if ready_at is not None and agent is not None:
            for command in expect.run:
                left = max(5.0, deadline - time.monotonic())
                try:
                    result = agent.run(command, left)
                except (AgentUnavailable, AgentCommandError, OSError) as exc:
                    result = {"command": command, "exitcode": None, "error": str(exc)}
                report["commands"].append(result)
                if result.get("exitcode") != 0 and not reason:
                    why = result.get("error") or f"exit status {result.get('exitcode')}"
                    reason = f"--run {command!r} failed ({why})"
        if m.running():
            try:
                failed, read = _blockstats(m)
            except Exception as exc:  # a QEMU that dies just now: the verdict has its reason
                failed, read = {}, {}
                report["blockstats_error"] = str(exc)
            report["read_errors"] = failed
            report["bytes_read"] = read
            bad = {d: n for d, n in failed.items() if n}
            if bad and not reason:
                reason = "the guest saw read errors on " + ", ".join(f"{d} ({n})" for d, n in bad.items())
    finally:
        if agent is not None:
            agent.close()
    report["console"] = _tail(m.console)
    report["firmware_log"] = _tail(m.firmware_log, 2000)
    ok = ready_at is not None and not reason
    return BootRun(ok, reason, None if ready_at is None else ready_at - started,
                   time.monotonic() - started, report)


def screendump(m: Machine, target: Path) -> bool:
    """Save the display as PNG at ``target``; whether it worked."""
    try:
        m.qmp("screendump", filename=str(target), format="png")
        return target.exists()
    except Exception:
        return False


def boot_point(repo_url: str, point: RestorePoint, shape: Shape, expect: Expectations, *,
               passphrase: bytes | None = None, scratch_parent: Path | None = None,
               screen: Path | None = None, say: Callable[[str], None] = lambda line: None) -> BootRun:
    """Serve ``point``, boot it in a throwaway machine, judge it, tear everything down."""
    with Scratch(scratch_parent) as scratch, interruptible(), \
            ServedPoint(repo_url, point, scratch, passphrase=passphrase) as served:
        machine = Machine(served.disks, scratch, shape, agent=expect.agent)
        try:
            say(f"booting {point.id} ({machine.accel[1].upper()}, {shape.firmware}, "
                f"{shape.memory} MiB, no network) from {', '.join(d.name for d in served.disks)}")
            machine.start()
            verdict = judge(machine, expect, say)
            if screen is not None and machine.running() and screendump(machine, screen):
                verdict.report["screendump"] = str(screen)
        finally:
            machine.stop()
    return verdict
