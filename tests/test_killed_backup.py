"""The agent SIGKILLed at each phase of a backup, and QEMU SIGKILLed mid-chain.

A killed ``fleece backup`` leaves no restore point that names missing data;
one stopped by SIGTERM tears its export down before it exits, leaving QEMU
exactly as it was found (plus, once the point was written, that point's
checkpoint); after a SIGKILL the next plain backup finds that the process
that left the export has certainly exited, cleans up as ``fleece cleanup``
would, says so in one line and goes on. Either way the next backup is an
incremental that holds every write — none of the dirty bits of the
interrupted run is lost. The guest writes while the killed backup is held,
after its snapshot point, so those writes are what a lost bit would lose.
"""

from __future__ import annotations

import shlex
import signal
from typing import Any

import pytest
from backups import CHUNK, MiB, backup, identical, point_ids, random_image, restore

from fleece.testing import PHASES

# Each test runs on a plain and on an encrypted repository (conftest.repo_encryption).
pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("repo_encryption")]


def stop_with(held: Any, sig: signal.Signals) -> tuple[int, str, str]:
    """Send ``sig`` to a held backup; once it says it is stopping, let the phase go on."""
    held.proc.send_signal(sig)
    assert held.proc.stderr is not None
    seen: list[str] = []
    while True:
        line = held.proc.stderr.readline()
        assert line, f"the backup ended without a word about {sig.name}: {seen}"
        seen.append(line)
        if line.startswith(f"fleece: {sig.name}: stopping the backup"):
            break
    held.marker.unlink()
    out, err = held.proc.communicate(timeout=120)
    return held.proc.returncode, out, "".join(seen) + err


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
@pytest.mark.parametrize("phase", PHASES)
def test_backup_killed_or_stopped_at_each_phase_loses_nothing_and_the_next_backup_heals(
        make_vm: Any, fleece: Any, hold_backup: Any, tmp_path: Any, scratch_tmpdir: Any, phase: Any,
        sig: signal.Signals) -> None:
    seed = random_image(tmp_path / "seed.raw", 32 * MiB, 11)
    vm = make_vm([("qcow2", "32M")], contents={"vda": seed})
    repo = tmp_path / "repo"
    first = backup(fleece, vm, repo)["point"]
    vm.write("vda", 0, 64 * 1024, 0x11)            # chunk 0: a delta, into a pack
    vm.write("vda", 5 * CHUNK + 4096, 3 * MiB, 0x12)   # chunk 5: mostly new, a whole chunk
    before = vm.block_graph()
    assert before["bitmaps"]["vda"] == [(f"fleece-{first}", True, True)]
    at_snapshot = vm.snapshot_shadow("vda", tmp_path / "at-snapshot.raw")

    held = hold_backup(vm, repo, phase)
    held.wait_held()
    committed = phase in ("before-commit", "deltas-unlinked")  # the point was written
    if phase == "deltas-unlinked":
        # Past this phase no reverse delta (a copy of guest data) is on disk.
        assert not list(scratch_tmpdir.rglob("delta-*")), list(scratch_tmpdir.rglob("*"))
    # After the held backup's snapshot point: only fleece-<first> (or, once
    # committed, the new checkpoint) can carry these bits into the next backup.
    vm.write("vda", 2 * CHUNK, 4096, 0x13)         # chunk 2, clean until now
    vm.write("vda", 0, 4096, 0x14)                 # chunk 0 again

    points = None
    if sig == signal.SIGKILL:
        held.kill()
        assert vm.block_graph() != before  # it did leave something in QEMU
    else:
        rc, out, err = stop_with(held, sig)
        assert (rc, out) == (128 + sig, ""), err
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert last.startswith("fleece: error: stopped by SIGTERM: the backup was interrupted; "
                               "nothing of it is left in QEMU"), err
        points = point_ids(fleece, repo)
        # Torn down before it exited: QEMU as found, or with its commit finished.
        killed = points[-1]
        expect = {**before, "bitmaps": {"vda": [(f"fleece-{killed}", True, True)]}} if committed else before
        assert vm.block_graph() == expect
        assert list(scratch_tmpdir.iterdir()) == []

    points = point_ids(fleece, repo)
    if committed:
        # The point was written before the tear-down began: it exists and is whole.
        assert points[0] == first and len(points) == 2
        killed = points[1]
        assert identical(restore(fleece, repo, killed, tmp_path / "killed.raw"), at_snapshot)
    else:
        assert points == [first], "an interrupted backup must leave no restore point"

    # The next backup, with no manual step: it cleans up what a killed run
    # left (saying so in one line) and goes on.
    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, "--json")
    assert res.rc == 0, res.err
    nxt = res.json()
    healed = [line for line in res.err.splitlines() if "has exited and left its export" in line]
    if sig == signal.SIGKILL:
        assert len(healed) == 1, res.err
        assert healed[0].startswith(f"fleece: fleece pid {held.proc.pid} on ")
        assert "cleaned up as 'fleece cleanup' would" in healed[0]
        assert ("its commit was finished" if committed else "aborted") in healed[0]
    else:
        assert healed == [], res.err
    disk = nxt["disks"][0]
    assert disk["level"] == "incremental"
    if committed:
        assert nxt["parent"] == killed
        # 64 KiB granules of chunks 0 and 2, written after its point, as deltas
        assert disk["bytes_read"] == 2 * 64 * 1024
    else:
        assert nxt["parent"] == first
        # every write since first: granules of chunks 0 and 2, and chunk 5 read whole
        assert disk["bytes_read"] == 2 * 64 * 1024 + CHUNK
    assert identical(restore(fleece, repo, nxt["point"], tmp_path / "next.raw"), vm.shadow("vda"))
    assert set(vm.bitmaps("vda")) == {f"fleece-{nxt['point']}"}
    assert list(scratch_tmpdir.iterdir()) == []
    assert fleece("cleanup", "--qmp", vm.qmp_path).out.strip() == "nothing to clean up"


