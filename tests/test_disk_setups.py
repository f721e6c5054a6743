"""Disks as operators really configure them: resized, on a backing chain, read-only, in an
iothread, behind scsi-hd, ide-hd and nvme; and a VM whose migration has finished.

Each runs a real QEMU, backs up through the CLI and restores to a file that
must equal the disk as the guest sees it (a shadow image every guest write is
mirrored into).
"""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from backups import backup, identical, restore
from conftest import DiskSpec
from guarantee_check import proved_in_part

from fleece.fleecing.vm_checks import SAFE_IOTHREAD_EXPORTS

MiB = 1 << 20
CHUNK = 4 * MiB

pytestmark = pytest.mark.qemu


def test_a_disk_grown_between_backups_is_backed_up_whole_at_its_new_size(
        make_vm: Any, fleece: Any, tmp_path: Path) -> None:
    """block_resize keeps the checkpoint bitmap, which does not mark the new area dirty: the next
    backup must still be complete (fleece makes it full, saying why) and restore at the new size."""
    vm = make_vm([("qcow2", "32M")])
    repo = tmp_path / "repo"
    vm.write("vda", 0, MiB, 0x11)
    first = backup(fleece, vm, repo)
    p1 = vm.snapshot_shadow("vda", tmp_path / "p1.raw")
    vm.qmp("block_resize", **{"node-name": "fmt-vda", "size": 48 * MiB})
    with open(vm.shadow("vda"), "r+b") as f:
        f.truncate(48 * MiB)
    vm.write("vda", 40 * MiB, MiB, 0x22)  # in the new area
    vm.write("vda", 4 * MiB, MiB, 0x33)   # and in the old one
    second = backup(fleece, vm, repo)
    disk = second["disks"][0]
    assert disk["size"] == 48 * MiB
    assert disk["level"] == "full" and "bytes now" in (disk["reason"] or ""), disk
    out = restore(fleece, repo, second["point"], tmp_path / "r2.raw")
    assert out.stat().st_size == 48 * MiB and identical(out, vm.shadow("vda"))
    assert identical(restore(fleece, repo, first["point"], tmp_path / "r1.raw"), p1)
    # The chain goes on from the resized disk.
    vm.write("vda", 44 * MiB, MiB, 0x44)
    third = backup(fleece, vm, repo)
    # Only the 1 MiB written since, stored as a delta of its chunk.
    assert third["disks"][0]["level"] == "incremental" and third["disks"][0]["bytes_read"] == MiB
    assert identical(restore(fleece, repo, third["point"], tmp_path / "r3.raw"), vm.shadow("vda"))


def test_an_overlay_on_a_backing_file_is_backed_up_with_the_full_view(
        make_vm: Any, fleece: Any, tmp_path: Path) -> None:
    """Data only in the backing file is part of the disk: block status of the overlay alone
    says 'unallocated' there, and a backup that skipped it would restore holes."""
    d = tmp_path / "chain"
    d.mkdir()
    base_raw = d / "base.raw"
    base_raw.write_bytes(random.Random(5).randbytes(24 * MiB))
    base = d / "base.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(base_raw),
                    str(base)], check=True)
    overlay = d / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(overlay)], check=True)
    shadow = d / "vda.shadow.raw"
    shadow.write_bytes(base_raw.read_bytes())
    vm = make_vm.start(d, [DiskSpec("vda", overlay, "qcow2", 24 * MiB, shadow=shadow)])
    vm.write("vda", 8 * MiB, MiB, 0x5E)  # the overlay holds this, the base the rest
    repo = tmp_path / "repo"
    first = backup(fleece, vm, repo)
    assert first["disks"][0]["bytes_read"] == 24 * MiB
    assert identical(restore(fleece, repo, first["point"], tmp_path / "r1.raw"), shadow)
    vm.write("vda", 16 * MiB, 4096, 0x6F)
    second = backup(fleece, vm, repo)
    assert second["disks"][0]["level"] == "incremental"
    assert identical(restore(fleece, repo, second["point"], tmp_path / "r2.raw"), shadow)


def test_a_read_only_drive_is_backed_up_and_left_as_found(
        make_vm: Any, fleece: Any, tmp_path: Path) -> None:
    seed = tmp_path / "seed.raw"
    seed.write_bytes(random.Random(7).randbytes(16 * MiB))
    vm = make_vm([("qcow2", "16M")], contents={"vda": seed})
    vm.kill()
    spec = vm.disks[0]
    spec.node_opts = ",read-only=on"
    vm = make_vm.start(vm.dir, [spec])
    graph = vm.block_graph()
    repo = tmp_path / "repo"
    first = backup(fleece, vm, repo)
    assert identical(restore(fleece, repo, first["point"], tmp_path / "r1.raw"), seed)
    second = backup(fleece, vm, repo)
    # Nothing can write it: the next backup is an incremental that reads nothing.
    assert second["disks"][0]["level"] == "incremental" and second["disks"][0]["bytes_read"] == 0
    assert identical(restore(fleece, repo, second["point"], tmp_path / "r2.raw"), seed)
    after = vm.block_graph()
    assert after["nodes"] == graph["nodes"] and after["exports"] == [] and after["jobs"] == []
    assert after["attached"] == graph["attached"]


def qemu_version(vm: Any) -> tuple[int, int, int]:
    q = vm.qmp("query-version")["qemu"]
    return (q["major"], q["minor"], q["micro"])


