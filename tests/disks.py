"""Disk images with real partition tables and file systems, built without mounting anything.

File systems are made on plain files (``mkfs.ext4 -d``, ``mkfs.vfat`` +
``mcopy``, ``mkntfs -F``, ``mkfs.xfs``, ``mkfs.btrfs``) and copied into a
partitioned image (``sfdisk``) at their partition's offset; nothing touches
the host kernel (no mount, no loop device, no device-mapper).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20


def run(*argv: str | Path) -> str:
    """Run a tool; its stdout (fails the test with its stderr)."""
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    assert res.returncode == 0, f"{argv}: {res.stderr}{res.stdout}"
    return res.stdout


def blank(path: Path, size: int) -> Path:
    """A sparse file of ``size`` bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def tree(root: Path, files: dict[str, bytes]) -> Path:
    """A directory holding ``files`` (relative paths → contents)."""
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def ext4(path: Path, size: int, label: str, files: dict[str, bytes] | None = None,
         fstype: str = "ext4") -> Path:
    """An ext2/3/4 file system holding ``files`` (``mkfs -d``)."""
    blank(path, size)
    src = tree(path.with_suffix(".tree"), files or {"hello.txt": b"hello\n"})
    run(f"mkfs.{fstype}", "-q", "-F", "-L", label, "-d", src, path)
    return path


def vfat(path: Path, size: int, label: str, files: dict[str, bytes] | None = None) -> Path:
    """A FAT file system holding ``files`` (``mkfs.vfat`` + ``mcopy``)."""
    blank(path, size)
    run("mkfs.vfat", "-n", label, path)
    for name, data in (files or {}).items():
        src = path.with_name(path.name + "." + name.replace("/", "_"))
        src.write_bytes(data)
        run("mcopy", "-i", path, src, f"::{name}")
    return path


def ntfs(path: Path, size: int, label: str) -> Path:
    """An NTFS file system (``mkntfs -F`` on a file)."""
    blank(path, size)
    run("mkntfs", "-q", "-F", "-Q", "-L", label, path)
    return path


def xfs(path: Path, size: int, label: str) -> Path:
    """An XFS file system."""
    blank(path, size)
    run("mkfs.xfs", "-q", "-f", "-L", label, path)
    return path


def btrfs(path: Path, size: int, label: str) -> Path:
    """A Btrfs file system."""
    blank(path, size)
    run("mkfs.btrfs", "-q", "-f", "-L", label, path)
    return path


def swap(path: Path, size: int) -> Path:
    """A swap area."""
    blank(path, size)
    run("mkswap", "-L", "swap", path)
    return path


@dataclass
class Part:
    """One partition: its size in MiB, its type for sfdisk, and the image copied into it."""

    mib: int
    type: str
    image: Path | None = None
    bootable: bool = False


def partitioned(path: Path, size: int, label: str, parts: list[Part]) -> Path:
    """An image with a ``dos`` (MBR) or ``gpt`` table of ``parts`` (1 MiB aligned), each filled."""
    blank(path, size)
    lines = [f"label: {label}", "unit: sectors"]
    start = MiB // 512
    starts = []
    for p in parts:
        boot = ", bootable" if p.bootable else ""
        lines.append(f"start={start}, size={p.mib * MiB // 512}, type={p.type}{boot}")
        starts.append(start * 512)
        start += p.mib * MiB // 512
    subprocess.run(["sfdisk", "-q", str(path)], input="\n".join(lines) + "\n", text=True, check=True,
                   capture_output=True)
    for p, offset in zip(parts, starts, strict=True):
        if p.image is not None:
            assert p.image.stat().st_size <= p.mib * MiB, p.image
            run("dd", f"if={p.image}", f"of={path}", "bs=1M", f"seek={offset}", "oflag=seek_bytes",
                "conv=notrunc,sparse", "status=none")
    return path


def zero(path: Path, offset: int, length: int) -> None:
    """Overwrite ``length`` bytes at ``offset`` with zeroes (damage on purpose)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(length))


SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")


def bios_boot_disk(path: Path, kernel_dir: Path, append: str, data_files: dict[str, bytes] | None = None,
                   size: int = 160 * MiB) -> Path:
    """A disk that boots by itself through the BIOS: syslinux's MBR code, an active FAT partition
    holding syslinux, the kernel and the initramfs of ``kernel_dir`` (``syslinux --install`` on the
    partition's image, through mtools), and an ext4 data partition. Nothing is mounted."""
    fat = vfat(path.with_suffix(".boot"), 96 * MiB, "BOOT")
    run("syslinux", "--install", fat)
    cfg = path.with_suffix(".cfg")
    cfg.write_text(f"DEFAULT fleece\nPROMPT 0\nTIMEOUT 0\nLABEL fleece\n  KERNEL /vmlinuz\n"
                   f"  APPEND initrd=/initrd.img {append}\n")
    for src, name in [(kernel_dir / "vmlinuz", "vmlinuz"), (kernel_dir / "initrd.img", "initrd.img"),
                      (cfg, "syslinux.cfg")]:
        run("mcopy", "-i", fat, src, f"::{name}")
    data = ext4(path.with_suffix(".data"), 32 * MiB, "data", data_files or {"hello.txt": b"hello\n"})
    partitioned(path, size, "dos", [Part(96, "c", fat, bootable=True), Part(32, "83", data)])
    code = SYSLINUX_MBR.read_bytes()[:440]
    with open(path, "r+b") as f:
        f.write(code)  # the boot code only: the partition table after byte 446 stays
    return path


def hanging_boot_disk(path: Path, size: int = 16 * MiB) -> Path:
    """A disk whose boot sector loops forever (``jmp $``): the firmware boots it, nothing comes up."""
    blank(path, size)
    with open(path, "r+b") as f:
        f.write(b"\xeb\xfe")
        f.seek(510)
        f.write(b"\x55\xaa")
    return path
