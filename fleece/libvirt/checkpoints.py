"""fleece's chain of restore points mapped onto libvirt checkpoints.

Restore point ``ID`` is libvirt checkpoint ``fleece-ID``; libvirt names each
disk's qcow2 bitmap after the checkpoint, so the bitmap is ``fleece-ID`` as on
the QMP path. Every checkpoint bitmap libvirt keeps records writes from its
point on, so an incremental since ``fleece-ID`` is exact however many
checkpoints came after it. Per disk, the parent is the newest fleece
checkpoint with a bitmap on that disk whose point is in the repository. A
commit deletes every older checkpoint whose disks all have a bitmap in a
newer one (a ``--drive vda`` backup keeps the checkpoint ``vdb`` still needs);
an abort deletes the new one (the parent never stopped recording).

Before each export every fleece checkpoint is checked against the bitmaps
QEMU holds (:func:`heal`): one whose bitmap is missing or inconsistent on a
disk (QEMU killed, the image restored in place) loses that disk, and the
disk goes full with the reason. Nothing stale is left for a hand-made
``virsh checkpoint-delete --metadata``.

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
from fleece.libvirt import offline
from fleece.libvirt.domain import DomainDisk, bindings, bitmap_capable, connection_lost, is_running, message


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


def new_checkpoint_xml(point: str, drives: list[str], all_disks: list[str], scratch: str) -> str | None:
    """The ``<domaincheckpoint>`` of restore point ``point``: a bitmap on ``drives`` only (None: none)."""
    if not drives:
        return None
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


def _redefine_xml(dom: Any, xml: str, disks: tuple[str, ...], *, validate: bool = True) -> str | None:
    """Redefine the checkpoint ``xml`` describes with bitmaps on ``disks`` only; None if libvirt agreed.

    With ``validate``, libvirt agrees only when QEMU holds every one of those
    bitmaps, persistent, recording and consistent; otherwise its reason is
    returned and nothing was changed. A broken connection is raised.
    """
    libvirt = bindings()
    root = ET.fromstring(xml)
    for tag in ("parent", "domain"):
        for el in root.findall(tag):
            root.remove(el)
    for el in root.findall("./disks/disk"):
        if el.get("name") not in disks:
            el.set("checkpoint", "no")
            el.attrib.pop("bitmap", None)
    flags = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
    if validate:
        flags |= libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
    try:
        dom.checkpointCreateXML(ET.tostring(root, encoding="unicode"), flags)
    except libvirt.libvirtError as exc:
        if connection_lost(exc):
            raise
        return message(exc)
    return None


@dataclass
class Healed:
    """What :func:`heal` found: the checkpoints left, and per disk why its checkpoint was dropped."""

    checkpoints: list[Checkpoint]
    broken: dict[str, str]
    """Per disk target, the reason its bitmap in a fleece checkpoint was found missing or broken."""
    done: list[str]
    """What was removed, one item each."""
    dropped: set[str]
    """The restore points whose checkpoint lost a disk (or all of them)."""


def heal(dom: Any, disks: list[DomainDisk]) -> Healed:
    """Check every fleece checkpoint's bitmaps and drop the disks whose bitmap is missing or broken.

    Running domain: each checkpoint's metadata is deleted and redefined with
    ``REDEFINE_VALIDATE`` (libvirt's own check against QEMU's bitmaps); a disk
    libvirt refuses is dropped from it, its broken bitmap removed where QEMU
    still has it. Shut-off domain: the bitmaps stored in the qcow2 images are
    read with ``qemu-img``; one missing or flagged in use is stale.
    A checkpoint left with no disk is deleted. Interrupted half-way, a
    checkpoint's metadata may be gone while its bitmaps stay: the next backup
    redefines it from the repository's newest point (:func:`choose_levels`).
    """
    libvirt = bindings()
    running = is_running(dom)
    kept: list[Checkpoint] = []
    broken: dict[str, str] = {}
    done: list[str] = []
    dropped: set[str] = set()
    for cp in fleece_checkpoints(dom):
        if not cp.disks:
            kept.append(cp)
            continue
        xml = dom.checkpointLookupByName(cp.name, 0).getXMLDesc(
            libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
        bad = _check_online(dom, cp, xml) if running else _check_offline(cp, disks)
        if not bad:
            kept.append(cp)
            continue
        good = tuple(d for d in cp.disks if d not in bad)
        for disk, why in bad.items():
            broken[disk] = (f"{disk}: the bitmap of checkpoint {cp.name} is missing or broken ({why}: QEMU "
                            "was stopped without a clean shutdown, or the image was replaced); fleece "
                            "removed the stale checkpoint" + (f" from {disk}" if good else ""))
        done.append(_drop(dom, cp, xml, good, tuple(bad), disks, running))
        dropped.add(cp.point or "")
        if good:
            kept.append(Checkpoint(cp.name, cp.point, None, good, cp.description))
    return Healed(kept, broken, done, dropped)


def _check_online(dom: Any, cp: Checkpoint, xml: str) -> dict[str, str]:
    """Per disk of ``cp`` whose bitmap QEMU does not hold intact, libvirt's reason; ``cp`` is
    left defined on the intact disks only (deleted when none is)."""
    delete(dom, cp.name, metadata_only=True)
    refusal = _redefine_xml(dom, xml, cp.disks)
    if refusal is None:
        return {}
    bad = {}
    for disk in cp.disks:  # which disks: one at a time
        why = _redefine_xml(dom, xml, (disk,))
        if why is None:
            delete(dom, cp.name, metadata_only=True)
        else:
            bad[disk] = why
    return bad or dict.fromkeys(cp.disks, refusal)


def _check_offline(cp: Checkpoint, disks: list[DomainDisk]) -> dict[str, str]:
    """Per disk of ``cp`` whose qcow2 image lacks the bitmap or has it flagged in use, why."""
    by_target = {d.target: d for d in disks}
    bad = {}
    for target in cp.disks:
        disk = by_target.get(target)
        path = offline.local_image(disk) if disk is not None else None
        if path is None:
            continue  # not readable here: the next start decides
        bitmaps = offline.image_bitmaps(path)
        if bitmaps is None:
            continue
        found = bitmaps.get(cp.name)
        if found is None:
            bad[target] = f"no bitmap {cp.name} in {path}"
        elif found.in_use:
            bad[target] = f"bitmap {cp.name} in {path} is inconsistent"
    return bad


def _drop(dom: Any, cp: Checkpoint, xml: str, good: tuple[str, ...], bad: tuple[str, ...],
          disks: list[DomainDisk], running: bool) -> str:
    """Remove the broken bitmaps of ``cp`` where they still exist, and leave ``cp`` on ``good``."""
    libvirt = bindings()
    try:
        dom.checkpointLookupByName(cp.name, 0)
        delete(dom, cp.name, metadata_only=True)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
            raise
    # The broken bitmaps alone, unvalidated, so that libvirt (or qemu-img) removes what is left of them.
    if _redefine_xml(dom, xml, bad, validate=False) is None:
        remove(dom, Checkpoint(cp.name, cp.point, None, bad, cp.description), disks)
    if good and _redefine_xml(dom, xml, good, validate=running) is not None:
        # It was intact a moment ago; if libvirt now refuses, the disks go full next time.
        return f"checkpoint {cp.name} (its bitmaps on {', '.join(bad + good)} were not usable)"
    if good:
        return f"checkpoint {cp.name} on {', '.join(bad)} (missing or broken bitmap)"
    return f"checkpoint {cp.name} (missing or broken bitmap)"


def remove(dom: Any, cp: Checkpoint, disks: list[DomainDisk]) -> str:
    """Delete checkpoint ``cp`` and its bitmaps; what was done, as one item.

    Running domain: libvirt deletes both; a bitmap libvirt cannot delete
    (missing, broken) leaves the metadata to delete alone. Shut-off domain:
    libvirt deletes the metadata, ``qemu-img`` the bitmaps in local images.
    """
    libvirt = bindings()
    if is_running(dom):
        try:
            delete(dom, cp.name)
            return f"checkpoint {cp.name}"
        except libvirt.libvirtError as exc:
            if connection_lost(exc):
                raise
            delete(dom, cp.name, metadata_only=True)
            return (f"checkpoint {cp.name} (its metadata; libvirt could not delete its bitmaps: "
                    f"{message(exc)})")
    delete(dom, cp.name, metadata_only=True)
    by_target = {d.target: d for d in disks}
    left = []
    for target in cp.disks:
        disk = by_target.get(target)
        path = offline.local_image(disk) if disk is not None else None
        bitmaps = offline.image_bitmaps(path) if path is not None else None
        if (path is None or bitmaps is None
                or (cp.name in bitmaps and offline.remove_bitmap(path, cp.name) is not None)):
            left.append(target)
    if left:
        return (f"checkpoint {cp.name} (domain shut off: its metadata; the bitmaps on {', '.join(left)} "
                "stay in the images, unused)")
    return f"checkpoint {cp.name} (domain shut off: its bitmaps removed from the images with qemu-img)"


def covered(ours: list[Checkpoint], newest: str) -> list[Checkpoint]:
    """The checkpoints older than ``newest`` (``ours`` is oldest first) whose every disk has a bitmap
    in a newer checkpoint: what a commit of ``newest`` deletes."""
    names = [c.name for c in ours]
    if newest not in names:
        return []
    drop = []
    for i, cp in enumerate(ours[:names.index(newest)]):
        newer = {d for later in ours[i + 1:] for d in later.disks}
        if set(cp.disks) <= newer:
            drop.append(cp)
    return drop


@dataclass
class LevelChoice:
    """One disk's level: the parent point of an incremental, or None with the reason it is full."""

    parent: str | None
    reason: str | None


