"""Point-in-time NBD exports of a running VM's disks (image fleecing).

The public API is :func:`point_in_time_export` (an async context manager),
:func:`start_export`/:func:`stop_export` for exports that outlive one process,
and :func:`cleanup`. ``docs/export.md`` has a runnable example.
"""

from fleece.fleecing.export import (
    DiskExport,
    PointInTimeExport,
    cleanup,
    point_in_time_export,
    start_export,
    stop_export,
)
from fleece.fleecing.leftovers import Leftovers, find_leftovers
from fleece.fleecing.names import new_point_id

__all__ = [
    "DiskExport",
    "Leftovers",
    "PointInTimeExport",
    "cleanup",
    "find_leftovers",
    "new_point_id",
    "point_in_time_export",
    "start_export",
    "stop_export",
]
