"""``--libvirt DOMAIN`` end to end on a real libvirtd (``tests/libvirt_host.py``).

The domains are TCG q35 guests without an OS; the "guest" writes through
libvirt's monitor (HMP qemu-io) and every write is mirrored into a shadow
image, so each restore is compared with the disk as it was at its point.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from backups import identical

MiB = 1 << 20
CHUNK = 4 * MiB
GRANULE = 64 * 1024
"""The dirty bitmaps' granularity (the qcow2 cluster): what an incremental reads per small write."""


def lv(fleece: Any, vm: Any, *args: str | Path) -> Any:
    """``fleece ARGS --libvirt DOMAIN --connect URI``."""
    return fleece(*args, "--libvirt", vm.name, "--connect", vm.host.uri)


def backup(fleece: Any, vm: Any, repo: Path, *extra: str) -> Any:
    """A libvirt backup that must succeed; (its ``--json`` object, its stderr)."""
    res = lv(fleece, vm, "backup", "--repo", repo, "--json", *extra)
    assert res.rc == 0, res.err
    return res.json(), res.err


def restore(fleece: Any, repo: Path, point: str, drive: str, out: Path) -> Path:
    res = fleece("restore", "--repo", repo, point, "--drive", drive, "--output", out)
    assert res.rc == 0, res.err
    return out


def levels(point: Any) -> dict[str, str]:
    return {d["drive"]: d["level"] for d in point["disks"]}


