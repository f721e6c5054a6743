"""A libguestfs appliance reading a served point: a guest's file systems, never the host's kernel.

A backup is untrusted input, so no file system of it is ever mounted in the
host's kernel: libguestfs boots a small appliance VM (its own kernel) that
reads the point's NBD sockets. Drives are added ``readonly``: libguestfs puts
a throwaway qcow2 overlay (in the run's scratch directory) above each, so
journal replays and checkers write there and never reach the point.

``LIBGUESTFS_BACKEND=direct`` is forced (libguestfs starts QEMU itself, no
libvirtd), and TCG where the KVM probe (:mod:`.accel`) fails. libguestfs's
temporary files and sockets go into the scratch directory; its appliance
cache stays where libguestfs keeps it (``$LIBGUESTFS_CACHEDIR``, else
``/var/tmp``): it is shared by every run and built once. libguestfs's
recovery process kills the appliance if fleece dies.
"""

from __future__ import annotations

import os
import shlex
from types import TracebackType
from typing import Any

from fleece.errors import FleeceError
from fleece.guest.accel import kvm_works
from fleece.guest.scratch import Scratch
from fleece.guest.served import ServedDisk


class ApplianceError(FleeceError):
    """libguestfs is missing or its appliance did not start."""


def _guestfs() -> Any:
    try:
        import guestfs
    except ImportError:
        raise ApplianceError(
            "libguestfs's Python binding is missing (Debian: apt install libguestfs-tools "
            "python3-guestfs linux-image-amd64, then scripts/bootstrap links it); nothing was "
            "checked") from None
    return guestfs


def require() -> None:
    """Fail (exit 1, nothing started) when libguestfs's Python binding is missing."""
    _guestfs()


class Appliance:
    """One libguestfs handle over the served disks, launched on ``__enter__``, closed on exit."""

    def __init__(self, disks: list[ServedDisk], scratch: Scratch) -> None:
        guestfs = _guestfs()
        # Its socket directory comes from the environment at creation only.
        saved = os.environ.get("XDG_RUNTIME_DIR")
        os.environ["XDG_RUNTIME_DIR"] = str(scratch.path)
        try:
            self.g = guestfs.GuestFS(python_return_dict=True)
        finally:
            if saved is None:
                del os.environ["XDG_RUNTIME_DIR"]
            else:
                os.environ["XDG_RUNTIME_DIR"] = saved
        self.g.set_tmpdir(str(scratch.path))
        self.g.set_cachedir(os.environ.get("LIBGUESTFS_CACHEDIR") or "/var/tmp")
        self.g.set_backend("direct")
        self.accel = "kvm" if kvm_works() else "tcg"
        if self.accel == "tcg":
            self.g.set_backend_settings(["force_tcg"])
        self.devices: dict[str, str] = {}
        """Appliance device (``/dev/sda``) → the point's disk name."""
        for i, disk in enumerate(disks):
            self.g.add_drive_opts("", format="raw", readonly=True, protocol="nbd",
                                  server=[f"unix:{disk.socket}"], name=disk.name)
            self.devices[f"/dev/sd{chr(ord('a') + i)}"] = disk.name

    def launch(self) -> None:
        """Boot the appliance (about 20 s under TCG); ``ApplianceError`` if it does not come up."""
        try:
            self.g.launch()
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown error"
            raise ApplianceError(f"the libguestfs appliance did not start: {first} "
                                 "(libguestfs-test-tool says more)") from None

    def sh(self, command: str) -> tuple[int, str]:
        """Run ``command`` in the appliance's shell; its exit status and its output (both streams)."""
        out = self.g.debug("sh", [f"{command} 2>&1; echo fleece-rc=$?"])
        body, _, rc = out.rstrip("\n").rpartition("fleece-rc=")
        return int(rc), body.rstrip("\n")

    def kernel_device(self, device: str) -> str:
        """The appliance kernel's own name for the libguestfs device ``device``.

        libguestfs's API names the drives /dev/sda, /dev/sdb … in the order
        they were added and translates; the appliance's kernel probes SCSI
        disks asynchronously and may name its own root disk sda (seen under
        load: a shell command on "/dev/sda1" then reads the appliance's
        disk, or nothing). Shell commands therefore use the stable link
        udev makes from the serial libguestfs gives drive N (``hdN``).
        Logical volumes (``/dev/VG/LV``) are named the same on both sides.
        """
        if not device.startswith("/dev/sd"):
            return device
        if device in self.devices:
            return f"/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_hd{self.g.device_index(device)}"
        parent, number = self.g.part_to_dev(device), self.g.part_to_partnum(device)
        return f"{self.kernel_device(parent)}-part{number}"

    def sh_on(self, command: str, device: str) -> tuple[int, str]:
        """``sh`` with ``{dev}`` in ``command`` naming ``device`` as the appliance's kernel knows it;
        the output names it as libguestfs does."""
        real = self.kernel_device(device)
        rc, out = self.sh(f"test -b {shlex.quote(real)} || {{ echo 'no device {real}'; exit 99; }}; "
                          + command.format(dev=shlex.quote(real)))
        if rc == 99 and out.startswith("no device "):
            raise ApplianceError(f"the appliance has no device for {device} ({real}); nothing was judged")
        return rc, out.replace(real, device)

    def close(self) -> None:
        """Stop the appliance (its overlays go with it) and free the handle."""
        try:
            self.g.shutdown()
        except RuntimeError:
            pass
        finally:
            self.g.close()

    def __enter__(self) -> Appliance:
        try:
            self.launch()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
