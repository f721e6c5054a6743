"""Check every file system and partition table of a served point, read-only, in the appliance.

What is checked, per device the appliance sees (whole disks, partitions,
LVM logical volumes — libguestfs activates volume groups at launch):

* partition tables: GPT with ``sgdisk -v`` (headers, CRCs, the backup
  header, overlaps), MBR with ``sfdisk --verify``;
* ext2/3/4: the journal is replayed into the overlay first (a crash-
  consistent point needs it, as a boot would), then ``e2fsck -fn``;
* XFS: the log is replayed by a read-only mount inside the appliance, then
  ``xfs_repair -n``; Btrfs: ``btrfs check --readonly``; VFAT: ``fsck.vfat -n``;
  NTFS: ``ntfsfix -n``;
* a device holding no recognised file system fails unless it reads as all
  zeroes or is a partition that holds none by design (BIOS boot, an LVM
  physical volume — its volumes are checked — or swap): fail closed. A
  device with an unrecognised superblock is still offered to ``e2fsck``,
  which finds an ext file system through its backup superblocks (a zeroed
  primary superblock is the classic).

A checker's exit status is the verdict; its output is kept as the findings.
Size comes from the block device, used space from ``statvfs`` after a
read-only mount inside the appliance (only for clean file systems).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fleece.guest.appliance import Appliance
from fleece.guest.scratch import Scratch, interruptible
from fleece.guest.served import ServedPoint
from fleece.repo.format.point import RestorePoint

BIOS_BOOT_GUID = "21686148-6449-6E6F-744E-656564454649"
NO_FS_BY_DESIGN = {"swap": "swap space", "LVM2_member": "LVM physical volume (its volumes are listed)"}
MAX_FINDINGS = 4000
"""Characters of a checker's output kept per file system (the report stays small)."""


@dataclass
class FilesystemCheck:
    """The verdict on one file system (or one device that should hold one)."""

    device: str
    """As the appliance names it (``/dev/sda1``, ``/dev/vg0/root``), with the point's disk."""
    disk: str
    type: str
    label: str
    uuid: str
    size: int
    used: int | None
    clean: bool | None
    """None: nothing to check (swap, a physical volume, an all-zero device)."""
    checker: str
    findings: str

    def as_dict(self) -> dict[str, Any]:
        """For the report and ``--json``."""
        return asdict(self)

    def describe(self) -> str:
        """One line for people."""
        used = "" if self.used is None else f", {self.used} used"
        state = ("clean" if self.clean else "not checked" if self.clean is None else "ERRORS")
        label = f" '{self.label}'" if self.label else ""
        return f"{state:11} {self.device} ({self.disk}) {self.type}{label} {self.size} bytes{used}"


@dataclass
class PartitionTableCheck:
    """The verdict on one disk's partition table."""

    device: str
    disk: str
    type: str
    """``gpt``, ``msdos`` or ``none``."""
    ok: bool
    findings: str

    def as_dict(self) -> dict[str, Any]:
        """For the report and ``--json``."""
        return asdict(self)


@dataclass
class FsckReport:
    """Everything one ``verify --fsck`` found."""

    tables: list[PartitionTableCheck]
    filesystems: list[FilesystemCheck]

    @property
    def ok(self) -> bool:
        """No table problem and no file system with errors."""
        return all(t.ok for t in self.tables) and all(f.clean is not False for f in self.filesystems)

    def failures(self) -> list[str]:
        """One phrase per problem, for the one-line reason."""
        out = [f"partition table of {t.disk} ({t.type}) is damaged" for t in self.tables if not t.ok]
        out += [f"no file system recognised on {f.device} ({f.disk})" if f.type == "unknown"
                else f"{f.type} on {f.device} ({f.disk}) has errors"
                for f in self.filesystems if f.clean is False]
        return out

    def as_dict(self) -> dict[str, Any]:
        """For the report and ``--json``."""
        return {"ok": self.ok, "partition_tables": [t.as_dict() for t in self.tables],
                "filesystems": [f.as_dict() for f in self.filesystems]}


