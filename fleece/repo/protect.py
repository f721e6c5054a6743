"""Protection markers: ``protect/<vm>/<point-id>`` keeps prune away from a point.

Points are immutable and checksummed, so protection is a separate small
object rather than a field (docs/format.md, "Pruning and garbage
collection"). Prune reads the markers before choosing and checks each one
again right before it deletes a point.
"""

from __future__ import annotations

import json
import socket

from fleece.errors import BadInput
from fleece.repo.backends.base import Backend, ObjectMissing
from fleece.repo.format import keys
from fleece.repo.format.point import RestorePoint, iso_utc
from fleece.repo.repository import Repository

MARKER_FORMAT = 1


def protected_ids(backend: Backend, vm: str) -> set[str]:
    """Ids of ``vm``'s protected points (from the keys alone)."""
    prefix = keys.protect_prefix(vm)
    return {key[len(prefix):] for key in backend.list(prefix)
            if keys.POINT_ID_RE.match(key[len(prefix):])}


def is_protected(backend: Backend, vm: str, point_id: str) -> bool:
    """Whether the point carries a protection marker."""
    return backend.exists(keys.protect_key(vm, point_id))


def protect(repo: Repository, point: RestorePoint, note: str = "") -> bool:
    """Mark ``point`` protected; False when it already was.

    The point is looked up again after the marker is written: a prune that
    removed it in between would otherwise leave a marker for nothing.
    """
    key = keys.protect_key(point.vm, point.id)
    if repo.backend.exists(key):
        return False
    doc = {"format": MARKER_FORMAT, "vm": point.vm, "point": point.id, "created": iso_utc(),
           "host": socket.gethostname(), "note": note}
    repo.backend.put(key, json.dumps(doc, sort_keys=True).encode() + b"\n")
    if not repo.backend.exists(keys.point_key(point.vm, point.id)):
        repo.backend.delete(key)
        raise BadInput(f"restore point {point.id} was removed while it was being protected")
    return True


def unprotect(repo: Repository, vm: str, point_id: str) -> bool:
    """Remove the marker of ``vm``'s point ``point_id``; False when there was none."""
    key = keys.protect_key(vm, point_id)
    try:
        repo.backend.get(key)
    except ObjectMissing:
        return False
    repo.backend.delete(key)
    return True
