"""What a VM's disks are, as QMP reports them, and which one ``--drive`` means.

``query-block`` lists every block backend with its attached device; we keep
the ones that have a medium inserted and a device attached. A disk is known
by three names and ``--drive`` accepts any of them: the device id (``vda``),
the node name of its top (format) node, and the block backend name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fleece.errors import BadInput
from fleece.qmp.answers import BlockDirtyInfo, query_block
from fleece.qmp.session import QmpSession

PERIPHERAL = "/machine/peripheral/"


@dataclass(frozen=True)
class DirtyBitmap:
    """One named dirty bitmap on a node (QEMU's unnamed internal ones are skipped)."""

    name: str
    granularity: int
    count: int
    recording: bool
    persistent: bool
    inconsistent: bool
    busy: bool

    @classmethod
    def from_qmp(cls, info: BlockDirtyInfo) -> DirtyBitmap:
        """Build from one named ``dirty-bitmaps`` entry of ``query-block``."""
        return cls(
            name=info["name"],
            granularity=int(info["granularity"]),
            count=int(info["count"]),
            recording=bool(info.get("recording", True)),
            persistent=bool(info.get("persistent", False)),
            inconsistent=bool(info.get("inconsistent", False)),
            busy=bool(info.get("busy", False)),
        )


@dataclass(frozen=True)
class Disk:
    """A VM disk: its device, its top node and what that node holds."""

    device_id: str | None
    """``vda`` for ``-device …,id=vda``; None for an anonymous device."""
    qdev: str
    """The device's QOM path, usable with ``qom-get``/``qom-set``."""
    backend: str
    """The block backend name (``-drive id=``); empty with ``-blockdev``."""
    node_name: str
    """The top node attached to the device (normally the format node)."""
    format: str
    virtual_size: int
    filename: str
    bitmaps: tuple[DirtyBitmap, ...] = field(default=())

    @property
    def name(self) -> str:
        """The friendliest name: device id, else backend, else node name."""
        return self.device_id or self.backend or self.node_name

    def bitmap(self, name: str) -> DirtyBitmap | None:
        """The named bitmap on this disk's node, if present."""
        return next((b for b in self.bitmaps if b.name == name), None)


def qom_path(qdev: str) -> str:
    """Turn ``query-block``'s ``qdev`` into a full QOM path.

    QEMU 7.2 gives a full path for virtio-blk but only the id for IDE and
    NVMe, and ``qom-set`` on a bare id fails for NVMe (docs/design.md §2.4).
    """
    return qdev if qdev.startswith("/") else PERIPHERAL + qdev


def device_id_of(qdev: str) -> str | None:
    """The ``id=`` of the device behind a QOM path, if it has one."""
    path = qom_path(qdev)
    if path.startswith(PERIPHERAL):
        return path[len(PERIPHERAL) :].split("/", 1)[0]
    return None


async def list_disks(session: QmpSession) -> list[Disk]:
    """Every disk with a medium and an attached device, in ``query-block`` order."""
    disks = []
    for info in await query_block(session):
        inserted = info.get("inserted")
        qdev = info.get("qdev")
        if not inserted or not qdev:
            continue
        image = inserted.get("image", {})
        bitmaps = tuple(
            DirtyBitmap.from_qmp(b) for b in inserted.get("dirty-bitmaps", []) if b.get("name")
        )
        disks.append(
            Disk(
                device_id=device_id_of(qdev),
                qdev=qom_path(qdev),
                backend=info.get("device", ""),
                node_name=inserted["node-name"],
                format=inserted.get("drv", image.get("format", "")),
                virtual_size=int(image.get("virtual-size", 0)),
                filename=inserted.get("file", image.get("filename", "")),
                bitmaps=bitmaps,
            )
        )
    return disks


def resolve_drive(disks: list[Disk], name: str) -> Disk:
    """The disk that ``--drive NAME`` means: device id, node name or backend name."""
    for attr in ("device_id", "node_name", "backend"):
        matches = [d for d in disks if name and getattr(d, attr) == name]
        if len(matches) == 1:
            return matches[0]
    known = ", ".join(d.name for d in disks) or "none"
    raise BadInput(f"no disk named {name!r} in this VM (disks: {known})")
