"""``fleece verify --boot``: a point boots from its own disk in a throwaway QEMU, from the repository.

The guest is the project's real one (Debian's kernel, busybox, qemu-guest-agent),
installed on a partitioned disk behind syslinux: the firmware boots it, no
``-kernel``. The verification machine has no network and writes only to
overlays in its scratch directory, which goes when the run ends.
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
from disks import MiB, bios_boot_disk, hanging_boot_disk, zero
from guest import build_guest
from verifying import back_up_images, leftovers


def boot_disk(tmp_path: Path) -> Path:
    return bios_boot_disk(tmp_path / "boot.raw", build_guest(), "console=ttyS0 quiet panic=-1",
                          {"etc/motd": b"restored\n"})


def test_a_good_encrypted_s3_point_boots_answers_and_runs_commands(
        make_vm: Any, fleece: Any, tmp_path: Path, scratch_tmpdir: Path, s3_bucket: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEECE_PASSPHRASE", TEST_PASSPHRASE)
    repo = f"s3://{s3_bucket}/fleece"
    assert fleece("init", "--repo", repo, "--encryption", "aes-256-gcm").rc == 0
    point = back_up_images(make_vm, fleece, repo, [boot_disk(tmp_path)])
    reports = tmp_path / "reports"
    reports.mkdir()
    metrics = tmp_path / "fleece.prom"

    res = fleece("verify", "--repo", repo, "--vm", "vm1", "--boot", "--memory", "256",
                 "--expect", "agent", "--expect", "serial", r"^FLEECE-IDLE",
                 "--run", "cat /proc/cmdline", "--run", "test -b /dev/vda2 && echo data-partition",
                 "--report-dir", reports, "--metrics-file", metrics, "--json", timeout=900)
    assert res.rc == 0, res.out + res.err
    doc = res.json()
    assert doc["ok"] and doc["point"] == point and doc["summary"].startswith("booted in ")
    assert doc["time_to_ready"] > 0 and doc["agent"]["ping"] is True
    assert doc["serial_match"] == "FLEECE-IDLE"
    assert [c["exitcode"] for c in doc["commands"]] == [0, 0]
    assert "BOOT_IMAGE=/vmlinuz" in doc["commands"][0]["stdout"]  # syslinux booted it
    assert doc["commands"][1]["stdout"].strip() == "data-partition"
    assert doc["read_errors"] == {"vda": 0} and 0 < doc["bytes_read"]["vda"] < 160 * MiB
    png = Path(doc["screendump"])
    assert png.parent == reports and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(next(reports.glob("*.json")).read_text())["ok"] is True
    assert "FLEECE-READY" in doc["console"]
    listed = fleece("list", "--repo", repo, "--json").json()["points"][0]["verification"]
    assert listed["kind"] == "boot" and listed["summary"] == doc["summary"]
    prom = metrics.read_text()
    assert 'fleece_verify_time_to_ready_seconds{command="verify-boot"' in prom
    assert leftovers(scratch_tmpdir) == []


def test_a_zeroed_boot_sector_fails_and_a_hanging_guest_fails_at_the_timeout(
        make_vm: Any, fleece: Any, tmp_path: Path, scratch_tmpdir: Path) -> None:
    disk = boot_disk(tmp_path)
    zero(disk, 0, 512)  # the boot code and the partition table
    hang = hanging_boot_disk(tmp_path / "hang.raw")
    repo = tmp_path / "repo"
    unbootable = back_up_images(make_vm, fleece, repo, [disk])
    hanging = back_up_images(make_vm, fleece, repo, [hang])

    res = fleece("verify", "--repo", repo, "--vm", "vm1", "--boot", unbootable, "--memory", "256",
                 "--expect", "serial", "FLEECE-IDLE", "--timeout", "300", "--json")
    assert res.rc == 1, res.out + res.err
    assert res.err.strip().splitlines()[-1].endswith(
        "FAILED: the firmware found nothing to boot on the point's disks"), res.err
    assert "No bootable device" in res.json()["firmware_log"]  # the details are in the report
    started = time.monotonic()
    res = fleece("verify", "--repo", repo, "--vm", "vm1", "--boot", hanging, "--memory", "256",
                 "--expect", "agent", "--timeout", "20", "--json")
    assert res.rc == 1, res.out + res.err
    assert res.json()["summary"] == "FAILED: not ready within 20 s: the guest agent did not answer"
    assert time.monotonic() - started < 200
    assert leftovers(scratch_tmpdir) == []
    verdicts = {p["id"]: p["verification"] for p in fleece("list", "--repo", repo, "--json").json()["points"]}
    assert not verdicts[unbootable]["ok"] and not verdicts[hanging]["ok"]

    # --unverified picks the points without a boot verdict: both have one (a failed one).
    again = fleece("verify", "--repo", repo, "--vm", "vm1", "--boot", "--unverified", "--expect", "agent",
                   "--json")
    assert again.rc == 0, again.err
    assert again.json()["points"] == []


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_a_boot_stopped_midway_leaves_nothing(
        make_vm: Any, fleece: Any, tmp_path: Path, scratch_tmpdir: Path, how: str) -> None:
    repo = tmp_path / "repo"
    back_up_images(make_vm, fleece, repo, [hanging_boot_disk(tmp_path / "hang.raw")])
    proc = subprocess.Popen([FLEECE, "verify", "--repo", str(repo), "--vm", "vm1", "--boot",
                             "--expect", "agent", "--memory", "128"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any("qemu-system" in x for x in leftovers(scratch_tmpdir)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, leftovers(scratch_tmpdir)
        time.sleep(0.2)
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=120)
    if how == "SIGTERM":
        assert proc.returncode == 1, err
        assert "stopped by signal SIGTERM" in err.strip().splitlines()[-1], err
    elif how == "SIGINT":  # Ctrl-C sent to fleece alone (a terminal's would reach QEMU too)
        assert proc.returncode == 130, err
        assert err.strip().splitlines()[-1] == "fleece: interrupted", err
    else:
        deadline = time.monotonic() + 30  # QEMU and nbdkit die with their parent
        while any(x.startswith("process") for x in leftovers(scratch_tmpdir)):
            assert time.monotonic() < deadline, leftovers(scratch_tmpdir)
            time.sleep(0.2)
        swept = fleece("cleanup", "--stale", "--json")
        assert swept.rc == 0 and json.loads(swept.out)["stale_scratch"]["removed"], swept.out
    assert leftovers(scratch_tmpdir) == []
    assert not (repo / "verified").exists()
