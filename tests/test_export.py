"""`fleece export start/stop` on real VMs: the snapshot's bytes, the checkpoint chain, QEMU left as found."""

from __future__ import annotations

import os
import shlex
import stat
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("scratch_tmpdir")

MiB = 1 << 20
G = 64 * 1024  # bitmap granularity of a 64 KiB-cluster qcow2


def granules(*writes: tuple[int, int]) -> set[int]:
    """Granule offsets touched by writes given as (offset, length)."""
    return {g for off, n in writes for g in range(off - off % G, off + n, G)}


def start(fleece: Any, vm: Any, *args: str) -> dict[str, Any]:
    res = fleece("export", "start", "--bounded-requests", "--qmp", vm.qmp_path, *args, "--json")
    assert res.rc == 0, res.err
    return dict(res.json())


def stop(fleece: Any, vm: Any, *args: str) -> str:
    res = fleece("export", "stop", "--qmp", vm.qmp_path, *args)
    assert res.rc == 0, res.err
    return str(res.out)


def checkpoints(vm: Any, drive: str = "vda") -> dict[str, dict[str, Any]]:
    return {n: b for n, b in vm.bitmaps(drive).items() if n.startswith("fleece-2")}


def test_snapshot_keeps_old_bytes_and_stop_leaves_qemu_as_found(
        vm: Any, fleece: Any, nbd_connect: Any) -> None:
    vm.write("vda", 0, 1 * MiB, 0x11)
    vm.write("vda", 8 * MiB, 256 * 1024, 0x22)
    before = vm.block_graph()

    out = start(fleece, vm, "--drive", "vda")
    (disk,) = out["disks"]
    assert disk["drive"] == "vda" and disk["size"] == 64 * MiB
    assert disk["dirty_bitmap"] is None and disk["since"] is None  # first export: full
    assert disk["uri"].startswith("nbd+unix:///vda?socket=/")
    assert out["pause_ms"] is None  # the VM is in prelaunch: never paused, never resumed
    assert vm.attached_node("vda") == "fleece-cbw-vda"
    scratch = os.path.dirname(out["socket"])
    assert stat.S_IMODE(os.stat(scratch).st_mode) == 0o700
    # status looks through the filter at the format node and its checkpoint bitmap.
    status = fleece("status", "--qmp", vm.qmp_path, "--json").json()
    (shown,) = status["disks"]
    assert (shown["node"], shown["filter"], shown["format"]) == ("fmt-vda", "fleece-cbw-vda", "qcow2")
    assert [b["checkpoint"] for b in shown["bitmaps"]] == [disk["checkpoint"]]
    # Left up by `export start`: `export stop` ends it.
    assert status["export"] == {"checkpoint": disk["checkpoint"], "drives": ["vda"], "socket": out["socket"],
                                "owner": "export", "pid": status["export"]["pid"],
                                "host": os.uname().nodename,
                                "owner_exited": False,
                                "end_with": f"fleece export stop --qmp {shlex.quote(vm.qmp_path)}"}

    # The guest overwrites both patterns and a never-written region while the export is up.
    vm.write("vda", 0, 1 * MiB, 0x99)
    vm.write("vda", 8 * MiB, 256 * 1024, 0x98)
    vm.write("vda", 32 * MiB, 64 * 1024, 0x97)

    conn = nbd_connect(disk["uri"])
    assert conn.size == 64 * MiB
    assert conn.read(0, 1 * MiB) == b"\x11" * MiB
    assert conn.read(8 * MiB, 256 * 1024) == b"\x22" * 256 * 1024
    assert conn.read(32 * MiB, 64 * 1024) == bytes(64 * 1024)
    assert conn.read(1 * MiB, 64 * 1024) == bytes(64 * 1024)
    assert conn.h.is_read_only() and not conn.h.can_trim()  # read-only without --discard
    with pytest.raises(Exception, match="trim"):
        conn.trim(0, G)
    conn.close()
    assert vm.qmp("query-status")["status"] == "prelaunch"

    msg = stop(fleece, vm)
    assert "committed" in msg
    after = vm.block_graph()
    new = "fleece-" + disk["checkpoint"]
    # Exactly as before, plus the new checkpoint: persistent and recording.
    assert after["bitmaps"]["vda"] == [(new, True, True)]
    assert {**after, "bitmaps": before["bitmaps"]} == before
    assert not os.path.exists(scratch)

    # The guest's writes went to the disk itself; --level full ignores the checkpoint,
    # and aborting a full export removes only its own new bitmap.
    again = start(fleece, vm, "--drive", "vda", "--level", "full")["disks"][0]
    assert (again["since"], again["dirty_bitmap"], again["level"]) == (None, None, "full")
    conn = nbd_connect(again["uri"])
    assert conn.read(0, 1 * MiB) == b"\x99" * MiB
    assert conn.read(32 * MiB, 64 * 1024) == b"\x97" * 64 * 1024
    conn.close()
    stop(fleece, vm, "--abort")
    assert vm.block_graph() == after