def test_qemu_killed_mid_chain_makes_the_next_backup_full_and_it_says_why(
        make_vm: Any, fleece: Any, tmp_path: Any) -> None:
    vm = make_vm([("qcow2", "16M")], name="web1")  # the name, not the socket, survives a restart
    repo = tmp_path / "repo"
    vm.write("vda", 0, MiB, 0x21)
    p1 = backup(fleece, vm, repo)["point"]
    vm = make_vm.restart(vm, kill=False)  # a clean quit stores fleece-<p1> in the image
    vm.write("vda", CHUNK, 4096, 0x22)
    p2 = backup(fleece, vm, repo)
    assert (p2["parent"], p2["disks"][0]["level"]) == (p1, "incremental")

    # Mid-chain: fleece-<p2> lives only in QEMU's memory; the commit removed
    # fleece-<p1> from the image. SIGKILL, restart: no checkpoint at all.
    vm.write("vda", 2 * CHUNK, 4096, 0x23)
    vm.qemu_io("vda", "flush")  # the data survives the kill; bitmaps are stored only at a clean quit
    vm = make_vm.restart(vm, kill=True)
    assert vm.bitmaps("vda") == {}
    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, "--json")
    assert res.rc == 0, res.err
    p3 = res.json()
    reason = "vda: no fleece checkpoint bitmap on node fmt-vda (first export)"
    assert (p3["parent"], p3["disks"][0]["level"], p3["disks"][0]["reason"]) == (None, "full", reason)
    assert f"fleece: full because {reason}" in res.err.splitlines()
    assert identical(restore(fleece, repo, p3["point"], tmp_path / "p3.raw"), vm.shadow("vda"))

    # A checkpoint stored at a clean quit, then a SIGKILL: it comes back
    # inconsistent, so the next backup is full again, says so, and drops it.
    vm = make_vm.restart(vm, kill=False)
    vm.write("vda", 3 * CHUNK, 4096, 0x24)
    vm.qemu_io("vda", "flush")
    vm = make_vm.restart(vm, kill=True)
    assert vm.bitmaps("vda")[f"fleece-{p3['point']}"]["inconsistent"] is True
    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo)
    assert res.rc == 0, res.err
    assert (f"fleece: full because vda: checkpoint bitmap fleece-{p3['point']} on fmt-vda is "
            "inconsistent (QEMU was not shut down cleanly while it was in use)") in res.err.splitlines()
    assert "full because" not in res.out  # said once, on stderr
    p4 = point_ids(fleece, repo)[-1]
    assert identical(restore(fleece, repo, p4, tmp_path / "p4.raw"), vm.shadow("vda"))
    assert set(vm.bitmaps("vda")) == {f"fleece-{p4}"}
    # The chain starts again from there.
    vm.write("vda", 0, 4096, 0x25)
    p5 = backup(fleece, vm, repo)
    assert (p5["parent"], p5["disks"][0]["level"], p5["disks"][0]["bytes_read"]) == (p4, "incremental", 65536)
    assert identical(restore(fleece, repo, p5["point"], tmp_path / "p5.raw"), vm.shadow("vda"))


def test_sighup_stops_a_backup_and_a_second_signal_ends_it_at_once(
        make_vm: Any, fleece: Any, hold_backup: Any, tmp_path: Any, scratch_tmpdir: Any) -> None:
    vm = make_vm([("qcow2", "16M")])
    vm.write("vda", 0, MiB, 0x31)
    repo = tmp_path / "repo"
    first = backup(fleece, vm, repo)["point"]
    vm.write("vda", CHUNK, MiB, 0x32)
    held = hold_backup(vm, repo, "export-live")
    held.wait_held()
    # Held at export-live its loop cannot tear down: the first signal is
    # noted, the second ends the process at once, naming the exact command.
    held.proc.send_signal(signal.SIGHUP)
    assert held.proc.stderr is not None
    assert held.proc.stderr.readline().startswith("fleece: SIGHUP: stopping the backup: undoing")
    held.proc.send_signal(signal.SIGTERM)
    out, err = held.proc.communicate(timeout=30)
    held.marker.unlink(missing_ok=True)
    assert (held.proc.returncode, out) == (128 + signal.SIGTERM, "")
    assert err.strip().splitlines()[-1] == (
        "fleece: error: SIGTERM again; exiting now: what the backup put into QEMU may still be "
        f"there; remove it with: fleece cleanup --qmp {shlex.quote(vm.qmp_path)}")
    assert vm.attached_node("vda") == "fleece-cbw-vda"

    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, "--json")
    assert res.rc == 0, res.err
    assert "has exited and left its export of vda" in res.err
    nxt = res.json()
    assert (nxt["parent"], nxt["disks"][0]["level"]) == (first, "incremental")
    assert identical(restore(fleece, repo, nxt["point"], tmp_path / "next.raw"), vm.shadow("vda"))
    assert list(scratch_tmpdir.iterdir()) == []
