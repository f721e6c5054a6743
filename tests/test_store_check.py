"""Third-party S3 stores: the store check, error bodies without a message, no aws-chunked uploads.

moto enforces ``If-None-Match``; s3rver (npm, a real second implementation)
silently ignores it and, over HTTPS, stores botocore's streamed ``aws-chunked``
framing as the object. Both run on loopback (conftest's ``s3_server``).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from conftest import S3_SERVERS

from fleece.errors import RepositoryCorrupt, RepositoryError
from fleece.repo.backends.s3 import S3Backend
from fleece.repo.backends.store_check import CHECK_KEY, ENFORCED, IGNORED
from fleece.testing.s3_faults import inject_http_faults

pytestmark = pytest.mark.s3

MiB = 1 << 20
ON_EVERY_STORE = pytest.mark.parametrize("s3_server", S3_SERVERS, indirect=True)
ON_S3RVER = pytest.mark.parametrize("s3_server", ["s3rver-http", "s3rver-https"], indirect=True)


def raw_keys(s3_env: Any, bucket: str) -> set[str]:
    pages = s3_env.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("fleece: unsafe_locks")]
    assert len(lines) == 1 and lines[0].startswith("fleece: error: "), err
    assert "Traceback" not in err
    return lines[0]


# -- what the store does with a plain upload ---------------------------------------------------
@ON_EVERY_STORE
def test_uploads_read_back_byte_for_byte_and_are_never_streamed_as_aws_chunked(
        s3_env: Any, s3_bucket: Any) -> None:
    backend = S3Backend(s3_bucket, "repo", check_store=False)
    sent = {}
    backend.client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent.update(request.headers))
    data = bytes(range(256)) * 4099  # not a multiple of any frame size
    backend.put("chunks/aa/aa", data)
    # A checksum header and a Content-Length, never the chunked encoding with a trailer.
    assert b"aws-chunked" not in sent.get("Content-Encoding", b"")
    assert "x-amz-trailer" not in {k.lower() for k in sent}
    assert int(sent["Content-Length"]) == len(data)
    assert "x-amz-checksum-crc32" in {k.lower() for k in sent}
    # What a client fleece does not own reads back: the very bytes, no framing.
    assert s3_env.client().get_object(Bucket=s3_bucket, Key="repo/chunks/aa/aa")["Body"].read() == data


# -- the store check ------------------------------------------------------------------------------
@ON_EVERY_STORE
def test_the_store_check_runs_once_and_is_cached_in_the_repository(s3_env: Any, s3_bucket: Any) -> None:
    backend = S3Backend(s3_bucket, "repo", unsafe_locks=True)
    with inject_http_faults(backend) as seen:
        assert backend.put("config", b"{}", if_absent=True) is True
        assert backend.put("locks/vms/a", b"lease", if_absent=True) is True
    check = backend.store_check
    assert check is not None and not check.cached
    want = ENFORCED if s3_env.enforces_conditional_writes else IGNORED
    assert check.conditional_create == want
    # The probe objects are gone; the result stays, for the next process.
    assert raw_keys(s3_env, s3_bucket) == {"repo/config", "repo/locks/vms/a", f"repo/{CHECK_KEY}"}
    # probe: put+get, If-Match with the current ETag (and, if that passed, a stale one),
    # 2 conditional creates, 2 deletes; the cache: a missed get, a put.
    if_match_puts = 1 if s3_env.if_match in ("refuses-valid", "not-implemented") else 2
    assert seen.requests["PutObject"] == 4 + if_match_puts + 2 and seen.requests["DeleteObject"] == 2

    again = S3Backend(s3_bucket, "repo", unsafe_locks=True)
    with inject_http_faults(again) as seen:
        assert again.put("locks/vms/b", b"lease", if_absent=True) is True
    assert again.store_check is not None and again.store_check.cached
    assert again.store_check.conditional_create == want
    assert seen.requests["GetObject"] == 1  # one GET, not a probe
    assert seen.requests["PutObject"] == 1


@ON_EVERY_STORE
def test_the_store_check_records_each_precondition_tried_both_ways_as_the_store_answers_it(
        s3_env: Any, s3_bucket: Any) -> None:
    """What the store does, asked with boto3 directly; what the check records; what docs/s3.md's
    table says: the three agree (on Ceph RGW: If-Match refused even with the current ETag)."""
    from botocore.exceptions import ClientError

    raw = s3_env.client()

    def put(key: str, **condition: str) -> int:
        try:
            raw.put_object(Bucket=s3_bucket, Key=key, Body=b"x", **condition)
            return 200
        except ClientError as e:
            return int(e.response["ResponseMetadata"]["HTTPStatusCode"])

    etag = raw.put_object(Bucket=s3_bucket, Key="raw/a", Body=b"one")["ETag"]
    answers = {"create absent": put("raw/b", IfNoneMatch="*"),
               "create existing": put("raw/b", IfNoneMatch="*"),
               "replace stale": put("raw/a", IfMatch='"00000000000000000000000000000000"'),
               "replace current": put("raw/a", IfMatch=etag)}
    backend = S3Backend(s3_bucket, "repo", unsafe_locks=True)
    backend.put("config", b"{}", if_absent=True)
    check = backend.store_check
    assert check is not None
    create = ENFORCED if s3_env.enforces_conditional_writes else IGNORED
    assert (check.conditional_create, check.conditional_replace) == (create, s3_env.if_match)
    # The raw answers behind each outcome.
    assert answers["create absent"] == 200
    assert answers["create existing"] == (412 if create == ENFORCED else 200)
    if s3_env.if_match == "enforced":
        assert (answers["replace current"], answers["replace stale"]) == (200, 412)
    elif s3_env.if_match == "refuses-valid":
        assert (answers["replace current"], answers["replace stale"]) == (412, 412)
    else:
        assert answers["replace stale"] == 200
    row = store_table()[s3_env.name.split("-")[0]]
    assert (row["If-None-Match: *"], row["If-Match"]) == (create, s3_env.if_match)
    assert row["leases"] == ("yes" if create == ENFORCED else "only with unsafe_locks")


@pytest.mark.parametrize("s3_server", ["ceph-http"], indirect=True)
def test_on_ceph_a_versioned_object_lock_bucket_ignores_if_none_match_and_the_table_says_so(
        s3_env: Any, s3_lock_bucket: Any) -> None:
    backend = S3Backend(s3_lock_bucket, "repo", unsafe_locks=True)
    backend.put("config", b"{}", if_absent=True)
    check = backend.store_check
    assert check is not None
    row = store_table()["ceph-object-lock"]
    assert (check.conditional_create, check.conditional_replace) == (IGNORED, row["If-Match"])
    assert row["If-None-Match: *"] == IGNORED and row["leases"] == "only with unsafe_locks"


def store_table() -> dict[str, dict[str, str]]:
    """docs/s3.md's table of stores, by the name the test suite gives each server."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "s3.md").read_text()
    after = text.split("<!-- store table -->")[1].strip().splitlines()
    lines = after[:next((n for n, line in enumerate(after) if not line.startswith("|")), len(after))]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = dict(zip(head, (c.strip().strip("`") for c in line.strip("|").split("|")), strict=True))
        if cells["in the tests"] != "—":
            rows[cells["in the tests"]] = cells
    return rows


