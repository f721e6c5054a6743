"""The s3 backend against real S3 servers on loopback: moto, and s3rver over HTTP and HTTPS.

The storage semantics run on every server in conftest's ``S3_SERVERS``; the
fault and credential tests need moto (its IAM, and the fault proxy).

Faults are injected below botocore's retry handler (``inject_http_faults``),
so what these tests show retried is retried by botocore itself.
"""

from __future__ import annotations

import base64
import logging
import socket
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import pytest
from conftest import S3_SERVERS

from fleece.errors import BadInput, RepositoryCorrupt, RepositoryError
from fleece.repo.backends.base import Backend, ObjectMissing
from fleece.repo.backends.s3 import S3Backend, parse_s3_url
from fleece.testing.s3_faults import inject_http_faults

pytestmark = pytest.mark.s3
ON_EVERY_STORE = pytest.mark.parametrize("s3_server", S3_SERVERS, indirect=True)


@pytest.fixture
def backend(s3_bucket: str) -> S3Backend:
    # The protocol itself; the store check has tests of its own (test_store_check.py).
    return S3Backend(s3_bucket, "repos/one", check_store=False)


def raw_keys(s3_env: Any, bucket: str) -> set[str]:
    """Every key in the bucket, listed by a client fleece does not own."""
    pages = s3_env.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def assert_one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and text.strip() == text and len(text) < 400, text
    return text


# -- storage semantics ---------------------------------------------------------------
@ON_EVERY_STORE
def test_round_trip_put_get_exists_list_delete_mtime(backend: Any) -> None:
    assert isinstance(backend, Backend)
    assert backend.url == f"s3://{backend.bucket}/repos/one"  # type: ignore[attr-defined]
    before = time.time()
    data = bytes(range(256)) * 1000
    assert backend.put("chunks/ab/abcd", data) is True
    assert backend.put("points/vm1/p.json", b"{}") is True
    assert backend.get("chunks/ab/abcd") == data
    assert backend.exists("chunks/ab/abcd") and not backend.exists("chunks/ab/nope")
    assert sorted(backend.list("")) == ["chunks/ab/abcd", "points/vm1/p.json"]
    assert list(backend.list("chunks/")) == ["chunks/ab/abcd"]
    assert list(backend.list("indexes/")) == []
    assert before - 2 <= backend.mtime("chunks/ab/abcd") <= time.time() + 2
    (info,) = backend.list_info("chunks/")
    assert (info.key, info.size) == ("chunks/ab/abcd", len(data))
    assert abs(info.mtime - backend.mtime("chunks/ab/abcd")) < 1
    assert backend.put("chunks/ab/abcd", b"replaced") is True  # plain put overwrites
    assert backend.get("chunks/ab/abcd") == b"replaced"

    backend.delete("chunks/ab/abcd")
    backend.delete("chunks/ab/abcd")  # absent: not an error
    assert not backend.exists("chunks/ab/abcd")
    with pytest.raises(ObjectMissing, match="chunks/ab/abcd"):
        backend.get("chunks/ab/abcd")
    with pytest.raises(ObjectMissing):
        backend.mtime("chunks/ab/abcd")


@ON_EVERY_STORE
def test_every_object_lies_under_the_prefix(s3_env: Any, s3_bucket: Any) -> None:
    neighbour = s3_env.client()
    neighbour.put_object(Bucket=s3_bucket, Key="repos/one-other/config", Body=b"not ours")
    neighbour.put_object(Bucket=s3_bucket, Key="repos/config", Body=b"not ours")
    backend = S3Backend(s3_bucket, "/repos/one/")  # slashes normalized
    for key in ("config", "chunks/00/0011", "locks/vms/vm1"):
        backend.put(key, b"x")

    assert raw_keys(s3_env, s3_bucket) == {
        "repos/one-other/config", "repos/config",
        "repos/one/config", "repos/one/chunks/00/0011", "repos/one/locks/vms/vm1"}
    # The neighbours share a string prefix but not the key prefix "repos/one/".
    assert sorted(backend.list("")) == ["chunks/00/0011", "config", "locks/vms/vm1"]


@ON_EVERY_STORE
def test_a_repository_at_the_bucket_root(s3_env: Any, s3_bucket: Any) -> None:
    backend = S3Backend(*parse_s3_url(f"s3://{s3_bucket}"))
    assert backend.url == f"s3://{s3_bucket}"
    backend.put("config", b"{}")
    assert raw_keys(s3_env, s3_bucket) == {"config"}
    assert list(backend.list("")) == ["config"]


