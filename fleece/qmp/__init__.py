"""The QMP layer: one session to one QEMU, and what it knows of its disks."""

from fleece.qmp.disks import DirtyBitmap, Disk, list_disks, qom_path, resolve_drive
from fleece.qmp.session import QmpSession, parse_qmp_address

__all__ = [
    "DirtyBitmap",
    "Disk",
    "QmpSession",
    "list_disks",
    "parse_qmp_address",
    "qom_path",
    "resolve_drive",
]
