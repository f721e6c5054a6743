"""The QMP answers fleece reads hold, on the QEMU that runs here, every member their types require;
an answer of the wrong shape is one clear error, not a crash further on."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from fleece.errors import QmpProtocolError
from fleece.qmp import QmpSession
from fleece.qmp import answers as qa


def missing(answer: Mapping[str, object], typed: Any) -> set[str]:
    """The members ``typed`` (a TypedDict) requires that ``answer`` lacks."""
    return set(typed.__required_keys__) - set(answer)


def test_every_answer_has_the_members_its_type_requires(make_vm: Any) -> None:
    vm = make_vm([("qcow2", "16M")], bitmaps={"vda": ["bm"]}, name="answers")
    # An export and a job, so that their lists are not empty: a backup job
    # throttled to a crawl onto a null node, and an NBD export of that node.
    vm.qmp("blockdev-add", driver="null-co", **{"node-name": "tgt"}, size=16 << 20)
    vm.qmp("blockdev-backup", **{"job-id": "j"}, device="fmt-vda", target="tgt", sync="full",
           speed=1)
    vm.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": str(vm.dir / "nbd.sock")}})
    vm.qmp("block-export-add", type="nbd", id="e", **{"node-name": "fmt-vda"})

    async def read_all() -> dict[str, Any]:
        async with QmpSession.open(vm.qmp_path) as s:
            return {
                "version": await qa.query_version(s), "status": await qa.query_status(s),
                "name": await qa.query_name(s), "uuid": await qa.query_uuid(s),
                "block": await qa.query_block(s),
                "nodes": await qa.query_named_block_nodes(s, flat=True),
                "chain": await qa.query_named_block_nodes(s),
                "exports": await qa.query_block_exports(s), "jobs": await qa.query_jobs(s),
                "block_jobs": await qa.query_block_jobs(s),
                "objects": await qa.qom_list(s, "/objects"), "graph": await qa.query_block_graph(s),
            }

    try:
        got = asyncio.run(read_all())
    finally:
        vm.qmp("block-job-cancel", device="j", force=True)
    assert not missing(got["version"], qa.VersionInfo)
    assert not missing(got["version"]["qemu"], qa.VersionTriple)
    assert not missing(got["status"], qa.StatusInfo)
    assert got["name"] == {"name": "answers"}
    assert not missing(got["uuid"], qa.UuidInfo)

    vda = next(b for b in got["block"] if "/vda/" in b.get("qdev", ""))
    assert not missing(vda, qa.BlockInfo)
    assert not missing(vda["inserted"], qa.BlockDeviceInfo)
    assert not missing(vda["inserted"]["image"], qa.ImageInfo)
    fmt = next(n for n in got["nodes"] if n["node-name"] == "fmt-vda")
    bitmaps = fmt["dirty-bitmaps"]
    assert [b["name"] for b in bitmaps if "name" in b] == ["bm"]
    assert not any(missing(b, qa.BlockDirtyInfo) for b in bitmaps), bitmaps
    for node in got["nodes"] + got["chain"]:
        assert not missing(node, qa.BlockDeviceInfo), node["node-name"]
        assert not missing(node["image"], qa.ImageInfo)
    # Unflattened, the qcow2 node's image names its protocol child's; flat leaves chains out.
    assert all("backing-image" not in n["image"] for n in got["nodes"])

    assert [e["id"] for e in got["exports"]] == ["e"]
    assert not missing(got["exports"][0], qa.BlockExportInfo)
    assert [j["id"] for j in got["jobs"]] == ["j"]
    assert not missing(got["jobs"][0], qa.JobInfo)
    assert [j["device"] for j in got["block_jobs"]] == ["j"]
    assert not missing(got["block_jobs"][0], qa.BlockJobInfo)
    assert got["objects"] and not any(missing(o, qa.ObjectPropertyInfo) for o in got["objects"])

    graph = got["graph"]
    assert not missing(graph, qa.XDbgBlockGraph)
    assert "fmt-vda" in {n["name"] for n in graph["nodes"]}
    assert not any(missing(n, qa.XDbgBlockGraphNode) for n in graph["nodes"])
    assert graph["edges"] and not any(missing(e, qa.XDbgBlockGraphEdge) for e in graph["edges"])


class Answers:
    """A stand-in for a session that answers every command with one canned value."""

    def __init__(self, answer: object) -> None:
        self.answer = answer

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        return self.answer


@pytest.mark.parametrize(("query", "answer"), [
    (qa.query_block, {"device": "vda"}),  # an object where a list is due
    (qa.query_jobs, [{"id": "j"}, "j2"]),  # a list holding a non-object
    (qa.query_status, ["running"]),  # a list where an object is due
    (qa.query_version, None),
])
def test_an_answer_of_the_wrong_shape_is_one_line_naming_the_command(query: Any, answer: object) -> None:
    with pytest.raises(QmpProtocolError) as err:
        asyncio.run(query(Answers(answer)))
    message = str(err.value)
    assert "\n" not in message and err.value.command in message
    assert err.value.exit_code == 1
