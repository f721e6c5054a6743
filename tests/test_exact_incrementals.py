"""Incrementals that cost what changed (repository format 2): dirty extents read, deltas in packs.

A real guest disk gets random writes of random sizes — unaligned to the
chunks and to the dirty bitmap's 64 KiB granularity — across a chain of 20
incrementals. Each incremental must read only the dirty extents, and every
point must restore bit-identical, verify clean and serve identical; prune
and gc must keep exactly the chunks and packs the kept points need.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
from backups import MiB, backup, identical, point_ids, random_image, repo_files, restore, write_from_file
from conftest import open_repo
from test_serve import serving

from fleece.repo.backends.file import FileBackend
from fleece.repo.format import keys
from fleece.repo.format.delta import MAX_DEPTH
from fleece.repo.repository import Repository

pytestmark = pytest.mark.qemu

GRANULE = 64 * 1024
SIZE = 64 * MiB


def seed_image(path: Path, size: int, data: int, seed: int) -> Path:
    """A raw image of ``size`` bytes: ``data`` bytes of random data, then a hole."""
    random_image(path, data, seed)
    with open(path, "r+b") as f:
        f.truncate(size)
    return path


def random_writes(vm: Any, rng: random.Random, tmp_path: Path, n: int) -> set[int]:
    """``n`` guest writes of 512 B … 1 MiB at unaligned offsets; the 64 KiB granules they dirty."""
    granules: set[int] = set()
    for k in range(n):
        length = rng.choice([512, 1536, 4096, 5000 // 512 * 512, 70_000 // 512 * 512,
                             300_000 // 512 * 512, MiB])
        offset = rng.randrange(0, SIZE - length) // 512 * 512
        if k % 3 == 0:
            data = random_image(tmp_path / "w.raw", length, rng.randrange(1 << 30))
            write_from_file(vm, "vda", offset, data)
        else:
            vm.write("vda", offset, length, rng.randrange(1, 256))
        granules.update(range(offset // GRANULE, (offset + length - 1) // GRANULE + 1))
    return granules


def run_chain(fleece: Any, vm: Any, repo: str | Path, tmp_path: Path, incrementals: int,
              seed: int) -> list[tuple[str, Path]]:
    """A full backup, then ``incrementals`` of random writes; ``(point, expected image)`` each."""
    rng = random.Random(seed)
    points = []
    first = backup(fleece, vm, repo)
    assert first["disks"][0]["level"] == "full"
    points.append((first["point"], vm.snapshot_shadow("vda", tmp_path / "p0.raw")))
    deltas = 0
    for n in range(1, incrementals + 1):
        granules = random_writes(vm, rng, tmp_path, rng.randint(1, 10))
        result = backup(fleece, vm, repo)
        disk = result["disks"][0]
        assert disk["level"] == "incremental"
        assert disk["bitmap_granularity"] == GRANULE
        # The bitmap says exactly which granules were written; only those are read.
        assert disk["bytes_dirty"] == len(granules) * GRANULE, n
        assert disk["bytes_read"] <= disk["bytes_dirty"] or disk["chunks_new"] > 0, n
        deltas += disk["deltas"]
        points.append((result["point"], vm.snapshot_shadow("vda", tmp_path / f"p{n}.raw")))
    assert deltas > incrementals, "small scattered writes must be stored as deltas"
    return points


def restores_to(fleece: Any, repo: str | Path, point: str, expected: Path, tmp_path: Path) -> bool:
    """Whether ``point`` restores (raw) to exactly ``expected``."""
    out = restore(fleece, repo, point, tmp_path / "restored.raw")
    try:
        return identical(out, expected)
    finally:
        out.unlink()


def backup_point(fleece: Any, repo: str | Path) -> str:
    return point_ids(fleece, repo)[-1]


def pack_keys(repo: Repository) -> set[str]:
    return set(repo.backend.list(keys.PACKS_PREFIX))


def named_packs(repo: Repository) -> set[str]:
    """Every pack some index of some remaining point names."""
    named = set()
    for point in repo.list_points():
        for disk in point.disks:
            named |= {keys.pack_key(p) for p in repo.read_index(point, disk.name).packs()}
    return named


@pytest.mark.usefixtures("repo_encryption")  # plain and encrypted repositories
def test_a_chain_of_20_random_incrementals_restores_verifies_and_serves_identical_then_gc_frees_the_rest(
        make_vm: Any, fleece: Any, tmp_path: Path, short_tmp: Path) -> None:
    vm = make_vm([("qcow2", SIZE)], contents={"vda": seed_image(tmp_path / "seed.raw", SIZE, 24 * MiB, 5)})
    repo = tmp_path / "repo"
    points = run_chain(fleece, vm, repo, tmp_path, 20, seed=20261130)

    r = open_repo(repo)
    last = r.read_index(r.find_point(points[-1][0]), "vda")
    assert last.version == 3  # paged (format 3), with deltas as in format 2
    depths = [len(last.deltas_of(i)) for i in range(last.n_chunks)]
    assert max(depths) <= MAX_DEPTH and any(depths), depths

    for n, (point, expected) in enumerate(points):
        assert restores_to(fleece, repo, point, expected, tmp_path), f"point {n}"
        if n % 4 == 0 or n == len(points) - 1:
            out = tmp_path / "r.qcow2"
            res = fleece("restore", "--repo", repo, point, "--drive", "vda", "-o", out,
                         "--format", "qcow2", "--force")
            assert res.rc == 0, res.err
            cmp = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2",
                                  str(expected), str(out)])
            assert cmp.returncode == 0, f"point {n} as qcow2"
    verified = fleece("verify", "--repo", repo, "--deep", "--json")
    assert verified.rc == 0 and verified.json()["ok"], verified.out

    for point, expected in (points[-1], points[10]):
        with serving("--repo", repo, point, "--drive", "vda", "--socket", short_tmp / "s.sock") as uri:
            copy = tmp_path / "served.raw"
            subprocess.run(["nbdcopy", uri, str(copy)], check=True)
        assert identical(copy, expected)
        copy.unlink()

    # Prune to the last 5; gc keeps every chunk and pack they need and frees the rest.
    before = pack_keys(r)
    assert fleece("prune", "--repo", repo, "--keep-last", "5").rc == 0
    gc = fleece("gc", "--repo", repo, "--json")
    assert gc.rc == 0, gc.err
    after = pack_keys(r)
    assert after == named_packs(r), "gc must keep exactly the packs the kept points name"
    assert gc.json()["packs_deleted"] == len(before - after)
    for point, expected in points[-5:]:
        assert restores_to(fleece, repo, point, expected, tmp_path)
    assert fleece("verify", "--repo", repo, "--deep").rc == 0

    # The guest rewrites most of every chunk: each position is stored whole
    # again, so once only that point is kept, no pack is needed and gc frees them all.
    for chunk in range(SIZE // (4 * MiB)):
        vm.write("vda", chunk * 4 * MiB + 512, 3 * MiB, 0x40 + chunk)
    whole = backup(fleece, vm, repo)
    assert whole["disks"][0]["deltas"] == 0
    assert fleece("prune", "--repo", repo, "--keep-last", "1").rc == 0
    gc = fleece("gc", "--repo", repo, "--json")
    assert gc.rc == 0 and gc.json()["packs_deleted"] == len(after) > 0 and not pack_keys(r)
    assert restores_to(fleece, repo, whole["point"], vm.shadow("vda"), tmp_path)


@pytest.mark.usefixtures("repo_encryption")  # plain and encrypted repositories
def test_an_incremental_of_scattered_writes_reads_and_stores_about_the_dirty_bytes(
        make_vm: Any, fleece: Any, tmp_path: Path) -> None:
    """The goal of the issue on a small scale: 1 % of the disk in scattered 64 KiB random writes."""
    vm = make_vm([("qcow2", SIZE)], contents={"vda": seed_image(tmp_path / "seed.raw", SIZE, 32 * MiB, 9)})
    repo = tmp_path / "repo"
    backup(fleece, vm, repo)
    rng = random.Random(3)
    for granule in rng.sample(range(SIZE // GRANULE), 10):  # 640 KiB, about 1 %
        write_from_file(vm, "vda", granule * GRANULE,
                        random_image(tmp_path / "w.raw", GRANULE, granule))
    disk = backup(fleece, vm, repo)["disks"][0]
    dirty = 10 * GRANULE
    assert disk["bytes_dirty"] == dirty
    assert disk["bytes_read"] <= 1.05 * dirty
    assert disk["bytes_stored"] <= 1.1 * dirty + MiB
    assert disk["objects_written"] <= dirty // (8 * MiB) + 8
    assert identical(restore(fleece, repo, backup_point(fleece, repo), tmp_path / "r.raw"), vm.shadow("vda"))


def small_chain(make_vm: Any, fleece: Any, tmp_path: Path) -> tuple[Path, list[tuple[str, Path]]]:
    vm = make_vm([("qcow2", "16M")], contents={"vda": random_image(tmp_path / "seed.raw", 16 * MiB, 1)})
    repo = tmp_path / "repo"
    points = [(backup(fleece, vm, repo)["point"], vm.snapshot_shadow("vda", tmp_path / "p0.raw"))]
    vm.write("vda", 100_000 // 512 * 512, 8192, 0x61)           # chunk 0: a delta
    vm.write("vda", 2 * 4 * MiB + 4096, 4096, 0x62)             # chunk 2: a delta
    points.append((backup(fleece, vm, repo)["point"], vm.snapshot_shadow("vda", tmp_path / "p1.raw")))
    vm.write("vda", 2 * 4 * MiB + 65536, 4096, 0x63)            # chunk 2: a second delta
    points.append((backup(fleece, vm, repo)["point"], vm.snapshot_shadow("vda", tmp_path / "p2.raw")))
    return repo, points


def test_a_damaged_pack_is_named_by_verify_and_refused_by_restore(make_vm: Any, fleece: Any,
                                                                    tmp_path: Path) -> None:
    repo, points = small_chain(make_vm, fleece, tmp_path)
    r = Repository.open(FileBackend(repo))
    index = r.read_index(r.find_point(points[1][0]), "vda")
    ((i0, ref0), (i2, ref2)) = index.delta_refs()
    assert (i0, i2) == (0, 2) and ref0.pack == ref2.pack
    pack = repo / keys.pack_key(ref2.pack)
    blob = bytearray(pack.read_bytes())
    blob[ref2.offset + ref2.length - 1] ^= 0x01       # a bit of chunk 2's delta in point 1
    pack.write_bytes(bytes(blob))

    report = fleece("verify", "--repo", repo, "--deep", "--json")
    assert report.rc == 1
    by_point = {p["id"]: p for p in report.json()["points"]}
    assert by_point[points[0][0]]["ok"]                 # the full does not use the pack
    for point, _ in points[1:]:                         # both incrementals apply that delta
        (damage,) = by_point[point]["damage"]
        assert damage["problem"] == "delta damaged"
        assert damage["ranges"] == [[8 * MiB, 12 * MiB]]
        assert damage["objects"] == [keys.pack_key(ref2.pack)]

    out = tmp_path / "out.raw"
    refused = fleece("restore", "--repo", repo, points[2][0], "-o", out)
    assert refused.rc == 1 and len(refused.err.strip().splitlines()) == 1
    assert "8388608-12582912" in refused.err and not out.exists()
    allowed = fleece("restore", "--repo", repo, points[2][0], "-o", out, "--allow-damage")
    assert allowed.rc == 0, allowed.err
    data, expected = out.read_bytes(), points[2][1].read_bytes()
    assert data[8 * MiB:12 * MiB] == bytes(4 * MiB)     # zeroes where the damage is
    assert data[:8 * MiB] == expected[:8 * MiB] and data[12 * MiB:] == expected[12 * MiB:]


def test_a_missing_pack_and_a_damaged_base_under_deltas_are_named(make_vm: Any, fleece: Any,
                                                                    tmp_path: Path) -> None:
    repo, points = small_chain(make_vm, fleece, tmp_path)
    r = open_repo(repo)
    last = r.read_index(r.find_point(points[2][0]), "vda")
    second_pack = last.deltas_of(2)[1].pack
    (repo / keys.pack_key(second_pack)).unlink()
    base = last.get(0)
    assert base is not None and last.deltas_of(0)
    chunk = repo / keys.chunk_key(base)
    blob = bytearray(chunk.read_bytes())
    blob[-1] ^= 0x40
    chunk.write_bytes(bytes(blob))

    report = fleece("verify", "--repo", repo, "--json")            # shallow: the pack is gone
    by_point = {p["id"]: p for p in report.json()["points"]}
    (missing,) = by_point[points[2][0]]["damage"]
    assert missing["problem"] == "pack missing" and missing["ranges"] == [[8 * MiB, 12 * MiB]]
    deep = fleece("verify", "--repo", repo, "--deep", "--json")
    by_point = {p["id"]: p for p in deep.json()["points"]}
    problems = {d["problem"]: d["ranges"] for d in by_point[points[2][0]]["damage"]}
    assert problems == {"pack missing": [[8 * MiB, 12 * MiB]], "chunk damaged": [[0, 4 * MiB]]}
    assert {d["problem"] for d in by_point[points[0][0]]["damage"]} == {"chunk damaged"}
    refused = fleece("restore", "--repo", repo, points[1][0], "-o", tmp_path / "o.raw")
    assert refused.rc == 1 and not (tmp_path / "o.raw").exists()


@pytest.mark.usefixtures("repo_encryption")  # plain and encrypted repositories
def test_a_backup_killed_after_storing_its_pack_leaves_no_point_and_gc_collects_the_pack(
        make_vm: Any, fleece: Any, hold_backup: Any, tmp_path: Path) -> None:
    vm = make_vm([("qcow2", "16M")], contents={"vda": random_image(tmp_path / "seed.raw", 16 * MiB, 2)})
    repo = tmp_path / "repo"
    first = backup(fleece, vm, repo)["point"]
    before = repo_files(repo)
    vm.write("vda", 4096, 4096, 0x71)
    held = hold_backup(vm, repo, "pack-stored")
    held.wait_held()
    held.kill()
    assert point_ids(fleece, repo) == [first]
    left = set(repo_files(repo)) - set(before)
    assert any(f.startswith("packs/") for f in left), left
    assert fleece("cleanup", "--qmp", vm.qmp_path).rc == 0
    gc = fleece("gc", "--repo", repo, "--json")
    assert gc.rc == 0 and gc.json()["packs_deleted"] == 1
    assert not [f for f in set(repo_files(repo)) - set(before) if not f.startswith(("locks/", "leases/"))]
    # The next incremental still holds the write.
    after = backup(fleece, vm, repo)
    assert after["disks"][0]["level"] == "incremental"
    assert identical(restore(fleece, repo, after["point"], tmp_path / "r.raw"), vm.shadow("vda"))


@pytest.mark.s3
@pytest.mark.usefixtures("repo_encryption")
def test_the_chain_on_s3(make_vm: Any, fleece: Any, s3_env: Any, s3_bucket: str,
                         tmp_path: Path) -> None:
    vm = make_vm([("qcow2", SIZE)], contents={"vda": seed_image(tmp_path / "seed.raw", SIZE, 16 * MiB, 6)})
    url = f"s3://{s3_bucket}/chain"
    points = run_chain(fleece, vm, url, tmp_path, 20, seed=42)
    for n, (point, expected) in enumerate(points):
        assert restores_to(fleece, url, point, expected, tmp_path), f"point {n}"
    assert fleece("verify", "--repo", url, "--deep").rc == 0
    assert fleece("prune", "--repo", url, "--keep-last", "3").rc == 0
    assert fleece("gc", "--repo", url).rc == 0
    r = open_repo(url)
    assert pack_keys(r) == named_packs(r)
    for point, expected in points[-3:]:
        assert restores_to(fleece, url, point, expected, tmp_path)
