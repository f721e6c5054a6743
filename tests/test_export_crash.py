"""QEMU killed, reverse delta full: the next export says why it is full, the guest never suffers."""

from __future__ import annotations

import contextlib
import subprocess
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("scratch_tmpdir")

MiB = 1 << 20


def start(fleece: Any, vm: Any, *args: str) -> Any:
    res = fleece("export", "start", "--bounded-requests", "--qmp", vm.qmp_path, *args, "--json")
    assert res.rc == 0, res.err
    return res.json()["disks"][0], res.err


def stop(fleece: Any, vm: Any, *args: str) -> None:
    res = fleece("export", "stop", "--qmp", vm.qmp_path, *args)
    assert res.rc == 0, res.err


def checkpoints(vm: Any) -> dict[str, dict[str, Any]]:
    return {n: b for n, b in vm.bitmaps("vda").items() if n.startswith("fleece-2")}


def test_sigkill_makes_the_next_export_full_and_says_why(make_vm: Any, fleece: Any, nbd_connect: Any) -> None:
    vm = make_vm([("qcow2", "16M")])
    a, _ = start(fleece, vm, "--drive", "vda")
    stop(fleece, vm)
    # A clean quit stores the persistent bitmap in the image...
    vm = make_vm.restart(vm, kill=False)
    assert checkpoints(vm)["fleece-" + a["checkpoint"]]["persistent"] is True
    vm.write("vda", 0, 64 * 1024, 0x11)
    b, _ = start(fleece, vm, "--drive", "vda")
    assert b["since"] == a["checkpoint"]
    stop(fleece, vm)

    # ...SIGKILL does not: the bitmap made in that run is gone (and the commit
    # had already removed the older one from the image).
    vm = make_vm.restart(vm, kill=True)
    assert checkpoints(vm) == {}
    c, err = start(fleece, vm, "--drive", "vda")
    assert (c["level"], c["since"], c["dirty_bitmap"]) == ("full", None, None)
    assert "full because vda: no fleece checkpoint bitmap on node fmt-vda" in err
    stop(fleece, vm)

    # A bitmap stored at a clean quit, then a SIGKILL: it comes back inconsistent.
    vm = make_vm.restart(vm, kill=False)
    vm.write("vda", 0, 64 * 1024, 0x22)
    vm = make_vm.restart(vm, kill=True)
    bitmaps = checkpoints(vm)
    assert list(bitmaps) == ["fleece-" + c["checkpoint"]]
    assert bitmaps["fleece-" + c["checkpoint"]].get("inconsistent") is True
    d, err = start(fleece, vm, "--drive", "vda")
    assert (d["level"], d["since"]) == ("full", None)
    assert f"full because vda: checkpoint bitmap fleece-{c['checkpoint']} on fmt-vda is inconsistent" in err
    assert "inconsistent" in d["reason"]
    conn = nbd_connect(d["uri"])
    assert conn.read(0, 64 * 1024) == b"\x22" * 64 * 1024
    conn.close()
    stop(fleece, vm)
    # The commit drops the unusable bitmap: the chain starts again from here.
    assert list(checkpoints(vm)) == ["fleece-" + d["checkpoint"]]

    # Killed while an incremental export is up: after the restart nothing of the
    # export is left in QEMU, and the next export is full, saying why.
    vm = make_vm.restart(vm, kill=False)
    e, _ = start(fleece, vm, "--drive", "vda")
    assert e["since"] == d["checkpoint"]
    vm = make_vm.restart(vm, kill=True)
    assert vm.block_graph()["nodes"] == ["file-vda", "fmt-vda"]
    assert vm.block_graph()["exports"] == []
    f, err = start(fleece, vm, "--drive", "vda")
    assert f["level"] == "full" and "inconsistent" in err
    stop(fleece, vm)


@pytest.fixture
def tiny_tmpfs(short_tmp: Any) -> Any:
    """A 1 MiB tmpfs: the reverse delta fills it after 1 MiB of overwrites."""
    mnt = short_tmp / "tiny"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M,mode=0755", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_reverse_delta_out_of_space_breaks_the_snapshot_not_the_guest(
        make_vm: Any, fleece: Any, nbd_connect: Any,
        tiny_tmpfs: Any) -> None:
    vm = make_vm([("qcow2", "16M")])
    vm.write("vda", 0, 4 * MiB, 0x5A)
    before = vm.block_graph()
    disk, _ = start(fleece, vm, "--drive", "vda", "--scratch-dir", str(tiny_tmpfs))
    conn = nbd_connect(disk["uri"])
    assert conn.read(0, 64 * 1024) == b"\x5a" * 64 * 1024

    # 4 MiB of overwrites need 4 MiB of reverse delta; there is 1 MiB.
    vm.write("vda", 0, 4 * MiB, 0x77)
    status = {b["qdev"]: b.get("io-status") for b in vm.qmp("query-block")}
    assert set(status.values()) <= {"ok", None}
    assert vm.qmp("query-status")["status"] == "prelaunch"  # not paused on an I/O error
    with pytest.raises(Exception, match=r"Invalid argument|EINVAL|Input/output"):
        conn.read(3 * MiB, 64 * 1024)
    conn.close()

    stop(fleece, vm)
    after = vm.block_graph()
    assert {**after, "bitmaps": before["bitmaps"]} == before
    assert list(tiny_tmpfs.iterdir()) == []

    # The guest's writes all landed.
    check, _ = start(fleece, vm, "--drive", "vda")
    conn = nbd_connect(check["uri"])
    assert conn.read(0, 4 * MiB) == b"\x77" * 4 * MiB
    conn.close()
    stop(fleece, vm, "--abort")