def test_dirty_bitmap_chain_commit_and_abort(vm: Any, fleece: Any, nbd_connect: Any) -> None:
    vm.write("vda", 0, 4 * MiB, 0x01)
    first = start(fleece, vm, "--drive", "vda")["disks"][0]
    # While the first export is up, and after it: both must be in the next incremental.
    during = [(1 * MiB, 64 * 1024), (5 * MiB + 4096, 4096)]
    for off, n in during:
        vm.write("vda", off, n, 0x02)
    stop(fleece, vm)
    after = [(20 * MiB, 200 * 1024), (63 * MiB, 1 * MiB)]
    for off, n in after:
        vm.write("vda", off, n, 0x03)

    second = start(fleece, vm, "--drive", "vda")["disks"][0]
    assert second["since"] == first["checkpoint"]
    assert second["dirty_bitmap"] == "qemu:dirty-bitmap:fleece-tmp-vda"
    assert second["checkpoint"] > first["checkpoint"]
    assert set(checkpoints(vm)) == {"fleece-" + first["checkpoint"], "fleece-" + second["checkpoint"]}
    conn = nbd_connect(second["uri"], second["dirty_bitmap"])
    assert conn.dirty_granules() == granules(*during, *after)
    assert conn.read(20 * MiB, 4096) == b"\x03" * 4096
    conn.close()
    later = [(40 * MiB, 64 * 1024)]
    vm.write("vda", *later[0], 0x04)

    assert "aborted" in stop(fleece, vm, "--abort")
    # Abort drops the second checkpoint; the first never stopped recording.
    assert set(checkpoints(vm)) == {"fleece-" + first["checkpoint"]}

    third = start(fleece, vm, "--drive", "vda")["disks"][0]
    assert third["since"] == first["checkpoint"]
    conn = nbd_connect(third["uri"], third["dirty_bitmap"])
    assert conn.dirty_granules() == granules(*during, *after, *later)
    conn.close()
    stop(fleece, vm)
    (name,) = checkpoints(vm)
    assert name == "fleece-" + third["checkpoint"]
    assert checkpoints(vm)[name]["count"] == 0


def pause_events(vm: Any) -> list[str]:
    """STOP/RESUME events QEMU sent to the test's monitor, up to the first RESUME."""
    seen = []
    while "RESUME" not in seen:
        event = vm._mon().pull_event(wait=5.0)
        if event is None:
            break
        if event["event"] in ("STOP", "RESUME"):
            seen.append(event["event"])
    return seen


def test_two_disks_share_one_point_and_the_pause_is_reported(
        make_vm: Any, fleece: Any, nbd_connect: Any) -> None:
    vm = make_vm([("qcow2", "16M"), ("qcow2", "16M")], running=True)
    vm.write("vda", 0, 64 * 1024, 0xA1)
    vm.write("vdb", 0, 64 * 1024, 0xB1)
    before = vm.block_graph()
    vm._mon().clear_events()

    out = start(fleece, vm, "--drive", "vda", "--drive", "vdb")
    assert isinstance(out["pause_ms"], float) and 0 < out["pause_ms"] < 5000
    (point,) = {d["checkpoint"] for d in out["disks"]}
    assert point == out["checkpoint"]
    assert pause_events(vm) == ["STOP", "RESUME"]  # one pause for both devices
    assert vm.qmp("query-status")["status"] == "running"
    assert vm.attached_node("vda") == "fleece-cbw-vda" and vm.attached_node("vdb") == "fleece-cbw-vdb"

    vm.write("vda", 0, 64 * 1024, 0xA2)
    vm.write("vdb", 0, 64 * 1024, 0xB2)
    a, b = (nbd_connect(d["uri"]) for d in out["disks"])
    assert a.read(0, 64 * 1024) == b"\xa1" * 64 * 1024
    assert b.read(0, 64 * 1024) == b"\xb1" * 64 * 1024

    stop(fleece, vm)
    after = vm.block_graph()
    assert {**after, "bitmaps": before["bitmaps"]} == before
    for drive in ("vda", "vdb"):
        assert list(checkpoints(vm, drive)) == ["fleece-" + point]


def test_drive_by_node_name_and_backend_name_human_output(make_vm: Any, fleece: Any) -> None:
    vm = make_vm([("qcow2", "16M"), ("raw", "16M")])
    res = fleece("export", "start", "--bounded-requests",
                 "--qmp", vm.qmp_path, "--drive", "fmt-vda", "--drive", "vdb")
    assert res.rc == 0, res.err
    assert "fmt-vda: nbd+unix:///fmt-vda?socket=" in res.out
    assert "checkpoint lives only while QEMU runs" in res.out
    assert "raw image cannot hold persistent bitmaps" in res.err
    assert "full because" in res.err
    stop(fleece, vm)
    # On raw, the checkpoint exists but cannot be persistent.
    assert [(b["persistent"], b["recording"]) for b in checkpoints(vm, "vdb").values()] == [(False, True)]


def test_discard_allows_aligned_trims_only(vm: Any, fleece: Any, nbd_connect: Any) -> None:
    vm.write("vda", 0, 2 * MiB, 0x33)
    out = start(fleece, vm, "--drive", "vda", "--discard")
    assert out["trim_alignment"] == 65536
    disk = out["disks"][0]
    assert disk["discard"] is True
    vm.write("vda", 0, 2 * MiB, 0x44)  # the old bytes now live in the reverse delta
    delta = os.path.join(os.path.dirname(out["socket"]), "delta-vda.raw")
    used = os.stat(delta).st_blocks * 512
    assert used >= 2 * MiB
    conn = nbd_connect(disk["uri"])
    assert conn.read(0, 64 * 1024) == b"\x33" * 64 * 1024
    conn.trim(0, 2 * MiB)  # what the reader does after it has read the chunks
    assert os.stat(delta).st_blocks * 512 < used
    conn.close()
    stop(fleece, vm)
    assert vm.block_graph()["nodes"] == ["file-vda", "fmt-vda"]
