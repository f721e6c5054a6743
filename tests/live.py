"""Helpers of the live-restore tests: the command running in the background, and a tiny guest.

The guest is a 512-byte boot sector that SeaBIOS loads from the VM's first
disk. It reads one sector every 100 ms through the BIOS (int 13h, so through
the real virtio-blk device and its rerror policy) at 32 MiB + k * 64 KiB for
k = 0…39, writes the first byte of each to the ``isa-debugcon`` port 0xe9,
then writes ``D`` and halts (``E`` if a read fails). Its source, assembled
with ``as --32`` and ``ld -m elf_i386 -Ttext 0x7c00 --oformat binary``::

    cli; xorw %ax,%ax; movw %ax,%ds; movw %ax,%es; movw %ax,%ss; movw $0x7c00,%sp; sti
    movb %dl,drive; movw $0,count
  next:
    movw count,%ax; movw $128,%bx; mulw %bx        # LBA = 65536 + count * 128
    addw $0,%ax; adcw $1,%dx; movw %ax,lba; movw %dx,lba+2
    movb $0x42,%ah; movb drive,%dl; movw $dap,%si; int $0x13; jc fail
    movb 0x8000,%al; outb %al,$0xe9
    movb $0x86,%ah; movw $0x0001,%cx; movw $0x86a0,%dx; int $0x15   # wait 100 ms
    incw count; cmpw $40,count; jb next
    movb $'D',%al; outb %al,$0xe9
  halt: hlt; jmp halt
  fail: movb $'E',%al; outb %al,$0xe9; jmp halt
    .align 4
  dap: .byte 16,0; .word 1; .word 0x8000,0        # one sector to 0000:8000
  lba: .long 0,0
  drive: .byte 0
    .align 2
  count: .word 0
    .org 510; .byte 0x55,0xaa
"""

from __future__ import annotations

import json
import select
import subprocess
import time
from pathlib import Path
from typing import Any

from conftest import FLEECE

MiB = 1 << 20
GUEST_READS = 40
GUEST_BASE = 32 * MiB
GUEST_STEP = 64 * 1024
_BOOT_CODE = bytes.fromhex(
    "fa31c08ed88ec08ed0bc007cfb8816707cc706727c0000a1727cbb8000f7e383c00083d201a3687c89166a7cb4428a16"
    "707cbe607ccd137221a00080e6e9b486b90100baa086cd15ff06727c833e727c2872c4b044e6e9f4ebfdb045e6e9ebf7"
    "100001000080000000000000000000000090")
BOOT_SECTOR = _BOOT_CODE.ljust(510, b"\0") + b"\x55\xaa"


def reading_guest_disk(size: int, filler: bytes) -> bytes:
    """A disk that boots the reading guest: ``filler`` data, with byte k+1 at read k's sector."""
    disk = bytearray(filler[:size].ljust(size, b"\0"))
    disk[:512] = BOOT_SECTOR
    for k in range(GUEST_READS):
        start = GUEST_BASE + k * GUEST_STEP
        disk[start : start + GUEST_STEP] = bytes([k + 1]) * GUEST_STEP
    return bytes(disk)


def guest_output_expected() -> bytes:
    """What the guest writes to port 0xe9 when every read succeeds."""
    return bytes(range(1, GUEST_READS + 1)) + b"D"


def debugcon_args(path: Path) -> list[str]:
    """QEMU arguments that send port 0xe9 to ``path``."""
    return ["-chardev", f"file,id=dbg,path={path}", "-device", "isa-debugcon,iobase=0xe9,chardev=dbg"]


class LiveRestore:
    """``fleece restore --live --json …`` in the background, its events read as they come."""

    def __init__(self, *args: str | Path) -> None:
        self.proc = subprocess.Popen([FLEECE, "restore", "--live", "--json", *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL)
        self.events: list[dict[str, Any]] = []

    def next_event(self, timeout: float = 60) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], max(timeout, 0))
        line = self.proc.stdout.readline() if ready else ""
        assert line, f"no event from fleece; stderr: {self.stderr()}"
        event: dict[str, Any] = json.loads(line)
        self.events.append(event)
        return event

    def wait_for(self, kind: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (event := self.next_event(deadline - time.monotonic()))["event"] != kind:
            pass
        return event

    def finish(self, timeout: float = 180) -> tuple[int, str]:
        out, err = self.proc.communicate(timeout=timeout)
        self.events += [json.loads(line) for line in out.splitlines() if line]
        return self.proc.returncode, err

    def children(self) -> list[int]:
        """Pids of the processes fleece started (its nbdkit servers)."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in path.read_text().split()]

    def stderr(self) -> str:
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            return "(still running)"
        return self.proc.stderr.read() if self.proc.stderr else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
