"""A throwaway QEMU on a served point: temporary overlays, no network, gone with its run.

Each disk is the point's NBD socket (read-only) behind a fresh qcow2
overlay in the scratch directory, so the guest writes where nothing lasts
and the point is never changed. The machine has no network device
(``-nodefaults``, ``-nic none``, and ``--qemu-arg`` may not add one), a VGA
display for a screendump, the serial console and the firmware's debug port
written to files, and, when asked, a guest agent port. KVM where the probe
says it works, TCG otherwise. QEMU gets SIGKILL when fleece dies
(``PR_SET_PDEATHSIG``), so not even a SIGKILL of fleece leaves it running.
"""

from __future__ import annotations

import contextlib
import ctypes
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleece.errors import BadInput, FleeceError
from fleece.guest.accel import QEMU, qemu_accel_args
from fleece.guest.scratch import Scratch
from fleece.guest.served import ServedDisk

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
BUSES = {"virtio": "virtio-blk-pci", "scsi": "scsi-hd", "ide": "ide-hd"}
NETWORK_OPTIONS = ("-nic", "-net", "-netdev")
_PR_SET_PDEATHSIG = 1


@dataclass
class Shape:
    """What the machine looks like: the point does not record it yet, so flags say it."""

    memory: int = 1024
    """MiB."""
    cpus: int = 1
    machine: str = "pc"
    firmware: str = "bios"
    bus: str = "virtio"
    extra: list[str] = field(default_factory=list)
    """``--qemu-arg`` words, appended last."""


def parse_qemu_args(values: list[str]) -> list[str]:
    """``--qemu-arg`` values split like a shell would; refuse any network device (exit 2)."""
    words: list[str] = []
    for value in values:
        try:
            words += shlex.split(value)
        except ValueError as exc:
            raise BadInput(f"--qemu-arg {value!r}: {exc}") from None
    for i, word in enumerate(words):
        if word.split("=")[0] in NETWORK_OPTIONS and words[i + 1:i + 2] != ["none"]:
            raise BadInput(f"--qemu-arg {word}: a verification machine has no network")
        if word in ("-device",) and i + 1 < len(words) and any(
                n in words[i + 1] for n in ("virtio-net", "e1000", "rtl8139", "vmxnet", "ne2k")):
            raise BadInput(f"--qemu-arg -device {words[i + 1]}: a verification machine has no network")
    return words


def check_shape(shape: Shape) -> None:
    """Refuse a shape QEMU would refuse, before anything starts (exit 2 with QEMU's own words)."""
    if shape.firmware not in ("bios", "uefi"):
        raise BadInput(f"--firmware {shape.firmware!r}: bios or uefi")
    if shape.bus not in BUSES:
        raise BadInput(f"--disk-bus {shape.bus!r}: one of {', '.join(BUSES)}")
    if shape.firmware == "uefi" and not (OVMF_CODE.exists() and OVMF_VARS.exists()):
        raise BadInput(f"--firmware uefi needs OVMF ({OVMF_CODE}; Debian: apt install ovmf)")
    if not 16 <= shape.memory <= 1 << 20 or not 1 <= shape.cpus <= 256:
        raise BadInput("--memory must be 16 MiB or more and --cpus between 1 and 256")
    probe = [QEMU, "-machine", shape.machine, "-accel", "tcg", "-nodefaults", "-nic", "none",
             "-display", "none", "-m", str(shape.memory), "-smp", str(shape.cpus), "-S",
             "-qmp", "stdio", "-serial", "none", "-monitor", "none", *shape.extra]
    try:
        done = subprocess.run(probe, input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BadInput(f"{QEMU} cannot start here: {exc}") from None
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise BadInput(f"QEMU refuses this machine (--machine/--memory/--cpus/--qemu-arg): {said}")


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Machine:
    """One throwaway QEMU over ``disks`` (the first boots), in ``scratch``."""

    def __init__(self, disks: list[ServedDisk], scratch: Scratch, shape: Shape, *, agent: bool) -> None:
        self.disks = disks
        self.scratch = scratch
        self.shape = shape
        self.agent = agent
        self.qmp_path = scratch / "qmp.sock"
        self.console = scratch / "console.log"
        self.firmware_log = scratch / "firmware.log"
        self.qga_path = scratch / "qga.sock"
        self.log = scratch / "qemu.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: Any = None
        self.accel = qemu_accel_args()

    def argv(self) -> list[str]:
        """The QEMU command line."""
        s = self.shape
        args = [QEMU, "-name", "fleece-verify", "-nodefaults", "-no-user-config", "-nic", "none",
                "-machine", s.machine, *self.accel, "-m", str(s.memory), "-smp", str(s.cpus),
                "-display", "none", "-device", "VGA", "-boot", "strict=on",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                "-chardev", f"file,id=console,path={self.console}", "-serial", "chardev:console",
                "-chardev", f"file,id=firmware,path={self.firmware_log}",
                "-device", "isa-debugcon,iobase=0x402,chardev=firmware"]
        if s.firmware == "uefi":
            args += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                     "-drive", f"if=pflash,format=raw,unit=1,file={self.scratch / 'efivars.fd'}"]
        if self.agent:
            args += ["-chardev", f"socket,id=qga,path={self.qga_path},server=on,wait=off",
                     "-device", "virtio-serial-pci",
                     "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0"]
        if s.bus == "scsi":
            args += ["-device", "virtio-scsi-pci,id=scsi0"]
        for i, disk in enumerate(self.disks):
            overlay = self.scratch / f"overlay{i}.qcow2"
            args += ["-blockdev", f"driver=nbd,node-name=fleece-src{i},server.type=unix,"
                                  f"server.path={disk.socket},read-only=on",
                     "-blockdev", f"driver=qcow2,node-name=fleece-disk{i},file.driver=file,"
                                  f"file.filename={overlay},backing=fleece-src{i}",
                     "-device", f"{BUSES[s.bus]},drive=fleece-disk{i},id=disk{i},bootindex={i + 1}"]
        return [*args, *s.extra]

    def start(self) -> None:
        """Make the overlays and start QEMU; connect to its QMP socket."""
        for i, disk in enumerate(self.disks):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                            str(self.scratch / f"overlay{i}.qcow2"), str(disk.size)],
                           check=True, capture_output=True)
        if self.shape.firmware == "uefi":
            (self.scratch / "efivars.fd").write_bytes(OVMF_VARS.read_bytes())
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         preexec_fn=_die_with_parent)
        from qemu.qmp.legacy import QEMUMonitorProtocol

        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise FleeceError(f"QEMU exited with status {self.proc.returncode} at start: "
                                  f"{self.log_tail(1)}")
            mon = QEMUMonitorProtocol(str(self.qmp_path))
            try:
                mon.connect()
                self._qmp = mon
                return
            except Exception:  # not listening yet
                if time.monotonic() > deadline:
                    raise FleeceError("QEMU's QMP socket did not come up within 30 s") from None
                time.sleep(0.1)

    def qmp(self, command: str, **arguments: Any) -> Any:
        """One QMP command; its ``return`` (``FleeceError`` on an error reply)."""
        reply = self._qmp.cmd_raw(command, arguments or None)
        if "error" in reply:
            raise FleeceError(f"QMP {command}: {reply['error'].get('desc')}")
        return reply["return"]

    def running(self) -> bool:
        """Whether QEMU still runs."""
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 5) -> str:
        """QEMU's own last messages."""
        try:
            return " ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Quit QEMU (``quit``, then SIGKILL after 10 s); idempotent."""
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.cmd_raw("quit", None)
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
