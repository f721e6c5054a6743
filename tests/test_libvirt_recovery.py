"""After a crash, a kill or a restart, the next ``fleece backup --libvirt`` heals and goes on.

Each scenario is what an unattended nightly backup meets on a real libvirtd
(``tests/libvirt_host.py``): QEMU killed, a disk restored in place, the domain
destroyed mid-backup, libvirtd restarted mid-backup, ``export stop`` typed
during a backup. Each is followed by a plain ``fleece backup --libvirt D``
that succeeds, says why a disk is full, and restores bit-identical to the
guest's disk (its shadow image).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from backups import identical
from test_libvirt import GRANULE, MiB, backup, levels, lv, one_line_error, restore

from fleece.libvirt.offline import image_bitmaps


def point_ids(fleece: Any, repo: Path) -> list[str]:
    res = fleece("list", "--repo", repo, "--json")
    assert res.rc == 0, res.err
    return [p["id"] for p in res.json()["points"]]


def test_qemu_killed_makes_the_next_backup_full_with_the_reason_and_drops_the_stale_checkpoint(
        make_domain: Any, fleece: Any, tmp_path: Any, scratch_tmpdir: Any) -> None:
    vm = make_domain()
    repo = tmp_path / "repo"
    vm.write("vda", 0, 2 * MiB, 0x11)
    p1, _ = backup(fleece, vm, repo)

    # The checkpoint made in this QEMU run lives only in QEMU's memory: SIGKILL loses its bitmap.
    vm.write("vda", 8 * MiB, MiB, 0x12)
    vm.flush("vda")
    vm.kill_qemu()
    vm.start()
    assert vm.checkpoints() == [f"fleece-{p1['point']}"] and vm.qcow2_bitmaps("vda") == []
    p2, err = backup(fleece, vm, repo)
    reason = p2["disks"][0]["reason"]
    assert levels(p2) == {"vda": "full"} and f"checkpoint fleece-{p1['point']} is missing or broken" in reason
    assert f"fleece: full because {reason}" in err.splitlines()
    assert identical(restore(fleece, repo, p2["point"], "vda", tmp_path / "r2"), vm.disk("vda").shadow)
    assert vm.libvirt_state() == {"checkpoints": {f"fleece-{p2['point']}": None}, "job": "None",
                                  "state": "paused"}

    # Stored at a clean exit, then SIGKILL: the bitmap comes back inconsistent. The domain is
    # shut off: cleanup drops the stale checkpoint offline, and says what it did.
    vm.shut_down()
    vm.start()
    vm.write("vda", 20 * MiB, 4096, 0x13)
    vm.flush("vda")
    vm.kill_qemu()
    res = lv(fleece, vm, "cleanup")
    assert res.rc == 0 and f"checkpoint fleece-{p2['point']}" in res.out, res.err
    assert "missing or broken" in res.err
    assert vm.checkpoints() == [] and image_bitmaps(vm.disk("vda").path) == {}
    assert lv(fleece, vm, "cleanup").out.strip() == "nothing to clean up"
    vm.start()
    p3, err = backup(fleece, vm, repo)
    assert levels(p3) == {"vda": "full"} and "full because" in err
    assert identical(restore(fleece, repo, p3["point"], "vda", tmp_path / "r3"), vm.disk("vda").shadow)

    # The chain goes on from there.
    vm.write("vda", 0, 4096, 0x14)
    p4, _ = backup(fleece, vm, repo)
    assert levels(p4) == {"vda": "incremental"} and p4["parent"] == p3["point"]
    assert p4["disks"][0]["bytes_read"] == GRANULE
    assert identical(restore(fleece, repo, p4["point"], "vda", tmp_path / "r4"), vm.disk("vda").shadow)

    # Inconsistent while the domain runs, and --level full: the point is stored and the run
    # succeeds (it used to fail deleting the stale checkpoint); no stale bitmap is left.
    vm.shut_down()
    vm.start()
    vm.write("vda", 24 * MiB, 4096, 0x15)
    vm.flush("vda")
    vm.kill_qemu()
    vm.start()
    p5, _ = backup(fleece, vm, repo, "--level", "full")
    assert levels(p5) == {"vda": "full"}
    assert identical(restore(fleece, repo, p5["point"], "vda", tmp_path / "r5"), vm.disk("vda").shadow)
    assert vm.checkpoints() == vm.qcow2_bitmaps("vda") == [f"fleece-{p5['point']}"]
    assert list(scratch_tmpdir.iterdir()) == []


def test_a_disk_restored_in_place_makes_the_next_backup_full_with_the_reason(
        make_domain: Any, fleece: Any, tmp_path: Any) -> None:
    vm = make_domain()
    repo = tmp_path / "repo"
    vm.write("vda", 0, 2 * MiB, 0x21)
    p1, _ = backup(fleece, vm, repo)
    vm.write("vda", 4 * MiB, MiB, 0x22)
    backup(fleece, vm, repo)

    # The administrator rolls the disk back to p1 in place, domain shut off.
    vm.shut_down()
    res = fleece("restore", "--repo", repo, p1["point"], "--drive", "vda", "--output", vm.disk("vda").path,
                 "--format", "qcow2", "--force")
    assert res.rc == 0, res.err
    restore(fleece, repo, p1["point"], "vda", tmp_path / "p1.raw")
    shutil.copyfile(tmp_path / "p1.raw", vm.disk("vda").shadow)
    vm.start()
    vm.write("vda", 30 * MiB, 4096, 0x23)

    p3, err = backup(fleece, vm, repo)
    assert levels(p3) == {"vda": "full"}
    assert "is missing or broken" in p3["disks"][0]["reason"] and "full because" in err
    assert identical(restore(fleece, repo, p3["point"], "vda", tmp_path / "r3"), vm.disk("vda").shadow)
    assert vm.checkpoints() == [f"fleece-{p3['point']}"]


def test_the_domain_destroyed_mid_backup_fails_that_backup_and_the_next_one_after_the_start_succeeds(
        make_domain: Any, fleece: Any, tmp_path: Any, scratch_tmpdir: Any, hold_backup: Any) -> None:
    vm = make_domain()
    repo = tmp_path / "repo"
    vm.write("vda", 0, 2 * MiB, 0x31)
    p1, _ = backup(fleece, vm, repo)
    vm.write("vda", 10 * MiB, MiB, 0x32)
    vm.flush("vda")

    held = hold_backup(vm, repo, "export-live")
    held.wait_held()
    vm.virsh("destroy", vm.name)
    rc, out, err = held.release()
    one_line_error(SimpleNamespace(rc=rc, out=out, err=err), 1)
    assert f"domain {vm.name} stopped during the backup; aborted it and removed" in err, err
    assert point_ids(fleece, repo) == [p1["point"]]

    # Shut off: status and cleanup answer, and cleanup has nothing left to loop on.
    res = lv(fleece, vm, "status")
    assert res.rc == 0 and "shut off" in res.out, res.err
    res = lv(fleece, vm, "cleanup")
    assert res.rc == 0, res.err
    assert lv(fleece, vm, "cleanup").out.strip() == "nothing to clean up"
    assert len(vm.checkpoints()) <= 1
    assert list(scratch_tmpdir.iterdir()) == []

    vm.start()
    vm.write("vda", 40 * MiB, 4096, 0x33)
    p2, err = backup(fleece, vm, repo)
    if levels(p2) == {"vda": "full"}:
        assert "full because" in err
    else:  # QEMU stored its bitmaps on the way out: the chain holds
        assert p2["parent"] == p1["point"] and p2["disks"][0]["bytes_read"] == MiB + GRANULE
    assert identical(restore(fleece, repo, p2["point"], "vda", tmp_path / "r2"), vm.disk("vda").shadow)
    assert vm.checkpoints() == [f"fleece-{p2['point']}"]


def test_libvirtd_restarted_or_stopped_after_the_point_is_stored_the_backup_still_succeeds(
        make_domain: Any, libvirt_host: Any, fleece: Any, tmp_path: Any, scratch_tmpdir: Any,
        hold_backup: Any) -> None:
    vm = make_domain()
    repo = tmp_path / "repo"
    vm.write("vda", 0, 2 * MiB, 0x41)
    backup(fleece, vm, repo)

    # Restarted: the commit is done on a new connection.
    vm.write("vda", 6 * MiB, MiB, 0x42)
    held = hold_backup(vm, repo, "before-point")
    held.wait_held()
    libvirt_host.restart_libvirtd()
    rc, out, err = held.release()
    assert rc == 0, err
    p2 = json.loads(out)
    assert "connection to libvirtd broke" in err and "on a new connection" in err, err
    assert vm.libvirt_state() == {"checkpoints": {f"fleece-{p2['point']}": None}, "job": "None",
                                  "state": "paused"}

    # Stopped until after the backup ends: the point is stored, the commit is left (and said),
    # and the next backup finishes it, saying so.
    vm.write("vda", 12 * MiB, MiB, 0x43)
    held = hold_backup(vm, repo, "before-point")
    held.wait_held()
    libvirt_host.stop_libvirtd()
    try:
        rc, out, err = held.release()
    finally:
        libvirt_host.start_libvirtd()
    assert rc == 0, err
    p3 = json.loads(out)
    assert point_ids(fleece, repo)[-1] == p3["point"]
    assert f"restore point {p3['point']} is stored" in err and "next fleece backup" in err, err
    assert lv(fleece, vm, "status", "--json").json()["leftovers"]

    vm.write("vda", 30 * MiB, 4096, 0x44)
    p4, err = backup(fleece, vm, repo)
    assert "finished the commit it had decided" in err, err
    assert levels(p4) == {"vda": "incremental"} and p4["parent"] == p3["point"]
    assert p4["disks"][0]["bytes_read"] == GRANULE
    for p in (p3, p4):
        assert identical(restore(fleece, repo, p["point"], "vda", tmp_path / f"r-{p['point']}"),
                         vm.disk("vda").shadow) == (p is p4)
    assert vm.libvirt_state() == {"checkpoints": {f"fleece-{p4['point']}": None}, "job": "None",
                                  "state": "paused"}
    assert list(scratch_tmpdir.iterdir()) == []


def test_export_stop_refuses_an_export_a_running_backup_holds(
        make_domain: Any, fleece: Any, tmp_path: Any, hold_backup: Any) -> None:
    vm = make_domain()
    repo = tmp_path / "repo"
    vm.write("vda", 0, 2 * MiB, 0x51)
    p1, _ = backup(fleece, vm, repo)
    vm.write("vda", 16 * MiB, MiB, 0x52)

    held = hold_backup(vm, repo, "export-live")
    held.wait_held()
    before = vm.libvirt_state()
    for args in (["export", "stop"], ["export", "stop", "--abort"]):
        line = one_line_error(lv(fleece, vm, *args), 1)
        assert f"belongs to a fleece backup that is running (pid {held.proc.pid})" in line
        assert vm.libvirt_state() == before
    st = lv(fleece, vm, "status")  # and status does not tell the user to run it
    assert "a fleece backup holds an export" in st.out and "export stop" not in st.out, st.out
    rc, out, err = held.release()
    assert rc == 0, err
    p2 = json.loads(out)
    assert levels(p2) == {"vda": "incremental"} and p2["parent"] == p1["point"]

    vm.write("vda", 20 * MiB, 4096, 0x53)
    p3, _ = backup(fleece, vm, repo)
    assert levels(p3) == {"vda": "incremental"} and p3["parent"] == p2["point"]
    assert identical(restore(fleece, repo, p3["point"], "vda", tmp_path / "r3"), vm.disk("vda").shadow)


def test_a_raw_disk_is_backed_up_full_every_time_said_once(make_domain: Any, fleece: Any,
                                                             tmp_path: Any) -> None:
    vm = make_domain([("qcow2", 32 * MiB), ("raw", 16 * MiB)])
    repo = tmp_path / "repo"
    vm.write("vda", 0, MiB, 0x61)
    vm.write("vdb", 0, MiB, 0x62)
    res = lv(fleece, vm, "backup", "--repo", repo)
    assert res.rc == 0, res.err
    raw = "vdb: a raw image cannot hold persistent bitmaps"
    assert (res.out + res.err).count(raw) == 1  # said once, not on both stdout and stderr
    assert (res.out + res.err).count("full because vda: no fleece checkpoint") == 1
    p1 = point_ids(fleece, repo)[-1]
    assert vm.checkpoints() == [f"fleece-{p1}"]

    vm.write("vda", 12 * MiB, 4096, 0x63)
    vm.write("vdb", 2 * MiB, 4096, 0x64)
    p2, err = backup(fleece, vm, repo)
    assert levels(p2) == {"vda": "incremental", "vdb": "full"} and err.count(raw) == 1
    for d in ("vda", "vdb"):
        assert identical(restore(fleece, repo, p2["point"], d, tmp_path / f"r2-{d}"), vm.disk(d).shadow)
    assert vm.checkpoints() == [f"fleece-{p2['point']}"]
    # A raw disk cannot be incremental.
    res = lv(fleece, vm, "backup", "--repo", repo, "--level", "incremental")
    assert raw in one_line_error(res, 1)


def test_a_drive_subset_keeps_the_checkpoint_the_other_disks_need(make_domain: Any, fleece: Any,
                                                                   tmp_path: Any) -> None:
    vm = make_domain([("qcow2", 32 * MiB), ("qcow2", 32 * MiB)])
    repo = tmp_path / "repo"
    vm.write("vda", 0, MiB, 0x71)
    vm.write("vdb", 0, MiB, 0x72)
    p1, _ = backup(fleece, vm, repo)

    # --drive vda alone: vdb keeps its checkpoint (p1), the next all-disk backup stays incremental.
    vm.write("vda", 4 * MiB, MiB, 0x73)
    vm.write("vdb", 8 * MiB, MiB, 0x74)
    p2, err = backup(fleece, vm, repo, "--drive", "vda")
    assert levels(p2) == {"vda": "incremental"} and "full because" not in err
    assert vm.checkpoints() == sorted([f"fleece-{p1['point']}", f"fleece-{p2['point']}"])
    vm.write("vda", 12 * MiB, 4096, 0x75)
    p3, err = backup(fleece, vm, repo)
    assert levels(p3) == {"vda": "incremental", "vdb": "incremental"}, err
    # vda since p2, vdb since p1: each disk's writes since its own last point, nothing more.
    assert {d["drive"]: d["bytes_read"] for d in p3["disks"]} == {"vda": GRANULE, "vdb": MiB}
    for d in ("vda", "vdb"):
        assert identical(restore(fleece, repo, p3["point"], d, tmp_path / f"r3-{d}"), vm.disk(d).shadow)
    assert vm.checkpoints() == [f"fleece-{p3['point']}"]


def test_every_hint_names_the_domain_so_that_it_can_be_pasted(make_domain: Any, fleece: Any,
                                                                tmp_path: Any) -> None:
    vm = make_domain(name="db server \u2013 \u00fc")
    res = lv(fleece, vm, "export", "start")
    assert res.rc == 0, res.err
    hint = res.out.splitlines()[-1].removeprefix("end it with: ").removesuffix(" [--abort]")
    assert shlex.split(hint) == ["fleece", "export", "stop", "--libvirt", vm.name]
    line = one_line_error(lv(fleece, vm, "backup", "--repo", tmp_path / "repo"), 1)
    assert shlex.join(["fleece", "export", "stop", "--libvirt", vm.name]) in line
    # Pasted into a shell (with this test's --connect), it works.
    pasted = subprocess.run(f"{hint} --connect {shlex.quote(vm.host.uri)}", shell=True, capture_output=True,
                            text=True, env={**os.environ, "PATH": f"{Path(sys.executable).parent}:"
                                                                  f"{os.environ['PATH']}"})
    assert pasted.returncode == 0 and "committed" in pasted.stdout, pasted.stderr


def test_sigterm_mid_backup_aborts_and_leaves_libvirt_as_found(make_domain: Any, fleece: Any, tmp_path: Any,
                                                              scratch_tmpdir: Any, hold_backup: Any) -> None:
    # systemctl stop, a unit's timeout, a shutdown: SIGTERM aborts like Ctrl-C.
    vm = make_domain()
    repo = tmp_path / "repo"
    vm.write("vda", 0, 2 * MiB, 0x81)
    p1, _ = backup(fleece, vm, repo)
    vm.write("vda", 6 * MiB, MiB, 0x82)
    held = hold_backup(vm, repo, "export-live")
    held.wait_held()
    before = vm.libvirt_state()
    assert before["job"] == "Unbounded"
    held.proc.send_signal(signal.SIGTERM)
    rc, _, err = held.release()
    assert rc == 143 and "Traceback" not in err, (rc, err)
    assert vm.libvirt_state() == {"checkpoints": {f"fleece-{p1['point']}": None}, "job": "None",
                                  "state": "paused"}
    assert point_ids(fleece, repo) == [p1["point"]] and list(scratch_tmpdir.iterdir()) == []
    p2, err = backup(fleece, vm, repo)
    assert "left its libvirt backup" not in err  # nothing was left to finish
    assert levels(p2) == {"vda": "incremental"} and p2["disks"][0]["bytes_read"] == MiB
    assert identical(restore(fleece, repo, p2["point"], "vda", tmp_path / "r2"), vm.disk("vda").shadow)
