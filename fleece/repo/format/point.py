"""Restore points: the JSON document that commits a backup (docs/format.md).

A point names, per disk, the chunk index that maps the disk; it is written
last, so its existence means everything it names is stored. The JSON carries
a sha256 over its canonical form, checked on every read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from fleece.errors import RepositoryCorrupt, RepositoryError
from fleece.repo.format.keys import POINT_ID_RE

POINT_FORMAT = 1
LEVELS = ("full", "incremental")

_T = TypeVar("_T")


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    # A naive datetime is taken to be UTC already (as datetime.utcnow() gives).
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def iso_utc(now: datetime | None = None) -> str:
    """``2026-11-23T07:36:00.123456Z``: the form of every timestamp in the repository."""
    return _utc(now).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso_utc(text: str) -> datetime:
    """Inverse of :func:`iso_utc` (``ValueError`` on anything else)."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def canonical_json(doc: Any) -> bytes:
    """The byte form checksums are computed over: sorted keys, no spaces, ASCII."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass
class DiskRecord:
    """One disk of a restore point: how it was backed up and where its index is."""

    name: str
    level: str
    virtual_size: int
    index_key: str
    index_digest: str
    bitmap: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class RestorePoint:
    """A committed backup of one VM's disks at one point in time."""

    id: str
    vm: str
    created: str
    parent: str | None
    chunk_size: int
    disks: list[DiskRecord]
    fleece_version: str
    qemu_version: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    object_lock: dict[str, str] | None = None
    """Object Lock repositories: ``{"mode", "repository", "horizon"}``: the ISO time until
    which every object the point needs is locked at least, in the repository of that id
    (written only when set)."""
    machine: dict[str, Any] | None = None
    """The machine record (definition, NVRAM, TPM state; :mod:`fleece.machine.record`), or None
    for points that record disks only (written only when set)."""

    @property
    def lock_horizon(self) -> datetime | None:
        """``object_lock``'s horizon as a time, or None (not recorded or unreadable)."""
        try:
            return parse_iso_utc(self.object_lock["horizon"]) if self.object_lock else None
        except (KeyError, ValueError):
            return None

    def disk(self, name: str) -> DiskRecord | None:
        """The record of disk ``name``, or None."""
        return next((d for d in self.disks if d.name == name), None)

    def to_json(self) -> bytes:
        """The point object: JSON with ``format`` and a ``checksum`` over the rest."""
        doc: dict[str, Any] = {"format": POINT_FORMAT, **asdict(self)}
        if doc["object_lock"] is None:
            del doc["object_lock"]  # points of other repositories stay as they were
        if doc["machine"] is None:
            del doc["machine"]  # points without a machine keep their bytes of before
        doc["checksum"] = hashlib.sha256(canonical_json(doc)).hexdigest()
        return json.dumps(doc, sort_keys=True, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, blob: bytes, what: str = "restore point") -> RestorePoint:
        """Parse and verify a point object; damage raises ``RepositoryCorrupt``."""
        try:
            doc = json.loads(blob)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RepositoryCorrupt(f"{what} is not valid JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise RepositoryCorrupt(f"{what} is not a JSON object")
        if doc.get("format") != POINT_FORMAT:
            raise RepositoryError(
                f"{what} has format {doc.get('format')!r}; this fleece reads format "
                f"{POINT_FORMAT} (upgrade fleece)"
            )
        checksum = doc.pop("checksum", None)
        if checksum != hashlib.sha256(canonical_json(doc)).hexdigest():
            raise RepositoryCorrupt(f"{what} fails its checksum (content damaged)")
        r = _Reader(doc, what)
        disks = []
        for n, raw in enumerate(r.get("disks", list)):
            d = _Reader(raw, f"{what} disk #{n}")
            level = d.get("level", str)
            if level not in LEVELS:
                raise RepositoryCorrupt(f"{what} disk #{n} has unknown level {level!r}")
            digest = d.get("index_digest", str)
            if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
                raise RepositoryCorrupt(f"{what} disk #{n} has a malformed index_digest")
            disks.append(
                DiskRecord(
                    name=d.get("name", str),
                    level=level,
                    virtual_size=d.get("virtual_size", int),
                    index_key=d.get("index_key", str),
                    index_digest=digest,
                    bitmap=d.get_optional("bitmap", str),
                    stats=d.get("stats", dict),
                )
            )
        point = cls(
            id=r.get("id", str),
            vm=r.get("vm", str),
            created=r.get("created", str),
            parent=r.get_optional("parent", str),
            chunk_size=r.get("chunk_size", int),
            disks=disks,
            fleece_version=r.get("fleece_version", str),
            qemu_version=r.get_optional("qemu_version", str),
            labels=r.get("labels", dict),
            stats=r.get("stats", dict),
            object_lock=r.get("object_lock", dict) if "object_lock" in r.doc else None,
            machine=r.get("machine", dict) if "machine" in r.doc else None,
        )
        if point.object_lock is not None and not all(
                isinstance(v, str) for v in point.object_lock.values()):
            raise RepositoryCorrupt(f"{what} has an object_lock that is not strings")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in point.labels.items()):
            raise RepositoryCorrupt(f"{what} has labels that are not strings")
        if not POINT_ID_RE.match(point.id):
            raise RepositoryCorrupt(f"{what} has a malformed id {point.id!r}")
        if len({d.name for d in disks}) != len(disks):
            raise RepositoryCorrupt(f"{what} names the same disk twice")
        return point


class _Reader:
    """Typed access to one JSON object's members, raising ``RepositoryCorrupt``."""

    def __init__(self, doc: Any, what: str) -> None:
        if not isinstance(doc, dict):
            raise RepositoryCorrupt(f"{what} is not a JSON object")
        self.doc = doc
        self.what = what

    def get(self, name: str, kind: type[_T]) -> _T:
        if name not in self.doc:
            raise RepositoryCorrupt(f"{self.what} lacks the field {name!r}")
        value = self.doc[name]
        # bool is an int subclass; a true/false where a size belongs is damage.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise RepositoryCorrupt(
                f"{self.what} field {name!r} should be {kind.__name__}, not {type(value).__name__}"
            )
        return value

    def get_optional(self, name: str, kind: type[_T]) -> _T | None:
        if name not in self.doc:
            raise RepositoryCorrupt(f"{self.what} lacks the field {name!r}")
        return None if self.doc[name] is None else self.get(name, kind)