@pytest.mark.parametrize("s3_server", ["moto", "s3rver-http"], indirect=True)  # TLS adds nothing here
def test_list_pages_through_more_than_one_thousand_keys(backend: Any) -> None:
    keys = {f"chunks/{i % 256:02x}/{i:064x}" for i in range(1100)}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: backend.put(k, b"c"), keys))
    with inject_http_faults(backend) as seen:
        assert set(backend.list("chunks/")) == keys
        assert {(i.key, i.size) for i in backend.list_info("chunks/")} == {(k, 1) for k in keys}
    assert seen.requests == {"ListObjectsV2": 4}  # two pages each, no HEAD per object

    # Counted per call, not per HTTP attempt: s3rver answers 500 to the first
    # attempt of a large DeleteObjects now and then (botocore retries it).
    calls: list[int] = []
    backend.client.meta.events.register("before-call.s3.DeleteObjects", lambda **_: calls.append(1))
    backend.delete_many([*sorted(keys), "chunks/ff/never-stored"])
    assert len(calls) == 2  # 1000 + 101 keys
    assert list(backend.list("")) == []


@pytest.mark.parametrize(("url", "expected"), [
    ("s3://bucket", ("bucket", "")),
    ("s3://bucket/", ("bucket", "")),
    ("s3://bucket/a/b", ("bucket", "a/b/")),
    ("s3://bucket/a/b/", ("bucket", "a/b/")),
    ("s3://my.bucket-1/vm backups", ("my.bucket-1", "vm backups/")),
])
def test_parse_s3_url(url: Any, expected: Any) -> None:
    assert parse_s3_url(url) == expected


@pytest.mark.parametrize("url", [
    "s3:/bucket", "http://bucket/x", "s3://", "s3://b", "s3://-bucket/x", "s3://bucket/a//b",
    "s3://bucket/a/../b", "s3://bucket/a?versionId=1",
])
def test_bad_s3_urls_are_bad_input(url: Any) -> None:
    with pytest.raises(BadInput):
        parse_s3_url(url)


def test_credentials_in_the_url_are_refused_without_echoing_them() -> None:
    with pytest.raises(BadInput) as err:
        parse_s3_url("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/x")
    assert "wJalrXUtnFEMI" not in str(err.value) and "AKIAEXAMPLE" not in str(err.value)


# -- conditional create ----------------------------------------------------------------
def test_if_absent_creates_once_and_never_overwrites(backend: Any) -> None:
    with inject_http_faults(backend) as seen:
        assert backend.put("locks/vms/vm1", b"lease A", if_absent=True) is True
        assert backend.put("locks/vms/vm1", b"lease B", if_absent=True) is False
    assert backend.get("locks/vms/vm1") == b"lease A"
    # One request each: the server decides (If-None-Match), no HEAD first.
    assert seen.requests == {"PutObject": 2}


def test_two_writers_racing_for_one_key_exactly_one_wins(backend: Any) -> None:
    for round_ in range(10):
        key = f"points/vm1/race-{round_}.json"
        start = threading.Barrier(8)

        def write(n: int, key: str = key, start: threading.Barrier = start) -> bool:
            start.wait()
            return bool(backend.put(key, f"writer {n}".encode(), if_absent=True))

        with ThreadPoolExecutor(8) as pool:
            won = list(pool.map(write, range(8)))
        assert won.count(True) == 1, won
        assert backend.get(key) == f"writer {won.index(True)}".encode()


def test_a_retried_conditional_put_recognizes_its_own_first_attempt(backend: Any) -> None:
    # The first attempt lands, its reply is lost; botocore's retry meets 412.
    with inject_http_faults(backend, lost_replies=1, ops={"PutObject"}) as seen:
        assert backend.put("locks/vms/vm1", b"lease mine", if_absent=True) is True
    assert seen.requests == {"PutObject": 2, "GetObject": 1} and seen.injected["lost_replies"] == 1
    # The same shape of failure while someone else holds the key is still a loss.
    with inject_http_faults(backend, lost_replies=1, ops={"PutObject"}):
        assert backend.put("locks/vms/vm1", b"lease other", if_absent=True) is False
    assert backend.get("locks/vms/vm1") == b"lease mine"


