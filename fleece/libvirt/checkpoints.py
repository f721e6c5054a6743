"""fleece's chain of restore points mapped onto libvirt checkpoints.

Restore point ``ID`` is libvirt checkpoint ``fleece-ID``; libvirt names each
disk's qcow2 bitmap after the checkpoint, so the bitmap is ``fleece-ID`` as on
the QMP path. Every checkpoint bitmap libvirt keeps records writes from its
point on, so an incremental since ``fleece-ID`` is exact however many
checkpoints came after it; fleece keeps one: a commit deletes the parent,
an abort deletes the new one (the parent never stopped recording).

libvirt may lose a checkpoint's metadata while the qcow2 bitmaps stay
(``virsh checkpoint-delete --metadata``, a transient domain, a host
re-install): when the repository's newest point has no checkpoint, fleece
redefines ``fleece-ID`` with ``REDEFINE_VALIDATE``, which libvirt grants only
if every disk's bitmap is present and consistent. Otherwise the disk is full,
and the reason says so.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fleece.fleecing.names import checkpoint_bitmap, checkpoint_of
from fleece.libvirt.domain import bindings, message


@dataclass(frozen=True)
class Checkpoint:
    """One libvirt checkpoint of the domain."""

    name: str
    point: str | None
    """The fleece restore point id it stands for; None for another tool's checkpoint."""
    parent: str | None
    """The parent checkpoint's name."""
    disks: tuple[str, ...]
    """The disks it has a bitmap on."""
    description: str


def list_checkpoints(dom: Any) -> list[Checkpoint]:
    """Every checkpoint of the domain, oldest point first (fleece's ids sort by time)."""
    found = []
    for cp in dom.listAllCheckpoints(0):
        xml = ET.fromstring(cp.getXMLDesc(bindings().VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
        parent = xml.findtext("./parent/name")
        disks = tuple(str(d.get("name")) for d in xml.findall("./disks/disk")
                      if d.get("checkpoint", "bitmap") == "bitmap")
        found.append(Checkpoint(cp.getName(), checkpoint_of(cp.getName()), parent, disks,
                                xml.findtext("description") or ""))
    return sorted(found, key=lambda c: (c.point is None, c.point or "", c.name))


def fleece_checkpoints(dom: Any) -> list[Checkpoint]:
    """fleece's checkpoints of the domain, oldest first."""
    return [c for c in list_checkpoints(dom) if c.point is not None]


def new_checkpoint_xml(point: str, drives: list[str], all_disks: list[str], scratch: str) -> str:
    """The ``<domaincheckpoint>`` for restore point ``point``: a bitmap on ``drives`` only."""
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = checkpoint_bitmap(point)
    # Read back by `fleece cleanup` when the backup job is gone: where the state file is.
    ET.SubElement(root, "description").text = f"fleece restore point {point}; scratch {scratch}"
    disks = ET.SubElement(root, "disks")
    for target in all_disks:
        ET.SubElement(disks, "disk", name=target, checkpoint="bitmap" if target in drives else "no")
    return ET.tostring(root, encoding="unicode")


def scratch_of(cp: Checkpoint) -> str | None:
    """The scratch directory the run that made ``cp`` used (from its description)."""
    _, sep, tail = cp.description.rpartition("; scratch ")
    return tail.strip() or None if sep else None


def redefine(dom: Any, point: str, drives: list[str]) -> str | None:
    """Re-create checkpoint ``fleece-<point>`` on ``drives`` from their qcow2 bitmaps.

    Returns None when libvirt accepted it (every bitmap present and
    consistent), else libvirt's reason. Changes nothing when refused.
    """
    libvirt = bindings()
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = checkpoint_bitmap(point)
    ET.SubElement(root, "description").text = f"fleece restore point {point}; redefined"
    # Required on redefinition; the point id carries the time it was taken.
    taken = datetime.strptime(point.split(".")[0], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    ET.SubElement(root, "creationTime").text = str(int(taken.timestamp()))
    disks = ET.SubElement(root, "disks")
    for target in drives:
        ET.SubElement(disks, "disk", name=target, checkpoint="bitmap", bitmap=checkpoint_bitmap(point))
    flags = (libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
             | libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE)
    try:
        dom.checkpointCreateXML(ET.tostring(root, encoding="unicode"), flags)
    except libvirt.libvirtError as exc:
        return message(exc)
    return None


def delete(dom: Any, name: str, *, metadata_only: bool = False) -> bool:
    """Delete checkpoint ``name`` (its bitmaps too, unless ``metadata_only``); False if it was gone."""
    libvirt = bindings()
    try:
        cp = dom.checkpointLookupByName(name, 0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
            return False
        raise
    cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY if metadata_only else 0)
    return True


@dataclass
class LevelChoice:
    """One disk's level: the parent point of an incremental, or None with the reason it is full."""

    parent: str | None
    reason: str | None


def choose_levels(
    dom: Any,
    drives: list[str],
    level: str,
    parent_ok: Callable[[str, str], bool],
    known_point: str | None,
    say: Callable[[str], None],
) -> tuple[dict[str, LevelChoice], list[str]]:
    """Per drive, incremental since which point or full and why; and the checkpoints redefined.

    ``known_point`` is the newest restore point the caller holds: when
    libvirt has no fleece checkpoint, it is the one worth redefining.
    """
    ours = fleece_checkpoints(dom)
    redefined: list[str] = []
    if level == "full":
        return {d: LevelChoice(None, None) for d in drives}, redefined
    current = ours[-1] if ours else None
    if current is None and known_point is not None:
        wanted = [d for d in drives if parent_ok(d, known_point)]
        if wanted:
            refusal = redefine(dom, known_point, wanted)
            name = checkpoint_bitmap(known_point)
            if refusal is None:
                say(f"libvirt had lost checkpoint {name} (restore point {known_point}); redefined it "
                    f"from the bitmaps in the qcow2 images of {', '.join(wanted)}")
                redefined.append(name)
                current = Checkpoint(name, known_point, None, tuple(wanted), "")
            else:
                reason = (f"libvirt has no checkpoint {name} for restore point {known_point} and the "
                          f"disks' bitmaps cannot restore it ({refusal})")
                return {d: LevelChoice(None, reason) for d in drives}, redefined
    choices = {}
    for drive in drives:
        if current is None:
            choices[drive] = LevelChoice(None, f"{drive}: no fleece checkpoint in libvirt (first backup)")
        elif current.point is None or drive not in current.disks:
            choices[drive] = LevelChoice(None, f"{drive}: checkpoint {current.name} has no bitmap on it")
        elif not parent_ok(drive, current.point):
            choices[drive] = LevelChoice(None, f"{drive}: restore point {current.point} of checkpoint "
                                               f"{current.name} is not in the repository")
        else:
            choices[drive] = LevelChoice(current.point, None)
    return choices, redefined