@ON_S3RVER
def test_a_store_that_ignores_if_none_match_is_refused_in_one_line_and_nothing_is_written(
        s3_env: Any, s3_bucket: Any) -> None:
    backend = S3Backend(s3_bucket, "repo")
    with pytest.raises(RepositoryError) as err:
        backend.put("locks/vms/web1", b"lease", if_absent=True)
    text = str(err.value)
    assert "\n" not in text
    assert text == (
        f"the S3 store at {s3_env.endpoint} ignores If-None-Match: * on PutObject (a write with a wrong "
        f"precondition succeeded), so two writers could both take one lock in s3://{s3_bucket}/repo; "
        "fleece refuses to take locks there (set unsafe_locks = true in the config to accept that "
        "risk); nothing was changed")
    assert raw_keys(s3_env, s3_bucket) == set()


def test_an_expired_cached_check_is_probed_again(s3_env: Any, s3_bucket: Any) -> None:
    backend = S3Backend(s3_bucket, "repo")
    backend.put("config", b"{}", if_absent=True)
    old = json.loads(backend.get(CHECK_KEY))
    old["checked"] = time.time() - 7200
    backend.put(CHECK_KEY, json.dumps(old).encode())
    again = S3Backend(s3_bucket, "repo")
    again.put("locks/vms/a", b"x", if_absent=True)
    assert again.store_check is not None and not again.store_check.cached
    assert json.loads(again.get(CHECK_KEY))["checked"] > old["checked"] + 3600