def test_a_501_to_if_none_match_is_refused_without_unsafe_locks(backend: Any, s3_env: Any) -> None:
    """Even after a passing store check (here: none), a 501 never turns a conditional create into
    HEAD-then-PUT unless the operator accepted that (unsafe_locks)."""
    with inject_http_faults(backend, statuses=[501], ops={"PutObject"}), \
            pytest.raises(RepositoryError) as err:
        backend.put("config", b"first", if_absent=True)
    assert str(err.value) == (
        f"the S3 store at {s3_env.endpoint} answered 501 NotImplemented to If-None-Match: * on "
        f"PutObject {backend.url}/config (the store check had found it enforced); fleece does not "
        "fall back to HEAD-then-PUT without unsafe_locks = true; nothing was written")
    assert not backend.exists("config") and backend.atomic_conditional_create


def test_servers_without_conditional_writes_get_head_then_put(backend: Any, caplog: Any) -> None:
    backend.unsafe_locks = True
    with inject_http_faults(backend, statuses=[501], ops={"PutObject"}) as seen:
        assert backend.put("config", b"first", if_absent=True) is True
        assert backend.put("config", b"second", if_absent=True) is False
    assert backend.get("config") == b"first"
    assert seen.requests == {"PutObject": 2, "HeadObject": 2}
    assert "does not support conditional writes" in caplog.text


def test_a_conditional_write_conflict_is_asked_again(backend: Any) -> None:
    with inject_http_faults(backend, statuses=[(409, "ConditionalRequestConflict")]) as seen:
        assert backend.put("config", b"x", if_absent=True) is True
    assert seen.requests["PutObject"] == 2


# -- integrity -----------------------------------------------------------------------
def test_uploads_carry_a_crc32_of_the_exact_body(backend: Any) -> None:
    data = b"chunk payload " * 4096
    sent = {}

    def record(request: Any, **_: Any) -> None:
        sent.update(request.headers)

    backend.client.meta.events.register("before-send.s3.PutObject", record)
    backend.put("chunks/aa/aa", data)
    want = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    assert sent["x-amz-checksum-crc32"].decode() == want


def test_a_body_corrupted_on_the_way_down_is_refused(backend: Any) -> None:
    data = b"precious chunk " * 10000
    backend.put("chunks/aa/aa", data)
    with inject_http_faults(backend, corrupt_responses=1) as seen:
        assert backend.get("chunks/aa/aa") == data  # the corrupt copy was never returned
    assert seen.requests["GetObject"] == 2

    with inject_http_faults(backend, corrupt_responses=100) as seen, \
            pytest.raises(RepositoryCorrupt, match="did not match its checksum") as err:
        backend.get("chunks/aa/aa")
    assert_one_line(err.value)
    assert seen.requests["GetObject"] == backend.max_attempts


def test_a_body_corrupted_on_the_way_up_never_reads_back_as_data(backend: Any) -> None:
    # AWS refuses such a PUT (BadDigest); moto stores it, with the checksum
    # botocore computed before the flip — so the read refuses it instead.
    data = b"precious chunk " * 10000
    with inject_http_faults(backend, corrupt_requests=1, ops={"PutObject"}) as seen:
        backend.put("chunks/bb/bb", data)
    assert seen.injected["corrupt_requests"] == 1
    with pytest.raises(RepositoryCorrupt, match="chunks/bb/bb"):
        backend.get("chunks/bb/bb")


def test_a_server_refusing_a_bad_digest_is_one_clear_line(backend: Any) -> None:
    with inject_http_faults(backend, statuses=[(400, "BadDigest")]), \
            pytest.raises(RepositoryError, match="did not match its checksum") as err:
        backend.put("chunks/cc/cc", b"data")
    assert "chunks/cc/cc" in assert_one_line(err.value)


# -- transient failures are botocore's to retry ----------------------------------------
def test_transient_5xx_and_resets_are_retried_and_the_put_succeeds(backend: Any) -> None:
    with inject_http_faults(backend, statuses=[500, 503], resets=1, timeouts=1,
                            ops={"PutObject"}) as seen:
        assert backend.put("chunks/dd/dd", b"survivor") is True
    assert seen.requests["PutObject"] == 5  # four failed attempts, then the real one
    assert backend.get("chunks/dd/dd") == b"survivor"


def test_throttling_is_retried(backend: Any) -> None:
    backend.put("config", b"c")
    with inject_http_faults(backend, statuses=[(503, "SlowDown")], ops={"GetObject"}) as seen:
        assert backend.get("config") == b"c"
    assert seen.requests["GetObject"] == 2


