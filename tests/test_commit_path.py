"""Every command that writes a restore point commits it through one path, lease checked after the write.

Each command is held once its point object is written and before its lease
is read again (the ``point-written`` phase); the operator breaks the lease
(``fleece unlock --force``), so a gc could have run unseen. Let go, the
command must withdraw the point, fail with one line, and the next run must
work: local ``backup``, ``backup --from-export``, ``backup --libvirt`` and
``copy``.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from backups import identical, point_ids
from conftest import FLEECE

from fleece.testing import Phase, pause_point

MiB = 1 << 20
POINT_WRITTEN = "point-written"


def lease_lost(rc: int, out: str, err: str) -> None:
    """The failure a lost lease gives: exit 1, one line saying so, no traceback, no point printed."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1, out + err
    assert lines[-1].startswith("fleece: error:") and "lost the lock" in lines[-1], err
    assert "Traceback" not in err and out == ""


def break_lease(fleece: Any, repo: Any, vm: str) -> None:
    res = fleece("unlock", "--repo", repo, "--vm", vm, "--force")
    assert res.rc == 0, res.err


@pytest.mark.qemu
def test_a_local_backup_withdraws_its_point_when_the_lease_breaks_after_the_write(
        make_vm: Any, fleece: Any, tmp_path: Path, hold_backup: Any) -> None:
    vm = make_vm(name="web1")
    repo = tmp_path / "repo"
    vm.write("vda", 0, 4 * MiB, 0x5A)
    first = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, "--json")
    assert first.rc == 0, first.err
    vm.write("vda", 8 * MiB, MiB, 0x6B)
    graph = vm.block_graph()
    held = hold_backup(vm, repo, POINT_WRITTEN)
    held.wait_held()
    assert len(point_ids(fleece, repo)) == 2  # written: the withdrawal is what is tested
    break_lease(fleece, repo, "web1")
    lease_lost(*held.release())
    assert point_ids(fleece, repo) == [first.json()["point"]]
    assert vm.block_graph() == graph  # the checkpoint was aborted, not committed
    again = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, "--json")
    assert again.rc == 0, again.err
    assert again.json()["disks"][0]["level"] == "incremental"
    assert again.json()["disks"][0]["bytes_read"] >= MiB  # the withdrawn point's writes again


class _FromExport:
    """What ``HeldBackup`` runs for a backup server: ``backup --from-export FILE --vm NAME``."""

    def __init__(self, exported: Path, vm: str) -> None:
        self.backup_target = ["--from-export", str(exported), "--vm", vm]


@pytest.mark.qemu
def test_a_backup_from_an_export_withdraws_its_point_when_the_lease_breaks_after_the_write(
        make_vm: Any, fleece: Any, tmp_path: Path, hold_backup: Any) -> None:
    vm = make_vm([("qcow2", "16M")])
    vm.write("vda", 0, 2 * MiB, 0x61)
    repo = tmp_path / "repo"
    exported = tmp_path / "export.json"
    res = fleece("export", "start", "--qmp", vm.qmp_path, "--drive", "vda", "--bounded-requests",
                 "--json")  # fleece's reader keeps its requests in bounds
    assert res.rc == 0, res.err
    exported.write_text(res.out)
    held = hold_backup(_FromExport(exported, "vm1"), repo, POINT_WRITTEN)
    held.wait_held()
    assert len(point_ids(fleece, repo)) == 1
    break_lease(fleece, repo, "vm1")
    lease_lost(*held.release())
    assert point_ids(fleece, repo) == []
    assert fleece("export", "stop", "--qmp", vm.qmp_path, "--abort").rc == 0
    # The hypervisor aborted the run: the next export and backup of it work and restore.
    res = fleece("export", "start", "--qmp", vm.qmp_path, "--drive", "vda", "--bounded-requests",
                 "--json")  # fleece's reader keeps its requests in bounds
    assert res.rc == 0, res.err
    exported.write_text(res.out)
    point = vm.snapshot_shadow("vda", tmp_path / "point.raw")
    res = fleece("backup", "--from-export", exported, "--vm", "vm1", "--repo", repo, "--json")
    assert res.rc == 0, res.err
    assert fleece("export", "stop", "--qmp", vm.qmp_path).rc == 0
    restored = tmp_path / "restored.raw"
    assert fleece("restore", "--repo", repo, res.json()["point"], "-o", restored).rc == 0
    assert identical(restored, point)


def test_a_libvirt_backup_withdraws_its_point_when_the_lease_breaks_after_the_write(
        make_domain: Any, fleece: Any, tmp_path: Path, hold_backup: Any) -> None:
    vm = make_domain()
    repo = tmp_path / "repo"
    vm.write("vda", 0, 4 * MiB, 0x61)
    first = fleece("backup", "--libvirt", vm.name, "--connect", vm.host.uri, "--repo", repo, "--json")
    assert first.rc == 0, first.err
    vm.write("vda", 12 * MiB, MiB, 0x62)
    before = vm.libvirt_state()
    held = hold_backup(vm, repo, POINT_WRITTEN)
    held.wait_held()
    break_lease(fleece, repo, vm.name)
    lease_lost(*held.release())
    assert point_ids(fleece, repo) == [first.json()["point"]]
    assert vm.libvirt_state() == before  # the job aborted, its checkpoint not kept
    again = fleece("backup", "--libvirt", vm.name, "--connect", vm.host.uri, "--repo", repo, "--json")
    assert again.rc == 0, again.err
    assert again.json()["disks"][0]["level"] == "incremental"
    assert again.json()["disks"][0]["bytes_read"] >= MiB


@pytest.mark.qemu
def test_a_copy_withdraws_its_point_when_the_lease_breaks_after_the_write(
        make_vm: Any, fleece: Any, tmp_path: Path) -> None:
    vm = make_vm(name="web1")
    vm.write("vda", 0, 4 * MiB, 0x71)
    source, dest = tmp_path / "source", tmp_path / "dest"
    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", source, "--json")
    assert res.rc == 0, res.err
    point = res.json()["point"]
    marker = tmp_path / "held"
    proc = subprocess.Popen([FLEECE, "copy", "--from", str(source), "--to", str(dest)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, env={**os.environ, "FLEECE_TEST_PAUSE_AT": POINT_WRITTEN,
                                            "FLEECE_TEST_PAUSE_FILE": str(marker)})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        assert point_ids(fleece, dest) == [point]
        break_lease(fleece, dest, "web1")
        marker.unlink()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lease_lost(proc.returncode, out, err)
    assert point_ids(fleece, dest) == []
    res = fleece("copy", "--from", source, "--to", dest, "--json")
    assert res.rc == 0, res.err
    assert res.json()["copied"] == [point]


def test_pause_phases_are_checked_at_each_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A phase misspelt in the code or in FLEECE_TEST_PAUSE_AT fails at once, not never pauses."""
    with pytest.raises(TypeError, match="Phase"):
        pause_point("before-piont")  # type: ignore[arg-type]
    monkeypatch.setenv("FLEECE_TEST_PAUSE_AT", "before-piont")
    with pytest.raises(RuntimeError, match="names no phase"):
        pause_point(Phase.BEFORE_POINT)
    monkeypatch.setenv("FLEECE_TEST_PAUSE_AT", "point-written")
    pause_point(Phase.BEFORE_POINT)  # another phase: returns at once
