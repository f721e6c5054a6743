"""`fleece backup` end to end on real VMs into a local repository.

Every restore is compared with a shadow image the test keeps by applying the
guest's writes to it as well: the disk as it was at that point.
"""

from __future__ import annotations

import random
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

MiB = 1 << 20
CHUNK = 4 * MiB


def identical(a: Path, b: Path) -> bool:
    res = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(a), str(b)])
    return res.returncode == 0


def backup(fleece: Any, vm: Any, repo: Any, *drives: Any, level: Any=None, extra: Any=()) -> Any:
    args = ["backup", "--qmp", vm.qmp_path, "--repo", repo, "--json"]
    for d in drives or ("vda",):
        args += ["--drive", d]
    if level:
        args += ["--level", level]
    res = fleece(*args, *extra)
    assert res.rc == 0, res.err
    return res.json()


def restore(fleece: Any, repo: Any, point: Any, drive: Any, out: Path) -> Path:
    res = fleece("restore", "--repo", repo, point, "--drive", drive, "--output", out)
    assert res.rc == 0, res.err
    return out


def test_two_disks_full_then_incremental_restore_identical(make_vm: Any, fleece: Any, tmp_path: Any) -> None:
    vm = make_vm([("qcow2", "64M"), ("raw", "32M")])
    repo = tmp_path / "repo"
    vm.write("vda", 0, 5 * MiB, 0x11)
    vm.write("vda", 50 * MiB, 64 * 1024, 0x12)
    vm.write("vdb", 3 * MiB, 2 * MiB, 0x21)

    p1 = backup(fleece, vm, repo, "vda", "vdb")
    assert [d["level"] for d in p1["disks"]] == ["full", "full"]
    assert p1["vm"] == vm.qmp_path  # no -name, no UUID: the socket path
    s1 = {d: vm.snapshot_shadow(d, tmp_path / f"{d}.p1") for d in ("vda", "vdb")}

    vm.write("vda", 6 * MiB, 1 * MiB, 0x13)
    vm.write("vda", 0, 4096, 0x14)
    vm.write("vdb", 31 * MiB, 1 * MiB, 0x22)
    p2 = backup(fleece, vm, repo, "vda", "vdb")
    assert p2["parent"] == p1["point"]
    assert [d["level"] for d in p2["disks"]] == ["incremental", "incremental"]
    by_drive = {d["drive"]: d for d in p2["disks"]}
    # Only the dirty extents, at the bitmap's 64 KiB granularity, are read and
    # stored: as deltas of chunks 0 and 1 (vda) and chunk 7 (vdb).
    vda, vdb = by_drive["vda"], by_drive["vdb"]
    assert vda["bitmap_granularity"] == 64 * 1024
    assert vda["bytes_dirty"] == vda["bytes_read"] == 1 * MiB + 64 * 1024
    assert vdb["bytes_dirty"] == vdb["bytes_read"] == 1 * MiB
    assert (vda["deltas"], vdb["deltas"]) == (2, 1)
    assert vda["chunks_new"] == vdb["chunks_new"] == 0
    # One pack, the one index page (format 3) the change touched, and the top table each;
    # the metadata (page and top table of a 64 MiB disk) is a few hundred bytes.
    assert vda["objects_written"] == vdb["objects_written"] == 3
    assert 0 < vda["bytes_metadata"] < 4096 and 0 < vdb["bytes_metadata"] < 4096
    assert vda["bytes_stored"] > vda["bytes_metadata"]

    for d in ("vda", "vdb"):
        assert identical(restore(fleece, repo, p1["point"], d, tmp_path / f"r1-{d}"), s1[d])
        assert identical(restore(fleece, repo, p2["point"], d, tmp_path / f"r2-{d}"), vm.shadow(d))

    # QEMU is left with one checkpoint bitmap per disk: the newest point's.
    assert set(vm.bitmaps("vda")) == {f"fleece-{p2['point']}"}
    assert vm.bitmaps("vda")[f"fleece-{p2['point']}"]["persistent"] is True
    assert vm.bitmaps("vdb")[f"fleece-{p2['point']}"]["persistent"] is False  # raw: cannot
    assert vm.block_graph()["exports"] == []