def test_a_download_cut_off_mid_body_is_read_again(backend: Any) -> None:
    data = b"x" * 100_000
    backend.put("chunks/ee/ee", data)
    with inject_http_faults(backend, body_resets=1) as seen:
        assert backend.get("chunks/ee/ee") == data
    assert seen.requests["GetObject"] == 2


def test_slow_responses_only_slow_things_down(backend: Any) -> None:
    with inject_http_faults(backend, slow=0.2, ops={"HeadObject"}):
        start = time.monotonic()
        assert backend.exists("nothing") is False
        assert time.monotonic() - start >= 0.2


# -- persistent failures: one clear line -------------------------------------------------
def test_a_persistent_503_ends_with_one_line_and_stores_nothing(backend: Any, s3_env: Any) -> None:
    with inject_http_faults(backend, outage=503) as seen:
        start = time.monotonic()
        with pytest.raises(RepositoryError) as err:
            backend.put("points/vm1/p.json", b"{}")
        assert time.monotonic() - start < 15
    text = assert_one_line(err.value)
    assert f"s3://{backend.bucket}/repos/one/points/vm1/p.json" in text
    assert f"failed after {backend.max_attempts} attempts: HTTP 503" in text
    assert seen.requests["PutObject"] == backend.max_attempts
    assert raw_keys(s3_env, backend.bucket) == set()
    # The outage ends; the same backend works again.
    assert backend.put("points/vm1/p.json", b"{}") is True


def test_persistent_connection_resets_end_with_one_line(backend: Any) -> None:
    with inject_http_faults(backend, outage="reset") as seen, pytest.raises(RepositoryError) as err:
        backend.get("config")
    assert "Connection was closed" in assert_one_line(err.value)
    assert seen.requests["GetObject"] == backend.max_attempts


def test_a_missing_bucket_is_named(s3_env: Any) -> None:
    backend = S3Backend(f"fleece-missing-{uuid.uuid4().hex[:8]}", "x")
    for call in (lambda: backend.get("config"), lambda: backend.put("config", b"{}"),
                 lambda: list(backend.list("")), lambda: backend.delete("config")):
        with pytest.raises(RepositoryError) as err:
            call()
        text = assert_one_line(err.value)
        assert text == f"S3 bucket {backend.bucket} does not exist at {s3_env.endpoint}"


def test_an_unreachable_endpoint_fails_quickly_with_one_line(s3_bucket: Any, monkeypatch: Any) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    backend = S3Backend(s3_bucket, "x")
    assert backend.max_attempts == 2
    start = time.monotonic()
    with pytest.raises(RepositoryError) as err:
        backend.put("config", b"{}")
    assert time.monotonic() - start < 10
    text = assert_one_line(err.value)
    assert text.startswith(f"cannot reach the S3 endpoint http://127.0.0.1:{port} for PutObject")


def test_access_denied_and_wrong_credentials_are_one_line_without_secrets(
        s3_env: Any, s3_bucket: Any, monkeypatch: Any, caplog: Any) -> None:
    iam = boto3.client("iam")
    user = f"fleece-nobody-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    caplog.set_level(logging.DEBUG)  # from here on, botocore's own request logs included
    with s3_env.checking_credentials():
        # A real user without any policy: moto answers 403 AccessDenied.
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        backend = S3Backend(s3_bucket, "x")
        with pytest.raises(RepositoryError) as err:
            backend.put("config", b"{}")
        denied = assert_one_line(err.value)
        assert denied.startswith(f"S3 denied PutObject on s3://{s3_bucket}/x/config (AccessDenied)")
        assert "s3:PutObject" in denied

        # A key the server has never heard of: 403 InvalidAccessKeyId.
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFLEECEWRONGKEY00")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fleece-wrong-secret-do-not-print")
        with pytest.raises(RepositoryError) as err2:
            S3Backend(s3_bucket, "x").get("config")
        wrong = assert_one_line(err2.value)
        assert "(InvalidAccessKeyId)" in wrong and "s3:GetObject" in wrong
    for text in (denied, wrong, caplog.text):
        assert key["SecretAccessKey"] not in text
        assert "fleece-wrong-secret-do-not-print" not in text


def test_debug_logging_never_shows_credentials(s3_bucket: Any, monkeypatch: Any, caplog: Any) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fleece-secret-do-not-log")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "fleece-session-token-do-not-log")
    caplog.set_level(logging.DEBUG)  # as `fleece -vv` does, on the root logger
    backend = S3Backend(s3_bucket, "x")
    backend.put("config", b"{}")
    assert backend.exists("config")
    assert "fleece-secret-do-not-log" not in caplog.text
    assert "fleece-session-token-do-not-log" not in caplog.text


