"""Writes of every kind after the snapshot point never reach the point (issue #32, item 1).

The guest writes zeroes (``write -z``, with and without unmap), discards
and data, of 4 KiB, 64 KiB, 1 MiB, 192 KiB and unaligned sizes at aligned
and unaligned offsets, while a backup is held after its snapshot point;
the point must restore to the disk as it was at that point, byte for
byte. QEMU before 8.0 answers the copy-before-write filter's "already
copied?" question wrongly for a request that starts in a copied run and
goes past it (docs/design.md §2.4, hbitmap_status): a write of zeroes then
showed through as a hole, and a read that is not bounded to one cluster
returned the live disk. The next incremental restores the disk after the
writes: no dirty bit was lost either.

The vendor's side: ``fleece export start`` read by a libnbd reader that
follows docs/export.md (block status and reads bounded to the export's
``max_request``), with structured replies on and off, sees the point.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import nbd
import pytest
from backups import CHUNK, MiB, backup, identical, random_image, restore

from fleece.backup.remote import read_export
from fleece.errors import BadInput, ExportError
from fleece.fleecing.request_bound import (
    CBW_CLUSTER,
    max_request,
    parse_qemu_version,
    refuse_unbounded_reader,
)

KiB = 1 << 10

# (qemu-io command, offset, length): zero writes, discards and data writes, of
# every size the issue names, aligned and not, each in a chunk of its own.
WRITES = [
    ("write -z", 1 * CHUNK, 4 * KiB),
    ("write -z", 1 * CHUNK + 256 * KiB, 64 * KiB),
    ("write -z", 2 * CHUNK, 1 * MiB),
    ("write -z", 2 * CHUNK + 2 * MiB, 192 * KiB),
    ("write -z", 3 * CHUNK + 12345, 100_000),             # unaligned offset and size
    ("write -z", 3 * CHUNK + 2 * MiB + 4096, 64 * KiB),   # 4 KiB-aligned, not cluster-aligned
    ("write -z", 4 * CHUNK + 65536 - 512, 2 * MiB + 1024),  # crosses clusters, unaligned ends
    ("write -z -u", 5 * CHUNK, 1 * MiB),                   # zeroes that unmap
    ("write -z -u", 5 * CHUNK + 2 * MiB + 777, 70_000),
    ("discard", 6 * CHUNK, 1 * MiB),                      # discards: the VM's nodes unmap
    ("discard", 6 * CHUNK + 2 * MiB + 64 * KiB, 128 * KiB),
    ("write -P 0x5a", 7 * CHUNK, 64 * KiB),               # data
    ("write -P 0x5b", 7 * CHUNK + 1 * MiB, 1 * MiB),
    ("write -P 0x5c", 7 * CHUNK + 3 * MiB + 333, 70_000),
]
DISK = 8 * CHUNK  # 32 MiB of random data
UNMAP = {"vda": ",discard=unmap"}  # the guest's discards reach the image (QEMU's default drops them)


def guest_writes(vm: Any) -> None:
    """Every write of :data:`WRITES`, through the device (guest I/O), mirrored in the shadow."""
    for cmd, offset, length in WRITES:
        vm.qemu_io("vda", f"{cmd} {offset} {length}")
        if cmd.startswith("write -P"):
            vm._shadow_write("vda", offset, bytes([int(cmd.split()[-1], 16)]) * length)
        elif cmd.startswith(("write -z", "discard")):  # a whole-cluster discard reads as zeroes
            vm._shadow_write("vda", offset, bytes(length))


@pytest.mark.qemu
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("phase", ["export-live", "chunk-stored"])
def test_writes_after_the_snapshot_point_stay_out_of_the_backup(
        make_vm: Any, fleece: Any, hold_backup: Any, tmp_path: Path, fmt: str, phase: str) -> None:
    seed = random_image(tmp_path / "seed.raw", DISK, 32)
    vm = make_vm([(fmt, DISK)], contents={"vda": seed}, node_opts=UNMAP)
    repo = tmp_path / "repo"
    at_snapshot = vm.snapshot_shadow("vda", tmp_path / "at-snapshot.raw")

    # One reader and one storer: at chunk-stored, chunk 0 is stored and the
    # chunks the writes hit are still to be read, after their reads were planned.
    held = hold_backup(vm, repo, phase, "--level", "full", "--readers", "1", "--storers", "1")
    held.wait_held()
    guest_writes(vm)
    rc, out, err = held.release()
    assert rc == 0, err
    point = json.loads(out)["point"]
    got = restore(fleece, repo, point, tmp_path / "point.raw")
    assert identical(got, at_snapshot), first_difference(got, at_snapshot)

    # Nothing was lost either: the next incremental holds every write, and the
    # discards made while the export was up reached the disk.
    after = backup(fleece, vm, repo)
    assert identical(restore(fleece, repo, after["point"], tmp_path / "after.raw"), vm.shadow("vda"))


@pytest.mark.qemu
def test_writes_after_the_point_stay_out_of_an_incremental_planned_from_the_bitmap_first(
        make_vm: Any, fleece: Any, hold_backup: Any, tmp_path: Path) -> None:
    """On QEMU < 8.0 an incremental asks the dirty bitmap in long spans and allocation only where
    it marks chunks: every chunk changed since the full is still read, and the writes made while
    it is held stay out of it."""
    seed = random_image(tmp_path / "seed.raw", DISK, 32)
    vm = make_vm([("qcow2", DISK)], contents={"vda": seed}, node_opts=UNMAP)
    repo = tmp_path / "repo"
    backup(fleece, vm, repo)
    # Between the full and the incremental: data in every chunk the held writes will hit, and
    # zeroes over part of another, so both the bitmap and allocation matter.
    for i in range(1, 8):
        vm.write("vda", i * CHUNK + 512 * 1024, 64 * 1024, 0x30 + i)
    vm.qemu_io("vda", f"write -z {0 * CHUNK + 1 * MiB} {1 * MiB}")
    vm._shadow_write("vda", 0 * CHUNK + 1 * MiB, bytes(1 * MiB))
    at_snapshot = vm.snapshot_shadow("vda", tmp_path / "at-snapshot.raw")
    held = hold_backup(vm, repo, "export-live", "--readers", "1", "--storers", "1")
    held.wait_held()
    guest_writes(vm)
    rc, out, err = held.release()
    assert rc == 0, err
    result = json.loads(out)
    assert result["disks"][0]["level"] == "incremental"
    got = restore(fleece, repo, result["point"], tmp_path / "point.raw")
    assert identical(got, at_snapshot), first_difference(got, at_snapshot)
    after = backup(fleece, vm, repo)
    assert identical(restore(fleece, repo, after["point"], tmp_path / "after.raw"), vm.shadow("vda"))


def first_difference(a: Path, b: Path) -> str:
    """``qemu-img compare``'s account of where two raw images first differ."""
    res = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                         capture_output=True, text=True)
    return res.stdout.strip()