def test_a_store_that_mangles_bodies_is_caught_before_the_repository_is_created(
        make_vm: Any, fleece: Any, s3_env: Any, s3_bucket: Any, s3_proxy: Any) -> None:
    vm = make_vm([("qcow2", "16M")], name="web1")
    vm.write("vda", 0, MiB, 0x42)
    before = vm.block_graph()
    # The first upload (the probe) arrives with a bit flipped after fleece
    # computed its checksums; moto checks neither CRC32 nor Content-MD5.
    s3_proxy.plan.ops = frozenset({"PutObject"})
    s3_proxy.plan.corrupt_requests = 1
    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", f"s3://{s3_bucket}/repo")
    assert res.rc == 1 and res.out == "", res.err
    line = one_error_line(res.err)
    assert line.startswith(f"fleece: error: the S3 store at {s3_proxy.endpoint} returned other bytes "
                           f"than were written to s3://{s3_bucket}/repo/store/probe-")
    assert line.endswith("it mangles uploads, so fleece will not store backups there; nothing was changed")
    assert raw_keys(s3_env, s3_bucket) == set()  # no config, no probe, no cached check
    assert vm.block_graph() == before


def test_a_mangled_probe_is_repository_corrupt(s3_env: Any, s3_bucket: Any) -> None:
    backend = S3Backend(s3_bucket, "repo")
    with inject_http_faults(backend, corrupt_requests=1, ops={"PutObject"}), \
            pytest.raises(RepositoryCorrupt, match="returned other bytes than were written"):
        backend.put("config", b"{}", if_absent=True)
    assert raw_keys(s3_env, s3_bucket) == set()


# -- error bodies with an empty <Message/> (Ceph RGW) ----------------------------------------------
@pytest.mark.parametrize(("status", "code", "want"), [
    (400, "InvalidRequest", "failed after 1 attempt: HTTP 400 InvalidRequest"),
    (403, "AccessDenied", "S3 denied PutObject on"),
    (404, "NoSuchBucket", "does not exist at"),
    (500, "InternalError", "failed after 6 attempts: HTTP 500 InternalError"),
])
def test_an_error_with_an_empty_message_is_one_line_naming_code_bucket_and_key(
        s3_bucket: Any, status: Any, code: Any, want: Any) -> None:
    backend = S3Backend(s3_bucket, "repo", check_store=False)
    with inject_http_faults(backend, statuses=[(status, code)] * 6, empty_messages=True) as seen, \
            pytest.raises(RepositoryError) as err:
        backend.put("chunks/ab/abcd", b"data")
    assert seen.injected["status"] >= 1
    text = str(err.value)
    assert "\n" not in text and want in text and "None" not in text
    if code != "NoSuchBucket":
        assert f"s3://{s3_bucket}/repo/chunks/ab/abcd" in text and code in text


