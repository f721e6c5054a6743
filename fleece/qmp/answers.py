"""The QMP answers fleece reads, as types, and the queries that return them.

``QmpSession.execute`` returns ``object``, as ``qemu.qmp`` does: what QEMU
sends back is only known once checked. Each query here runs one command,
checks the answer's outer shape (an object, or a list of objects) and names
it with a ``TypedDict`` of the members fleece reads, spelled as in QEMU's
QAPI schema (``qapi/block-core.json``, ``qapi/job.json``, ``qapi/qom.json``,
``qapi/misc.json``, ``qapi/run-state.json``). Members QEMU may leave out
are ``NotRequired``; members fleece never reads are not listed.
"""

# No ``from __future__ import annotations``: the TypedDicts' NotRequired members must be
# seen when the classes are made (``__required_keys__``; tests check answers against it).
from collections.abc import Mapping
from typing import NotRequired, Protocol, TypedDict, cast

from fleece.errors import QmpProtocolError


class Executes(Protocol):
    """Anything that runs a QMP command and returns its ``return`` value (``QmpSession``)."""

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        """Run ``command`` with ``arguments``."""
        ...


class VersionTriple(TypedDict):
    """``VersionTriple``: QEMU's version numbers."""

    major: int
    minor: int
    micro: int


class VersionInfo(TypedDict):
    """``query-version``."""

    qemu: VersionTriple
    package: str


class StatusInfo(TypedDict):
    """``query-status``: ``status`` is a ``RunState`` (``running``, ``paused``, ``postmigrate``…)."""

    running: bool
    status: str


class NameInfo(TypedDict):
    """``query-name``: ``name`` only when QEMU was started with ``-name``."""

    name: NotRequired[str]


class UuidInfo(TypedDict):
    """``query-uuid``: all zeros when QEMU was started without ``-uuid``."""

    UUID: str


class BlockDirtyInfo(TypedDict):
    """One entry of a node's ``dirty-bitmaps``."""

    name: NotRequired[str]  # QEMU's own bitmaps (copy-before-write's) have none
    count: int
    granularity: int
    recording: bool
    busy: bool
    persistent: bool
    inconsistent: NotRequired[bool]

ImageInfo = TypedDict("ImageInfo", {
    "filename": str,
    "format": str,
    "virtual-size": int,
    "backing-image": NotRequired["ImageInfo"],
})
"""A node's ``image``: the image chain as QEMU sees it."""

BlockDeviceInfo = TypedDict("BlockDeviceInfo", {
    "file": str,
    "node-name": str,
    "drv": str,
    "image": ImageInfo,
    "dirty-bitmaps": NotRequired[list[BlockDirtyInfo]],
    "active": NotRequired[bool],  # QEMU 10.0 and later
})
"""One node of ``query-named-block-nodes``, or the medium of a ``query-block`` entry."""

class BlockInfo(TypedDict):
    """One block backend of ``query-block``."""

    device: str  # the block backend's name; empty with -blockdev
    qdev: NotRequired[str]
    inserted: NotRequired[BlockDeviceInfo]

BlockExportInfo = TypedDict("BlockExportInfo", {
    "id": str,
    "type": str,
    "node-name": str,
    "shutting-down": bool,
})
"""One export of ``query-block-exports``."""

JobInfo = TypedDict("JobInfo", {
    "id": str,
    "type": str,
    "status": str,
    "current-progress": int,
    "total-progress": int,
    "error": NotRequired[str],
})
"""One job of ``query-jobs``."""

BlockJobInfo = TypedDict("BlockJobInfo", {
    "device": str,  # the job's id
    "type": str,
    "status": str,
    "io-status": NotRequired[str],
})
"""One block job of ``query-block-jobs``."""


class ObjectPropertyInfo(TypedDict):
    """One child or property of ``qom-list``; ``type`` is ``child<…>`` for a child object."""

    name: str
    type: str


class XDbgBlockGraphNode(TypedDict):
    """A node of ``x-debug-query-block-graph``; ``type``: ``block-backend``, ``block-driver``…"""

    id: int
    type: str
    name: str


class XDbgBlockGraphEdge(TypedDict):
    """An edge of ``x-debug-query-block-graph``; ``name`` is the child's role (``file``, ``backing``…)."""

    parent: int
    child: int
    name: str


class XDbgBlockGraph(TypedDict):
    """``x-debug-query-block-graph``."""

    nodes: list[XDbgBlockGraphNode]
    edges: list[XDbgBlockGraphEdge]


def _object(answer: object, command: str) -> dict[str, object]:
    if not isinstance(answer, dict):
        raise QmpProtocolError(command, "an object", answer)
    return answer


def _objects(answer: object, command: str) -> list[dict[str, object]]:
    if not isinstance(answer, list) or not all(isinstance(item, dict) for item in answer):
        raise QmpProtocolError(command, "a list of objects", answer)
    return answer


async def query_version(qmp: Executes) -> VersionInfo:
    """QEMU's version (``QmpSession.qemu_version`` keeps it for the session)."""
    return cast(VersionInfo, _object(await qmp.execute("query-version"), "query-version"))


async def query_status(qmp: Executes) -> StatusInfo:
    """The VM's run state."""
    return cast(StatusInfo, _object(await qmp.execute("query-status"), "query-status"))


async def query_name(qmp: Executes) -> NameInfo:
    """The VM's ``-name``, if it has one."""
    return cast(NameInfo, _object(await qmp.execute("query-name"), "query-name"))


async def query_uuid(qmp: Executes) -> UuidInfo:
    """The VM's UUID."""
    return cast(UuidInfo, _object(await qmp.execute("query-uuid"), "query-uuid"))


async def query_block(qmp: Executes) -> list[BlockInfo]:
    """Every block backend, with its device and medium."""
    return cast(list[BlockInfo], _objects(await qmp.execute("query-block"), "query-block"))


async def query_named_block_nodes(qmp: Executes, *, flat: bool = False) -> list[BlockDeviceInfo]:
    """Every named node; ``flat`` leaves out each node's backing chain (``image.backing-image``)."""
    answer = await qmp.execute("query-named-block-nodes", {"flat": True} if flat else None)
    return cast(list[BlockDeviceInfo], _objects(answer, "query-named-block-nodes"))


async def query_block_exports(qmp: Executes) -> list[BlockExportInfo]:
    """Every block export (NBD, FUSE, vhost-user)."""
    return cast(list[BlockExportInfo],
                _objects(await qmp.execute("query-block-exports"), "query-block-exports"))


async def query_jobs(qmp: Executes) -> list[JobInfo]:
    """Every job, in any state until it is dismissed."""
    return cast(list[JobInfo], _objects(await qmp.execute("query-jobs"), "query-jobs"))


async def query_block_jobs(qmp: Executes) -> list[BlockJobInfo]:
    """Every block job (for its ``io-status``, which ``query-jobs`` lacks)."""
    return cast(list[BlockJobInfo], _objects(await qmp.execute("query-block-jobs"), "query-block-jobs"))


async def qom_list(qmp: Executes, path: str) -> list[ObjectPropertyInfo]:
    """The children and properties of the QOM object at ``path``."""
    return cast(list[ObjectPropertyInfo],
                _objects(await qmp.execute("qom-list", {"path": path}), "qom-list"))


async def query_block_graph(qmp: Executes) -> XDbgBlockGraph:
    """The whole block graph (``x-debug-``: a QEMU may lack it; the caller decides what then)."""
    return cast(XDbgBlockGraph, _object(await qmp.execute("x-debug-query-block-graph"),
                                    "x-debug-query-block-graph"))
