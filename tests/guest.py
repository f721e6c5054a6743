"""A real Linux guest for the tests: it boots, writes and fsyncs, and says what it committed.

``scripts/build-guest`` builds (once, cached) Debian's kernel with a busybox
initramfs and qemu-guest-agent. Its workload (see the script) runs one
sequence ``n = 1, 2, …`` over every ext4 disk labelled ``fleece-*``: a new
file ``f/<n>`` of random bytes, slot ``n % slots`` of the file ``slots``
overwritten in place with the line ``<n>`` repeated, or with zeroes when
``n`` is a multiple of 3 (``slots`` must not be one), then the
line ``<n> <sha256> <slot> <uptime>`` appended to ``journal`` — each step
fsynced on every disk before the next begins —
and finally ``FLEECE-COMMIT <n>`` on the serial console, which the host
reads from a file. Every 4th sequence also writes, removes and trims a
256 KiB file on each disk (``fstrim``) and says ``FLEECE-TRIM <n> <bytes>``.
The disks' nodes have ``discard=unmap`` and ``detect-zeroes=unmap``: the
zeroes reach QEMU as writes of zeroes that unmap, the trims as discards,
both reaching the image — the kinds of write
that QEMU 7.2's snapshot answered wrongly (docs/design.md §2.4).

So the host knows which sequences were on the disks before a backup began
(the console), and :func:`check_image` knows what a restored disk must hold
for *one* point in time: every file the journal names with its checksum,
every slot as the journal's sequence left it (or as the one write that may
have been in flight), and — across disks — journals at most one step apart
in the order the guest writes them.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parent.parent
BUILD = ROOT / "scripts" / "build-guest"
KEEP = 64
BLOCK = 4096
KERNEL_ERRORS = re.compile(r"I/O error|EXT4-fs error|EXT4-fs warning|Aborting journal|read-only|"
                           r"blk_update_request|critical|Buffer I/O", re.I)


def build_guest() -> Path:
    """The directory holding ``vmlinuz`` and ``initrd.img`` (built on first use, then cached)."""
    res = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"scripts/build-guest failed: {res.stderr.strip()}")
    return Path(res.stdout.strip())


def ext4_image(path: Path, size: str, label: str) -> Path:
    """A sparse raw image holding an empty ext4 named ``label``."""
    subprocess.run(["truncate", "-s", size, str(path)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, str(path)], check=True)
    return path


@dataclass
class Guest:
    """A booted test guest: its VM (``conftest.TestVM``), console and agent socket."""

    vm: Any
    console: Path
    qga: Path | None
    drives: list[str]
    slots: int = 32
    """The workload overwrites ``slots`` slots of ``slotkb`` KiB, ``stride`` KiB apart, in turn."""
    slotkb: int = 64
    stride: int = 64

    def text(self) -> str:
        """Everything the guest wrote on its console so far."""
        return self.console.read_text(errors="replace")

    def commits(self) -> list[tuple[int, float]]:
        """(sequence, guest uptime) of every FLEECE-COMMIT line seen so far."""
        return [(int(n), float(up)) for n, up in re.findall(r"^FLEECE-COMMIT (\d+) ([\d.]+)$",
                                                              self.text(), re.M)]

    def trims(self) -> list[tuple[int, int]]:
        """(sequence, bytes the guest's fstrim reported trimmed) of every FLEECE-TRIM line so far."""
        return [(int(n), int(b)) for n, b in re.findall(r"^FLEECE-TRIM (\d+) (\d+)$", self.text(), re.M)]

    def committed(self) -> int:
        """The last sequence the guest reported as on every disk (0 before the first)."""
        found = re.findall(r"^FLEECE-COMMIT (\d+) ", self.text(), re.M)
        return int(found[-1]) if found else 0

    def wait_committed(self, n: int, timeout: float = 120) -> int:
        """Wait until sequence ``n`` is committed; the last committed one."""
        deadline = time.monotonic() + timeout
        while (last := self.committed()) < n:
            self.check_alive()
            assert time.monotonic() < deadline, (
                f"the guest committed only {last} of {n}:\n{self.text()[-2000:]}")
            time.sleep(0.05)
        return last

    def wait_more(self, count: int, timeout: float = 120) -> int:
        """Wait until ``count`` more sequences are committed; the last committed one."""
        return self.wait_committed(self.committed() + count, timeout)

    def check_alive(self) -> None:
        """Fail with the console if QEMU ended or the guest said something went wrong."""
        assert self.vm.proc.poll() is None, f"QEMU ended:\n{self.text()[-2000:]}"
        assert "FLEECE-ERROR" not in self.text(), self.text()[-2000:]

    def kernel_errors(self) -> list[str]:
        """Console lines that report an I/O or filesystem error in the guest."""
        return [line for line in self.text().splitlines()
                if not line.startswith("FLEECE-") and KERNEL_ERRORS.search(line)]


def boot_guest(make_vm: Any, short_tmp: Path, drives: int = 1, *, size: str = "128M",
               qga: bool = False, slots: int = 32, slotkb: int = 64, stride: int = 64) -> Guest:
    """Boot the guest on ``drives`` fresh ext4 disks (qcow2), vda, vdb, …; return once it writes."""
    assert slots % 3, "slots must not be a multiple of 3: then zeroes never overwrite data"
    kernel = build_guest()
    seeds = {}
    names = ["vd" + chr(ord("a") + i) for i in range(drives)]
    for name in names:
        seeds[name] = ext4_image(short_tmp / f"{name}.ext4", size, f"fleece-{name}")
    console = short_tmp / f"console{len(make_vm.vms)}.log"
    args = ["-m", "256",
            "-kernel", str(kernel / "vmlinuz"), "-initrd", str(kernel / "initrd.img"),
            "-append", f"console=ttyS0 quiet panic=-1 fleece.slots={slots} fleece.slotkb={slotkb} "
                       f"fleece.stride={stride} "
                       f"fleece.keep={KEEP}",
            "-chardev", f"file,id=console,path={console}", "-device", "isa-serial,chardev=console"]
    socket = None
    if qga:
        socket = short_tmp / f"qga{len(make_vm.vms)}.sock"
        args += ["-chardev", f"socket,id=qga,path={socket},server=on,wait=off",
                 "-device", "virtio-serial-pci",
                 "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0"]
    vm = make_vm([("qcow2", size)] * drives, running=True, contents=seeds, extra_args=args,
                 node_opts={name: ",discard=unmap,detect-zeroes=unmap" for name in names})
    for seed in seeds.values():
        seed.unlink()
    guest = Guest(vm, console, socket, names, slots, slotkb, stride)
    deadline = time.monotonic() + 120
    while not re.search(r"^FLEECE-READY", guest.text(), re.M):
        guest.check_alive()
        assert time.monotonic() < deadline, f"the guest did not boot:\n{guest.text()[-2000:]}"
        time.sleep(0.05)
    mounted = re.search(r"^FLEECE-READY(.*)$", guest.text(), re.M)
    assert mounted and len(mounted.group(1).split()) == drives, guest.text()
    guest.wait_committed(1)
    return guest


# -- what a restored disk must hold ---------------------------------------------------
@dataclass
class Disk:
    """One restored disk as the workload left it, read back with debugfs."""

    journal: list[tuple[int, str, int, float]]
    """(sequence, sha256 of f/<n>, slot, uptime) of every line."""
    files: dict[int, bytes]
    slots: bytes
    clean_before_replay: bool

    @property
    def last(self) -> int:
        return self.journal[-1][0] if self.journal else 0


E2FSCK_BENIGN = re.compile(
    r"^(e2fsck \d|Pass \d|fleece-\w+: (recovering journal|clearing orphan|\d+/\d+ files|\*+ FILE SYSTEM)|"
    r"Free (blocks|inodes) count wrong|Fix\? yes|(Clearing|Truncating) orphaned inode|"
    r"Setting free (blocks|inodes) count|\s*$)")


def fsck(image: Path) -> bool:
    """Replay the journal, then require a clean filesystem; whether it was clean before the replay.

    After a crash ext4 leaves only the journal to replay and the superblock's
    free counts to refresh (and orphans to clear); anything else e2fsck would
    fix is damage: a torn point in time.
    """
    clean = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    needs_recovery = "needs_recovery" in subprocess.run(
        ["dumpe2fs", "-h", str(image)], capture_output=True, text=True).stdout
    replay = subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(image)],
                            capture_output=True, text=True)
    assert replay.returncode == 0, f"journal replay of {image} failed:\n{replay.stdout}{replay.stderr}"
    fix = subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True, text=True)
    damage = [line for line in (fix.stdout + fix.stderr).splitlines() if not E2FSCK_BENIGN.match(line)]
    assert not damage and fix.returncode in (0, 1), f"{image} is damaged:\n{fix.stdout}{fix.stderr}"
    check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, f"{image} is not clean:\n{check.stdout}{check.stderr}"
    return clean.returncode == 0 and not needs_recovery


