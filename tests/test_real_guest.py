"""Backups of a real Linux guest while it writes (see ``tests/guest.py`` and ``scripts/build-guest``).

The guest boots Debian's kernel under TCG and keeps writing and fsyncing
files on ext4; every backup is taken while it does. Each restore point must
restore to filesystems that are clean after journal replay and hold one
point in time: everything the guest had committed before the backup began,
nothing it wrote after the point — neither data nor the writes of zeroes and
the trims its workload makes while a backup is held (which reached a point
on QEMU 7.2 before fleece bounded its requests, docs/design.md §2.4).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from backups import point_ids, repo_files, restore
from guest import Guest, boot_guest, check_point, read_disk

pytestmark = pytest.mark.qemu

LAG = 5
"""Sequences the console may trail the disks by: a backup held after its point may see its
point hold up to this many sequences more than the console had shown when it was held."""


def backup_args(guest: Guest, repo: Path, *extra: str) -> list[str]:
    args = ["backup", "--qmp", guest.vm.qmp_path, "--repo", str(repo), "--json"]
    for d in guest.drives:
        args += ["--drive", d]
    return [*args, *extra]


def backup_while_writing(fleece: Any, guest: Guest, repo: Path, *extra: str
                         ) -> tuple[dict[str, Any], int, int]:
    """A backup run to its end while the guest writes: (its JSON, committed before, bound after)."""
    before = guest.wait_more(3)
    res = fleece(*backup_args(guest, repo, *extra))
    assert res.rc == 0, res.err
    after = guest.wait_more(1)  # the guest goes on writing after the backup
    return res.json(), before, after + LAG


def held_while_writing(hold_backup: Any, guest: Guest, repo: Path, phase: str, writes: int,
                       *extra: str) -> tuple[dict[str, Any], int, int]:
    """A backup held at ``phase`` while the guest commits ``writes`` more sequences, then let go.

    Those sequences write zeroes (every 3rd) and trim (every 4th): the
    guest's fstrim must report bytes trimmed while the export is up (that
    discards pass the filter to the image is shown by
    ``test_writes_after_point.py``; QEMU 7.2's virtio-blk does not count them).
    """
    assert writes >= 8, "the hold must span a trim"
    before = guest.wait_more(3)
    drives = [a for d in guest.drives[1:] for a in ("--drive", d)]
    held = hold_backup(guest.vm, repo, phase, *drives, *extra)
    held.wait_held()
    at_hold = guest.committed()
    guest.wait_more(writes)
    assert [b for n, b in guest.trims() if n > at_hold + 1 and b > 0], (
        f"no trim while held: {guest.trims()[-5:]}")
    rc, out, err = held.release()
    assert rc == 0, err
    return json.loads(out), before, at_hold + LAG


def restored_disks(fleece: Any, guest: Guest, repo: Path, point: str, work: Path) -> list[Any]:
    """Restore every disk of ``point`` to raw files and read the workload's record from them."""
    disks = []
    for d in guest.drives:
        raw = restore(fleece, repo, point, work / f"{point}-{d}.raw", drive=d)
        disks.append(read_disk(raw, work))
        raw.unlink()
    return disks


def test_full_and_incrementals_taken_while_the_guest_writes_each_restore_to_their_point(
        make_vm: Any, fleece: Any, hold_backup: Any, short_tmp: Any, tmp_path: Any) -> None:
    guest = boot_guest(make_vm, short_tmp)
    repo = tmp_path / "repo"
    points = [backup_while_writing(fleece, guest, repo),
              held_while_writing(hold_backup, guest, repo, "export-live", 10),
              backup_while_writing(fleece, guest, repo),
              held_while_writing(hold_backup, guest, repo, "chunk-stored", 10)]
    levels = [p["disks"][0]["level"] for p, _, _ in points]
    assert levels == ["full", "incremental", "incremental", "incremental"]
    assert [p["parent"] for p, _, _ in points[1:]] == [p["point"] for p, _, _ in points[:-1]]
    cuts = []
    for p, before, bound in points:
        disks = restored_disks(fleece, guest, repo, p["point"], tmp_path)
        cuts.append(check_point(guest, disks, before, bound))
    assert cuts == sorted(cuts) and len(set(cuts)) == len(cuts), cuts
    guest.check_alive()
    assert guest.kernel_errors() == []


def test_two_disks_written_by_one_workload_restore_to_one_point_in_time(
        make_vm: Any, fleece: Any, hold_backup: Any, short_tmp: Any, tmp_path: Any) -> None:
    guest = boot_guest(make_vm, short_tmp, drives=2)
    repo = tmp_path / "repo"
    points = [held_while_writing(hold_backup, guest, repo, "export-live", 8),
              backup_while_writing(fleece, guest, repo),
              held_while_writing(hold_backup, guest, repo, "chunk-stored", 8)]
    for p, before, bound in points:
        assert len(p["disks"]) == 2
        disks = restored_disks(fleece, guest, repo, p["point"], tmp_path)
        check_point(guest, disks, before, bound)
    assert guest.kernel_errors() == []


