"""Backups of libvirt-managed VMs through libvirt's own pull-mode backup API.

libvirt owns the QMP socket of the VMs it runs, so there fleece asks libvirt
for the point in time instead of fleecing itself: a pull-mode backup job
(``virDomainBackupBegin``) exports each disk over NBD on a unix socket in
fleece's private scratch directory, with the dirty bitmap since the parent
checkpoint, and creates the new checkpoint ``fleece-<point id>`` in the same
transaction. fleece's reader, pipeline and repository do the rest, as on the
QMP path.

- ``domain``: connection, lookup, disks, version and errors;
- ``checkpoints``: restore points ↔ libvirt checkpoints, redefinition, and
  dropping stale ones (missing or broken bitmaps);
- ``offline``: the bitmaps in a shut-off domain's images (``qemu-img``);
- ``job``: the backup job's XML, state file and scratch directory;
- ``export``: set-up, commit/abort, ``export stop``, ``cleanup``, and
  finishing what a dead run left (``recover``);
- ``source``: :class:`LibvirtSource` for ``fleece backup --libvirt``.
"""

from fleece.libvirt.export import LibvirtDiskExport, LibvirtExport, cleanup, start, stop
from fleece.libvirt.source import LibvirtSource, libvirt_export

__all__ = ["LibvirtDiskExport", "LibvirtExport", "LibvirtSource", "cleanup", "libvirt_export", "start",
           "stop"]