def test_a_bulk_delete_error_without_a_message_is_one_line(s3_bucket: Any, monkeypatch: Any) -> None:
    backend = S3Backend(s3_bucket, "repo", check_store=False)
    # What botocore makes of RGW's <Error><Key>…</Key><Code>AccessDenied</Code><Message/></Error>.
    monkeypatch.setattr(backend.client, "delete_objects", lambda **_: {
        "Errors": [{"Key": "repo/chunks/ab/abcd", "Code": "AccessDenied", "Message": None}]})
    with pytest.raises(RepositoryError) as err:
        backend.delete_many(["chunks/ab/abcd", "chunks/cd/cdef"])
    assert str(err.value) == (f"S3 DeleteObjects could not delete 1 of 2 objects, first "
                              f"s3://{s3_bucket}/repo/chunks/ab/abcd: AccessDenied")


def test_a_fleece_command_meeting_empty_error_messages_prints_one_line(
        s3_proxy: Any, s3_bucket: Any, fleece: Any) -> None:
    s3_proxy.plan.empty_messages = True
    s3_proxy.plan.outage = 400
    res = fleece("list", "--repo", f"s3://{s3_bucket}/repo", timeout=60)
    assert res.rc == 1, (res.out, res.err)
    line = one_error_line(res.err)
    assert line.startswith(f"fleece: error: S3 GetObject s3://{s3_bucket}/repo/config ")
    assert line.endswith("failed after 1 attempt: HTTP 400 BadRequest")


# -- the opt-in, through the CLI ---------------------------------------------------------------------
@ON_S3RVER
def test_backup_on_a_store_ignoring_if_none_match_is_refused_unless_unsafe_locks_is_set(
        make_vm: Any, fleece: Any, s3_env: Any, s3_bucket: Any, tmp_path: Any) -> None:
    vm = make_vm([("qcow2", "16M")], name="web1")
    vm.write("vda", 0, MiB, 0x42)
    before = vm.block_graph()
    url = f"s3://{s3_bucket}/repo"
    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", url, "--json")
    assert res.rc == 1 and res.out == "", res.err
    assert "ignores If-None-Match" in one_error_line(res.err)
    assert vm.block_graph() == before and raw_keys(s3_env, s3_bucket) == set()

    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", url, "--json",
                 *s3_env.config_args)
    assert res.rc == 0, res.err
    store = res.json()["store"]
    assert store["conditional_create"] == "ignored" and store["unsafe_locks"] is True
    assert any("both take its lock" in g for g in store["guarantees_not_held"])
    assert "fleece: unsafe_locks: the S3 store" in res.err  # said on every run, not only in --json

    # `fleece status --repo` says it too, from the check cached in the repository (no probe).
    status = fleece("status", "--qmp", vm.qmp_path, "--repo", url, "--json")
    assert status.rc == 0, status.err
    store = status.json()["repository"]["store"]
    assert store["conditional_create"] == "ignored" and store["endpoint"] == s3_env.endpoint
    assert store["guarantees_not_held"] and "unsafe_locks" not in store
    human = fleece("status", "--qmp", vm.qmp_path, "--repo", url)
    assert f"the store at {s3_env.endpoint} ignores conditional creates" in human.out
    assert human.out.count("  does not hold: ") == len(store["guarantees_not_held"])


def test_on_a_store_that_enforces_conditional_creates_every_guarantee_holds(
        make_vm: Any, fleece: Any, s3_env: Any, s3_bucket: Any) -> None:
    vm = make_vm([("qcow2", "16M")], name="web1")
    vm.write("vda", 0, MiB, 0x42)
    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo",
                 f"s3://{s3_bucket}/{uuid.uuid4().hex[:6]}", "--json")
    assert res.rc == 0, res.err
    store = res.json()["store"]
    assert store["conditional_create"] == "enforced" and store["guarantees_not_held"] == []