def test_qga_freezes_the_real_guest_around_the_point_and_its_filesystem_needs_no_replay(
        make_vm: Any, fleece: Any, hold_backup: Any, short_tmp: Any, tmp_path: Any) -> None:
    guest = boot_guest(make_vm, short_tmp, qga=True)
    assert guest.qga is not None
    repo = tmp_path / "repo"
    before = guest.wait_more(3)
    held = hold_backup(guest.vm, repo, "guest-frozen", "--qga", str(guest.qga))
    held.wait_held()
    # Frozen: the workload's fsyncs block, no sequence completes.
    frozen_at = guest.committed()
    time.sleep(3)
    assert guest.committed() <= frozen_at + 1, "the guest kept committing while frozen"
    rc, out, err = held.release()
    assert rc == 0, err
    assert re.search(r"froze [1-9]\d* guest filesystems", err) and "thawed" in err, err
    guest.wait_more(5)  # thawed: it writes again
    point = json.loads(out)["point"]
    (disk,) = restored_disks(fleece, guest, repo, point, tmp_path)
    # A frozen ext4 has its journal flushed: the restored one needs no replay.
    assert disk.clean_before_replay
    cut = check_point(guest, [disk], before, frozen_at + 1)
    # The guest's own clock shows the freeze: its record has a gap of the 3 s held, right after
    # the point (the sequence in flight at the freeze finished after the thaw).
    ups = dict(guest.commits())
    gaps = [ups[n] - ups[n - 1] for n in range(cut + 1, cut + 4)]
    assert max(gaps) >= 2.5, (cut, guest.commits()[-20:])
    assert guest.kernel_errors() == []


def test_trim_after_read_races_guest_overwrites_and_the_point_stays_exact(
        make_vm: Any, fleece: Any, hold_backup: Any, short_tmp: Any, tmp_path: Any) -> None:
    # Slots 4 MiB apart (one a chunk) over most of the disk: each sequence overwrites part of
    # a chunk the backup has read and trimmed, has queued, or has not read yet.
    guest = boot_guest(make_vm, short_tmp, size="96M", slots=16, slotkb=256, stride=4096)
    repo = tmp_path / "repo"
    full, before, bound = held_while_writing(hold_backup, guest, repo, "chunk-stored", 18,
                                             "--storers", "1", "--readers", "1")
    assert full["disks"][0]["level"] == "full"
    assert full["disks"][0]["bytes_trimmed"] > 0, full  # QEMU answered fleece's trims
    check_point(guest, restored_disks(fleece, guest, repo, full["point"], tmp_path), before, bound)
    incr, before, bound = held_while_writing(hold_backup, guest, repo, "chunk-stored", 18,
                                             "--storers", "1", "--readers", "1")
    assert incr["disks"][0]["level"] == "incremental"
    assert incr["disks"][0]["bytes_trimmed"] > 0, incr
    check_point(guest, restored_disks(fleece, guest, repo, incr["point"], tmp_path), before, bound)
    assert guest.kernel_errors() == []


def test_reverse_delta_full_under_a_running_guest_fails_the_backup_not_the_guest(
        make_vm: Any, fleece: Any, hold_backup: Any, tmpfs: Any, short_tmp: Any, tmp_path: Any) -> None:
    guest = boot_guest(make_vm, short_tmp)
    repo = tmp_path / "repo"
    first, _, _ = backup_while_writing(fleece, guest, repo)
    tiny = tmpfs("delta", "1M")
    before, files_before = guest.vm.block_graph(), repo_files(repo)
    assert before["status"] == "running"

    held = hold_backup(guest.vm, repo, "export-live", "--scratch-dir", str(tiny))
    held.wait_held()
    # Every sequence overwrites 64 KiB of slots and writes a new file: 40 of them need
    # more reverse delta than the 1 MiB there is. The guest's writes all succeed.
    guest.wait_more(40)
    assert guest.vm.qmp("query-status")["status"] == "running"
    assert {b.get("io-status", "ok") for b in guest.vm.qmp("query-block")} == {"ok"}
    rc, out, err = held.release()

    assert (rc, out) == (1, ""), err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("fleece: error: ")] == lines[-1:], err
    assert "a full reverse delta breaks the snapshot" in lines[-1], err
    assert guest.vm.block_graph() == before  # running, nothing of the export left
    assert list(tiny.iterdir()) == []
    assert point_ids(fleece, repo) == [first["point"]]
    assert repo_files(repo) == files_before
    guest.wait_more(5)
    guest.check_alive()
    assert guest.kernel_errors() == [], guest.kernel_errors()

    nxt, before_nxt, bound = backup_while_writing(fleece, guest, repo)
    assert (nxt["parent"], nxt["disks"][0]["level"]) == (first["point"], "incremental")
    check_point(guest, restored_disks(fleece, guest, repo, nxt["point"], tmp_path), before_nxt, bound)