def _trim(text: str) -> str:
    return text if len(text) <= MAX_FINDINGS else text[:MAX_FINDINGS] + "\n… (cut)"


def _disk_of(app: Appliance, device: str) -> str:
    """The point's disk behind an appliance device (a partition's parent, an LV's volume group's)."""
    g = app.g
    try:
        if device.startswith("/dev/sd"):
            parent = device if device in app.devices else g.part_to_dev(device)
            return app.devices.get(parent, parent)
        vg = device.split("/")[2]  # /dev/VG/LV
        # vgpvuuids gives LVM's dashed form, pvs_full the bare one.
        uuids = {u.replace("-", "") for u in g.vgpvuuids(vg)}
        pvs = [p["pv_name"] for p in g.pvs_full() if p["pv_uuid"].replace("-", "") in uuids]
        parents = {pv if pv in app.devices else g.part_to_dev(pv) for pv in pvs}
        return ",".join(sorted(app.devices.get(p, p) for p in parents)) or "?"
    except (RuntimeError, IndexError):
        return "?"


def check_partition_tables(app: Appliance) -> list[PartitionTableCheck]:
    """Each whole disk's partition table: its type and what the table's own verifier says."""
    out = []
    for device in app.g.list_devices():
        disk = app.devices.get(device, device)
        try:
            kind = app.g.part_get_parttype(device)
        except RuntimeError:
            out.append(PartitionTableCheck(device, disk, "none", True, "no partition table"))
            continue
        if kind == "gpt":
            rc, text = app.sh_on("sgdisk -v {dev}", device)
            ok = rc == 0 and "No problems found" in text
        elif kind == "msdos":
            rc, text = app.sh_on("sfdisk --verify {dev}", device)
            ok = rc == 0 and "No errors detected" in text
        else:
            ok, text = True, f"{kind}: no verifier"
        out.append(PartitionTableCheck(device, disk, kind, ok, _trim(text)))
    return out


def _no_fs_by_design(app: Appliance, device: str) -> str | None:
    """Why ``device`` holds no file system on purpose, or None."""
    g = app.g
    if device in app.devices or not device.startswith("/dev/sd"):
        return None
    try:
        parent, number = g.part_to_dev(device), g.part_to_partnum(device)
        if g.part_get_parttype(parent) == "gpt":
            if g.part_get_gpt_type(parent, number).upper() == BIOS_BOOT_GUID:
                return "BIOS boot partition"
        elif g.part_get_mbr_id(parent, number) in (0x05, 0x0F, 0x85):
            return "extended partition"
    except RuntimeError:
        return None
    return None


def _check(app: Appliance, device: str, fstype: str) -> tuple[bool | None, str, str]:
    """Run the checker for ``fstype``: (clean, checker, findings)."""
    if fstype in ("ext2", "ext3", "ext4"):
        # Replay into libguestfs's overlay, as a mount at boot would; never touches the point.
        rc, replay = app.sh_on("e2fsck -E journal_only -y {dev}", device)
        rc, text = app.sh_on("e2fsck -fn {dev}", device)
        return rc == 0, "e2fsck -fn", (replay + "\n" if "recovering journal" in replay else "") + text
    if fstype == "xfs":
        # A dirty log makes xfs_repair -n refuse; a mount replays it (into the overlay).
        with contextlib.suppress(RuntimeError):
            app.g.mount_ro(device, "/")
        app.g.umount_all()
        rc, text = app.sh_on("xfs_repair -n {dev}", device)
        return rc == 0, "xfs_repair -n", text
    if fstype == "btrfs":
        rc, text = app.sh_on("btrfs check --readonly {dev}", device)
        return rc == 0, "btrfs check --readonly", text
    if fstype == "vfat":
        rc, text = app.sh_on("fsck.vfat -n {dev}", device)
        return rc == 0, "fsck.vfat -n", text
    if fstype == "ntfs":
        rc, text = app.sh_on("ntfsfix -n {dev}", device)
        return rc == 0, "ntfsfix -n", text
    if fstype in NO_FS_BY_DESIGN:
        return None, "-", NO_FS_BY_DESIGN[fstype]
    return None, "-", f"no checker for {fstype}"


