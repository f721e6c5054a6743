"""``fleece cleanup --stale``: the scratch directories whose QEMU and fleece are both gone, and only those.

Four real situations side by side in one ``$TMPDIR``: a backup whose QEMU
was killed with the export up (and the backup with it): stale; an export
left up on purpose by ``fleece export start`` (its process exited, its QEMU
holds the files): kept; a backup running now: kept; a directory being set
up (no state file yet): kept. ``fleece status`` names the stale one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.qemu


def scratch_dirs(parent: Path) -> set[Path]:
    return {p for p in parent.iterdir() if p.name.startswith("fleece-")}


def test_cleanup_stale_removes_only_what_no_qemu_and_no_fleece_uses(
        make_vm: Any, fleece: Any, hold_backup: Any, scratch_tmpdir: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    # A backup whose QEMU dies with the export up; the backup is killed too.
    dead_vm = make_vm(name="dead")
    held = hold_backup(dead_vm, repo, "export-live")
    held.wait_held()
    (dead,) = scratch_dirs(scratch_tmpdir)
    dead_vm.kill()
    held.kill()
    assert (dead / "fleece-export.json").exists() and list(dead.glob("delta-*.raw"))

    # An export left up on purpose: fleece exited, QEMU holds its files.
    exported_vm = make_vm(name="exported")
    r = fleece("export", "start", "--bounded-requests", "--qmp", exported_vm.qmp_path, "--drive", "vda")
    assert r.rc == 0, r.err
    (exported,) = scratch_dirs(scratch_tmpdir) - {dead}

    # A backup running now.
    running_vm = make_vm(name="running")
    running_vm.write("vda", 0, 1 << 20, 0x42)
    running = hold_backup(running_vm, repo, "export-live")
    running.wait_held()
    (busy,) = scratch_dirs(scratch_tmpdir) - {dead, exported}

    # Being set up (no state file yet), and an old one that never got one.
    young = scratch_tmpdir / "fleece-young123"
    young.mkdir(mode=0o700)
    old = scratch_tmpdir / "fleece-old12345"
    old.mkdir(mode=0o700)
    os.utime(old, (time.time() - 3600, time.time() - 3600))

    status = fleece("status", "--qmp", exported_vm.qmp_path, "--json")
    assert status.rc == 0, status.err
    stale = set(status.json()["stale_scratch"])
    assert {str(dead), str(old)} <= stale and not {str(exported), str(busy), str(young)} & stale
    human = fleece("status", "--qmp", exported_vm.qmp_path)
    assert str(dead) in human.out and "fleece cleanup --stale" in human.out

    r = fleece("cleanup", "--stale", "--scratch-dir", scratch_tmpdir, "--json")
    assert r.rc == 0, r.err
    doc = r.json()["stale_scratch"]
    assert sorted(doc["removed"]) == sorted([str(dead), str(old)])
    kept = {k["path"]: k["why"] for k in doc["kept"]}
    assert set(kept) == {str(exported), str(busy), str(young)}
    assert kept[str(exported)].startswith("in use by pid")
    assert kept[str(busy)].startswith("in use by pid")
    assert kept[str(young)].startswith("no state file yet")
    assert not dead.exists() and not old.exists()
    assert exported.is_dir() and busy.is_dir() and young.is_dir()

    # What was kept still works.
    rc, _out, err = running.release()
    assert rc == 0, err
    stop = fleece("export", "stop", "--qmp", exported_vm.qmp_path)
    assert stop.rc == 0, stop.err
    assert scratch_dirs(scratch_tmpdir) == {young}


@pytest.mark.parametrize("args", [
    (),
    ("--scratch-dir", "/nonexistent-fleece-dir", "--stale"),
    ("--scratch-dir", "/tmp"),
])
def test_cleanup_bad_input_gets_one_line_and_removes_nothing(
        fleece: Any, scratch_tmpdir: Path, args: tuple[str, ...]) -> None:
    old = scratch_tmpdir / "fleece-old12345"
    old.mkdir(mode=0o700)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    r = fleece("cleanup", *args)
    assert r.rc == 2 and len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err, r.err
    assert old.is_dir()