def choose_levels(
    dom: Any,
    disks: list[DomainDisk],
    level: str,
    parent_ok: Callable[[str, str], bool],
    known_point: str | None,
    say: Callable[[str], None],
    healed: Healed,
) -> tuple[dict[str, LevelChoice], list[str]]:
    """Per disk, incremental since which point or full and why; and the checkpoints redefined.

    ``known_point`` is the newest restore point the caller holds: when
    libvirt has no fleece checkpoint, it is the one worth redefining.
    ``healed`` is what :func:`heal` left.
    """
    ours = list(healed.checkpoints)
    redefined: list[str] = []
    capable = [d.target for d in disks if bitmap_capable(d)]
    choices: dict[str, LevelChoice] = {}
    for d in disks:
        if not bitmap_capable(d):
            choices[d.target] = LevelChoice(None, f"{d.target}: a {d.format} image cannot hold persistent "
                                                  "bitmaps (libvirt keeps checkpoints only in qcow2): "
                                                  "full every time")
    if level == "full":
        return {d.target: choices.get(d.target, LevelChoice(None, None)) for d in disks}, redefined
    if not ours and known_point is not None and known_point not in healed.dropped:
        wanted = [d for d in capable if parent_ok(d, known_point)]
        if wanted:
            refusal = redefine(dom, known_point, wanted)
            name = checkpoint_bitmap(known_point)
            if refusal is None:
                say(f"libvirt had lost checkpoint {name} (restore point {known_point}); redefined it "
                    f"from the bitmaps in the qcow2 images of {', '.join(wanted)}")
                redefined.append(name)
                ours = [Checkpoint(name, known_point, None, tuple(wanted), "")]
            else:
                reason = (f"libvirt has no checkpoint {name} for restore point {known_point} and the "
                          f"disks' bitmaps cannot restore it ({refusal})")
                return {d.target: choices.get(d.target, LevelChoice(None, reason)) for d in disks}, redefined
    for drive in capable:
        on_drive = [c for c in reversed(ours) if drive in c.disks]
        usable = next((c for c in on_drive if c.point is not None and parent_ok(drive, c.point)), None)
        if usable is not None:
            choices[drive] = LevelChoice(usable.point, None)
        elif drive in healed.broken:
            choices[drive] = LevelChoice(None, healed.broken[drive])
        elif on_drive:
            choices[drive] = LevelChoice(None, f"{drive}: restore point {on_drive[0].point} of checkpoint "
                                               f"{on_drive[0].name} is not in the repository")
        elif ours:
            choices[drive] = LevelChoice(None, f"{drive}: no fleece checkpoint has a bitmap on it")
        else:
            choices[drive] = LevelChoice(None, f"{drive}: no fleece checkpoint in libvirt (first backup)")
    return {d.target: choices[d.target] for d in disks}, redefined