def test_random_writes_over_a_chain_of_incrementals_restore_identical_at_every_point(
    make_vm: Any, fleece: Any, tmp_path: Any
) -> None:
    rng = random.Random(20261123)
    size = 48 * MiB
    vm = make_vm([("qcow2", size)])
    repo = tmp_path / "repo"
    points: list[tuple[str, Path]] = []
    for n in range(7):  # one full, six incrementals
        dirty_chunks: set[int] = set()
        for _ in range(rng.randint(1, 12)):
            length = rng.choice([512, 4096, 65536, 300_000, 2 * MiB])
            offset = rng.randrange(0, size - length) // 512 * 512
            vm.write("vda", offset, length, rng.randrange(1, 256))
            dirty_chunks.update(range(offset // CHUNK, (offset + length - 1) // CHUNK + 1))
        if n == 3:
            vm.discard("vda", 8 * MiB, 4 * MiB)  # the guest trims: reads as zeroes
            dirty_chunks.add(2)
        point = backup(fleece, vm, repo)
        disk = point["disks"][0]
        if n == 0:
            assert disk["level"] == "full"
        else:
            assert disk["level"] == "incremental"
            # Reads nothing outside the chunks written since the previous point.
            assert disk["bytes_read"] <= len(dirty_chunks) * CHUNK
            assert disk["chunks_unchanged"] >= size // CHUNK - len(dirty_chunks)
        points.append((point["point"], vm.snapshot_shadow("vda", tmp_path / f"p{n}.raw")))

    listed = [p["id"] for p in fleece("list", "--repo", repo, "--json").json()["points"]]
    assert listed == [p for p, _ in points]
    for n, (point, expected) in enumerate(points):
        out = restore(fleece, repo, point, "vda", tmp_path / f"restore{n}.raw")
        assert identical(out, expected), f"point {n} differs"


def test_second_full_backup_of_an_unchanged_disk_stores_no_new_chunk(
        make_vm: Any, fleece: Any, tmp_path: Any) -> None:
    vm = make_vm([("qcow2", "32M")])
    for i in range(6):
        vm.write("vda", i * 5 * MiB, MiB, 0x30 + i)
    repo = tmp_path / "repo"
    first = backup(fleece, vm, repo)["disks"][0]
    assert first["chunks_new"] == 6
    objects = sorted(p.name for p in (repo / "chunks").rglob("*") if p.is_file())
    second = backup(fleece, vm, repo, level="full")["disks"][0]
    assert second["level"] == "full"
    assert second["bytes_read"] == first["bytes_read"]
    assert (second["chunks_new"], second["chunks_reused"]) == (0, 6)
    # What it stored is its index's top table (its pages exist already): metadata only.
    assert second["bytes_stored"] == second["bytes_metadata"] < 1024
    assert sorted(p.name for p in (repo / "chunks").rglob("*") if p.is_file()) == objects


def test_backup_killed_mid_read_leaves_no_point_and_the_next_one_is_correct(
    make_vm: Any, fleece: Any, tmp_path: Any
) -> None:
    seed = tmp_path / "random.raw"
    with open(seed, "wb") as f:
        f.write(random.Random(7).randbytes(48 * MiB))
    vm = make_vm([("qcow2", "48M")], contents={"vda": seed})
    repo = tmp_path / "repo"
    first = backup(fleece, vm, repo, extra=("--compress", "none"))
    vm.write("vda", 0, 48 * MiB, 0x5C)  # every chunk dirty
    vm.write("vda", 10 * MiB, 9 * MiB, 0x5D)
    before = vm.block_graph()

    from conftest import FLEECE

    # Slow on purpose (zstd level 19, one thread each) so the kill lands mid-read.
    proc = subprocess.Popen(
        [FLEECE, "backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", str(repo),
         "--compress", "zstd:19", "--readers", "1", "--storers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    chunks_before = len(list((repo / "chunks").rglob("*")))
    deadline = time.monotonic() + 60
    while len(list((repo / "chunks").rglob("*"))) == chunks_before:
        assert proc.poll() is None, "the backup finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    points = fleece("list", "--repo", repo, "--json").json()["points"]
    assert [p["id"] for p in points] == [first["point"]]  # no half-written point

    # Its process has certainly exited: the next backup cleans up (as an
    # abort: the first checkpoint still recorded everything) and goes on.
    nxt = backup(fleece, vm, repo)
    assert {**vm.block_graph(), "bitmaps": before["bitmaps"]} == before
    assert nxt["parent"] == first["point"]
    assert nxt["disks"][0]["level"] == "incremental"
    out = restore(fleece, repo, nxt["point"], "vda", tmp_path / "after.raw")
    assert identical(out, vm.shadow("vda"))


@pytest.mark.parametrize("case", ["unknown-drive", "not-a-repo", "bad-qmp", "bad-compress",
                                  "bad-chunk-size", "incremental-impossible", "config-missing",
                                  "config-unknown-key", "same-drive-twice"])
def test_bad_backup_input_gets_one_line_and_changes_nothing(
        make_vm: Any, fleece: Any, tmp_path: Any, case: Any) -> None:
    vm = make_vm([("qcow2", "16M")])
    vm.write("vda", 0, MiB, 0x42)
    repo = tmp_path / "repo"
    args = ["backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", str(repo)]
    expected_rc = 2
    if case == "unknown-drive":
        args[4] = "vdz"
    elif case == "not-a-repo":
        repo.mkdir()
        (repo / "notes.txt").write_text("my files")
    elif case == "bad-qmp":
        args[2] = str(tmp_path / "no.sock")
        expected_rc = 1
    elif case == "bad-compress":
        args += ["--compress", "zstd:99"]
    elif case == "bad-chunk-size":
        args += ["--chunk-size", "3M"]
    elif case == "incremental-impossible":
        args += ["--level", "incremental"]
        expected_rc = 1
    elif case == "config-missing":
        args += ["--config", str(tmp_path / "none.toml")]
    elif case == "config-unknown-key":
        cfg = tmp_path / "c.toml"
        cfg.write_text('levle = "full"\n')
        args += ["--config", str(cfg)]
    elif case == "same-drive-twice":
        args += ["--drive", "vda"]
    before = vm.block_graph()
    repo_before = sorted(str(p) for p in repo.rglob("*")) if repo.exists() else None

    res = fleece(*args)
    assert res.rc == expected_rc, res.err
    assert res.out == ""
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleece: error:"), res.err
    assert vm.block_graph() == before
    if repo_before is None:
        assert not repo.exists(), "a failed backup must not create a repository"
    else:
        assert sorted(str(p) for p in repo.rglob("*")) == repo_before


def test_backup_reads_settings_from_a_config_file(make_vm: Any, fleece: Any, tmp_path: Any) -> None:
    vm = make_vm([("qcow2", "16M")], name="cfgvm")
    vm.write("vda", 0, MiB, 0x42)
    cfg = tmp_path / "vm.toml"
    cfg.write_text(
        f'[backup]\nqmp = "{vm.qmp_path}"\ndrives = ["vda"]\nrepo = "{tmp_path / "repo"}"\n'
        'vm = "from-config"\ncompress = "none"\nchunk-size = "1M"\nlabels = {{ tier = "gold" }}\n'
        '[init]\n'  # create the repository on the first run
        .replace("{{", "{").replace("}}", "}")
    )
    res = fleece("backup", "--config", cfg, "--json")
    assert res.rc == 0, res.err
    out = res.json()
    assert out["vm"] == "from-config"
    assert out["disks"][0]["bytes_stored"] > MiB - 4096  # uncompressed 1 MiB chunk
    listed = fleece("list", "--repo", tmp_path / "repo", "--json").json()["points"]
    assert listed[0]["labels"] == {"tier": "gold"}
    # The command line wins over the file.
    res2 = fleece("backup", "--config", cfg, "--vm", "from-cli", "--json")
    assert res2.json()["vm"] == "from-cli"


def test_blake3_repository_backs_up_and_restores_identical(make_vm: Any, fleece: Any, tmp_path: Any) -> None:
    import json

    import blake3

    vm = make_vm([("qcow2", "16M")])
    vm.write("vda", 0, 3 * MiB, 0x61)
    repo = tmp_path / "repo"
    p1 = backup(fleece, vm, repo, extra=("--hash", "blake3"))
    assert json.loads((repo / "config").read_text())["hash"] == "blake3"
    # Chunks are named by the BLAKE3 of their sparse form (format 3: header, zero-block
    # bitmap, the non-zero blocks; docs/format.md "Chunks"), not sha256.
    form = (b"FLSP" + struct.pack("<IQ", 4096, 4 * MiB) + bytes(96) + b"\xff" * 32
            + b"\x61" * 3 * MiB)  # blocks 768..1023 (the last MiB) are zero
    names = {p.name for p in (repo / "chunks").rglob("*") if p.is_file()}
    assert names == {blake3.blake3(form).hexdigest()}
    vm.write("vda", 5 * MiB, 4096, 0x62)
    p2 = backup(fleece, vm, repo)  # the repository's hash sticks; no --hash needed
    assert p2["disks"][0]["level"] == "incremental"
    assert identical(restore(fleece, repo, p2["point"], "vda", tmp_path / "r2"), vm.shadow("vda"))
    assert fleece("verify", "--repo", repo, "--deep").rc == 0
    assert p1["point"] != p2["point"]


def test_example_config_holds_only_settings_fleece_knows(tmp_path: Any) -> None:
    # Every key of configs/example.toml must be accepted by the command it is for.
    import argparse

    from fleece.commands import backup, gc, prune
    from fleece.commands.config import apply_config

    example = Path(__file__).parent.parent / "configs" / "example.toml"
    for module, section in ((backup, "backup"), (prune, "prune"), (gc, "gc")):
        args = argparse.Namespace(config=str(example), drive=[], labels=None)
        apply_config(args, module.CONFIG_KEYS, section)
        assert args.repo == "/srv/fleece" and args.drive == ["vda", "vdb"]
    args = argparse.Namespace(config=str(example), drive=[], labels=None)
    apply_config(args, backup.CONFIG_KEYS, "backup")
    assert args.labels == {"tier": "gold", "owner": "ops"} and args.hash == "blake3"
    # [init]: backup's keys, and copy's (which takes only the Object Lock ones).
    from fleece.commands import copy
    from fleece.commands.config import read_table

    assert read_table(args, "init", backup.INIT_KEYS) == {"encryption": "aes-256-gcm"}
    for web1 in (Path(__file__).parent.parent / "configs" / "web1.toml",):
        assert read_table(argparse.Namespace(config=str(web1)), "init", backup.INIT_KEYS) is not None
    assert read_table(args, "init", copy.INIT_KEYS) == {"encryption": "aes-256-gcm"}
