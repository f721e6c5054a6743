"""``backup --audit-bitmap PERCENT``: a dirty bitmap that missed writes is caught, and the backup is full.

Writes made while the checkpoint bitmap was disabled over QMP are exactly
what a lost or stale bitmap looks like: an incremental would silently miss
them. The audit reads a sample of the chunks the bitmap calls clean from the
export and compares them with the parent's index (no repository reads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backups import MiB, backup, identical, random_image, restore


def test_writes_the_bitmap_missed_make_the_backup_full_and_it_restores_identical(
        make_vm: Any, fleece: Any, tmp_path: Path) -> None:
    vm = make_vm([("qcow2", "32M")], contents={"vda": random_image(tmp_path / "seed.raw", 32 * MiB, 3)})
    repo = tmp_path / "repo"
    first = backup(fleece, vm, repo)

    # An honest incremental: the audit samples every clean chunk and finds them all as stored.
    vm.write("vda", 1 * MiB, 64 * 1024, 0x11)
    honest = backup(fleece, vm, repo, "--audit-bitmap", "100")["disks"][0]
    assert honest["level"] == "incremental" and honest["reason"] is None
    assert honest["audit"]["sampled"] == honest["audit"]["candidates"] > 0
    assert honest["audit"]["mismatched"] == 0

    # Writes behind the bitmap's back (disabled over QMP, as after a crash or an outside edit).
    bitmap = next(name for name in vm.bitmaps("vda") if name.startswith("fleece-"))
    vm.qmp("block-dirty-bitmap-disable", node=vm.format_node("vda"), name=bitmap)
    vm.write("vda", 20 * MiB, 4096, 0x22)
    vm.qmp("block-dirty-bitmap-enable", node=vm.format_node("vda"), name=bitmap)
    metrics = tmp_path / "fleece.prom"
    caught = backup(fleece, vm, repo, "--audit-bitmap", "100", "--metrics-file", str(metrics))
    disk = caught["disks"][0]
    assert disk["level"] == "full", disk
    assert disk["reason"].startswith("--audit-bitmap: 1 of ") and "missed writes" in disk["reason"]
    assert disk["audit"]["mismatched"] == 1 and disk["audit"]["first_mismatch_offset"] == 20 * MiB
    assert 'fleece_backup_audit_mismatches{command="backup"' in metrics.read_text()
    out = restore(fleece, repo, caught["point"], tmp_path / "out.raw")
    assert identical(out, vm.shadow("vda"))  # the write the bitmap missed is in the point
    assert first["point"] != caught["point"]


def test_audit_bitmap_out_of_range_is_bad_input(fleece: Any, tmp_path: Path) -> None:
    res = fleece("backup", "--qmp", tmp_path / "none.sock", "--drive", "vda", "--repo", tmp_path / "r",
                 "--audit-bitmap", "0")
    assert res.rc == 2 and "--audit-bitmap PERCENT must be" in res.err