def read_disk(image: Path, work: Path) -> Disk:
    """fsck ``image`` (a raw restore: it is modified) and read the workload's files from it."""
    clean = fsck(image)
    out = work / f"{image.name}.files"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    res = subprocess.run(["debugfs", "-R", f"rdump / {out}", str(image)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    journal = []
    text = (out / "journal").read_text() if (out / "journal").exists() else ""
    assert text == "" or text.endswith("\n"), f"a torn journal line: {text[-200:]!r}"
    for line in text.splitlines():
        n, digest, slot, up = line.split()
        journal.append((int(n), digest, int(slot), float(up)))
    files = {int(p.name): p.read_bytes() for p in (out / "f").iterdir()} if (out / "f").exists() else {}
    slots = (out / "slots").read_bytes() if (out / "slots").exists() else b""
    shutil.rmtree(out)
    return Disk(journal, files, slots, clean)


def block_sequence(block: bytes) -> int | None:
    """The sequence a 4 KiB block of ``slots`` holds (0: never written), None if it is mixed."""
    if not block.strip(b"\0"):
        return 0
    parts = block.split(b"\n")
    middle = set(parts[1:-1])
    if len(middle) != 1:
        return None
    line = middle.pop()
    if not line.isdigit() or not line.endswith(parts[0]) or not line.startswith(parts[-1]):
        return None
    return int(line)


def expected_slot(slot: int, last: int, slots: int) -> int:
    """What ``slot``'s blocks hold after sequences 1…``last``: the sequence that wrote it
    last, or 0 when none did or that one wrote zeroes."""
    n = last - (last - slot) % slots
    return shown(n) if n >= 1 else 0


def shown(n: int) -> int:
    """What a slot block written by sequence ``n`` reads as: ``n``, or 0 (zeroes) for a multiple of 3."""
    return 0 if n % 3 == 0 else n


def check_point(guest: Guest, disks: list[Disk], committed: int, at_most: int | None = None) -> int:
    """Check restored disks (in the guest's write order) hold one point in time; its sequence.

    ``committed``: the guest had reported this sequence before the backup
    began, so the point holds it. ``at_most``: a bound from the console
    after the point (the point cannot hold a later sequence).
    """
    slots, size, stride = guest.slots, guest.slotkb * 1024, guest.stride * 1024
    lasts = [d.last for d in disks]
    cut = max(lasts)
    # The guest appends sequence n to the journals in disk order, each after
    # every file and slot of n is on every disk: a point in time sees the
    # first disks' journals one ahead of the others at most, never behind.
    assert lasts == sorted(lasts, reverse=True) and cut - min(lasts) <= 1, (
        f"journals of one point disagree: {lasts}")
    assert cut >= committed, f"the point misses sequences {committed} committed before the backup (has {cut})"
    if at_most is not None:
        assert cut <= at_most, f"the point holds sequence {cut}, committed after it (at most {at_most})"
    for i, disk in enumerate(disks):
        assert [j[0] for j in disk.journal] == list(range(1, disk.last + 1)), f"disk {i}: journal has gaps"
        for n, digest, slot, _ in disk.journal[-KEEP + 1:]:
            assert n in disk.files, f"disk {i}: file {n} is in the journal but missing"
            assert hashlib.sha256(disk.files[n]).hexdigest() == digest, f"disk {i}: file {n} has wrong bytes"
            assert slot == n % slots
        # Files of sequences up to the cut were fsynced before the cut's journal line.
        for n in range(max(1, cut - KEEP + 1), cut + 1):
            assert n in disk.files, f"disk {i}: file {n} (before the point) is missing"
            assert len(disk.files[n]) == (n % 16 + 1) * 4096, f"disk {i}: file {n} is short"
        # Nothing after the one sequence that may have been in flight.
        assert max(disk.files, default=0) <= cut + 1, f"disk {i}: holds file {max(disk.files)}, after {cut}"
        assert len(disk.slots) == slots * stride, f"disk {i}: slots file is {len(disk.slots)} bytes"
        for s in range(slots):
            allowed = {expected_slot(s, cut, slots)}
            if (cut + 1) % slots == s:
                allowed.add(shown(cut + 1))  # being overwritten at the point
            base = s * stride
            assert not disk.slots[base + size:base + stride].strip(b"\0"), f"disk {i}: slot {s} spills"
            for b in range(base, base + size, BLOCK):
                seq = block_sequence(disk.slots[b:b + BLOCK])
                assert seq in allowed, (f"disk {i}: slot {s} block {(b - base) // BLOCK} holds "
                                        f"sequence {seq}; a point at {cut} allows {sorted(allowed)}")
    return cut
