"""``fleece verify --fsck``: every file system of a point checked read-only, from the repository.

The point is served by nbdkit and read by a libguestfs appliance (TCG
here); nothing is mounted in the host's kernel, and the run leaves nothing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import FLEECE, TEST_PASSPHRASE
from disks import MiB, Part, btrfs, ext4, ntfs, partitioned, swap, vfat, zero
from verifying import back_up_images, leftovers


@pytest.mark.usefixtures("repo_encryption")  # plain, then encrypted (the fleece fixture inits it)
def test_a_zeroed_superblock_passes_verify_deep_and_fails_verify_fsck(
        make_vm: Any, fleece: Any, tmp_path: Path, scratch_tmpdir: Path) -> None:
    # A guest's ext4 whose primary superblock was zeroed (a stray dd), backed up as it is.
    disk = ext4(tmp_path / "damaged.raw", 64 * MiB, "data", {"etc/app.conf": b"x" * 5000})
    zero(disk, 1024, 1024)
    repo = tmp_path / "repo"
    point = back_up_images(make_vm, fleece, repo, [disk])

    deep = fleece("verify", "--repo", repo, "--deep")
    assert deep.rc == 0, deep.err  # every stored byte matches its digest…
    assert "0 damaged" in deep.out

    metrics = tmp_path / "fleece.prom"
    # The nightly job's form: every point without a fsck verdict (this one), newest first.
    fsck = fleece("verify", "--repo", repo, "--vm", "vm1", "--fsck", "--unverified", "--limit", "5",
                  "--metrics-file", metrics)
    assert fsck.rc == 1, fsck.out + fsck.err  # …and the file system is broken all the same
    reason = fsck.err.strip().splitlines()[-1]
    assert reason.startswith("fleece: error: point ") and "FAILED" in reason and "/dev/sda" in reason
    assert "Bad magic number in super-block" in fsck.out  # the checker's own findings
    assert f"point {point} of VM vm1, fsck" in fsck.out
    assert "1 unverified point of VM vm1 judged (fsck): 1 failed" in fsck.out
    prom = metrics.read_text()
    assert 'fleece_verify_result{command="verify-fsck",' in prom
    assert 'fleece_failures_total{command="verify-fsck",' in prom
    assert "fleece_verify_newest_verified_point_timestamp_seconds" not in prom  # none passed

    listed = fleece("list", "--repo", repo, "--json").json()["points"][0]
    assert listed["verification"]["ok"] is False
    assert listed["verification"]["summary"].startswith("FAILED: ")
    table = fleece("list", "--repo", repo).out
    assert "FAILED: " in table
    assert leftovers(scratch_tmpdir) == []
    # The point itself never changes; the verdict is an object beside it.
    assert len(list((repo / "verified").rglob("*.json"))) == 1


def _lvm_disk(path: Path) -> Path:
    """A GPT disk: a BIOS boot partition, ext2 and Btrfs, and LVM (ext3 and XFS volumes),
    made through libguestfs (LVM needs device-mapper: never on the host)."""
    import guestfs

    partitioned(path, 640 * MiB, "gpt", [
        Part(1, "21686148-6449-6E6F-744E-656564454649"),
        Part(32, "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
             ext4(path.with_suffix(".ext2"), 32 * MiB, "old", fstype="ext2")),
        Part(130, "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
             btrfs(path.with_suffix(".btrfs"), 130 * MiB, "pool")),
        Part(460, "E6D6D379-F507-44C2-A23C-238F2A3DF928"),
    ])
    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend("direct")
    g.set_backend_settings(["force_tcg"])
    g.add_drive_opts(str(path), format="raw")
    g.launch()
    g.pvcreate("/dev/sda4")
    g.vgcreate("vg0", ["/dev/sda4"])
    g.lvcreate("home", "vg0", 64)
    g.lvcreate("srv", "vg0", 320)  # XFS wants 300 MB at least
    g.mkfs("ext3", "/dev/vg0/home", label="home")
    g.mkfs("xfs", "/dev/vg0/srv", label="srv")
    g.shutdown()
    g.close()
    return path


def test_a_clean_point_with_mbr_and_gpt_disks_and_many_file_systems_passes(
        make_vm: Any, fleece: Any, tmp_path: Path, scratch_tmpdir: Path) -> None:
    mbr = partitioned(tmp_path / "mbr.raw", 200 * MiB, "dos", [
        Part(64, "83", ext4(tmp_path / "root.ext4", 64 * MiB, "root", {"etc/hostname": b"web1\n"}),
             bootable=True),
        Part(32, "c", vfat(tmp_path / "boot.vfat", 32 * MiB, "BOOT", {"readme.txt": b"boot\n"})),
        Part(64, "7", ntfs(tmp_path / "win.ntfs", 64 * MiB, "win")),
        Part(16, "82", swap(tmp_path / "swap.img", 16 * MiB)),
    ])
    gpt = _lvm_disk(tmp_path / "gpt.raw")
    repo = tmp_path / "repo"
    point = back_up_images(make_vm, fleece, repo, [mbr, gpt])

    metrics = tmp_path / "fleece.prom"
    res = fleece("verify", "--repo", repo, "--vm", "vm1", "--fsck", "--json", "--metrics-file", metrics,
                 timeout=1200)
    assert res.rc == 0, res.out + res.err
    doc = res.json()
    assert doc["ok"] is True and doc["point"] == point and doc["summary"] == "fsck clean"
    tables = {t["disk"]: t for t in doc["partition_tables"]}
    assert tables["vda"]["type"] == "msdos" and tables["vda"]["ok"]
    assert tables["vdb"]["type"] == "gpt" and tables["vdb"]["ok"]
    found = {(f["disk"], f["type"], f["label"]): f for f in doc["filesystems"]}
    for disk, fstype, label in [("vda", "ext4", "root"), ("vda", "vfat", "BOOT"), ("vda", "ntfs", "win"),
                                ("vdb", "ext2", "old"), ("vdb", "btrfs", "pool"),
                                ("vdb", "ext3", "home"), ("vdb", "xfs", "srv")]:
        f = found[(disk, fstype, label)]
        assert f["clean"] is True, f
        assert f["uuid"] and f["size"] > 0 and f["used"] is not None and f["used"] > 0, f
    assert found[("vda", "ext4", "root")]["checker"] == "e2fsck -fn"
    not_checked = [f for f in doc["filesystems"] if f["clean"] is None]
    assert {f["findings"] for f in not_checked} >= {"BIOS boot partition"}, not_checked
    assert leftovers(scratch_tmpdir) == []
    listed = fleece("list", "--repo", repo).out
    assert "fsck clean" in listed
    again = fleece("verify", "--repo", repo, "--vm", "vm1", "--fsck", "--unverified", "--json")
    assert again.rc == 0 and again.json() == {"mode": "fsck", "ok": True, "points": []}
    prom = metrics.read_text()
    assert "fleece_verify_newest_verified_point_timestamp_seconds{" in prom
    assert 'fleece_verify_result{command="verify-fsck",repository=' in prom


def test_an_encrypted_s3_point_is_checked_and_its_verdict_is_sealed(
        make_vm: Any, fleece: Any, tmp_path: Path, scratch_tmpdir: Path, s3_bucket: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEECE_PASSPHRASE", TEST_PASSPHRASE)
    repo = f"s3://{s3_bucket}/fleece"
    assert fleece("init", "--repo", repo, "--encryption", "aes-256-gcm").rc == 0
    good = ext4(tmp_path / "good.raw", 32 * MiB, "good")
    bad = ext4(tmp_path / "bad.raw", 32 * MiB, "bad")
    zero(bad, 1024, 1024)
    back_up_images(make_vm, fleece, repo, [good, bad])

    only_good = fleece("verify", "--repo", repo, "--vm", "vm1", "--fsck", "--drive", "vda", "--json")
    assert only_good.rc == 0, only_good.err
    assert [f["disk"] for f in only_good.json()["filesystems"]] == ["vda"]
    listed = fleece("list", "--repo", repo, "--json").json()["points"][0]["verification"]
    assert listed["ok"] is True and listed["summary"] == "fsck clean"

    import boto3

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]]
    records = [k for k in keys if k.startswith("fleece/verified/")]
    assert len(records) == 1 and "vm1" not in records[0]  # the VM's name is a token
    body = boto3.client("s3").get_object(Bucket=s3_bucket, Key=records[0])["Body"].read()
    assert body.startswith(b"FLEN") and b"fsck clean" not in body  # sealed
    assert leftovers(scratch_tmpdir) == []


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_run_stopped_mid_check_leaves_nothing(
        make_vm: Any, fleece: Any, tmp_path: Path, scratch_tmpdir: Path, how: str) -> None:
    disk = ext4(tmp_path / "disk.raw", 32 * MiB, "data")
    repo = tmp_path / "repo"
    back_up_images(make_vm, fleece, repo, [disk])
    proc = subprocess.Popen([FLEECE, "verify", "--repo", str(repo), "--vm", "vm1", "--fsck"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Wait until the appliance runs (its QEMU lives in the run's scratch directory).
    deadline = time.monotonic() + 120
    while not any("qemu" in x for x in leftovers(scratch_tmpdir)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, leftovers(scratch_tmpdir)
        time.sleep(0.2)
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=120)
    if how == "SIGTERM":
        assert proc.returncode == 1, err
        assert "stopped by signal SIGTERM" in err.strip().splitlines()[-1], err
    else:
        deadline = time.monotonic() + 30  # the children die with their parent
        while any(x.startswith("process") for x in leftovers(scratch_tmpdir)):
            assert time.monotonic() < deadline, leftovers(scratch_tmpdir)
            time.sleep(0.2)
        assert leftovers(scratch_tmpdir) != []  # the directory stays until cleanup
        swept = fleece("cleanup", "--stale", "--json")
        assert swept.rc == 0, swept.err
        assert json.loads(swept.out)["stale_scratch"]["removed"], swept.out
    assert leftovers(scratch_tmpdir) == []
    assert not (repo / "verified").exists()  # no verdict for a run that did not finish
