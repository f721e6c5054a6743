"""Immutable restore points with S3 Object Lock (moto_server and Ceph RGW, buckets created with
Object Lock).

What is proved here, through moto's and Ceph RGW's own Object Lock implementations:

* the backend: a locked object cannot be deleted — not by a plain
  ``DeleteObject`` of its version (AccessDenied), not by fleece; a plain
  ``DeleteObject`` without a version only hides it behind a delete marker,
  which fleece's delete takes away again; unlocked objects go with every
  version, so a versioned bucket keeps nothing hidden;
* ``fleece init --object-lock-days`` refuses a bucket without Object Lock and
  the file backend in one line, exit 2, writing nothing;
* backups lock every object a point needs and record its horizon; a backup
  past the slack extends the locks of the old chunks it reuses (requests
  counted); prune keeps a locked point and says until when; gc leaves locked
  garbage and reports it; verify reports the horizon and fails a lock that
  was shortened; the same holds in an encrypted repository.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from fleece.errors import RepositoryError
from fleece.repo.backends.base import ObjectLocked, Retention
from fleece.repo.backends.s3 import LIST_DIRECTORY_ABOVE, S3Backend
from fleece.repo.object_lock import CLOCK_OFFSET_ENV

pytestmark = [pytest.mark.s3]

MiB = 1 << 20
DAY = 86400.0
ON_LOCKING_STORES = pytest.mark.parametrize("s3_server", ["moto", "ceph-http", "ceph-https"], indirect=True)
"""The stores of the suite that implement Object Lock (s3rver does not). The life cycle with
locked points runs on moto only: on Ceph RGW a versioned bucket ignores If-None-Match, so
fleece refuses to back up there without unsafe_locks (tested below)."""
PREFIX = "vms"


# -- helpers ---------------------------------------------------------------------------
def ok(res: Any) -> Any:
    assert res.rc == 0, res.err
    return res


def one_line(res: Any) -> str:
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fleece: error: "), res.err
    assert "Traceback" not in res.err
    return str(lines[0])


def versions(s3_env: Any, bucket: str, prefix: str = "") -> list[tuple[str, str, bool]]:
    """Every version and delete marker under ``prefix``: (key, version id, is a marker)."""
    out: list[tuple[str, str, bool]] = []
    for page in s3_env.client().get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        out += [(v["Key"], v["VersionId"], False) for v in page.get("Versions", [])]
        out += [(v["Key"], v["VersionId"], True) for v in page.get("DeleteMarkers", [])]
    return out


def lock_end(s3_env: Any, bucket: str, key: str) -> float:
    """The object's lock end as S3 reports it (0: not locked)."""
    head = s3_env.client().head_object(Bucket=bucket, Key=key)
    until = head.get("ObjectLockRetainUntilDate")
    return float(until.timestamp()) if until else 0.0


def data_keys(s3_env: Any, bucket: str, prefix: str = PREFIX) -> list[str]:
    """The current objects a point may need: everything but leases and the store check."""
    pages = s3_env.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
    return [o["Key"] for page in pages for o in page.get("Contents", [])
            if o["Key"].split("/")[1] not in ("locks", "leases", "store")]


