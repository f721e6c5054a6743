"""Out of space: the reverse delta's filesystem, or the repository's, fills up mid-backup.

Either way the guest's writes succeed, the backup fails with one clear line,
no restore point appears, nothing is left in QEMU, in the scratch directory
or in the repository, the previous checkpoint keeps recording (so no dirty
bit is lost), and the next backup is an incremental that restores identical.
(A persistent S3 outage is the same story on S3:
``tests/test_s3_backup.py::test_a_persistent_outage_mid_backup_fails_cleanly_and_loses_no_dirty_bit``.)
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
from backups import (
    CHUNK,
    MiB,
    backup,
    identical,
    point_ids,
    random_image,
    repo_files,
    restore,
    write_from_file,
)

# Each test runs on a plain and on an encrypted repository (conftest.repo_encryption).
pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("repo_encryption")]


def error_line(err: str) -> str:
    """The one error line a failed command ends with (notices may come before it)."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("fleece: error: ")]
    assert errors == lines[-1:], err
    return lines[-1]


def test_reverse_delta_out_of_space_fails_the_backup_not_the_guest(
        make_vm: Any, fleece: Any, hold_backup: Any, tmpfs: Any, tmp_path: Any, scratch_tmpdir: Any) -> None:
    vm = make_vm([("qcow2", "16M")])
    repo = tmp_path / "repo"
    vm.write("vda", 0, 2 * CHUNK, 0x5A)
    first = backup(fleece, vm, repo)["point"]
    vm.write("vda", 0, 4096, 0x5B)
    before, files_before = vm.block_graph(), repo_files(repo)
    tiny = tmpfs("delta", "1M")

    held = hold_backup(vm, repo, "export-live", "--scratch-dir", str(tiny))
    held.wait_held()
    # 8 MiB of overwrites under the snapshot need 8 MiB of reverse delta; there is 1 MiB.
    vm.write("vda", 0, 2 * CHUNK, 0x77)
    assert {b.get("io-status", "ok") for b in vm.qmp("query-block")} == {"ok"}
    assert vm.qmp("query-status")["status"] == "prelaunch"  # not paused on an I/O error
    rc, out, err = held.release()

    assert (rc, out) == (1, ""), err
    line = error_line(err)
    # The plan's block-status request is the first to hit the broken snapshot.
    assert line.startswith("fleece: error: block status at offset 0 failed: ")
    assert line.endswith("Invalid argument (EINVAL) (a full reverse delta breaks the snapshot)")
    assert vm.block_graph() == before  # fleece-<first> still recording, no new checkpoint
    assert list(tiny.iterdir()) == []
    assert point_ids(fleece, repo) == [first]
    assert repo_files(repo) == files_before

    nxt = backup(fleece, vm, repo)
    assert (nxt["parent"], nxt["disks"][0]["level"]) == (first, "incremental")
    assert nxt["disks"][0]["bytes_read"] == 2 * CHUNK  # every chunk the guest wrote
    assert identical(restore(fleece, repo, nxt["point"], tmp_path / "r.raw"), vm.shadow("vda"))


def test_repository_disk_full_fails_cleanly_and_the_next_backup_after_freeing_space_is_incremental(
        make_vm: Any, fleece: Any, tmpfs: Any, tmp_path: Any) -> None:
    seed = random_image(tmp_path / "seed.raw", CHUNK, 21)
    with open(seed, "r+b") as f:
        f.truncate(32 * MiB)  # one chunk of incompressible data, the rest never written
    vm = make_vm([("qcow2", "32M")], contents={"vda": seed})
    mnt = tmpfs("repofs", "8M")
    repo = mnt / "repo"
    first = backup(fleece, vm, repo)["point"]
    # The guest writes 12 MiB more of incompressible data: it cannot fit.
    write_from_file(vm, "vda", CHUNK, random_image(tmp_path / "more.raw", 3 * CHUNK, 22))
    before, files_before = vm.block_graph(), repo_files(repo)

    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo)
    assert res.rc == 1 and res.out == "", res.err
    line = error_line(res.err)
    assert line.startswith(f"fleece: error: cannot write {repo}/")
    assert "No space left on device" in line
    assert vm.block_graph() == before  # fleece-<first> still recording, no new checkpoint
    assert point_ids(fleece, repo) == [first]
    assert repo_files(repo) == files_before  # no partial point, index, chunk or .tmp-* file

    subprocess.run(["mount", "-o", "remount,size=64M", str(mnt)], check=True)  # space freed
    nxt = backup(fleece, vm, repo)
    assert (nxt["parent"], nxt["disks"][0]["level"]) == (first, "incremental")
    assert nxt["disks"][0]["chunks_new"] == 3
    assert identical(restore(fleece, repo, nxt["point"], tmp_path / "r.raw"), vm.shadow("vda"))
