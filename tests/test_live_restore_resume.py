"""``fleece restore --live`` losing its server mid-stream: the guest pauses, ``--resume`` carries on.

The guest is real (the boot sector in ``tests/live.py``): it reads the disk
through the BIOS and the virtio-blk device, whose ``rerror=stop`` policy is
what pauses the VM when the point is no longer served.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from live import GUEST_READS, debugcon_args, guest_output_expected, reading_guest_disk
from test_live_restore import (
    ERROR_POLICY,
    P1,
    SIZE,
    flushed,
    identical,
    make_repo,
    only_the_targets,
    qemu_img_info,
)

MiB = 1 << 20


def wait_until(what: str, check: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def guest_said(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


@pytest.mark.qemu
@pytest.mark.parametrize("victim", ["server", "fleece"])
def test_losing_the_server_mid_stream_pauses_the_guest_at_an_unstreamed_read_and_resume_finishes(
        make_vm: Any, live: Any, fleece: Any, store_point: Any, tmp_path: Path,
        scratch_tmpdir: Path, victim: str) -> None:
    # 32 MiB of data before the guest's reads: at 1 MiB/s the stream is far from them.
    data = reading_guest_disk(SIZE, random.Random(7).randbytes(32 * MiB))
    repo = tmp_path / "repo"
    make_repo(str(repo), store_point, {"vda": data})
    said = tmp_path / "guest.out"
    vm = make_vm([("qcow2", "64M")], device_options=ERROR_POLICY, extra_args=debugcon_args(said))
    out = tmp_path / "vda.qcow2"
    lr = live("--repo", repo, P1, "--drive", "vda", "--output", out, "--qmp", vm.qmp_path,
              "--speed", "1M")
    lr.wait_for("running")
    # The guest boots from the point and reads through it.
    wait_until("the guest's first reads", lambda: len(guest_said(said)) >= 3)
    expected = bytearray(data)
    vm.qemu_io("vda", f"write -P 0x5a {50 * MiB} {64 * 1024}")
    expected[50 * MiB : 50 * MiB + 64 * 1024] = b"\x5a" * 64 * 1024

    if victim == "server":
        (nbdkit,) = lr.children()
        os.kill(nbdkit, signal.SIGKILL)
        rc, err = lr.finish()
        assert rc == 1 and "--resume" in err and "Traceback" not in err, err
    else:
        lr.kill()  # SIGKILL: its nbdkit follows it (--exit-with-parent)

    # The guest's next read of a region not streamed yet pauses the VM; no error reaches it.
    wait_until(f"the VM to pause on the read error (guest said {guest_said(said)!r})",
               lambda: vm.qmp("query-status")["status"] == "io-error", timeout=30)
    before = guest_said(said)
    time.sleep(1)
    assert guest_said(said) == before
    assert len(before) < GUEST_READS and before == guest_output_expected()[: len(before)]
    assert b"E" not in before

    res = fleece("restore", "--live", "--resume", "--repo", repo, P1, "--drive", "vda",
                 "--output", out, "--qmp", vm.qmp_path)
    assert res.rc == 0, res.err
    assert vm.qmp("query-status")["status"] == "running"
    # The read that failed is retried and the guest carries on to the end.
    wait_until("the guest to finish", lambda: guest_said(said) == guest_output_expected())
    only_the_targets(vm, ["vda"])
    flushed(vm, "vda")
    assert "backing-filename" not in qemu_img_info(out)
    assert identical(out, bytes(expected), tmp_path)
    # The live restore's scratch directories (sockets, state files, nbdkit's pid files) are gone.
    assert list(scratch_tmpdir.iterdir()) == []


@pytest.mark.qemu
def test_fleece_killed_after_the_stream_completed_is_finished_by_resume(
        make_vm: Any, live: Any, fleece: Any, store_point: Any, tmp_path: Path,
        scratch_tmpdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = random.Random(8).randbytes(SIZE // 2) + bytes(SIZE // 2)
    repo = tmp_path / "repo"
    make_repo(str(repo), store_point, {"vda": data})
    vm = make_vm([("qcow2", "64M")], device_options=ERROR_POLICY)
    out = tmp_path / "vda.qcow2"
    marker = tmp_path / "held"
    monkeypatch.setenv("FLEECE_TEST_PAUSE_AT", "live-streamed")
    monkeypatch.setenv("FLEECE_TEST_PAUSE_FILE", str(marker))
    lr = live("--repo", repo, P1, "--drive", "vda", "--output", out, "--qmp", vm.qmp_path)
    wait_until("the stream to complete", marker.exists)
    lr.kill()
    # Killed between the job's end and the clean-up: the NBD node and the placeholder remain.
    nodes = {n["node-name"] for n in vm.qmp("query-named-block-nodes", flat=True)}
    assert "fmt-vda" in nodes and any(n.startswith("fleece-live-nbd-vda-") for n in nodes)
    monkeypatch.delenv("FLEECE_TEST_PAUSE_AT")
    res = fleece("restore", "--live", "--resume", "--repo", repo, P1, "--drive", "vda",
                 "--output", out, "--qmp", vm.qmp_path)
    assert res.rc == 0, res.err
    assert vm.qmp("query-status")["status"] == "running"
    only_the_targets(vm, ["vda"])
    flushed(vm, "vda")
    assert "backing-filename" not in qemu_img_info(out)
    assert identical(out, data, tmp_path)
    assert list(scratch_tmpdir.iterdir()) == []