# -- connections ---------------------------------------------------------------------------
def test_the_connection_pool_grows_to_the_threads_that_share_the_backend(s3_bucket: Any, caplog: Any) -> None:
    backend = S3Backend(s3_bucket, "x")
    assert backend.preferred_concurrency == 16  # what `fleece backup` stores with on S3
    backend.reserve_connections(21)
    assert backend.client.meta.config.max_pool_connections == 32  # type: ignore[attr-defined]  # room already
    backend.reserve_connections(48)
    assert backend.client.meta.config.max_pool_connections == 48  # type: ignore[attr-defined]
    caplog.set_level(logging.WARNING)
    with ThreadPoolExecutor(48) as pool:
        list(pool.map(lambda i: backend.put(f"chunks/{i}", b"x" * 100_000), range(240)))
    assert len(list(backend.list("chunks/"))) == 240
    assert "Connection pool is full" not in caplog.text  # no connection opened and thrown away


# -- requests per operation --------------------------------------------------------------
def test_each_operation_costs_one_request(backend: Any) -> None:
    with inject_http_faults(backend) as seen:
        backend.put("chunks/ff/ff", b"c")
        backend.put("chunks/ff/ff", b"c", if_absent=True)
        backend.get("chunks/ff/ff")
        backend.exists("chunks/ff/ff")
        backend.mtime("chunks/ff/ff")
        list(backend.list("chunks/"))
        backend.delete("chunks/ff/ff")
    assert seen.requests == {"PutObject": 2, "GetObject": 1, "HeadObject": 2,
                             "ListObjectsV2": 1, "DeleteObject": 1}
    assert not seen.injected


# -- real TCP faults: a proxy between fleece and the server (conftest's s3_proxy) -------------------
def test_real_resets_and_errors_on_the_wire_are_retried(s3_proxy: Any, s3_bucket: Any) -> None:
    s3_proxy.plan.statuses.append((503, "ServiceUnavailable"))
    s3_proxy.plan.resets = 1
    s3_proxy.plan.lost_replies = 1
    s3_proxy.plan.ops = frozenset({"PutObject"})
    backend = S3Backend(s3_bucket, "wire", check_store=False)
    # 503, RST, stored-but-RST, then 412 for the attempt's own object: still ours.
    assert backend.put("locks/vms/vm1", b"lease mine", if_absent=True) is True
    assert s3_proxy.plan.requests == {"PutObject": 4, "GetObject": 1}  # the GET compares the bodies

    backend.put("chunks/aa/aa", b"z" * 200_000)
    s3_proxy.plan.requests.clear()
    s3_proxy.plan.ops = frozenset({"GetObject"})
    s3_proxy.plan.body_resets = 1
    s3_proxy.plan.corrupt_responses = 1
    assert backend.get("chunks/aa/aa") == b"z" * 200_000
    assert s3_proxy.plan.requests["GetObject"] == 3
    assert s3_proxy.plan.injected == {"status": 1, "resets": 1, "lost_replies": 1, "body_resets": 1,
                                      "corrupt_responses": 1}


def test_a_stalled_server_is_a_read_timeout_and_retried(
        s3_proxy: Any, s3_bucket: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("FLEECE_S3_READ_TIMEOUT", "0.5")
    backend = S3Backend(s3_bucket, "wire")
    backend.put("config", b"{}")
    s3_proxy.plan.timeouts = 1
    start = time.monotonic()
    assert backend.get("config") == b"{}"
    assert 0.5 <= time.monotonic() - start < 1.5
    assert s3_proxy.plan.requests["GetObject"] == 2


def test_a_persistent_outage_ends_a_fleece_command_with_one_line(
        s3_proxy: Any, s3_bucket: Any, monkeypatch: Any, fleece: Any) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    s3_proxy.plan.outage = 503
    res = fleece("list", "--repo", f"s3://{s3_bucket}/wire", timeout=60)
    assert res.rc == 1, (res.out, res.err)
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleece: error: S3 "), res.err
    assert f"s3://{s3_bucket}/wire/" in lines[0] and "failed after 3 attempts: HTTP 503" in lines[0]
    assert sum(s3_proxy.plan.requests.values()) == 3  # one request, botocore's three attempts
