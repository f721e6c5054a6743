"""Live-restore benchmark (``scripts/bench --live-restore``): instant recovery against plain restore.

For the realistic 2 GiB disk of the main benchmark and for a 16 GiB disk
holding 512 MiB of data, stored in a local repository, it measures:

* time from ``fleece restore --live``'s start to the guest running
  (the ``running`` event, checked against QEMU's own run state; goal <= 2 s);
* the stream's throughput against a plain ``fleece restore`` of the same
  point to a raw file, whole commands both, idle guest (goal >= 0.8);
* a guest writer's rate (1 MiB writes through the device) during the stream,
  against the same writer on the restored local image afterwards.
"""

from __future__ import annotations

import json
import os
import random
import select
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

MiB = 1 << 20
GiB = 1 << 30
RUNS = 3
"""Runs of each timed command; the machine is shared, so medians are reported."""


class PausedVM:
    """QEMU started with ``-S`` on a blank placeholder of ``size`` bytes, device ``vda``."""

    def __init__(self, work: Path, name: str, size: int) -> None:
        placeholder = work / f"{name}-placeholder.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(placeholder), str(size)],
                       check=True)
        self.qmp = str(work / f"{name}.qmp")
        guest = str(work / f"{name}.guest")
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-nodefaults", "-display", "none",
             "-m", "64", "-S",
             "-blockdev", f"driver=file,filename={placeholder},node-name=ph-file",
             "-blockdev", "driver=qcow2,file=ph-file,node-name=ph",
             "-device", "virtio-blk-pci,drive=ph,id=vda,rerror=stop,werror=stop",
             "-qmp", f"unix:{self.qmp},server=on,wait=off",
             "-qmp", f"unix:{guest},server=on,wait=off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(500):
            if os.path.exists(guest) and os.path.exists(self.qmp):
                break
            time.sleep(0.02)
        self.mon = QEMUMonitorProtocol(guest)
        self.mon.connect()

    def status(self) -> str:
        return str(self.mon.cmd_raw("query-status")["return"]["status"])

    def write(self, offset: int, length: int) -> None:
        self.mon.cmd_raw("human-monitor-command", {
            "command-line": f'qemu-io -d /machine/peripheral/vda/virtio-backend '
                            f'"write -P 0x5a {offset} {length}"'})

    def streaming(self) -> bool:
        return any(j["id"].startswith("fleece-live-") and j["status"] == "running"
                   for j in self.mon.cmd_raw("query-jobs")["return"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.mon.cmd_raw("quit")
                self.mon.close()
                self.proc.wait(20)
            except Exception:
                self.proc.kill()


def guest_writer(vm: PausedVM, size: int, until: threading.Event, out: list[float]) -> None:
    """1 MiB writes at random places until ``until`` is set; appends MiB/s to ``out``."""
    rnd = random.Random(5)
    n, t0 = 0, time.perf_counter()
    while not until.is_set():
        vm.write(rnd.randrange(size // MiB) * MiB, MiB)
        n += 1
    out.append(n / max(time.perf_counter() - t0, 1e-9))


def live_run(fleece: str, work: Path, repo: Path, point: str, size: int, name: str,
             writer: bool) -> dict[str, Any]:
    """One live restore into a fresh paused VM; its timings, and with ``writer`` the rates of a
    guest writer during the stream and afterwards."""
    vm = PausedVM(work, name, size)
    out = work / f"{name}-live.qcow2"
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen([fleece, "restore", "--live", "--json", "--repo", str(repo), point,
                                 "--drive", "vda", "--output", str(out), "--qmp", vm.qmp],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        running_s = None
        while running_s is None:
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            line = proc.stdout.readline() if ready else ""
            if not line:
                raise SystemExit(f"live restore failed: {proc.stderr.read() if proc.stderr else ''}")
            if json.loads(line)["event"] == "running":
                running_s = time.perf_counter() - t0
        status = vm.status()
        stop, during, after = threading.Event(), [], []  # type: ignore[var-annotated]
        thread = threading.Thread(target=guest_writer, args=(vm, size, stop, during))
        if writer:
            thread.start()
        for line in proc.stdout:
            if json.loads(line)["event"] == "done":
                break
        stop.set()
        if writer:
            thread.join()
        if proc.wait() != 0:
            raise SystemExit(f"live restore failed: {proc.stderr.read() if proc.stderr else ''}")
        total_s = time.perf_counter() - t0
        if writer:
            # The same writer on the restored, purely local image: the reference rate.
            stop2 = threading.Event()
            threading.Timer(3.0, stop2.set).start()
            guest_writer(vm, size, stop2, after)
        return {"running_s": running_s, "status": status, "total_s": total_s,
                "writer_during": during[0] if during else 0.0,
                "writer_after": after[0] if after else 0.0}
    finally:
        vm.stop()
        out.unlink(missing_ok=True)


def plain_restore(fleece: str, work: Path, repo: Path, point: str) -> float:
    """Seconds of ``fleece restore`` of the same point to a raw file (whole command)."""
    out = work / "plain.raw"
    t = time.perf_counter()
    subprocess.run([fleece, "restore", "--repo", str(repo), point, "--drive", "vda", "--output",
                    str(out)], check=True, capture_output=True)
    dt = time.perf_counter() - t
    out.unlink()
    return dt


def bench_live(fleece: str, work: Path, points: list[tuple[str, Path, str, int]]
               ) -> list[tuple[str, str, str, str]]:
    """Rows for ``points``: (label, repository, point id, disk size) each."""
    rows = []
    for label, repo, point, size in points:
        print(f"bench: live restore of the {label} disk ...", file=sys.stderr)
        tag = label.replace(" ", "-")
        plain, live = [], []
        for i in range(RUNS):  # interleaved, so that a busy moment hits both alike
            plain.append(plain_restore(fleece, work, repo, point))
            live.append(live_run(fleece, work, repo, point, size, f"{tag}-{i}", writer=False))
        busy = live_run(fleece, work, repo, point, size, f"{tag}-w", writer=True)
        running = sorted(r["running_s"] for r in live)
        plain_s = statistics.median(plain)
        live_s = statistics.median(r["total_s"] for r in live)
        rows.append((f"live restore, {label}: start to guest running (s)",
                     f"{statistics.median(running):.2f}", "<= 2",
                     f"median of {RUNS} (min {running[0]:.2f}, max {running[-1]:.2f}); QEMU said "
                     f"'{live[0]['status']}' at the 'running' event"))
        rows.append((f"live restore, {label}: whole command vs plain restore",
                     f"{plain_s / live_s:.2f}", ">= 0.8",
                     f"medians of {RUNS}: plain restore to raw {plain_s:.2f}s, live restore start "
                     f"to done {live_s:.2f}s (idle guest)"))
        rows.append((f"live restore, {label}: guest writer during / after (MiB/s)",
                     f"{busy['writer_during']:.0f} / {busy['writer_after']:.0f}", "",
                     "1 MiB writes through the device (HMP qemu-io, which holds QEMU's main "
                     f"loop); the stream took {busy['total_s']:.2f}s with it"))
    return rows
