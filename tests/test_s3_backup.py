"""`fleece backup` of real VMs into S3 on loopback, through the CLI.

The life cycle runs on every S3 implementation in conftest's ``S3_SERVERS``:
moto, and s3rver (a second, independent implementation), each over HTTP and
HTTPS (``fleece copy``, its last step, is in ``test_copy.py``). s3rver
ignores ``If-None-Match``, so lock-taking commands run there with the
operator's explicit opt-in (``s3_env.config_args``: a config file
saying ``unsafe_locks = true``). The repository is ``s3://BUCKET/sites/a``: every object must land under that
prefix. Restores are compared with the test's shadow of each disk. Faults
come from ``S3FaultProxy`` (conftest's ``s3_proxy``) between the ``fleece``
subprocess and moto: real 503s, throttling, TCP resets and stalls below
botocore's retry handler, and outages switched on mid-backup.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from conftest import FLEECE, S3_SERVERS

from fleece.repo.backends.s3 import S3Backend
from fleece.repo.format.keys import lease_generation_key
from fleece.repo.lock import LeaseInfo, read_lease

pytestmark = [pytest.mark.s3, pytest.mark.qemu]

MiB = 1 << 20
CHUNK = 4 * MiB
PREFIX = "sites/a"
ON_EVERY_STORE = pytest.mark.parametrize("s3_server", S3_SERVERS, indirect=True)


# -- helpers ---------------------------------------------------------------------------
def identical(a: Path, b: Path) -> bool:
    res = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(a), str(b)])
    return res.returncode == 0


def backup(fleece: Any, vm: Any, url: str, *, level: str | None = None, extra: tuple[str, ...] = ()) -> Any:
    args = ["backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", url, "--json", *extra]
    if level:
        args += ["--level", level]
    res = fleece(*args)
    assert res.rc == 0, res.err
    return res.json()


def restore(fleece: Any, url: str, point: str, out: Path) -> Path:
    res = fleece("restore", "--repo", url, point, "--drive", "vda", "--output", out)
    assert res.rc == 0, res.err
    return out


def bucket_objects(s3_env: Any, bucket: str) -> dict[str, tuple[str, Any]]:
    """Every object in the bucket (key → (ETag, LastModified)), listed by a client fleece does not own."""
    pages = s3_env.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: (o["ETag"], o["LastModified"]) for page in pages for o in page.get("Contents", [])}


def chunk_objects(s3_env: Any, bucket: str) -> dict[str, tuple[str, Any]]:
    return {k: v for k, v in bucket_objects(s3_env, bucket).items() if k.startswith(f"{PREFIX}/chunks/")}


def random_seed(path: Path, size: int, seed: int) -> Path:
    """A raw image of incompressible data, like real disk contents after compression."""
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def start_backup(vm: Any, url: str, *extra: str) -> subprocess.Popen[str]:
    """A ``fleece backup`` in the background, for faults switched on while it runs."""
    return subprocess.Popen(
        [FLEECE, "backup", "--init", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", url, "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def ok(res: Any) -> Any:
    assert res.rc == 0, res.err
    return res


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the backup ended too early: {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleece: error: "), err
    assert "Traceback" not in err
    return lines[0]


def error_lines(err: str) -> str:
    """The one error line, beside the warning every run on an opted-in unsafe store prints."""
    return one_error_line("\n".join(line for line in err.splitlines()
                                     if not line.startswith("fleece: unsafe_locks: ")))


# -- the happy path ----------------------------------------------------------------------
@ON_EVERY_STORE
def test_full_incremental_and_restores_are_identical_and_every_object_is_under_the_prefix(
        make_vm: Any, fleece: Any, s3_env: Any, s3_bucket: Any, tmp_path: Any) -> None:
    locks = s3_env.config_args
    seed = random_seed(tmp_path / "seed.raw", 64 * MiB, 1)
    with open(seed, "r+b") as f:  # half of the disk never written: zero chunks, not stored
        f.truncate(32 * MiB)
        f.truncate(64 * MiB)
    vm = make_vm([("qcow2", "64M")], name="web1", contents={"vda": seed})
    vm.write("vda", 40 * MiB, MiB, 0x11)
    url = f"s3://{s3_bucket}/{PREFIX}"

    p1 = backup(fleece, vm, url, extra=locks)
    d1 = p1["disks"][0]
    assert (d1["level"], d1["chunks_new"], d1["chunks_zero"]) == ("full", 9, 7)
    assert d1["bytes_stored"] > 32 * MiB  # random data does not compress
    s1 = vm.snapshot_shadow("vda", tmp_path / "p1.raw")

    vm.write("vda", 5 * MiB, 3 * MiB, 0x22)    # most of chunk 1: stored whole again
    vm.write("vda", 60 * MiB, 64 * 1024, 0x33)  # a little of chunk 15, a zero chunk until now
    p2 = backup(fleece, vm, url, extra=locks)
    d2 = p2["disks"][0]
    assert p2["parent"] == p1["point"] and d2["level"] == "incremental"
    # Chunk 1 is read whole and stored as a new chunk; of chunk 15 only the
    # dirty 64 KiB is read, stored as a delta in one pack.
    assert d2["bytes_read"] == 4 * MiB + 64 * 1024 and (d2["chunks_new"], d2["deltas"]) == (1, 1)

    assert identical(restore(fleece, url, p1["point"], tmp_path / "r1.raw"), s1)
    assert identical(restore(fleece, url, p2["point"], tmp_path / "r2.raw"), vm.shadow("vda"))
    listed = fleece("list", "--repo", url, "--json").json()["points"]
    assert [p["id"] for p in listed] == [p1["point"], p2["point"]]

    keys = set(bucket_objects(s3_env, s3_bucket))
    assert keys and all(k.startswith(f"{PREFIX}/") for k in keys), keys
    # The lock is released (its last generation says so); "store" holds the store check's
    # cached result.
    assert {k.split("/")[2] for k in keys} == {"config", "chunks", "packs", "indexes", "pages", "points",
                                               "store", "leases"}
    assert read_lease(S3Backend(s3_bucket, PREFIX), "locks/vms/web1") is None
    assert f"{PREFIX}/points/web1/{p2['point']}.json" in keys
    assert len([k for k in keys if k.startswith(f"{PREFIX}/chunks/")]) == 10
    assert len([k for k in keys if k.startswith(f"{PREFIX}/packs/")]) == 1
    assert set(vm.bitmaps("vda")) == {f"fleece-{p2['point']}"}

    # Every chunk fetched, decoded and hashed: both points restore.
    deep = ok(fleece("verify", "--repo", url, "--deep", "--json")).json()
    assert deep["ok"] is True and len(deep["points"]) == 2, deep
    # Keep only the newest point; gc frees the chunk only the first one named.
    pruned = ok(fleece("prune", "--repo", url, "--keep-last", "1", "--json", *locks)).json()
    assert [r["id"] for r in pruned["removed"]] == [p1["point"]]
    freed = ok(fleece("gc", "--repo", url, "--grace", "0s", "--json", *locks)).json()
    assert freed["chunks_deleted"] == 1 and freed["chunks_kept"] == 9, freed
    assert freed["packs_kept"] == 1, freed
    assert len(chunk_objects(s3_env, s3_bucket)) == 9
    assert ok(fleece("verify", "--repo", url, "--deep", "--json")).json()["ok"] is True
    assert identical(restore(fleece, url, p2["point"], tmp_path / "r3.raw"), vm.shadow("vda"))


def test_an_unchanged_full_backup_uploads_no_chunk_and_probes_nothing(
        make_vm: Any, fleece: Any, s3_env: Any, s3_bucket: Any, s3_proxy: Any, tmp_path: Any) -> None:
    vm = make_vm([("qcow2", "32M")], name="web1")
    for i in range(6):
        vm.write("vda", i * 5 * MiB, MiB, 0x30 + i)
    url = f"s3://{s3_bucket}/{PREFIX}"
    first = backup(fleece, vm, url)["disks"][0]
    assert first["chunks_new"] == 6
    chunks = chunk_objects(s3_env, s3_bucket)
    assert len(chunks) == 6

    s3_proxy.plan.requests.clear()
    second = backup(fleece, vm, url, level="full")["disks"][0]
    assert second["level"] == "full" and second["bytes_read"] == first["bytes_read"]
    assert (second["chunks_new"], second["chunks_reused"]) == (0, 6)
    assert second["bytes_stored"] == second["bytes_metadata"]  # only its index: format 3 counts it
    assert chunk_objects(s3_env, s3_bucket) == chunks  # same keys, same ETags, same times
    seen = s3_proxy.plan.requests
    # The latest point's index names every chunk: no HEAD per chunk, no chunk PUT.
    # PUTs: the lease's first generation and its guard for older versions, the generation
    # naming the points it reads, the released generation, the index (format 3: its top table and
    # one create-if-absent of its page, which the store refuses), the point — at most one more
    # for a lease renewal; six chunk PUTs or HEADs would show as far more.
    assert seen["HeadObject"] <= 1 and seen["PutObject"] <= 8, seen

    # The guest rewrites most of chunk 0 with the bytes it already held and
    # most of chunk 7 with new ones: both are read whole (too much changed for
    # a delta); only the new digest is probed and stored.
    s3_proxy.plan.requests.clear()
    vm.write("vda", 0, MiB, 0x30)
    vm.write("vda", MiB, 2 * MiB, 0x00)
    vm.write("vda", 28 * MiB, 3 * MiB, 0x77)
    third = backup(fleece, vm, url)["disks"][0]
    assert third["level"] == "incremental" and third["bytes_read"] == 6 * MiB
    assert (third["chunks_new"], third["chunks_reused"]) == (1, 1)
    # PUTs: as above with the new chunk, and format 3's index as a page and a top table.
    assert seen["HeadObject"] == 1 and seen["PutObject"] == 8, seen
    # GETs: config, the cached store check, the parent point and its index (once, it is
    # also the latest: its top table and its page), the leases' newest generations (gc's, ours
    # before and after the point is written) and the guard at release; not one per point of the VM.
    assert seen["GetObject"] == 10, seen
    assert len(chunk_objects(s3_env, s3_bucket)) == 7


@ON_EVERY_STORE
def test_two_vms_backing_up_at_once_into_one_prefix_share_its_chunks(
        make_vm: Any, fleece: Any, s3_env: Any, s3_bucket: Any, tmp_path: Any, hold_backup: Any) -> None:
    from test_concurrent_backups import release_together

    seed = random_seed(tmp_path / "seed.raw", 24 * MiB, 2)  # same golden image, 6 chunks
    vms = [make_vm([("qcow2", "24M")], name=name, contents={"vda": seed}) for name in ("web1", "web2")]
    vms[1].write("vda", 0, MiB, 0x42)  # web2 differs in its first chunk
    url = f"s3://{s3_bucket}/{PREFIX}"

    # Both start on an empty prefix: one creates the repository, both store the shared chunks
    # (conditional creates decide who writes each object). Overlap made certain, not hoped for:
    # both are held while storing chunks, then let go together.
    held = [hold_backup(vm, url, "chunk-stored", *s3_env.config_args) for vm in vms]
    for h in held:
        h.wait_held()
    results = release_together(held)
    for rc, _, err in results:
        assert rc == 0, err
    points = [json.loads(out)["point"] for _, out, _ in results]

    chunks = chunk_objects(s3_env, s3_bucket)
    assert len(chunks) == 7  # 6 shared + web2's own first chunk, each stored once
    for vm, point in zip(vms, points, strict=True):
        assert identical(restore(fleece, url, point, tmp_path / f"{vm.name}.raw"), vm.shadow("vda"))
    listed = fleece("list", "--repo", url, "--json").json()["points"]
    assert sorted(p["vm"] for p in listed) == ["web1", "web2"]

    # A third, later VM from the same image finds every chunk in the bucket.
    late = make_vm([("qcow2", "24M")], name="web3", contents={"vda": seed})
    disk = backup(fleece, late, url, extra=s3_env.config_args)["disks"][0]
    assert (disk["chunks_new"], disk["chunks_reused"]) == (0, 6)
    assert chunk_objects(s3_env, s3_bucket) == chunks


# -- faults ------------------------------------------------------------------------------
def test_throttling_errors_resets_and_stalls_are_retried_and_the_point_restores_identical(
        make_vm: Any, fleece: Any, s3_env: Any, s3_bucket: Any, s3_proxy: Any, tmp_path: Any,
        monkeypatch: Any) -> None:
    monkeypatch.setenv("FLEECE_S3_READ_TIMEOUT", "0.5")  # the proxy stalls 1.5 s
    seed = random_seed(tmp_path / "seed.raw", 48 * MiB, 3)
    vm = make_vm([("qcow2", "48M")], name="web1", contents={"vda": seed})
    url = f"s3://{s3_bucket}/{PREFIX}"
    plan = s3_proxy.plan
    plan.ops = frozenset({"PutObject", "HeadObject"})
    plan.slow = 0.02

    proc = start_backup(vm, url)
    # Once the lease is taken and the chunks flow, the server starts misbehaving.
    wait_for(lambda: plan.requests["HeadObject"] >= 1, proc)
    plan.statuses.extend([(503, "SlowDown"), (503, "SlowDown"), (500, "InternalError"),
                          (503, "ServiceUnavailable")])
    plan.resets, plan.lost_replies, plan.timeouts = 2, 1, 1
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert plan.injected == {"status": 4, "resets": 2, "lost_replies": 1, "timeouts": 1}
    point = json.loads(out)
    assert point["disks"][0]["chunks_new"] == 12
    assert identical(restore(fleece, url, point["point"], tmp_path / "r.raw"), vm.shadow("vda"))
    assert set(vm.bitmaps("vda")) == {f"fleece-{point['point']}"}


@pytest.mark.parametrize("outage", ["puts-503", "endpoint-resets"])
def test_a_persistent_outage_mid_backup_fails_cleanly_and_loses_no_dirty_bit(
        make_vm: Any, fleece: Any, s3_env: Any, s3_bucket: Any, s3_proxy: Any, tmp_path: Any,
        monkeypatch: Any, outage: Any) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    seed = random_seed(tmp_path / "seed.raw", 32 * MiB, 4)
    vm = make_vm([("qcow2", "32M")], name="web1", contents={"vda": seed})
    url = f"s3://{s3_bucket}/{PREFIX}"
    first = backup(fleece, vm, url)
    for i in range(8):  # every chunk mostly rewritten, so each is uploaded whole
        vm.write("vda", i * CHUNK + 4096, 3 * MiB, 0x50 + i)
    before = vm.block_graph()
    assert before["bitmaps"]["vda"] == [(f"fleece-{first['point']}", True, True)]
    objects = bucket_objects(s3_env, s3_bucket)

    plan = s3_proxy.plan
    plan.slow = 0.2  # each request takes a while, so the outage lands mid-upload
    plan.requests.clear()
    proc = start_backup(vm, url, "--storers", "4")
    # The lease and its guard, the lease naming its parent, then the first chunk: the store
    # goes down.
    wait_for(lambda: plan.requests["PutObject"] >= 4, proc)
    if outage == "puts-503":
        plan.ops, plan.outage = frozenset({"PutObject"}), 503
    else:
        plan.outage = "reset"  # every request, the lease's release included
    out, err = proc.communicate(timeout=120)
    plan.outage, plan.slow = None, 0.0

    assert proc.returncode == 1 and out == "", (out, err)
    line = one_error_line(err)
    assert line.startswith("fleece: error: S3 ") and f"s3://{s3_bucket}/{PREFIX}/" in line
    # Nor could the lease be released (that is a write too): the line says so, and until when
    # it holds; its newest generation and its guard stay until then.
    left_behind = {f"{PREFIX}/chunks/", f"{PREFIX}/leases/vms/web1/", f"{PREFIX}/locks/vms/web1"}
    assert line.endswith(tuple("0123456789Z")) and "the lock locks/vms/web1 could not be released" in line
    if outage == "puts-503":
        assert "failed after 2 attempts: HTTP 503" in line
    else:
        assert "(up to 2 attempts): ConnectionClosedError" in line
    # QEMU exactly as found: the previous checkpoint still there and recording, no new one.
    assert vm.block_graph() == before
    # No point, no index: at most chunks nobody names yet (gc's to collect), and the lease.
    new_keys = set(bucket_objects(s3_env, s3_bucket)) - set(objects)
    assert all(k.startswith(tuple(left_behind)) for k in new_keys), new_keys
    assert any(k.startswith(f"{PREFIX}/chunks/") for k in new_keys)  # it did fail mid-upload
    assert [p["id"] for p in fleece("list", "--repo", url, "--json").json()["points"]] == [first["point"]]

    # The store is back: the next backup is an incremental on the first point
    # and holds every write made since it.
    nxt = backup(fleece, vm, url)
    assert nxt["parent"] == first["point"] and nxt["disks"][0]["level"] == "incremental"
    assert nxt["disks"][0]["bytes_read"] == 8 * CHUNK
    assert identical(restore(fleece, url, nxt["point"], tmp_path / "r.raw"), vm.shadow("vda"))


@pytest.mark.parametrize("case", ["missing-bucket", "unreachable-endpoint"])
def test_a_repository_that_cannot_be_reached_fails_in_one_line_before_qemu_is_touched(
        make_vm: Any, fleece: Any, s3_env: Any, tmp_path: Any, monkeypatch: Any, case: Any) -> None:
    vm = make_vm([("qcow2", "16M")], name="web1")
    vm.write("vda", 0, MiB, 0x42)
    before = vm.block_graph()
    bucket = f"fleece-missing-{uuid.uuid4().hex[:8]}"
    if case == "unreachable-endpoint":
        with socket.socket() as s:  # a loopback port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    start = time.monotonic()
    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", f"s3://{bucket}/{PREFIX}")
    assert res.rc == 1 and res.out == "", res.err
    line = one_error_line(res.err)
    if case == "missing-bucket":
        assert line == f"fleece: error: S3 bucket {bucket} does not exist at {s3_env.endpoint}"
    else:
        assert line.startswith(f"fleece: error: cannot reach the S3 endpoint http://127.0.0.1:{port}")
        assert time.monotonic() - start < 20
    assert vm.block_graph() == before


def test_credentials_that_may_only_read_fail_in_one_line_and_change_nothing(
        make_vm: Any, fleece: Any, s3_env: Any, s3_bucket: Any, tmp_path: Any) -> None:
    vm = make_vm([("qcow2", "16M")], name="web1")
    vm.write("vda", 0, MiB, 0x42)
    url = f"s3://{s3_bucket}/{PREFIX}"
    first = backup(fleece, vm, url)
    vm.write("vda", 8 * MiB, MiB, 0x43)
    before, objects = vm.block_graph(), bucket_objects(s3_env, s3_bucket)

    iam = boto3.client("iam")  # moto's IAM, at AWS_ENDPOINT_URL
    user = f"fleece-reader-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="read-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                       "Resource": [f"arn:aws:s3:::{s3_bucket}", f"arn:aws:s3:::{s3_bucket}/*"]}],
    }))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    with s3_env.checking_credentials():
        res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", url,
                     env={"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                          "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]})
    assert res.rc == 1 and res.out == "", res.err
    assert one_error_line(res.err) == (
        f"fleece: error: S3 denied ListObjectsV2 on {url}/leases/vms/web1/ (AccessDenied): "
        "check the credentials and that they allow s3:ListBucket")
    assert key["SecretAccessKey"] not in res.err
    assert vm.block_graph() == before
    assert bucket_objects(s3_env, s3_bucket) == objects
    assert set(vm.bitmaps("vda")) == {f"fleece-{first['point']}"}


@ON_EVERY_STORE
def test_a_lease_left_by_a_dead_host_blocks_backups_until_it_is_broken_explicitly(
        make_vm: Any, fleece: Any, s3_env: Any, s3_bucket: Any, tmp_path: Any) -> None:
    locks = s3_env.config_args
    vm = make_vm([("qcow2", "16M")], name="web1")
    vm.write("vda", 0, MiB, 0x42)
    url = f"s3://{s3_bucket}/{PREFIX}"
    first = backup(fleece, vm, url, extra=locks)
    vm.write("vda", 4 * MiB, MiB, 0x43)
    # Another host's backup died holding the lease: it has not expired yet.
    lease = LeaseInfo(key="locks/vms/web1", host="backup-host-2", pid=4242, token="f" * 32,
                      created="2026-11-23T07:00:00.000000Z", expires="2099-01-01T00:00:00.000000Z",
                      generation=99)
    S3Backend(s3_bucket, PREFIX).put(lease_generation_key("locks/vms/web1", 99), lease.to_json())
    before = vm.block_graph()

    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", url, *locks)
    assert res.rc == 1
    assert error_lines(res.err) == (
        "fleece: error: VM web1 is locked by backup-host-2 pid 4242 since 2026-11-23T07:00:00.000000Z "
        "(lease expires 2099-01-01T00:00:00.000000Z); nothing was changed")
    assert vm.block_graph() == before

    refused = fleece("unlock", "--repo", url, "--vm", "web1")
    assert refused.rc == 1 and "run again with --force" in one_error_line(refused.err)
    broken = fleece("unlock", "--repo", url, "--vm", "web1", "--force")
    if not s3_env.enforces_conditional_writes:
        # A break is a conditional create too, and `unlock` takes no config to opt in.
        assert broken.rc == 1 and "ignores If-None-Match" in one_error_line(broken.err)
        return
    assert broken.rc == 0, broken.err
    assert broken.out.startswith("removed the lock of VM web1 held by backup-host-2 pid 4242")
    assert read_lease(S3Backend(s3_bucket, PREFIX), "locks/vms/web1") is None

    nxt = backup(fleece, vm, url, extra=locks)
    assert nxt["parent"] == first["point"] and nxt["disks"][0]["level"] == "incremental"
    assert identical(restore(fleece, url, nxt["point"], tmp_path / "r.raw"), vm.shadow("vda"))
    assert fleece("unlock", "--repo", url, "--vm", "web1").out.strip() == f"VM web1 holds no lock in {url}"