def _unrecognised(app: Appliance, device: str) -> tuple[str, bool | None, str, str]:
    """A device blkid finds nothing on: (type, clean, checker, findings)."""
    why = _no_fs_by_design(app, device)
    if why is not None:
        return "none", None, "-", why
    if app.g.is_zero_device(device):
        return "none", None, "-", "all zeroes"
    _, text = app.sh_on("e2fsck -fn {dev}", device)
    if "trying backup blocks" in text and "could not be read or does not describe" not in text:
        return "ext (primary superblock unreadable)", False, "e2fsck -fn", text
    return ("unknown", False, "e2fsck -fn",
            "no file system recognised, and the device is not all zeroes; e2fsck says:\n" + text)


def _used(app: Appliance, device: str) -> int | None:
    try:
        app.g.mount_ro(device, "/")
    except RuntimeError:
        return None
    try:
        st = app.g.statvfs("/")
        return int((st["blocks"] - st["bfree"]) * st["frsize"])
    except RuntimeError:
        return None
    finally:
        app.g.umount_all()


def _quiet(call: Any, device: str) -> str:
    try:
        return str(call(device))
    except RuntimeError:
        return ""


def check_filesystems(app: Appliance) -> list[FilesystemCheck]:
    """Every file system (or device that should hold one) the appliance sees, checked."""
    g = app.g
    out = []
    for device, fstype in sorted(g.list_filesystems().items()):
        # parted and sgdisk (partition types, below) open whole disks: let udev's re-read end.
        app.sh("udevadm settle")
        disk = _disk_of(app, device)
        if fstype == "unknown":
            fstype, clean, checker, findings = _unrecognised(app, device)
        else:
            clean, checker, findings = _check(app, device, fstype)

        used = _used(app, device) if clean else None
        out.append(FilesystemCheck(device, disk, fstype, _quiet(g.vfs_label, device),
                                   _quiet(g.vfs_uuid, device),
                                   int(g.blockdev_getsize64(device)), used, clean, checker,
                                   _trim(findings.strip())))
    return out


def check_point(app: Appliance) -> FsckReport:
    """File systems, then partition tables.

    The table tools (parted, sfdisk, sgdisk) open whole disks, and the
    appliance's udev answers their close by re-reading the partition table,
    so each check waits for udev to settle first. Shell commands name
    devices as the appliance's kernel does (:meth:`Appliance.kernel_device`).
    """
    app.sh("udevadm settle")
    filesystems = check_filesystems(app)
    tables = check_partition_tables(app)
    app.sh("udevadm settle")
    return FsckReport(tables, filesystems)


@dataclass
class FsckRun:
    """One ``verify --fsck`` run: the report and what it cost."""

    report: FsckReport
    accel: str
    appliance_seconds: float
    seconds: float


def fsck_point(repo_url: str, point: RestorePoint, *, drives: list[str] | None = None,
               passphrase: bytes | None = None, scratch_parent: Path | None = None,
               say: Callable[[str], None] = lambda line: None) -> FsckRun:
    """Serve ``point`` (its ``drives``, default all), check it in an appliance, tear it all down."""
    started = time.monotonic()
    with Scratch(scratch_parent) as scratch, interruptible(), \
            ServedPoint(repo_url, point, scratch, drives=drives, passphrase=passphrase) as served:
        app = Appliance(served.disks, scratch)
        say(f"starting the libguestfs appliance ({app.accel.upper()}) on "
            f"{', '.join(d.name for d in served.disks)} of {point.id}")
        with app:
            ready = time.monotonic()
            report = check_point(app)
    return FsckRun(report, app.accel, ready - started, time.monotonic() - started)