def one_line_error(res: Any, rc: int) -> str:
    """The failure is exit ``rc`` with one ``fleece: error:`` line, last, and no traceback.

    (Notices may come before it, such as taking over a killed run's repository lock.)
    """
    assert res.rc == rc, (res.rc, res.out, res.err)
    lines = [line for line in res.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("fleece: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.err
    assert all(line.startswith("fleece: ") for line in lines) and "Traceback" not in res.err
    return str(errors[0])


def test_two_disk_domain_full_then_incrementals_restore_bit_identical(
        make_domain: Any, fleece: Any, tmp_path: Any, scratch_tmpdir: Any, hold_backup: Any) -> None:
    vm = make_domain([("qcow2", 64 * MiB), ("qcow2", 32 * MiB)])
    repo = tmp_path / "repo"
    vm.write("vda", 0, 5 * MiB, 0x11)
    vm.write("vda", 50 * MiB, 64 * 1024, 0x12)
    vm.write("vdb", 3 * MiB, 2 * MiB, 0x21)

    p1, err = backup(fleece, vm, repo)
    assert levels(p1) == {"vda": "full", "vdb": "full"}  # no --drive: every disk
    assert p1["vm"] == vm.name
    assert "full because vda: no fleece checkpoint in libvirt (first backup)" in err
    s1 = {d: vm.snapshot_shadow(d, tmp_path / f"{d}.p1") for d in ("vda", "vdb")}
    assert vm.checkpoints() == [f"fleece-{p1['point']}"]

    vm.write("vda", 6 * MiB, 1 * MiB, 0x13)
    vm.write("vda", 0, 4096, 0x14)
    vm.write("vdb", 31 * MiB, 1 * MiB, 0x22)
    p2, _ = backup(fleece, vm, repo, "--drive", "vda", "--drive", "vdb")
    assert p2["parent"] == p1["point"]
    assert levels(p2) == {"vda": "incremental", "vdb": "incremental"}
    by_drive = {d["drive"]: d for d in p2["disks"]}
    # Only the dirty extents (64 KiB granules) are read: 1 MiB + one granule, and 1 MiB.
    assert by_drive["vda"]["bytes_read"] == MiB + GRANULE
    assert by_drive["vdb"]["bytes_read"] == MiB
    s2 = {d: vm.snapshot_shadow(d, tmp_path / f"{d}.p2") for d in ("vda", "vdb")}

    # A write while the export is up is not in this point (it is libvirt's
    # point in time) and is in the next incremental.
    vm.write("vdb", 8 * MiB, 64 * 1024, 0x23)
    s3 = {d: vm.snapshot_shadow(d, tmp_path / f"{d}.p3") for d in ("vda", "vdb")}
    held = hold_backup(vm, repo, "export-live")
    held.wait_held()
    vm.write("vda", 20 * MiB, 1 * MiB, 0x15)
    rc, out, err = held.release()
    assert rc == 0, err
    p3 = json.loads(out)
    assert p3["parent"] == p2["point"]
    p4, _ = backup(fleece, vm, repo)
    assert p4["parent"] == p3["point"]
    assert {d["drive"]: d["bytes_read"] for d in p4["disks"]} == {"vda": MiB, "vdb": 0}

    for d in ("vda", "vdb"):
        assert identical(restore(fleece, repo, p1["point"], d, tmp_path / f"r1-{d}"), s1[d])
        assert identical(restore(fleece, repo, p2["point"], d, tmp_path / f"r2-{d}"), s2[d])
        assert identical(restore(fleece, repo, p3["point"], d, tmp_path / f"r3-{d}"), s3[d])
        assert identical(restore(fleece, repo, p4["point"], d, tmp_path / f"r4-{d}"), vm.disk(d).shadow)

    # libvirt is left with one fleece checkpoint (one bitmap per disk), no job,
    # and fleece's scratch directory is gone.
    assert vm.libvirt_state() == {"checkpoints": {f"fleece-{p4['point']}": None}, "job": "None",
                                  "state": "paused"}
    assert vm.qcow2_bitmaps("vda") == vm.qcow2_bitmaps("vdb") == [f"fleece-{p4['point']}"]
    assert list(scratch_tmpdir.iterdir()) == []


def test_the_checkpoint_chain_survives_a_libvirtd_restart(
        make_domain: Any, libvirt_host: Any, fleece: Any, tmp_path: Any) -> None:
    vm = make_domain()
    repo = tmp_path / "repo"
    vm.write("vda", 0, 3 * MiB, 0x31)
    p1, _ = backup(fleece, vm, repo)
    vm.write("vda", 40 * MiB, 1 * MiB, 0x32)

    # An export that is up when libvirtd restarts is still there afterwards (libvirt
    # reconnects its backup job), and its abort loses no write.
    res = lv(fleece, vm, "export", "start", "--json")
    assert res.rc == 0 and res.json()["disks"][0]["since"] == p1["point"], res.err

    libvirt_host.restart_libvirtd()
    assert vm.job_type() == "Unbounded" and len(vm.checkpoints()) == 2
    res = lv(fleece, vm, "export", "stop", "--abort")
    assert res.rc == 0 and "aborted" in res.out, res.err
    assert vm.checkpoints() == [f"fleece-{p1['point']}"]

    # (the domain from --config this time: keys libvirt and connect)
    config = tmp_path / "fleece.toml"
    config.write_text(f'libvirt = "{vm.name}"\nconnect = "{vm.host.uri}"\nrepo = "{repo}"\n')
    res = fleece("backup", "--config", config, "--json")
    assert res.rc == 0, res.err
    p2 = res.json()
    assert levels(p2) == {"vda": "incremental"} and p2["parent"] == p1["point"]
    assert p2["disks"][0]["bytes_read"] == MiB
    assert identical(restore(fleece, repo, p2["point"], "vda", tmp_path / "r2"), vm.disk("vda").shadow)


def test_a_deleted_libvirt_checkpoint_makes_the_next_backup_full_and_it_says_why(
        make_domain: Any, fleece: Any, tmp_path: Any) -> None:
    vm = make_domain()
    repo = tmp_path / "repo"
    vm.write("vda", 0, 2 * MiB, 0x41)
    p1, _ = backup(fleece, vm, repo)
    vm.virsh("checkpoint-delete", vm.name, f"fleece-{p1['point']}")  # the qcow2 bitmap goes too
    vm.write("vda", 30 * MiB, 1 * MiB, 0x42)

    # --level incremental refuses, with one line, and changes nothing.
    before = vm.libvirt_state()
    res = lv(fleece, vm, "backup", "--repo", repo, "--level", "incremental")
    assert f"no checkpoint fleece-{p1['point']}" in one_line_error(res, 1)
    assert vm.libvirt_state() == before == {"checkpoints": {}, "job": "None", "state": "paused"}

    p2, err = backup(fleece, vm, repo)
    assert levels(p2) == {"vda": "full"}
    reason = p2["disks"][0]["reason"]
    assert f"libvirt has no checkpoint fleece-{p1['point']}" in reason and "bitmap" in reason
    assert f"full because libvirt has no checkpoint fleece-{p1['point']}" in err
    assert identical(restore(fleece, repo, p2["point"], "vda", tmp_path / "r2"), vm.disk("vda").shadow)
    assert vm.checkpoints() == [f"fleece-{p2['point']}"]

    # The chain goes on from the full.
    vm.write("vda", 0, 4096, 0x43)
    p3, _ = backup(fleece, vm, repo)
    assert levels(p3) == {"vda": "incremental"} and p3["parent"] == p2["point"]


def test_lost_checkpoint_metadata_is_redefined_from_the_bitmaps_and_the_backup_stays_incremental(
        make_domain: Any, fleece: Any, tmp_path: Any) -> None:
    vm = make_domain([("qcow2", 64 * MiB), ("qcow2", 32 * MiB)])
    repo = tmp_path / "repo"
    vm.write("vda", 0, 2 * MiB, 0x51)
    p1, _ = backup(fleece, vm, repo)
    name = f"fleece-{p1['point']}"
    vm.shut_down()  # the bitmaps reach the images
    vm.start()
    vm.virsh("checkpoint-delete", vm.name, name, "--metadata")  # libvirt forgets; the bitmaps stay
    assert vm.checkpoints() == [] and vm.qcow2_bitmaps("vda") == [name]
    # status shows them, and what the next backup does with them.
    st = lv(fleece, vm, "status", "--json").json()
    assert st["checkpoints"] == [] and st["bitmaps"] == [
        {"drive": d, "bitmap": name, "point": p1["point"], "usable": None} for d in ("vda", "vdb")]
    assert f"bitmap {name} on vda has no libvirt checkpoint" in lv(fleece, vm, "status").out
    vm.write("vda", 30 * MiB, 1 * MiB, 0x52)
    vm.write("vdb", 0, 4096, 0x53)

    p2, err = backup(fleece, vm, repo)
    assert f"libvirt had lost checkpoint {name}" in err and "redefined" in err
    assert levels(p2) == {"vda": "incremental", "vdb": "incremental"} and p2["parent"] == p1["point"]
    read = {d["drive"]: d["bytes_read"] for d in p2["disks"]}
    # (vdb: its one granule, less what block status shows as zero after QEMU's restart)
    assert read["vda"] == MiB and 4096 <= read["vdb"] <= GRANULE, read
    for d in ("vda", "vdb"):
        assert identical(restore(fleece, repo, p2["point"], d, tmp_path / f"r2-{d}"), vm.disk(d).shadow)
    assert vm.checkpoints() == [f"fleece-{p2['point']}"]


@pytest.mark.parametrize("phase", ["export-live", "chunk-stored", "before-point", "before-commit"])
def test_a_backup_killed_mid_run_is_finished_by_the_next_backup_or_by_cleanup(
        make_domain: Any, fleece: Any, tmp_path: Any, scratch_tmpdir: Any, hold_backup: Any,
        phase: Any) -> None:
    vm = make_domain()
    repo = tmp_path / "repo"
    vm.write("vda", 0, 6 * MiB, 0x61)
    backup(fleece, vm, repo)
    vm.write("vda", 12 * MiB, 1 * MiB, 0x62)

    held = hold_backup(vm, repo, phase)
    held.wait_held()
    held.kill()
    left = vm.libvirt_state()
    assert len(left["checkpoints"]) == 2
    assert left["job"] == ("None" if phase == "before-commit" else "Unbounded")
    status = lv(fleece, vm, "status", "--json")
    assert status.rc == 0 and status.json()["leftovers"], status.out
    points = [p["id"] for p in fleece("list", "--repo", repo, "--json").json()["points"]]
    # Killed after its point was written and the commit decided: finished as a commit.
    committed = phase == "before-commit"
    assert len(points) == (2 if committed else 1)
    what = "finished the commit it had decided" if committed else "aborted its export"

    if phase in ("export-live", "before-commit"):
        # By hand: cleanup says what it finished and how.
        res = lv(fleece, vm, "cleanup")
        assert res.rc == 0 and "checkpoint fleece-" in res.out, res.err
        assert what in res.err and f"fleece pid {held.proc.pid}" in res.err, res.err
        assert vm.libvirt_state() == {"checkpoints": {f"fleece-{points[-1]}": None}, "job": "None",
                                      "state": "paused"}
        assert list(scratch_tmpdir.iterdir()) == []
        assert lv(fleece, vm, "cleanup").out.strip() == "nothing to clean up"
        vm.write("vda", 30 * MiB, 4096, 0x63)
        p3, err = backup(fleece, vm, repo)
        assert "unfinished" not in err
    else:
        # Unattended: the next backup finishes the dead run's leftovers, says so, and goes on.
        vm.write("vda", 30 * MiB, 4096, 0x63)
        p3, err = backup(fleece, vm, repo)
        assert f"fleece pid {held.proc.pid}, which has exited, left its libvirt backup" in err, err
        assert what in err
    assert levels(p3) == {"vda": "incremental"} and p3["parent"] == points[-1]
    # No dirty bit lost: every write since the last committed point is read.
    assert p3["disks"][0]["bytes_read"] == (GRANULE if committed else MiB + GRANULE)
    assert identical(restore(fleece, repo, p3["point"], "vda", tmp_path / "r3"), vm.disk("vda").shadow)
    assert vm.libvirt_state() == {"checkpoints": {f"fleece-{p3['point']}": None}, "job": "None",
                                  "state": "paused"}
    assert list(scratch_tmpdir.iterdir()) == []


def test_export_start_stop_and_status_on_a_libvirt_domain(
        make_domain: Any, fleece: Any, nbd_connect: Any, tmp_path: Any,
        scratch_tmpdir: Any) -> None:
    vm = make_domain()
    vm.write("vda", 0, 1 * MiB, 0x71)
    res = lv(fleece, vm, "export", "start", "--drive", "vda", "--json")
    assert res.rc == 0, res.err
    first = res.json()
    disk = first["disks"][0]
    assert disk["level"] == "full" and disk["dirty_bitmap"] is None
    assert os.stat(Path(first["socket"]).parent).st_mode & 0o777 == 0o700
    vm.write("vda", 0, 64 * 1024, 0x72)  # after the point: the export keeps the old bytes
    conn = nbd_connect(disk["uri"])
    assert conn.read(0, 64 * 1024) == b"\x71" * 64 * 1024
    conn.close()
    st = lv(fleece, vm, "status", "--json").json()
    assert st["backup_job"]["fleece"] and st["backup_job"]["checkpoint"] == first["checkpoint"]
    assert lv(fleece, vm, "status").out.count("a fleece export is up") == 1
    # Without --connect, $LIBVIRT_DEFAULT_URI names the daemon, as for virsh.
    res = fleece("status", "--libvirt", vm.name, "--json", env={"LIBVIRT_DEFAULT_URI": vm.host.uri})
    assert res.rc == 0 and res.json()["backup_job"]["checkpoint"] == first["checkpoint"], res.err
    # A second export (or backup) is refused while this one is up.
    assert "fleece export stop --libvirt" in one_line_error(lv(fleece, vm, "export", "start"), 1)

    res = lv(fleece, vm, "export", "stop")
    assert res.rc == 0 and "committed" in res.out, res.err
    assert vm.libvirt_state()["checkpoints"] == {f"fleece-{first['checkpoint']}": None}

    vm.write("vda", 8 * MiB, 64 * 1024, 0x73)
    for attempt in ("abort", "commit"):
        res = lv(fleece, vm, "export", "start", "--json")
        assert res.rc == 0, res.err
        disk = res.json()["disks"][0]
        assert disk["level"] == "incremental" and disk["since"] == first["checkpoint"]
        # libvirt 9 exports the bitmap since the parent checkpoint as backup-<target>.
        assert disk["dirty_bitmap"] == "qemu:dirty-bitmap:backup-vda"
        conn = nbd_connect(disk["uri"], disk["dirty_bitmap"])
        # The abort lost no dirty bit: the same granules both times.
        assert conn.dirty_granules() == {0, 8 * MiB}
        conn.close()
        res = lv(fleece, vm, "export", "stop", *(["--abort"] if attempt == "abort" else []))
        assert res.rc == 0, res.err
        if attempt == "abort":
            assert vm.libvirt_state()["checkpoints"] == {f"fleece-{first['checkpoint']}": None}
    assert vm.libvirt_state()["job"] == "None" and len(vm.checkpoints()) == 1
    assert one_line_error(lv(fleece, vm, "export", "stop"), 1).endswith("nothing was changed")
    assert list(scratch_tmpdir.iterdir()) == []


def test_qga_through_libvirt_without_an_agent_fails_clearly_and_changes_nothing(make_domain: Any, fleece: Any,
                                                                                tmp_path: Any) -> None:
    # The test domains run no OS, so there is no guest agent to answer; the
    # freeze call must fail cleanly before the backup job begins.
    vm = make_domain()
    repo = tmp_path / "repo"
    vm.write("vda", 0, 64 * 1024, 0x81)
    p1, _ = backup(fleece, vm, repo)
    before = vm.libvirt_state()
    res = lv(fleece, vm, "backup", "--repo", repo, "--qga")
    line = one_line_error(res, 1)
    assert "freeze the guest's filesystems" in line and "nothing was changed" in line
    assert vm.libvirt_state() == before
    assert [p["id"] for p in fleece("list", "--repo", repo, "--json").json()["points"]] == [p1["point"]]
    # A socket makes no sense with --libvirt.
    one_line_error(lv(fleece, vm, "backup", "--repo", repo, "--qga", "/run/qga.sock"), 2)


def test_bad_input_gets_one_line_the_right_exit_and_changes_nothing_in_libvirt(
        make_domain: Any, libvirt_host: Any, fleece: Any, tmp_path: Any, scratch_tmpdir: Any) -> None:
    vm = make_domain([("qcow2", 64 * MiB), ("raw", 32 * MiB)])
    off = make_domain(start=False)
    repo = tmp_path / "repo"
    cases = [
        (["backup", "--repo", repo, "--libvirt", "no-such-domain", "--connect", libvirt_host.uri],
         2, "no domain 'no-such-domain'"),
        (["backup", "--repo", repo, *vm.backup_target, "--drive", "vdz"], 2, "has no disk 'vdz'"),
        (["backup", "--repo", repo, *off.backup_target], 1, "is not running (shut off)"),
        (["backup", "--repo", repo, "--qmp", "/x.sock", *vm.backup_target], 2, "not both"),
        (["backup", "--repo", repo, "--qmp", "/x.sock", "--drive", "vda", "--connect", libvirt_host.uri],
         2, "--connect URI goes with --libvirt"),
        (["backup", "--repo", repo, "--libvirt", vm.name, "--connect", "qemu:///system?socket=/nonexistent"],
         1, "cannot connect to libvirt"),
        (["export", "start", "--libvirt", "no-such-domain", "--connect", libvirt_host.uri], 2, "no domain"),
        (["export", "start", *vm.backup_target, "--drive", "vda", "--discard"], 2, "read-only"),
        (["status", "--libvirt", "no-such-domain", "--connect", libvirt_host.uri], 2, "no domain"),
        (["cleanup", "--libvirt", "no-such-domain", "--connect", libvirt_host.uri], 2, "no domain"),
    ]
    before = vm.libvirt_state()
    for args, rc, text in cases:
        res = fleece(*args)
        assert text in one_line_error(res, rc), (args, res.err)
        assert vm.libvirt_state() == before, args
        assert not repo.exists(), args
    assert list(scratch_tmpdir.iterdir()) == []
    # status works on a shut-off domain, and says so
    res = fleece("status", *off.backup_target)
    assert res.rc == 0 and "shut off" in res.out.splitlines()[0], res.err


def test_another_tools_backup_job_is_refused_and_left_alone(
        make_domain: Any, fleece: Any, tmp_path: Any) -> None:
    vm = make_domain()
    repo = tmp_path / "repo"
    scratch = tmp_path / "other"
    scratch.mkdir()
    (tmp_path / "other.xml").write_text(
        f"<domainbackup mode='pull'><server transport='unix' socket='{scratch}/s'/>"
        f"<disks><disk name='vda' backup='yes' type='file'><scratch file='{scratch}/vda.scratch'/></disk>"
        "</disks></domainbackup>")
    vm.virsh("backup-begin", vm.name, str(tmp_path / "other.xml"))
    try:
        before = vm.libvirt_state()
        assert before["job"] == "Unbounded"
        assert "another backup job is running" in one_line_error(
            lv(fleece, vm, "backup", "--repo", repo, "--drive", "vda"), 1)
        assert "not fleece's" in one_line_error(lv(fleece, vm, "cleanup"), 1)
        assert vm.libvirt_state() == before and not repo.exists()
    finally:
        vm.virsh("domjobabort", vm.name)


def test_a_libvirt_older_than_the_minimum_is_refused_in_fleeces_voice() -> None:
    # No old libvirt on this host: the version check itself, in process.
    from fleece.libvirt.domain import LibvirtError, check_version

    check_version((7, 6, 0), (9, 0, 0))
    with pytest.raises(LibvirtError, match=r"libvirtd is 7\.5\.0; fleece --libvirt needs 7\.6\.0"):
        check_version((9, 0, 0), (7, 5, 0))
    with pytest.raises(LibvirtError, match=r"the libvirt library is 6\.0\.0"):
        check_version((6, 0, 0), (9, 0, 0))


def test_cleanup_leaves_the_job_of_a_backup_that_still_runs_alone(
        make_domain: Any, fleece: Any, tmp_path: Any, hold_backup: Any) -> None:
    # While the backup that holds the job still runs, cleanup leaves it alone.
    vm = make_domain()
    repo = tmp_path / "repo"
    held = hold_backup(vm, repo, "export-live")
    held.wait_held()
    res = lv(fleece, vm, "cleanup")
    assert "is running (pid" in one_line_error(res, 1)
    # A second backup of the domain, into another repository, is refused too.
    res = lv(fleece, vm, "backup", "--repo", tmp_path / "other-repo")
    assert f"another fleece backup of domain {vm.name} is running (pid" in one_line_error(res, 1)
    assert vm.libvirt_state()["job"] == "Unbounded" and not (tmp_path / "other-repo").exists()
    rc, out, err = held.release()
    assert rc == 0, err
    assert vm.libvirt_state() == {"checkpoints": {f"fleece-{json.loads(out)['point']}": None},
                                  "job": "None", "state": "paused"}


def test_a_libvirt_error_nobody_expected_is_one_line_in_fleeces_voice() -> None:
    # Unit test of the last line of defence (in process): whatever libvirt
    # raises that no code path handles becomes a FleeceError, never a traceback.
    import libvirt

    from fleece.libvirt.domain import LibvirtError, libvirt_errors

    expected = r"^libvirt failed on domain web1: .*odd; see what is left with: fleece status --libvirt web1$"
    with pytest.raises(LibvirtError, match=expected), libvirt_errors("web1"):
        raise libvirt.libvirtError("operation failed: something odd")
    # A name that needs quoting is quoted: the hint can be pasted.
    odd = "db server \u2013 \u00fc 2"
    with pytest.raises(LibvirtError, match=re.escape(f"fleece status --libvirt '{odd}'") + "$"), \
            libvirt_errors(odd):
        raise libvirt.libvirtError("operation failed: something odd")


def test_the_python_api_commits_on_normal_exit_and_aborts_on_an_exception(make_domain: Any, nbd_connect: Any,
                                                                          scratch_tmpdir: Any) -> None:
    import asyncio

    import libvirt

    from fleece.libvirt import libvirt_export

    vm = make_domain()
    vm.write("vda", 0, 64 * 1024, 0x91)
    conn = libvirt.open(vm.host.uri)
    try:
        dom = conn.lookupByName(vm.name)

        async def export(fail: bool) -> Any:
            async with libvirt_export(dom, ["vda"]) as ex:
                disk = ex.disks[0]
                reader = nbd_connect(disk.uri, disk.dirty_bitmap)
                dirty = reader.dirty_granules() if disk.dirty_bitmap else None
                seen = (disk.level, reader.read(0, 4096), dirty)
                reader.close()
                if fail:
                    raise RuntimeError("the caller failed")
            return ex, seen

        first, seen = asyncio.run(export(False))
        assert seen == ("full", b"\x91" * 4096, None)
        assert vm.checkpoints() == [f"fleece-{first.checkpoint}"]

        vm.write("vda", 1 << 20, 64 * 1024, 0x92)
        with pytest.raises(RuntimeError, match="the caller failed"):
            asyncio.run(export(True))
        assert vm.libvirt_state() == {"checkpoints": {f"fleece-{first.checkpoint}": None}, "job": "None",
                                      "state": "paused"}

        second, seen = asyncio.run(export(False))
        assert seen[0] == "incremental" and seen[2] == {1 << 20}  # the aborted export lost nothing
        assert vm.checkpoints() == [f"fleece-{second.checkpoint}"]
    finally:
        conn.close()
    assert list(scratch_tmpdir.iterdir()) == []


def test_cleanup_removes_the_scratch_directory_of_a_run_killed_before_libvirt_began_its_job(
        make_domain: Any, fleece: Any, scratch_tmpdir: Any) -> None:
    # A run killed between writing its state and virDomainBackupBegin left only
    # its scratch directory: no job, no checkpoint points to it.
    from fleece.libvirt.job import JobState

    vm = make_domain()
    uuid = vm.virsh("domuuid", vm.name).stdout.strip()
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = scratch_tmpdir / "fleece-lv-orphan"
    orphan.mkdir(mode=0o700)
    JobState(domain=vm.name, uuid=uuid, checkpoint="20261130T000000.000000Z-abcdef", scratch=str(orphan),
             socket=str(orphan / "nbd.sock"), owner="session", pid=dead.pid).save()
    other = scratch_tmpdir / "fleece-lv-other-domain"
    other.mkdir(mode=0o700)
    JobState(domain="x", uuid="00000000-0000-0000-0000-000000000001",
             checkpoint="20261130T000000.000000Z-abcdef", scratch=str(other),
             socket=str(other / "nbd.sock"), owner="session", pid=dead.pid).save()

    res = lv(fleece, vm, "cleanup")
    assert res.rc == 0 and res.out.strip() == f"removed scratch directory {orphan}", res.err
    assert not orphan.exists() and other.exists()  # another domain's is not ours to remove
    assert vm.libvirt_state() == {"checkpoints": {}, "job": "None", "state": "paused"}