def docs_reader() -> Any:
    """``read_export`` of docs/export.md's "Reading an export", run as a vendor would copy it."""
    text = (Path(__file__).parent.parent / "docs" / "export.md").read_text()
    section = text[text.index("## Reading an export"):]
    code = section[section.index("```python\n") + 10:]
    namespace: dict[str, Any] = {}
    exec(code[:code.index("```")], namespace)
    return namespace["read_export"]


def read_like_a_vendor(uri: str, size: int, max_request: int | None, *, structured: bool) -> bytes:
    """The disk as a vendor's reader sees it: docs/export.md's reader, or, without structured
    replies (no block status), every byte in reads that each stay inside one block."""
    out = bytearray(size)

    def write(offset: int, data: bytes) -> None:
        out[offset:offset + len(data)] = data

    if structured:
        docs_reader()(uri, max_request, write=write)
        return bytes(out)
    h = nbd.NBD()
    h.set_request_structured_replies(False)
    h.connect_uri(uri)
    try:
        step = max_request or 32 * MiB
        for offset in range(0, size, step):
            write(offset, h.pread(min(step, size - offset), offset))
    finally:
        h.shutdown()
    return bytes(out)


@pytest.mark.qemu
@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple-replies"])
def test_a_vendor_reader_of_export_start_sees_the_point(
        make_vm: Any, fleece: Any, tmp_path: Path, structured: bool) -> None:
    seed = random_image(tmp_path / "seed.raw", DISK, 33)
    vm = make_vm([("qcow2", DISK)], contents={"vda": seed}, node_opts=UNMAP)
    at_snapshot = seed.read_bytes()
    res = fleece("export", "start", "--qmp", vm.qmp_path, "--drive", "vda", "--bounded-requests", "--json")
    assert res.rc == 0, res.err
    export = res.json()
    try:
        guest_writes(vm)
        disk = export["disks"][0]
        got = read_like_a_vendor(disk["uri"], disk["size"], export["max_request"], structured=structured)
    finally:
        assert fleece("export", "stop", "--qmp", vm.qmp_path).rc == 0
    bad = next((i for i in range(0, DISK, 4096) if got[i:i + 4096] != at_snapshot[i:i + 4096]), None)
    assert bad is None, f"the export showed a write from after its point near offset {bad}"


