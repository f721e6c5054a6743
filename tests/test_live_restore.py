"""``fleece restore --live``: a VM runs on a restore point at once while the point streams home.

Every test drives the real command against a real QEMU started with ``-S``
on blank qcow2 placeholders, and the "guest" writes through the device
(HMP ``qemu-io -d``) while the stream runs.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fleece.repo.backends.url import open_backend
from fleece.repo.repository import Repository

KiB = 1024
MiB = 1 << 20
CHUNK = 256 * KiB
SIZE = 64 * MiB
P1 = "20260101T000000.000001Z-aaaaaa"
ERROR_POLICY = "rerror=stop,werror=stop"


def point_disk(seed: int, size: int = SIZE) -> bytes:
    """A disk with random data in several places and zero chunks between them."""
    rnd = __import__("random").Random(seed)
    disk = bytearray(size)
    for start, length in ((0, 3 * MiB), (10 * MiB + 4096, 5 * MiB), (40 * MiB, 8 * MiB),
                          (size - CHUNK, CHUNK)):
        length = max(0, min(length, size - start))
        disk[start : start + length] = rnd.randbytes(length)
    return bytes(disk)


def make_repo(url: str, store_point: Any, disks: dict[str, bytes]) -> Repository:
    repo = Repository.init(open_backend(url), chunk_size=CHUNK, hash="sha256")
    store_point(repo, P1, disks)
    return repo


def apply(disk: bytearray, offset: int, data: bytes) -> None:
    disk[offset : offset + len(data)] = data


def job_running(vm: Any) -> bool:
    return any(j["id"].startswith("fleece-live-") and j["status"] == "running"
               for j in vm.qmp("query-jobs"))


def flushed(vm: Any, drive: str) -> None:
    """Make QEMU write its cached qcow2 metadata, so qemu-img sees what the guest sees."""
    vm.hmp(f'qemu-io -d {vm.qdev(drive)} "flush"')


def identical(image: Path, expected: bytes, tmp_path: Path) -> bool:
    raw = tmp_path / f"expected-{image.name}.raw"
    raw.write_bytes(expected)
    res = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", str(image),
                          str(raw)], capture_output=True, text=True)
    return res.returncode == 0


def qemu_img_info(image: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)],
                         capture_output=True, text=True, check=True).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def only_the_targets(vm: Any, drives: list[str], disks: list[str] | None = None) -> None:
    """QEMU holds each device's restored image (named after the point's disk) and nothing else:
    no node of fleece's, of the placeholders' or of the NBD client, no job, no export."""
    names = disks or drives
    nodes = sorted(n["node-name"] for n in vm.qmp("query-named-block-nodes", flat=True))
    assert nodes == sorted(n for d in names for n in (f"restored-{d}", f"restored-{d}-file"))
    assert vm.qmp("query-jobs") == [] and vm.qmp("query-block-exports") == []
    assert {d: vm.attached_node(d) for d in drives} == {
        d: f"restored-{n}" for d, n in zip(drives, names, strict=True)}


@pytest.mark.qemu
def test_live_restore_runs_the_vm_at_once_and_ends_on_a_local_image_with_the_guests_writes(
        make_vm: Any, live: Any, repo_url: str, store_point: Any, tmp_path: Path,
        scratch_tmpdir: Path) -> None:
    data = point_disk(1)
    make_repo(repo_url, store_point, {"vda": data})
    vm = make_vm([("qcow2", "64M")], device_options=ERROR_POLICY)
    out = tmp_path / "vda.qcow2"
    lr = live("--repo", repo_url, P1, "--drive", "vda", "--output", out, "--qmp", vm.qmp_path,
              "--speed", "4M")
    running = lr.wait_for("running")
    assert running["status"] == "running"
    assert vm.qmp("query-status")["status"] == "running"

    # The guest writes while the stream runs: over streamed and unstreamed data,
    # unaligned (QEMU copies the rest of the cluster from the point), and into a hole.
    expected = bytearray(data)
    writes = [(0, b"\x55" * 64 * KiB), (33 * MiB + 512, b"\x66" * 4 * KiB),
              (44 * MiB + 100, b"\x77" * 300 * KiB), (SIZE - 4 * KiB, b"\x88" * 4 * KiB)]
    for offset, payload in writes:
        assert job_running(vm), "the stream ended before the guest's writes"
        vm.qemu_io("vda", f"write -P 0x{payload[0]:02x} {offset} {len(payload)}")
        apply(expected, offset, payload)
    assert job_running(vm)

    rc, err = lr.finish()
    assert rc == 0, err
    assert [e["event"] for e in lr.events][-2:] == ["finished", "done"]
    assert any(e["event"] == "progress" for e in lr.events)
    assert vm.qmp("query-status")["status"] == "running"
    only_the_targets(vm, ["vda"])
    flushed(vm, "vda")
    assert "backing-filename" not in qemu_img_info(out)
    assert identical(out, bytes(expected), tmp_path)
    # Zero chunks of the point were skipped, not copied: they are unallocated in the image.
    layout = json.loads(subprocess.run(["qemu-img", "map", "-U", "--output=json", str(out)],
                                       capture_output=True, text=True, check=True).stdout)
    hole = next(e for e in layout if e["start"] <= 20 * MiB < e["start"] + e["length"])
    assert not hole["data"]
    assert list(scratch_tmpdir.iterdir()) == []  # sockets, state files, pid files: all gone


@pytest.mark.qemu
def test_several_drives_pair_with_their_outputs_and_devices_in_order_and_no_start_leaves_it_paused(
        make_vm: Any, live: Any, store_point: Any, tmp_path: Path, short_tmp: Path) -> None:
    sys_disk, data_disk = point_disk(2), point_disk(3, 32 * MiB)
    repo = tmp_path / "repo"
    make_repo(str(repo), store_point, {"sys": sys_disk, "data": data_disk})
    # Devices without rerror/werror=stop: it works, with a warning per device.
    vm = make_vm([("qcow2", "32M"), ("qcow2", "64M")])
    outs = [tmp_path / "sys.qcow2", tmp_path / "data.qcow2"]
    # "sys" goes to the second device and "data" to the first: pairing is by order.
    lr = live("--repo", repo, P1, "--qmp", vm.qmp_path, "--speed", "8M", "--no-start",
              "--drive", "sys", "--device", "vdb", "--output", outs[0],
              "--drive", "data", "--device", "vda", "--output", outs[1])
    running = lr.wait_for("running")
    assert running["status"] == "prelaunch"  # --no-start: streaming, the VM left paused
    assert [(d["drive"], d["output"]) for d in running["disks"]] == [
        ("sys", str(outs[0])), ("data", str(outs[1]))]
    expected = {"sys": bytearray(sys_disk), "data": bytearray(data_disk)}
    for device, name, offset in (("vdb", "sys", 41 * MiB), ("vda", "data", 5 * MiB)):
        assert job_running(vm)
        vm.qemu_io(device, f"write -P 0x3c {offset} 65536")
        apply(expected[name], offset, b"\x3c" * 65536)
    rc, err = lr.finish()
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "create it with rerror=stop,werror=stop" in line]
    assert len(warnings) == 2 and "rerror=auto" in warnings[0], err
    assert sorted(e["drive"] for e in lr.events if e["event"] == "finished") == ["data", "sys"]
    assert vm.qmp("query-status")["status"] == "prelaunch"
    only_the_targets(vm, ["vdb", "vda"], ["sys", "data"])
    for device, name, out in (("vdb", "sys", outs[0]), ("vda", "data", outs[1])):
        flushed(vm, device)
        assert "backing-filename" not in qemu_img_info(out)
        assert identical(out, bytes(expected[name]), tmp_path)


BAD_INPUT = [
    # (case, extra arguments, words the one-line message must hold)
    ("vm-running", [], "start QEMU with -S"),
    ("no-such-device", ["--device", "vdz"], "no disk named 'vdz'"),
    ("output-exists", [], "use --force"),
    ("size-mismatch", ["--device", "vdb"], "placeholder of exactly that size"),
    ("pairs", ["--output", "{tmp}/second.qcow2"], "one --output"),
    ("nothing-to-resume", ["--resume"], "no live restore of vda"),
    ("raw-format", ["--format", "raw"], "qcow2"),
    ("no-qmp", ["--qmp", ""], "--live needs --qmp"),
    ("same-device-twice", ["--drive", "vda", "--output", "{tmp}/b.qcow2", "--device", "vda",
                           "--device", "vda"], "a disk is named by two --drives"),
]


@pytest.mark.qemu
@pytest.mark.parametrize("case,extra,words", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_gets_one_line_exit_2_and_changes_nothing(
        make_vm: Any, fleece: Any, store_point: Any, tmp_path: Path, scratch_tmpdir: Path,
        case: str, extra: list[str], words: str) -> None:
    repo = tmp_path / "repo"
    make_repo(str(repo), store_point, {"vda": point_disk(4)})
    vm = make_vm([("qcow2", "64M"), ("qcow2", "32M")], device_options=ERROR_POLICY)
    if case == "vm-running":
        vm.qmp("cont")
    out = tmp_path / "vda.qcow2"
    if case in ("output-exists", "nothing-to-resume"):
        out.write_bytes(b"keep me")
    before = vm.block_graph()
    args = ["restore", "--live", "--repo", repo, P1, "--drive", "vda", "--output", out,
            "--qmp", vm.qmp_path, *(a.format(tmp=tmp_path) for a in extra)]
    if case == "no-qmp":
        args.remove(vm.qmp_path)
        args.remove("--qmp")
    res = fleece(*args)
    assert res.rc == 2, res.err
    assert res.err.count("\n") == 1 and res.err.startswith("fleece: error:") and words in res.err, res.err
    assert res.out == ""
    assert vm.block_graph() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["repo", "vms", *(["vda.qcow2"] if out.exists() else [])])
    if out.exists():
        assert out.read_bytes() == b"keep me"
    assert list(scratch_tmpdir.iterdir()) == []