def horizon(doc: dict[str, Any]) -> float:
    return datetime.strptime(doc["horizon"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def backup(fleece: Any, vm: Any, url: str, env: dict[str, str] | None = None) -> Any:
    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", url, "--json", env=env)
    assert res.rc == 0, res.err
    return res.json()


# -- the backend ------------------------------------------------------------------------
@ON_LOCKING_STORES
def test_a_locked_object_survives_every_delete_and_a_delete_marker_is_taken_away(
        s3_env: Any, s3_lock_bucket: str) -> None:
    bucket = s3_lock_bucket
    ceph = s3_env.name.startswith("ceph")
    if ceph:
        # Ceph RGW ignores If-None-Match in a versioned bucket, which an Object Lock bucket is
        # (docs/s3.md): no conditional create there without the opt-in.
        with pytest.raises(RepositoryError, match=r"ignores If-None-Match: \* on PutObject"):
            S3Backend(bucket, PREFIX).put_locked("chunks/ab/ab00", b"x", Retention("governance", 0))
    backend = S3Backend(bucket, PREFIX, unsafe_locks=ceph)
    backend.check_object_lock()
    s3 = s3_env.client()
    until = time.time() + DAY
    key, stored = "chunks/ab/ab01", f"{PREFIX}/chunks/ab/ab01"
    assert backend.put_locked(key, b"locked bytes", Retention("governance", until))
    assert not backend.put_locked(key, b"other bytes", Retention("governance", until))  # a conditional create
    lock = backend.lock_of(key)
    assert lock is not None and lock.mode == "governance" and abs(lock.until - until) < 1

    # A plain delete of the locked version fails: S3 Object Lock itself refuses it.
    (version,) = [v for k, v, marker in versions(s3_env, bucket, stored) if not marker]
    with pytest.raises(ClientError) as refused:
        s3.delete_object(Bucket=bucket, Key=stored, VersionId=version)
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    # Without a version S3 "deletes" by adding a delete marker: the object
    # looks gone, its locked version is still there.
    assert s3.delete_object(Bucket=bucket, Key=stored)["DeleteMarker"] is True
    assert not backend.exists(key)
    assert s3.get_object(Bucket=bucket, Key=stored, VersionId=version)["Body"].read() == b"locked bytes"
    # fleece deletes every version: the marker goes, the locked version stays, and it says so.
    with pytest.raises(ObjectLocked, match=r"chunks/ab/ab01 is locked by S3 Object Lock \(governance\) "
                                           r"until 20\d\d-.*Z; it cannot be deleted before then"):
        backend.delete(key)
    assert backend.get(key) == b"locked bytes"
    assert [marker for _, _, marker in versions(s3_env, bucket, stored)] == [False]

    # Unlocked objects (a lease rewritten twice) go with every version; locked ones are named.
    backend.put("locks/vms/web1", b"1")
    backend.put("locks/vms/web1", b"2")
    assert backend.delete_unlocked(["locks/vms/web1", key, "chunks/cd/never-stored"]) == [key]
    assert versions(s3_env, bucket, f"{PREFIX}/locks/") == []
    # gc's path: many keys of one directory, listed once.
    many = [f"chunks/ef/ef{i:02d}" for i in range(LIST_DIRECTORY_ABOVE + 3)]
    for k in many[:2]:
        backend.put_locked(k, b"x", Retention("governance", until))
    for k in many[2:]:
        backend.put(k, b"y")
    assert sorted(backend.delete_unlocked(many)) == many[:2]
    assert sorted(k for k, _, _ in versions(s3_env, bucket, f"{PREFIX}/chunks/ef/")) == [
        f"{PREFIX}/{k}" for k in many[:2]]

    # A lock is extended, never shortened by fleece.
    assert backend.extend_lock(key, Retention("governance", until + DAY)).until == until + DAY
    assert abs(lock_end(s3_env, bucket, stored) - (until + DAY)) < 1


# -- fleece init -------------------------------------------------------------------------
def test_init_refuses_a_bucket_without_object_lock_a_directory_and_bad_values_writing_nothing(
        fleece: Any, s3_env: Any, s3_bucket: str, s3_lock_bucket: str, tmp_path: Path) -> None:
    res = fleece("init", "--repo", f"s3://{s3_bucket}/{PREFIX}", "--encryption", "none",
                 "--object-lock-days", "30")
    assert res.rc == 2
    line = one_line(res)
    assert f"S3 bucket {s3_bucket} does not have Object Lock enabled" in line
    assert line.endswith("nothing was changed")
    assert versions(s3_env, s3_bucket) == []

    directory = tmp_path / "repo"
    res = fleece("init", "--repo", directory, "--encryption", "none", "--object-lock-days", "30")
    assert res.rc == 2 and "cannot lock objects" in one_line(res)
    assert not directory.exists()

    for bad, says in ((["--object-lock-days", "0"], "between 1 and 36500"),
                      (["--object-lock-days", "36501"], "between 1 and 36500"),
                      (["--object-lock-days", "a week"], "not a whole number"),
                      (["--object-lock-mode", "compliance"], "--object-lock-mode needs --object-lock-days"),
                      (["--object-lock-days", "7", "--object-lock-mode", "legal-hold"], "invalid choice")):
        res = fleece("init", "--repo", f"s3://{s3_lock_bucket}/{PREFIX}", "--encryption", "none", *bad)
        assert res.rc == 2 and says in one_line(res), (bad, res.err)
    assert versions(s3_env, s3_lock_bucket) == []


# -- backups, prune, gc, verify ------------------------------------------------------------
@pytest.mark.qemu
def test_points_stay_locked_prune_and_gc_cannot_remove_them_and_reused_locks_are_extended(
        make_vm: Any, fleece: Any, s3_env: Any, s3_lock_bucket: str, s3_proxy: Any) -> None:
    bucket = s3_lock_bucket
    url = f"s3://{bucket}/{PREFIX}"
    made = ok(fleece("init", "--repo", url, "--encryption", "none", "--object-lock-days", "1",
                     "--object-lock-mode", "governance", "--json")).json()
    assert made["object_lock"] == {"days": 1, "mode": "governance"}
    vm = make_vm([("qcow2", "32M")], name="web1")
    for i in range(4):
        vm.write("vda", i * 8 * MiB, MiB, 0x40 + i)

    started = time.time()
    p1 = backup(fleece, vm, url)
    lock1 = p1["object_lock"]
    # New objects are locked N + S = 2 days; the first backup re-locks config (1 request).
    assert lock1["mode"] == "governance" and lock1["locks_extended"] == 1
    assert lock1["repository"] == made["id"]
    assert started + 2 * DAY - 5 < horizon(lock1) < time.time() + 2 * DAY + 1
    needed = data_keys(s3_env, bucket)
    assert {k.split("/")[1] for k in needed} == {"config", "chunks", "indexes", "pages", "points"}
    for key in needed:
        assert lock_end(s3_env, bucket, key) >= horizon(lock1) - 1, key
    # Leases and store-check probes were deleted with every version: nothing hidden stays.
    assert [v for v in versions(s3_env, bucket) if v[2] or "/locks/" in v[0] or "/probe-" in v[0]] == []

    # An incremental reuses the old chunks: no lock request while the horizon holds.
    vm.write("vda", 0, MiB, 0x55)
    s3_proxy.plan.requests.clear()
    p2 = backup(fleece, vm, url)
    assert p2["disks"][0]["level"] == "incremental" and p2["object_lock"]["locks_extended"] == 0
    assert s3_proxy.plan.requests["PutObjectRetention"] == 0
    assert horizon(p2["object_lock"]) >= horizon(lock1) - 1

    # A plain delete of a chunk's version is refused by the store.
    chunk = next(k for k in needed if "/chunks/" in k)
    (version,) = [v for _, v, _ in versions(s3_env, bucket, chunk)]
    with pytest.raises(ClientError, match="AccessDenied"):
        s3_env.client().delete_object(Bucket=bucket, Key=chunk, VersionId=version)

    # Without a version S3 only hides it behind a delete marker: verify says
    # the chunk is missing; the locked bytes are there, and removing the
    # marker brings the point back whole.
    marker = s3_env.client().delete_object(Bucket=bucket, Key=chunk)["VersionId"]
    hidden = fleece("verify", "--repo", url, "--json")
    assert hidden.rc == 1 and "chunk missing" in {d["problem"] for p in hidden.json()["points"]
                                                  for d in p["damage"]}
    s3_env.client().delete_object(Bucket=bucket, Key=chunk, VersionId=marker)
    assert ok(fleece("verify", "--repo", url, "--deep", "--json")).json()["ok"] is True

    # prune keeps the locked point and says until when (dry run and real run alike).
    for dry in (("--dry-run",), ()):
        pruned = ok(fleece("prune", "--repo", url, "--keep-last", "1", "--json", *dry)).json()
        assert pruned["removed"] == [], pruned
        (locked,) = pruned["locked"]
        assert locked["id"] == p1["point"] and locked["until"].startswith(
            datetime.fromtimestamp(horizon(lock1), UTC).strftime("%Y-%m-%d"))
        kept = {k["id"]: k["reasons"] for k in pruned["kept"]}
        assert kept[p1["point"]] == [f"locked until {locked['until']}"]
    said = ok(fleece("prune", "--repo", url, "--keep-last", "1")).out
    assert f"keep    {p1['point']}  (locked until 20" in said
    assert f"{PREFIX}/points/web1/{p1['point']}.json" in data_keys(s3_env, bucket)

    # gc leaves garbage that is still locked, and reports it.
    digest = secrets.token_hex(32)
    garbage = f"chunks/{digest[:2]}/{digest}"
    S3Backend(bucket, PREFIX).put_locked(garbage, b"a failed backup's chunk",
                                         Retention("governance", time.time() + DAY))
    collected = ok(fleece("gc", "--repo", url, "--grace", "0s", "--json")).json()
    assert (collected["objects_locked"], collected["chunks_deleted"], collected["bytes_freed"]) == (1, 0, 0)
    assert f"{PREFIX}/{garbage}" in data_keys(s3_env, bucket)
    assert "Object Lock still protects" in ok(fleece("gc", "--repo", url, "--grace", "0s")).out

    # verify reports the lock horizon of every point.
    checked = ok(fleece("verify", "--repo", url, "--json")).json()
    assert checked["ok"] is True and checked["object_lock"]["mode"] == "governance"
    assert abs(horizon(checked["object_lock"]) - horizon(lock1)) < 2
    assert all("lock_until" in p for p in checked["points"])
    assert "every object these points need is locked until at least 20" in ok(
        fleece("verify", "--repo", url, "--deep")).out

    # Two days on (the test clock), the horizon no longer covers N days: the
    # backup extends every object its point names that it did not write, and
    # config — one request each, once — then none again.
    later = {CLOCK_OFFSET_ENV: str(int(2 * DAY))}
    reused = [k for k in data_keys(s3_env, bucket) if k.split("/")[1] in ("chunks", "packs", "pages")
              and k != f"{PREFIX}/{garbage}"]
    s3_proxy.plan.requests.clear()
    p3 = backup(fleece, vm, url, env=later)
    extended = p3["object_lock"]["locks_extended"]
    # Every reused chunk and pack and config; pages only those p3's index still names (the one
    # its write changed is new, and new objects are locked when written).
    reused_data = [k for k in reused if k.split("/")[1] != "pages"]
    assert extended == s3_proxy.plan.requests["PutObjectRetention"]
    assert len(reused_data) + 1 < extended <= len(reused) + 1
    for key in [*reused_data, f"{PREFIX}/config"]:
        assert lock_end(s3_env, bucket, key) >= time.time() + 3 * DAY - 5, key
    extended_pages = [k for k in reused if k.split("/")[1] == "pages"
                      and lock_end(s3_env, bucket, k) >= time.time() + 3 * DAY - 5]
    assert len(extended_pages) == extended - len(reused_data) - 1 >= 1
    assert horizon(p3["object_lock"]) >= time.time() + 3 * DAY - 5
    s3_proxy.plan.requests.clear()
    p4 = backup(fleece, vm, url, env=later)
    assert p4["object_lock"]["locks_extended"] == 0 == s3_proxy.plan.requests["PutObjectRetention"]

    # A copy into another Object Lock repository locks everything the copied
    # points need, there and then, and records the horizon it measured.
    copy_url = f"s3://{bucket}/copy"
    ok(fleece("init", "--repo", copy_url, "--encryption", "none", "--object-lock-days", "1"))
    ok(fleece("copy", "--from", url, "--to", copy_url))
    landed = [k for k, _, marker in versions(s3_env, bucket, "copy/")
              if not marker and k.split("/")[1] in ("chunks", "packs", "indexes", "pages", "points")]
    assert {k.split("/")[1] for k in landed} == {"chunks", "packs", "indexes", "pages", "points"}
    for key in landed:
        assert lock_end(s3_env, bucket, key) >= time.time() + DAY - 5, key
    with pytest.raises(ClientError) as refused:
        s3_env.client().delete_object(Bucket=bucket, Key=landed[0], VersionId=next(
            v for k, v, _ in versions(s3_env, bucket, landed[0]) if k == landed[0]))
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    checked = ok(fleece("verify", "--repo", copy_url, "--json")).json()
    assert checked["points"] and all(
        datetime.strptime(p["lock_until"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
        >= time.time() + DAY - 5 for p in checked["points"])
    copy_id = json.loads(s3_env.client().get_object(Bucket=bucket, Key="copy/config")["Body"].read())["id"]
    for key in (k for k in landed if k.split("/")[1] == "points"):
        doc = json.loads(s3_env.client().get_object(Bucket=bucket, Key=key)["Body"].read())
        assert doc["object_lock"]["repository"] == copy_id, key
    # Two days later that horizon is too short: the next backup there
    # extends everything it reuses for N days from then.
    p5 = backup(fleece, vm, copy_url, env=later)
    assert p5["disks"][0]["level"] == "incremental" and p5["object_lock"]["locks_extended"] > 1
    copied = [k for k in versions(s3_env, bucket, "copy/") if k[0].split("/")[1] in ("chunks", "packs")]
    assert copied
    for key, _, _ in copied:
        assert lock_end(s3_env, bucket, key) >= time.time() + 3 * DAY - 5, key

    # Someone allowed to bypass governance shortens a chunk's lock: verify fails.
    s3_env.client().put_object_retention(
        Bucket=bucket, Key=chunk, BypassGovernanceRetention=True,
        Retention={"Mode": "GOVERNANCE", "RetainUntilDate": datetime.now(UTC) + timedelta(hours=1)})
    res = fleece("verify", "--repo", url, "--json")
    assert res.rc == 1
    damage = [d for p in res.json()["points"] for d in p["damage"]]
    assert damage and {d["problem"] for d in damage} == {"lock too short"}
    assert all(d["objects"] == [chunk.removeprefix(f"{PREFIX}/")] for d in damage)


@pytest.mark.qemu
def test_an_encrypted_repository_locks_its_sealed_objects_config_and_key(
        make_vm: Any, fleece: Any, s3_env: Any, s3_lock_bucket: str, tmp_path: Path) -> None:
    bucket = s3_lock_bucket
    url = f"s3://{bucket}/{PREFIX}"
    env = {"FLEECE_PASSPHRASE": "correct horse battery staple"}
    ok(fleece("init", "--repo", url, "--encryption", "aes-256-gcm", "--object-lock-days", "3",
              "--object-lock-mode", "compliance", env=env))
    vm = make_vm([("qcow2", "16M")], name="db1")
    vm.write("vda", 0, 2 * MiB, 0x61)
    p1 = backup(fleece, vm, url, env=env)
    vm.write("vda", 8 * MiB, MiB, 0x62)
    p2 = backup(fleece, vm, url, env=env)
    assert p1["object_lock"]["mode"] == p2["object_lock"]["mode"] == "compliance"
    needed = data_keys(s3_env, bucket)
    assert {k.split("/")[1] for k in needed} == {"config", "keys", "chunks", "packs", "indexes", "pages",
                                                 "points"}
    for key in needed:
        assert lock_end(s3_env, bucket, key) >= time.time() + 3 * DAY, key
    head = s3_env.client().head_object(Bucket=bucket, Key=needed[0])
    assert head["ObjectLockMode"] == "COMPLIANCE"
    pruned = ok(fleece("prune", "--repo", url, "--keep-last", "1", "--json", env=env)).json()
    assert pruned["removed"] == [] and [p["id"] for p in pruned["locked"]] == [p1["point"]]
    checked = ok(fleece("verify", "--repo", url, "--deep", "--json", env=env)).json()
    assert checked["ok"] is True and checked["object_lock"]["days"] == 3
    assert horizon(checked["object_lock"]) >= time.time() + 3 * DAY
    # The plain delete of any sealed chunk's version is refused.
    chunk = next(k for k in needed if "/chunks/" in k)
    (version,) = [v for _, v, _ in versions(s3_env, bucket, chunk)]
    with pytest.raises(ClientError, match="AccessDenied"):
        s3_env.client().delete_object(Bucket=bucket, Key=chunk, VersionId=version)
    assert json.loads(json.dumps(checked))["points"][0]["ok"] is True

    # copy --init into an empty prefix makes the destination like the source: encrypted with its
    # key and locked the same way (it used to be made unlocked, silently) — every object locked.
    ok(fleece("copy", "--init", "--from", url, "--to", f"s3://{bucket}/made", env=env))
    made = json.loads(s3_env.client().get_object(Bucket=bucket, Key="made/config")["Body"].read())
    assert made["encryption"] == "aes-256-gcm"
    assert made["object_lock"] == {"days": 3, "mode": "compliance"}
    landed = data_keys(s3_env, bucket, "made")
    assert {k.split("/")[1] for k in landed} >= {"config", "keys", "chunks", "points"}
    for key in landed:
        assert lock_end(s3_env, bucket, key) >= time.time() + 3 * DAY - 5, key
    # Unless told otherwise.
    ok(fleece("copy", "--init", "--no-object-lock", "--from", url, "--to", f"s3://{bucket}/free",
              env=env))
    free = json.loads(s3_env.client().get_object(Bucket=bucket, Key="free/config")["Body"].read())
    assert "object_lock" not in free and lock_end(s3_env, bucket, "free/config") == 0


@pytest.mark.parametrize("s3_server", ["ceph-http"], indirect=True)
def test_a_repository_in_a_ceph_object_lock_bucket_is_refused_naming_the_ignored_precondition(
        fleece: Any, s3_env: Any, s3_lock_bucket: str) -> None:
    """Ceph RGW's versioned buckets accept a second If-None-Match: * create: ``init`` (whose
    config is a conditional create) says so in one line and writes nothing."""
    url = f"s3://{s3_lock_bucket}/{PREFIX}"
    res = fleece("init", "--repo", url, "--encryption", "none", "--object-lock-days", "1")
    assert res.rc == 1 and res.out == ""
    assert one_line(res) == (
        f"fleece: error: the S3 store at {s3_env.endpoint} ignores If-None-Match: * on PutObject (a "
        f"write with a wrong precondition succeeded), so two writers could both take one lock in "
        f"{url}; fleece refuses to take locks there (set unsafe_locks = true in the config to "
        "accept that risk); nothing was changed")
    assert versions(s3_env, s3_lock_bucket) == []


@pytest.mark.parametrize("s3_server", ["s3rver-http"], indirect=True)
def test_init_on_a_store_without_object_lock_is_refused_in_one_line(
        fleece: Any, s3_env: Any, s3_bucket: str) -> None:
    res = fleece("init", "--repo", f"s3://{s3_bucket}/{PREFIX}", "--encryption", "none",
                 "--object-lock-days", "7")
    assert res.rc == 2, res.err
    line = one_line(res)
    assert "Object Lock" in line and line.endswith("nothing was changed"), line
    pages = s3_env.client().get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
    assert [o for page in pages for o in page.get("Contents", [])] == []
