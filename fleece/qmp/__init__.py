"""The QMP layer: one session to one QEMU, and what it knows of its disks."""

from fleece.qmp.session import QmpSession, parse_qmp_address
from fleece.qmp.disks import Disk, list_disks, resolve_drive

__all__ = ["Disk", "QmpSession", "list_disks", "parse_qmp_address", "resolve_drive"]
