"""Verification records: ``verified/<vm>/<point-id>/<stamp>.json``, the verdicts of a point.

``fleece verify --fsck`` and ``--boot`` store what they found as a small
object beside the point (docs/format.md "Verification records"): the point
itself is immutable and checksummed, so a verdict never changes it. Each run
adds one record (the history stays); the newest is the point's verdict.
Records are written through :attr:`Repository.backend`, so an encrypted
repository seals them and hides the VM name like every other object; they
are never locked (Object Lock protects what restores need, not reports).
Prune deletes a point's records with the point; gc deletes records whose
point is gone (a prune cut short, a verify racing a prune).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fleece.errors import RepositoryCorrupt
from fleece.repo.backends.base import Backend, ObjectMissing
from fleece.repo.format import keys
from fleece.repo.format.point import canonical_json, iso_utc

RECORD_FORMAT = 1
KINDS = ("fsck", "boot")


def new_stamp(now: datetime | None = None) -> str:
    """A record's name: its time as a point id is written (sorts by time)."""
    when = (now or datetime.now(UTC)).astimezone(UTC)
    return when.strftime("%Y%m%dT%H%M%S.%fZ") + "-" + secrets.token_hex(3)


@dataclass
class Verification:
    """One verdict on one restore point."""

    vm: str
    point: str
    kind: str
    """``fsck`` or ``boot``."""
    ok: bool
    summary: str
    """One line for people: ``fsck clean``, ``booted in 41 s``, ``FAILED: …``."""
    stamp: str = field(default_factory=new_stamp)
    finished: str = field(default_factory=iso_utc)
    seconds: float = 0.0
    time_to_ready: float | None = None
    """``boot``: seconds from QEMU's start until the guest was judged ready."""
    host: str = field(default_factory=socket.gethostname)
    fleece_version: str = ""
    """The writer's version (the command fills it in; the repository layer does not know it)."""
    report: dict[str, Any] = field(default_factory=dict)
    """The run's report (file systems, console excerpt, commands' output …), free-form."""

    @property
    def key(self) -> str:
        """Where the record is stored."""
        return keys.verification_key(self.vm, self.point, self.stamp)

    def document(self) -> dict[str, Any]:
        """The JSON document, checksum included."""
        doc: dict[str, Any] = {
            "format": RECORD_FORMAT, "vm": self.vm, "point": self.point, "stamp": self.stamp,
            "kind": self.kind, "ok": self.ok, "summary": self.summary, "finished": self.finished,
            "seconds": round(self.seconds, 3),
            "time_to_ready": None if self.time_to_ready is None else round(self.time_to_ready, 3),
            "host": self.host, "fleece_version": self.fleece_version, "report": self.report,
        }
        doc["checksum"] = hashlib.sha256(canonical_json(doc)).hexdigest()
        return doc

    def to_json(self) -> bytes:
        """The stored bytes."""
        return json.dumps(self.document(), sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, blob: bytes, what: str) -> Verification:
        """Parse and check a stored record; ``RepositoryCorrupt`` when it is not one."""
        try:
            doc = json.loads(blob)
            checksum = doc.pop("checksum")
            if hashlib.sha256(canonical_json(doc)).hexdigest() != checksum:
                raise ValueError("checksum mismatch")
            if doc["format"] != RECORD_FORMAT or doc["kind"] not in KINDS:
                raise ValueError(f"unknown format {doc['format']} or kind {doc['kind']!r}")
            return cls(vm=str(doc["vm"]), point=str(doc["point"]), kind=doc["kind"],
                       ok=bool(doc["ok"]), summary=str(doc["summary"]), stamp=str(doc["stamp"]),
                       finished=str(doc["finished"]), seconds=float(doc["seconds"]),
                       time_to_ready=doc["time_to_ready"], host=str(doc["host"]),
                       fleece_version=str(doc["fleece_version"]), report=dict(doc["report"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RepositoryCorrupt(f"verification record {what} is damaged: {exc}") from None

    def as_dict(self) -> dict[str, Any]:
        """The short form ``list --json`` carries (no report)."""
        return {"kind": self.kind, "ok": self.ok, "summary": self.summary, "at": self.finished,
                "time_to_ready": self.time_to_ready}


def store(backend: Backend, record: Verification) -> bool:
    """Write ``record`` (a conditional create); False when its point was removed meanwhile.

    The point is looked up after the write, as ``protect`` does: a prune that
    removed it in between would otherwise leave a record of nothing.
    """
    backend.put(record.key, record.to_json(), if_absent=True)
    if not backend.exists(keys.point_key(record.vm, record.point)):
        backend.delete(record.key)
        return False
    return True


def newest(backend: Backend, vm: str) -> dict[str, Verification]:
    """The newest readable record of each of ``vm``'s points (one listing, one read per point).

    A damaged newest record is skipped for the one before it: a report must
    not hide the points it can still describe.
    """
    by_point: dict[str, list[str]] = {}
    for key in backend.list(keys.verification_prefix(vm)):
        parsed = keys.parse_verification_key(key)
        if parsed is not None:
            by_point.setdefault(parsed[1], []).append(key)
    found: dict[str, Verification] = {}
    for point_id, names in by_point.items():
        for key in sorted(names, reverse=True):
            try:
                found[point_id] = Verification.from_json(backend.get(key), key)
                break
            except (ObjectMissing, RepositoryCorrupt):
                continue
    return found


def delete_for_point(backend: Backend, vm: str, point_id: str) -> int:
    """Delete every record of one point; how many."""
    names = list(backend.list(keys.verification_prefix(vm, point_id)))
    for key in names:
        backend.delete(key)
    return len(names)
