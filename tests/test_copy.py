"""``fleece copy``: replicate restore points from a local repository to S3 (and back), through the CLI."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import FLEECE, S3_SERVERS
from test_metrics import scrape, value

pytestmark = [pytest.mark.s3, pytest.mark.qemu]

MiB = 1 << 20
CHUNK = 4 * MiB


def identical(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def ok(res: Any) -> Any:
    assert res.rc == 0, res.err
    return res


def two_points(make_vm: Any, fleece: Any, tmp_path: Path) -> Any:
    """A VM with random data and a local repository holding a full and an incremental point."""
    seed = tmp_path / "seed.raw"
    seed.write_bytes(random.Random(5).randbytes(24 * MiB))
    vm = make_vm([("qcow2", "24M")], name="web1", contents={"vda": seed})
    local = tmp_path / "local"
    p1 = ok(fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", local, "--json")).json()
    first = vm.snapshot_shadow("vda", tmp_path / "p1.raw")
    vm.write("vda", 8 * MiB, MiB, 0x51)
    p2 = ok(fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", local, "--json")).json()
    return vm, local, (p1["point"], first), (p2["point"], vm.shadow("vda"))


def s3_keys(s3_env: Any, bucket: str) -> set[str]:
    pages = s3_env.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


# The life cycle's last step (test_s3_backup.py has the others), on every store over HTTP and HTTPS.
@pytest.mark.parametrize("s3_server", S3_SERVERS, indirect=True)
def test_copy_local_to_s3_then_restore_from_s3_is_identical_and_copying_again_sends_nothing(
        make_vm: Any, fleece: Any, s3_env: Any, s3_bucket: Any, tmp_path: Any) -> None:
    _, local, (p1, shadow1), (p2, shadow2) = two_points(make_vm, fleece, tmp_path)
    url = f"s3://{s3_bucket}/offsite"
    prom = tmp_path / "fleece.prom"
    report = ok(fleece("copy", "--init", "--from", local, "--to", url, "--json", "--metrics-file", prom,
                       *s3_env.config_args)).json()
    assert report["copied"] == [p1, p2] and report["skipped"] == []
    # 6 chunks for the full, the incremental's pack of deltas; its 6 chunks were already there.
    assert (report["chunks_copied"], report["chunks_present"]) == (7, 6)
    assert report["bytes_copied"] >= 24 * MiB  # random data: stored as it was, incompressible
    samples = scrape(prom)  # prometheus_client's own parser, as node_exporter reads it
    labels = {"command": "copy", "repository": url}
    assert value(samples, "fleece_copy_points_copied", **labels) == 2
    assert value(samples, "fleece_copy_bytes_copied", **labels) == report["bytes_copied"]
    assert value(samples, "fleece_copy_objects_written", **labels) == report["objects_written"]
    assert value(samples, "fleece_last_success_timestamp_seconds", **labels) > 0

    for point, shadow in ((p1, shadow1), (p2, shadow2)):
        out = tmp_path / f"{point}.raw"
        ok(fleece("restore", "--repo", url, point, "--drive", "vda", "--output", out))
        assert identical(out, shadow)
    listed = ok(fleece("list", "--repo", url, "--json")).json()["points"]
    assert [p["id"] for p in listed] == [p1, p2] and listed[1]["parent"] == p1

    before = s3_keys(s3_env, s3_bucket)
    again = ok(fleece("copy", "--from", local, "--to", url, "--json", *s3_env.config_args)).json()
    assert again["copied"] == [] and again["skipped"] == [p1, p2] and again["bytes_copied"] == 0
    assert s3_keys(s3_env, s3_bucket) == before

    # And back: a new local repository from the offsite copy, only the latest point.
    back = tmp_path / "restored-repo"
    report = ok(fleece("copy", "--init", "--from", url, "--to", back, "latest", "--vm", "web1",
                       "--json")).json()
    assert report["copied"] == [p2]
    ok(fleece("restore", "--repo", back, p2, "--drive", "vda", "--output", tmp_path / "back.raw"))
    # The incremental names its parent, which stayed behind: it restores all the same.
    assert identical(tmp_path / "back.raw", shadow2)


def test_an_interrupted_copy_leaves_no_point_and_the_next_one_finishes_it(
        make_vm: Any, fleece: Any, s3_env: Any, s3_bucket: Any, s3_proxy: Any, tmp_path: Any,
        monkeypatch: Any) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    _, local, (p1, _), (p2, shadow2) = two_points(make_vm, fleece, tmp_path)
    url = f"s3://{s3_bucket}/offsite"
    plan = s3_proxy.plan
    plan.slow = 0.1
    proc = subprocess.Popen([FLEECE, "copy", "--init", "--from", str(local), "--to", url, "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    # The config, the probe, the lease... then chunks: the store goes down mid-point.
    while plan.requests["PutObject"] < 9:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    plan.ops, plan.outage = frozenset({"PutObject"}), 503
    out, err = proc.communicate(timeout=60)
    plan.outage, plan.slow = None, 0.0
    assert proc.returncode == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleece: error: S3 PutObject"), err
    keys = s3_keys(s3_env, s3_bucket)
    assert not any(k.startswith("offsite/points/") for k in keys), keys
    assert any(k.startswith("offsite/chunks/") for k in keys)

    report = ok(fleece("copy", "--from", local, "--to", url, "--json")).json()
    assert report["copied"] == [p1, p2] and report["chunks_present"] >= 1
    ok(fleece("restore", "--repo", url, p2, "--drive", "vda", "--output", tmp_path / "r.raw"))
    assert identical(tmp_path / "r.raw", shadow2)


def test_a_damaged_source_chunk_is_not_copied_and_no_point_appears(
        make_vm: Any, fleece: Any, tmp_path: Any) -> None:
    _, local, (p1, _), _ = two_points(make_vm, fleece, tmp_path)
    damaged = set()
    for chunk in (p for p in (local / "chunks").rglob("*") if p.is_file()):  # every one: p1 needs some
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 1
        chunk.write_bytes(bytes(data))
        damaged.add(bytes(data))
    dest = tmp_path / "dest"
    res = fleece("copy", "--init", "--from", local, "--to", dest, p1)
    assert res.rc == 1
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and "chunks/" in lines[0] and "Traceback" not in res.err, res.err
    assert not list(dest.rglob("points/**/*.json"))
    assert ok(fleece("list", "--repo", dest, "--json")).json()["points"] == []
    # Not copied: the destination holds none of the damaged bytes, under any name, visible or
    # in a temporary file (and, every source chunk being damaged, no chunk at all).
    held = [p for p in dest.rglob("*") if p.is_file() and p.name != "config"]
    assert not [p for p in held if p.read_bytes() in damaged], held
    assert not [p for p in held if "chunks" in p.parts or p.name.startswith(".tmp-")], held


def test_a_destination_with_another_chunk_size_is_refused(make_vm: Any, fleece: Any, tmp_path: Any) -> None:
    _, local, _, _ = two_points(make_vm, fleece, tmp_path)
    other = tmp_path / "other"
    vm2 = make_vm([("qcow2", "8M")], name="db1")
    vm2.write("vda", 0, MiB, 0x77)
    ok(fleece("backup", "--qmp", vm2.qmp_path, "--drive", "vda", "--repo", other, "--chunk-size", "1M"))
    res = fleece("copy", "--from", local, "--to", other)
    assert res.rc == 2
    assert "indexes name chunks by position, so both must use the same; nothing was copied" in res.err
    assert json.loads(ok(fleece("list", "--repo", other, "--json")).out)["points"][0]["vm"] == "db1"