def test_a_device_in_an_iothread_is_backed_up_or_refused_without_harming_the_guest(
        make_vm: Any, fleece: Any, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """QEMU < 9.0 aborts when an NBD client leaves an export running in an iothread (seen on
    7.2: the guest dies at the first reader's disconnect). There fleece refuses in one line and
    changes nothing; from 9.0 on the backup runs and restores identical. Each QEMU proves one
    half, and the run says which (``proved_in_part``)."""
    vm = make_vm([("qcow2", "32M")], running=True, extra_args=["-object", "iothread,id=io0"],
                 device_opts={"vda": ",iothread=io0"})
    repo = tmp_path / "repo"
    vm.write("vda", 0, 2 * MiB, 0x21)
    graph = vm.block_graph()
    version = qemu_version(vm)
    if version < SAFE_IOTHREAD_EXPORTS:
        for args in (["backup", "--repo", str(repo)], ["export", "start", "--bounded-requests"]):
            r = fleece(*args, "--qmp", vm.qmp_path, "--drive", "vda")
            assert r.rc == 1, r.out + r.err
            lines = r.err.strip().splitlines()
            assert len(lines) == 1 and "iothread io0" in lines[0], r.err
            assert "nothing was changed" in lines[0] and "Traceback" not in r.err
            assert vm.block_graph() == graph and vm.proc.poll() is None
        assert not repo.exists()
        vm.write("vda", 4 * MiB, MiB, 0x23)  # the guest's disk still works
        proved_in_part(request, f"only the refusal: QEMU {'.'.join(map(str, version))} < 9.0 cannot "
                                "export from an iothread safely, so the backup half needs QEMU >= 9.0")
    else:
        first = backup(fleece, vm, repo)
        assert identical(restore(fleece, repo, first["point"], tmp_path / "r1.raw"), vm.shadow("vda"))
        vm.write("vda", 20 * MiB, MiB, 0x22)
        second = backup(fleece, vm, repo)
        assert second["disks"][0]["level"] == "incremental"
        assert identical(restore(fleece, repo, second["point"], tmp_path / "r2.raw"), vm.shadow("vda"))
        after = vm.block_graph()
        assert after["nodes"] == graph["nodes"] and after["attached"] == graph["attached"]
        proved_in_part(request, f"only the backup: QEMU {'.'.join(map(str, version))} >= 9.0 exports "
                                "from an iothread, so the refusal half needs QEMU < 9.0")


def test_a_scsi_disk_behind_a_controller_in_an_iothread_is_seen_as_in_it(make_vm: Any) -> None:
    """The iothread of a scsi-hd is its controller's: found by walking up from the device."""
    import asyncio

    from fleece.fleecing.vm_checks import device_iothread
    from fleece.qmp import QmpSession

    vm = make_vm([("qcow2", "16M")], models=["scsi"],
                 extra_args=["-object", "iothread,id=io1", "-global", "virtio-scsi-pci.iothread=io1"])

    qdev = vm.qdev("vda")

    async def look() -> str | None:
        async with QmpSession.open(vm.qmp_path) as session:
            return await device_iothread(session, qdev)

    assert asyncio.run(look()) == "/objects/io1"


@pytest.mark.parametrize("model", ["scsi", "ide", "nvme"])
def test_scsi_ide_and_nvme_disks_back_up_and_restore_identical(
        make_vm: Any, fleece: Any, tmp_path: Path, model: str) -> None:
    vm = make_vm([("qcow2", "32M")], models=[model], running=True)
    repo = tmp_path / "repo"
    vm.write("vda", 0, 3 * MiB, 0x31)
    vm.write("vda", 30 * MiB, 64 * 1024, 0x32)
    first = backup(fleece, vm, repo)
    p1 = vm.snapshot_shadow("vda", tmp_path / "p1.raw")
    vm.write("vda", 12 * MiB, MiB, 0x33)
    second = backup(fleece, vm, repo)
    assert second["disks"][0]["level"] == "incremental"
    assert second["disks"][0]["bytes_read"] == MiB  # what was written since, as a delta
    assert identical(restore(fleece, repo, first["point"], tmp_path / "r1.raw"), p1)
    assert identical(restore(fleece, repo, second["point"], tmp_path / "r2.raw"), vm.shadow("vda"))
    assert vm.attached_node("vda") == "fmt-vda" and vm.block_graph()["exports"] == []


def test_a_vm_whose_migration_has_finished_is_refused_in_one_line_and_left_as_found(
        make_vm: Any, fleece: Any, tmp_path: Path) -> None:
    """After a migration its disks belong to the destination (inactive here: QEMU 10 says so in
    query-named-block-nodes, 7.2 only through the run state): nothing may be set up on them."""
    vm = make_vm([("qcow2", "16M")], running=True)
    vm.qmp("migrate", uri=f"exec:cat > {tmp_path / 'migration.bin'}")
    deadline = time.monotonic() + 60
    while vm.qmp("query-migrate").get("status") != "completed":
        assert time.monotonic() < deadline, vm.qmp("query-migrate")
        time.sleep(0.1)
    graph = vm.block_graph()
    repo = tmp_path / "repo"
    for args in (["backup", "--repo", str(repo)], ["export", "start", "--bounded-requests"]):
        r = fleece(*args, "--qmp", vm.qmp_path, "--drive", "vda")
        assert r.rc == 1, r.out + r.err
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and "migrat" in lines[0] and "nothing was changed" in lines[0], r.err
        assert "Traceback" not in r.err
        assert vm.block_graph() == graph
    assert not repo.exists()
