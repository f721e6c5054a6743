"""Checkpoint bitmaps: when an export may be incremental, and what it says when it may not."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from fleece.fleecing.names import CHECKPOINT_RE, checkpoint_bitmap, checkpoint_of, new_point_id

pytestmark = pytest.mark.usefixtures("scratch_tmpdir")


def start(fleece: Any, vm: Any, *args: Any) -> Any:
    res = fleece("export", "start", "--bounded-requests", "--qmp", vm.qmp_path, *args, "--json")
    assert res.rc == 0, res.err
    return res.json()["disks"][0], res.err


def stop(fleece: Any, vm: Any, *args: Any) -> None:
    res = fleece("export", "stop", "--qmp", vm.qmp_path, *args)
    assert res.rc == 0, res.err


def test_point_ids_sort_by_time_to_the_microsecond() -> None:
    a = new_point_id(datetime(2026, 11, 23, 7, 36, 0, 123456, tzinfo=UTC))
    assert re.fullmatch(r"20261123T073600\.123456Z-[0-9a-f]{6}", a)
    ids = []
    for _ in range(3):
        ids.append(new_point_id())
        time.sleep(0.001)
    assert ids == sorted(ids)
    assert CHECKPOINT_RE.match(checkpoint_bitmap(ids[0]))
    assert checkpoint_of(checkpoint_bitmap(ids[0])) == ids[0]
    assert checkpoint_of("fleece-tmp-vda") is None


@pytest.mark.parametrize(
    ("make", "says"),
    [
        ({"persistent": False}, "is not persistent"),
        ({"persistent": True, "disabled": True}, "is disabled (not recording)"),
    ],
)
def test_unusable_parent_means_full_and_says_why(vm: Any, fleece: Any, make: Any, says: Any) -> None:
    name = "fleece-20260101T000000.000000Z-abcdef"
    vm.qmp("block-dirty-bitmap-add", node="fmt-vda", name=name, **make)
    disk, err = start(fleece, vm, "--drive", "vda")
    assert (disk["level"], disk["since"]) == ("full", None)
    assert f"full because vda: checkpoint bitmap {name} on fmt-vda {says}" in err
    stop(fleece, vm, "--abort")
    assert name in vm.bitmaps("vda")  # abort leaves the old one alone
    res = fleece("export", "start", "--bounded-requests",
                 "--qmp", vm.qmp_path, "--drive", "vda", "--level", "incremental")
    assert res.rc == 1 and says in res.err


def test_raw_chain_lives_while_qemu_runs(make_vm: Any, fleece: Any, nbd_connect: Any) -> None:
    vm = make_vm([("raw", "16M")])
    first, err = start(fleece, vm, "--drive", "vda")
    assert "raw image cannot hold persistent bitmaps" in err and "only while this QEMU process runs" in err
    assert first["persistent"] is False
    stop(fleece, vm)
    vm.write("vda", 1 << 20, 4096, 0x31)
    second, _ = start(fleece, vm, "--drive", "vda")
    assert second["since"] == first["checkpoint"]
    conn = nbd_connect(second["uri"], second["dirty_bitmap"])
    assert conn.dirty_granules() == {1 << 20}
    conn.close()
    stop(fleece, vm)

    vm = make_vm.restart(vm, kill=False)  # even a clean restart ends a raw disk's chain
    third, err = start(fleece, vm, "--drive", "vda")
    assert third["level"] == "full" and "no fleece checkpoint bitmap" in err
    stop(fleece, vm)


def test_checkpoint_id_must_sort_after_the_parent(vm: Any, fleece: Any) -> None:
    first, _ = start(fleece, vm, "--drive", "vda")
    stop(fleece, vm)
    before = vm.block_graph()
    res = fleece("export", "start", "--bounded-requests", "--qmp", vm.qmp_path, "--drive", "vda",
                 "--checkpoint", "20000101T000000.000000Z-000000")
    assert res.rc == 2 and "does not sort after" in res.err
    assert vm.block_graph() == before
    given = "29990101T000000.000000Z-123abc"
    disk, _ = start(fleece, vm, "--drive", "vda", "--checkpoint", given)
    assert (disk["checkpoint"], disk["since"]) == (given, first["checkpoint"])
    stop(fleece, vm)
