"""Backups at the same time: of one VM (refused, clearly), of two VMs into one repository (both fine).

Overlap is made certain, not hoped for: each backup is held at a phase
(``fleece.testing``) while the other one runs or starts, and backups that
must race are let go together (``release_together``), not one after the other. Scratch directories
go to a private ``$TMPDIR`` (``scratch_tmpdir``): a backup killed when a test
fails must not litter ``/var/tmp``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from backups import CHUNK, MiB, backup, identical, point_ids, random_image, repo_files, restore

# Each test runs on a plain and on an encrypted repository (conftest.repo_encryption).
pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("repo_encryption")]


def test_a_second_backup_of_a_vm_while_one_runs_is_refused_with_one_line(
        make_vm: Any, fleece: Any, hold_backup: Any, tmp_path: Any, scratch_tmpdir: Any) -> None:
    # QEMU serves one client per QMP socket: a second backup through the socket
    # the first one holds would wait for the handshake. Through a second socket
    # it gets as far as the lock.
    second_qmp = tmp_path / "second-qmp.sock"
    vm = make_vm([("qcow2", "16M")], name="web1",
                 extra_args=["-qmp", f"unix:{second_qmp},server=on,wait=off"])
    vm.write("vda", 0, MiB, 0x31)  # (QEMU's sockets are all up once this returns)
    repo = tmp_path / "repo"
    first = backup(fleece, vm, repo)["point"]
    vm.write("vda", CHUNK, MiB, 0x32)

    held = hold_backup(vm, repo, "export-live")
    held.wait_held()
    during, files_during = vm.block_graph(), repo_files(repo)

    # Same repository: QEMU shows the running export before the VM's writer
    # lock is asked; the line names its process and the command for when it is gone.
    res = fleece("backup", "--qmp", second_qmp, "--drive", "vda", "--repo", repo)
    assert (res.rc, res.out) == (1, "")
    assert res.err.count("\n") == 1 and "Traceback" not in res.err
    pid = held.proc.pid
    assert res.err.startswith(f"fleece: error: fleece pid {pid} on ")
    assert "is exporting this VM now" in res.err and f"run: fleece cleanup --qmp {second_qmp};" in res.err
    assert res.err.rstrip().endswith("; nothing was changed")
    # Another repository: the lock there is free, but QEMU shows the running export.
    other = tmp_path / "other"
    res = fleece("backup", "--qmp", second_qmp, "--drive", "vda", "--repo", other)
    assert (res.rc, res.out) == (1, "")
    assert res.err.count("\n") == 1, res.err
    assert res.err.startswith(f"fleece: error: fleece pid {pid} on ")
    assert "is exporting this VM now" in res.err and res.err.rstrip().endswith("nothing was changed")
    assert vm.block_graph() == during
    assert repo_files(repo) == files_during
    assert not other.exists()  # not even created

    rc, out, err = held.release()
    assert rc == 0, err
    point = json.loads(out)
    assert point["parent"] == first and point["disks"][0]["level"] == "incremental"
    assert point_ids(fleece, repo) == [first, point["point"]]
    assert identical(restore(fleece, repo, point["point"], tmp_path / "r.raw"), vm.shadow("vda"))


def release_together(held: list[Any], timeout: float = 180) -> list[tuple[int, str, str]]:
    """Let every held backup go on at once, then wait for each: they run side by side from
    where they were held (``HeldBackup.release`` waits for one before the next is let go)."""
    for h in held:
        h.marker.unlink()
    results = []
    for h in held:
        out, err = h.proc.communicate(timeout=timeout)
        results.append((h.proc.returncode, out, err))
    return results


def test_two_vms_backing_up_into_one_file_repository_at_once_both_succeed_and_share_chunks(
        make_vm: Any, fleece: Any, hold_backup: Any, tmp_path: Any, scratch_tmpdir: Any) -> None:
    seed = random_image(tmp_path / "golden.raw", 6 * CHUNK, 31)  # one golden image, 6 chunks
    vms = [make_vm([("qcow2", "24M")], name=name, contents={"vda": seed}) for name in ("web1", "web2")]
    vms[1].write("vda", 0, MiB, 0x42)  # web2 differs in its first chunk
    repo = tmp_path / "repo"
    # Both find an empty location: one creates the repository, the other opens it. Each is held
    # once its storers have each stored a chunk (staged: not visible before the backup's flush),
    # and both are held at once: neither can see what the other stored, so at least one chunk
    # both hold (each stores 4 of its 6 before the hold, 5 of web2's 6 are web1's) is stored by
    # both, and both are let go together to store the rest side by side.
    held = [hold_backup(vm, repo, "chunk-stored") for vm in vms]
    for h in held:
        h.wait_held()
    results = release_together(held)
    for rc, _, err in results:
        assert rc == 0, err
    points = [json.loads(out) for _, out, _ in results]
    assert [p["vm"] for p in points] == ["web1", "web2"]

    chunks = [f for f in repo_files(repo) if f.startswith("chunks/")]
    assert len(chunks) == 7, chunks  # 6 shared + web2's own first chunk, each stored once
    stored = [p["disks"][0]["chunks_new"] for p in points]
    assert sum(stored) > 7, stored  # the race happened: a shared chunk was stored by both
    for vm, p in zip(vms, points, strict=True):
        assert identical(restore(fleece, repo, p["point"], tmp_path / f"{vm.name}.raw"), vm.shadow("vda"))
    assert fleece("verify", "--repo", repo, "--deep").rc == 0
    assert not [f for f in repo_files(repo) if "/.tmp-" in f or f.startswith(".tmp-")]
    assert not [f for f in repo_files(repo) if f.startswith("locks/")]