@pytest.mark.qemu
def test_export_start_without_bounded_requests_is_refused_on_qemu_before_8(
        make_vm: Any, fleece: Any, tmp_path: Path) -> None:
    vm = make_vm()
    version = vm.qmp("query-version")["qemu"]
    if (version["major"], version["minor"]) >= (8, 0):
        pytest.skip("QEMU 8.0 and later answer every request right")  # (Debian 13: see the unit test)
    before = vm.block_graph()
    res = fleece("export", "start", "--qmp", vm.qmp_path, "--drive", "vda", "--json")
    assert res.rc == 1 and res.out == ""
    line = res.err.strip()
    assert "\n" not in line and line.startswith("fleece: error: "), res.err
    assert "hbitmap_status" in line and "--bounded-requests" in line and "nothing was changed" in line
    assert vm.block_graph() == before


@pytest.mark.parametrize(("version", "bound"), [
    ((7, 1, 0), CBW_CLUSTER), ((7, 2, 22), CBW_CLUSTER), ((7, 2, 99), CBW_CLUSTER),
    ((8, 0, 0), None), ((9, 2, 0), None), ((10, 0, 13), None), (None, CBW_CLUSTER),
])
def test_requests_are_bounded_on_every_qemu_before_8_and_when_the_version_is_unknown(
        version: Any, bound: int | None) -> None:
    assert max_request(version) == bound
    if version is not None:
        if bound is None:
            refuse_unbounded_reader(version, False)  # fast path: no promise needed
        else:
            with pytest.raises(ExportError, match="hbitmap_status"):
                refuse_unbounded_reader(version, False)
        refuse_unbounded_reader(version, True)
    assert parse_qemu_version("7.2.22") == (7, 2, 22)
    assert parse_qemu_version("10.0.13") == (10, 0, 13)
    assert parse_qemu_version("unknown") is None


@pytest.mark.parametrize(("said", "bound"), [
    ({}, CBW_CLUSTER),                      # an older fleece or --libvirt: which QEMU is unknown
    ({"max_request": None}, None),          # QEMU 8.0 or later
    ({"max_request": CBW_CLUSTER}, CBW_CLUSTER),
])
def test_backup_from_export_bounds_its_requests_unless_the_export_says_it_need_not(
        tmp_path: Path, said: dict[str, Any], bound: int | None) -> None:
    exported = tmp_path / "export.json"
    exported.write_text(json.dumps({
        "checkpoint": "20261123T073600.123456Z-3f9a1c", **said,
        "disks": [{"drive": "vda", "uri": "nbds://192.0.2.10:10809/vda", "size": DISK, "level": "full"}]}))
    assert read_export(str(exported))[2] == bound


def test_backup_from_export_refuses_a_max_request_that_does_not_divide_the_cluster(tmp_path: Path) -> None:
    exported = tmp_path / "export.json"
    exported.write_text(json.dumps({
        "checkpoint": "20261123T073600.123456Z-3f9a1c", "max_request": 100_000,
        "disks": [{"drive": "vda", "uri": "nbds://192.0.2.10:10809/vda", "size": DISK, "level": "full"}]}))
    with pytest.raises(BadInput, match="max_request"):
        read_export(str(exported))
