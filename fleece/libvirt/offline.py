"""The checkpoint bitmaps in a shut-off domain's qcow2 images, read and removed with ``qemu-img``.

libvirt removes a checkpoint's bitmaps only through the domain's running
QEMU. When the domain is shut off, fleece removes the checkpoint's metadata
through libvirt and the bitmaps from the image files itself: QEMU is not
running, so nothing else has the images open (``qemu-img`` takes QEMU's
write lock and fails if a QEMU started meanwhile holds it). Images that are
not local files (network disks) are left to the next start of the domain.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fleece.libvirt.domain import DomainDisk

QEMU_IMG_TIMEOUT = 60


@dataclass(frozen=True)
class ImageBitmap:
    """One persistent bitmap stored in a qcow2 image."""

    name: str
    in_use: bool
    """Flagged in use: the QEMU that had it open did not close the image cleanly (inconsistent)."""


def local_image(disk: DomainDisk) -> Path | None:
    """The disk's image file when it is a local qcow2 file or block device, else None."""
    if disk.format != "qcow2" or not disk.source.startswith("/"):
        return None
    path = Path(disk.source)
    return path if path.exists() else None


def image_bitmaps(path: Path) -> dict[str, ImageBitmap] | None:
    """The bitmaps stored in qcow2 image ``path``; None when ``qemu-img`` cannot read it."""
    res = subprocess.run(["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", str(path)],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         timeout=QEMU_IMG_TIMEOUT, check=False)
    if res.returncode != 0:
        return None
    data = json.loads(res.stdout).get("format-specific", {}).get("data", {})
    return {str(b["name"]): ImageBitmap(str(b["name"]), "in-use" in b.get("flags", []))
            for b in data.get("bitmaps", [])}


def remove_bitmap(path: Path, name: str) -> str | None:
    """Remove bitmap ``name`` from image ``path``; None when done, else ``qemu-img``'s reason."""
    res = subprocess.run(["qemu-img", "bitmap", "--remove", "-f", "qcow2", str(path), name],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         timeout=QEMU_IMG_TIMEOUT, check=False)
    if res.returncode != 0:
        return " ".join(res.stderr.split()) or f"qemu-img exited {res.returncode}"
    return None
