"""The ``s3`` backend: one S3 object per key, every key under the URL's prefix.

Only storage lives here (see :mod:`fleece.repo.backends.base`). Transport policy is
botocore's own: its ``standard``/``adaptive`` retry modes with jittered
backoff for throttling, 5xx and connection errors, its timeouts, its
connection pool. Checksums are fleece's: every upload carries a CRC32 header
(and, to a store other than AWS, a Content-MD5) with a plain Content-Length
body — never botocore's streamed ``aws-chunked`` encoding, which several
S3-compatible stores refuse or store verbatim (see docs/s3.md). Downloads
are checked against a checksum the server returns, when it returns one.
Before the first conditional create of a process the store itself is
checked (:mod:`fleece.repo.backends.store_check`).
Settings come from boto3's configuration chain — ``AWS_*`` environment
variables, ``AWS_ENDPOINT_URL``, profiles, instance roles — never from the
command line, and nothing here logs or prints a credential.

An :class:`S3Backend` is safe to share between threads (boto3 clients are);
its connection pool must hold as many connections as threads use it at once
(:meth:`S3Backend.reserve_connections`), or urllib3 opens and discards extra
ones with a warning each time.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import hashlib
import logging
import os
import re
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    FlexibleChecksumError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from fleece.errors import BadInput, RepositoryCorrupt, RepositoryError
from fleece.repo.backends.base import Backend, ObjectInfo, ObjectLocked, ObjectMissing, Retention
from fleece.repo.backends.store_check import (
    ProbeOps,
    StoreCheck,
    cached_check,
    missing,
    probe_store,
    refusal,
    save_check,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

log = logging.getLogger(__name__)
# botocore's DEBUG records carry request headers, session tokens included.
# A root logger at DEBUG (fleece -vv) must not print them, nor its INFO
# chatter; whoever wants botocore's output sets its level by name, which
# this leaves alone.
if logging.getLogger("botocore").level == logging.NOTSET:
    logging.getLogger("botocore").setLevel(logging.WARNING)

T = TypeVar("T")

DEFAULT_MAX_ATTEMPTS = 6
"""Total attempts per request unless ``AWS_MAX_ATTEMPTS`` or a profile says otherwise.

botocore's own default (3) gives up on a throttled bucket within seconds;
a backup that has already read gigabytes deserves a little more patience.
"""
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0
DELETE_BATCH = 1000  # the most keys one DeleteObjects request may name
DEFAULT_POOL_CONNECTIONS = 32
PREFERRED_CONCURRENCY = 16
"""Chunks a backup uploads at once unless told otherwise.

A request to S3 spends most of its time waiting (tens of milliseconds of
latency for a few MiB), so it takes more requests in flight than a local
disk's 4 to keep the link busy. Each one holds an encoded chunk in memory.
"""

_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$")
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED_CODES = frozenset({
    "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "AllAccessDisabled", "AccountProblem",
})
_ENDPOINT_URL_RE = re.compile(r'\s+(?:from|on|to)\s+(?:the\s+)?endpoint URL: "[^"]*"')
_BAD_DIGEST_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"})
# The IAM action a denied operation needs, for the error message.
_ACTIONS = {
    "PutObject": "s3:PutObject", "GetObject": "s3:GetObject",
    "HeadObject": "s3:GetObject (and s3:ListBucket, so a missing key reads as 404)",
    "ListObjectsV2": "s3:ListBucket", "DeleteObject": "s3:DeleteObject",
    "DeleteObjects": "s3:DeleteObject (and s3:DeleteObjectVersion in an Object Lock bucket)",
    "GetObjectLockConfiguration": "s3:GetBucketObjectLockConfiguration",
    "PutObjectRetention": "s3:PutObjectRetention",
    "ListObjectVersions": "s3:ListBucketVersions",
}
LIST_DIRECTORY_ABOVE = 8
"""Deleting more keys than this from one directory lists the directory's versions once
instead of each key's (an Object Lock bucket keeps versions; see :meth:`S3Backend.delete_unlocked`)."""
# Failures while reading a GET body arrive after botocore has returned, so
# its retry handler never sees them; s3transfer retries these too.
_BODY_ERRORS = (ResponseStreamingError, ReadTimeoutError, IncompleteReadError, FlexibleChecksumError)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b/")``; ``s3://bucket`` → ``("bucket", "")``.

    Raises :class:`BadInput` for anything else, without echoing credentials
    someone may have pasted into the URL.
    """
    if not url.startswith("s3://"):
        raise BadInput(f"{url!r} is not an s3:// URL")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if "@" in bucket:
        raise BadInput("an s3:// URL must not carry credentials: use the AWS environment "
                       "variables, a profile or an instance role")
    if not _BUCKET_RE.match(bucket):
        raise BadInput(f"{url!r} does not name an S3 bucket (s3://BUCKET/PREFIX)")
    if "?" in prefix or "#" in prefix:
        raise BadInput(f"{url!r}: an S3 repository URL takes no query or fragment")
    parts = prefix.strip("/").split("/") if prefix.strip("/") else []
    if any(p in ("", ".", "..") for p in parts):
        raise BadInput(f"{url!r}: the prefix must not contain empty, '.' or '..' components")
    return bucket, "".join(p + "/" for p in parts)


def _endpoint_for_messages(client: Any) -> str:
    """The endpoint's scheme, host and port: never user information."""
    parts = urlsplit(str(client.meta.endpoint_url))
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}"


def _make_client(max_pool_connections: int, connect_timeout: float | None,
                 read_timeout: float | None) -> S3Client:
    """An S3 client configured by boto3's chain plus fleece's transport defaults."""
    core = botocore.session.get_session()
    # Respect AWS_MAX_ATTEMPTS / a profile's max_attempts; a value passed in
    # Config would otherwise silently override them.
    attempts = core.get_config_variable("max_attempts") or DEFAULT_MAX_ATTEMPTS
    retries: dict[str, Any] = {"total_max_attempts": int(attempts)}
    # "legacy" (the old default) lacks the retry quota and throttling
    # detection; standard and adaptive are taken as configured.
    if core.get_config_variable("retry_mode") not in ("standard", "adaptive"):
        retries["mode"] = "standard"
    env = os.environ
    config = Config(
        retries=retries,  # type: ignore[arg-type]
        connect_timeout=connect_timeout or float(env.get("FLEECE_S3_CONNECT_TIMEOUT") or
                                                 DEFAULT_CONNECT_TIMEOUT),
        read_timeout=read_timeout or float(env.get("FLEECE_S3_READ_TIMEOUT") or DEFAULT_READ_TIMEOUT),
        max_pool_connections=max_pool_connections,
        tcp_keepalive=True,
        # Never aws-chunked: with "when_supported", botocore >= 1.36 streams
        # every upload over TLS with a trailing checksum, which older Ceph
        # refuses (411) and s3rver stores, framing and all, as the object.
        # fleece sends the checksum as a header instead (S3Backend.put).
        request_checksum_calculation="when_required",
    )
    return boto3.session.Session(botocore_session=core).client("s3", config=config)


class S3Backend(Backend):
    """Objects in one S3 bucket under one key prefix (see module docstring)."""

    @property
    def preferred_concurrency(self) -> int | None:
        """How many chunks a backup should store in parallel here (``--storers`` overrides)."""
        return PREFERRED_CONCURRENCY

    def __init__(self, bucket: str, prefix: str, *,
                 max_pool_connections: int = DEFAULT_POOL_CONNECTIONS,
                 client: Any | None = None, connect_timeout: float | None = None,
                 read_timeout: float | None = None, check_store: bool = True,
                 unsafe_locks: bool = False) -> None:
        """Open ``s3://bucket/prefix``; no request is sent until the first operation.

        ``client`` replaces the boto3 client (tests); ``connect_timeout`` and
        ``read_timeout`` default to ``FLEECE_S3_CONNECT_TIMEOUT`` and
        ``FLEECE_S3_READ_TIMEOUT`` from the environment, else 10 s and 60 s.
        ``check_store`` probes the store before the first conditional create
        (:mod:`fleece.repo.backends.store_check`); ``unsafe_locks`` accepts a store
        that does not enforce conditional creates instead of refusing it.
        """
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.max_pool_connections = max_pool_connections
        self._own_client = client is None
        self._timeouts = (connect_timeout, read_timeout)
        self.client: S3Client = client or _make_client(max_pool_connections, connect_timeout,
                                                       read_timeout)
        config: Any = self.client.meta.config
        retries = config.retries or {}
        self.max_attempts = int(retries.get("total_max_attempts") or 3)
        self.endpoint = _endpoint_for_messages(self.client)
        # S3-compatible stores check Content-MD5 but mostly ignore the CRC32
        # header; AWS checks the CRC32, so it is spared the (3x costlier) MD5.
        host = urlsplit(self.endpoint).hostname or ""
        self._send_md5 = not host.endswith((".amazonaws.com", ".amazonaws.com.cn"))
        self._conditional_writes = True  # until the server says NotImplemented
        self._conditional_replace = True  # If-Match, likewise
        self._fallback_lock = threading.Lock()
        self.unsafe_locks = unsafe_locks
        self.store_check: StoreCheck | None = None
        """What :meth:`check_store` found this run (or read from its cache)."""
        """What the store check found (None until it ran, or when disabled)."""
        self._check_pending = check_store
        self._check_lock = threading.Lock()
        self._versioned = False
        """Set by :meth:`check_object_lock`: deletes remove every version of a key."""

    # -- the Backend protocol ------------------------------------------------------
    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """PutObject (atomic on S3); with ``if_absent``, ``If-None-Match: *``.

        The first conditional create of this backend runs the store check
        first. On a store that does not enforce conditional creates (allowed
        only with ``unsafe_locks``) they become HEAD-then-PUT, which two
        writers racing for one key can both win.
        """
        return self._create(key, data) if if_absent else self._put(key, data, False)

    def _create(self, key: str, data: bytes, lock: Retention | None = None) -> bool:
        """A conditional create (locked with ``lock``), after the store check on the first one."""
        if self._check_pending:
            self._check_store()
        if not self._conditional_writes:
            return self._put_if_absent_by_head(key, data, lock)
        return self._put(key, data, True, lock)

    def _put(self, key: str, data: bytes, if_absent: bool, lock: Retention | None = None) -> bool:
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if if_absent else {}
        if lock is not None:
            # S3 wants a checksum header with these (the CRC32 below is one).
            extra["ObjectLockMode"] = lock.mode.upper()
            extra["ObjectLockRetainUntilDate"] = datetime.fromtimestamp(lock.until, UTC)
        # Naming the algorithm too lets stores that keep checksums (AWS, moto)
        # return it on GET; a header already set keeps botocore from streaming.
        extra["ChecksumAlgorithm"] = "CRC32"
        extra["ChecksumCRC32"] = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
        if self._send_md5:
            extra["ContentMD5"] = base64.b64encode(hashlib.md5(data).digest()).decode()
        # S3 answers 409 ConditionalRequestConflict while another conditional
        # write to the key is in flight; botocore does not retry it, and the
        # answer we need is "who won", so ask again (a few times at most).
        last: ClientError | None = None
        for _ in range(3):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data, **extra)
                return True
            except ClientError as e:
                code, status = _code(e), _status(e)
                if not if_absent:
                    raise self._error(e, "PutObject", key) from e
                if code == "PreconditionFailed" or status == 412:
                    # A retried attempt can meet the object its own lost first
                    # attempt stored: that is our write, not somebody else's.
                    retried = e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
                    return bool(retried) and self._get_or_none(key) == data
                if code == "NotImplemented" or status == 501:
                    # After a store check that found it enforced: a gateway swapped
                    # behind the endpoint, or one that implements it only sometimes.
                    if not self.unsafe_locks:
                        raise RepositoryError(
                            f"the S3 store at {self.endpoint} answered 501 NotImplemented to "
                            f"If-None-Match: * on PutObject {self._where(key)} (the store check had "
                            "found it enforced); fleece does not fall back to HEAD-then-PUT without "
                            "unsafe_locks = true; nothing was written") from e
                    self._disable_conditional_writes()
                    return self._put_if_absent_by_head(key, data, lock)
                if code != "ConditionalRequestConflict":
                    raise self._error(e, "PutObject", key) from e
                last = e
            except BotoCoreError as e:
                raise self._error(e, "PutObject", key) from e
        assert last is not None
        raise self._error(last, "PutObject", key) from last

    def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        """GetObject, compare, then PutObject with ``If-Match: <the ETag compared>``.

        Only where the store check proved ``If-Match`` both ways (the current
        ETag accepted, a stale one refused; AWS S3 since 2024 and moto do):
        the store then refuses the put with 412 when the object changed after
        our read, and with 404 when it was deleted, so neither is overwritten
        or brought back. Elsewhere (Ceph RGW refuses even the current ETag)
        this raises :class:`RepositoryError` naming what the store lacks —
        unless ``unsafe_locks`` accepts read, compare, write, read again, which
        a write landing between our read and our put defeats. Leases do not
        use this (:mod:`fleece.repo.lock` needs only conditional creates).
        """
        if self._check_pending:
            self._check_store()
        check = self.store_check
        if check is not None and not check.replace_safe:
            if not self.unsafe_locks:
                raise RepositoryError(
                    f"the S3 store at {self.endpoint} "
                    f"{missing('conditional_replace', check.conditional_replace)}, so fleece cannot "
                    f"replace {self._where(key)} only if unchanged; nothing was changed")
            self._disable_conditional_replace()
        for _ in range(3):
            found = self._get_with_etag(key)
            if found is None or found[0] != expected:
                return False
            if not self._conditional_replace:
                return self._replace_by_rereading(key, data)
            extra: dict[str, Any] = {"IfMatch": found[1]}
            if self._send_md5:
                extra["ContentMD5"] = base64.b64encode(hashlib.md5(data).digest()).decode()
            try:
                self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data, **extra)
                return True
            except ClientError as e:
                code, status = _code(e), _status(e)
                if code == "PreconditionFailed" or status == 412:
                    # As for if_absent: a retried attempt may meet its own first write.
                    retried = e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
                    return bool(retried) and self._get_or_none(key) == data
                if code in _MISSING_CODES or status == 404:
                    return False
                if code == "NotImplemented" or status == 501:
                    if not self.unsafe_locks:
                        raise RepositoryError(
                            f"the S3 store at {self.endpoint} answered 501 NotImplemented to If-Match "
                            f"on PutObject {self._where(key)}; fleece does not fall back to an "
                            "unconditional write without unsafe_locks = true; nothing was changed"
                        ) from e
                    self._disable_conditional_replace()
                    continue
                if code != "ConditionalRequestConflict":
                    raise self._error(e, "PutObject", key) from e
                # Another conditional write to the key is in flight: compare again.
            except BotoCoreError as e:
                raise self._error(e, "PutObject", key) from e
        return False

    def get(self, key: str) -> bytes:
        """GetObject; :class:`ObjectMissing` if absent, :class:`RepositoryCorrupt` on a bad body."""
        for attempt in range(1, self.max_attempts + 1):
            resp = self._call("GetObject", key, lambda: self.client.get_object(
                Bucket=self.bucket, Key=self.prefix + key))
            try:
                return resp["Body"].read()
            except _BODY_ERRORS as e:
                resp["Body"].close()
                if attempt == self.max_attempts:
                    if isinstance(e, FlexibleChecksumError):
                        raise RepositoryCorrupt(
                            f"S3 GetObject {self._where(key)}: the body received {attempt} times did "
                            f"not match its checksum ({_one_line(str(e))})") from e
                    raise self._error(e, "GetObject", key) from e
                log.debug("re-reading %s after %s", self._where(key), type(e).__name__)
        raise AssertionError("unreachable")

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """GetObject with a ``Range`` header: only the part travels (deltas inside packs)."""
        if length <= 0:
            return b""
        end = offset + length - 1
        for attempt in range(1, self.max_attempts + 1):
            try:
                resp = self._call("GetObject", key, lambda: self.client.get_object(
                    Bucket=self.bucket, Key=self.prefix + key, Range=f"bytes={offset}-{end}"))
            except RepositoryError as e:
                if "InvalidRange" in str(e):  # past the end: as a slice would be
                    return b""
                raise
            try:
                return resp["Body"].read()
            except _BODY_ERRORS as e:
                resp["Body"].close()
                if attempt == self.max_attempts:
                    raise self._error(e, "GetObject", key) from e
        raise AssertionError("unreachable")

    @property
    def atomic_conditional_create(self) -> bool:
        """False once the store answered NotImplemented to ``If-None-Match`` (HEAD-then-PUT)."""
        return self._conditional_writes

    def exists(self, key: str) -> bool:
        """HeadObject: True unless the key (or, as S3 answers HEAD, the bucket) is absent."""
        try:
            self._call("HeadObject", key, lambda: self.client.head_object(
                Bucket=self.bucket, Key=self.prefix + key))
        except ObjectMissing:
            return False
        return True

    def list(self, prefix: str) -> Iterator[str]:
        """ListObjectsV2 page by page; keys come back relative to the backend's prefix."""
        for obj in self._listed(prefix):
            yield obj["Key"][len(self.prefix):]

    def delete(self, key: str) -> None:
        """DeleteObject; S3 itself treats an absent key as deleted.

        In an Object Lock bucket (after :meth:`check_object_lock`) every version
        of the key goes, and a locked one raises :class:`ObjectLocked`.
        """
        if self._versioned:
            if self.delete_unlocked([key]):
                raise ObjectLocked(self._locked_message(key))
            return
        # Some S3 clones answer 404 where S3 answers 204.
        with contextlib.suppress(ObjectMissing):
            self._call("DeleteObject", key, lambda: self.client.delete_object(
                Bucket=self.bucket, Key=self.prefix + key))

    def mtime(self, key: str) -> float:
        """HeadObject's LastModified, in Unix seconds."""
        head = self._call("HeadObject", key, lambda: self.client.head_object(
            Bucket=self.bucket, Key=self.prefix + key))
        return head["LastModified"].timestamp()

    # -- beyond the protocol -----------------------------------------------------------
    def store_report(self) -> dict[str, Any] | None:
        """The store check's findings (:mod:`fleece.repo.backends.store_check`), once it ran."""
        return None if self.store_check is None else self.store_check.as_dict()

    def reserve_connections(self, threads: int) -> None:
        """Make the connection pool hold ``threads`` connections; call before sharing the backend.

        Grows only, by replacing a client of our own (cheap before the first
        requests; no request is lost, the old pool just closes).
        """
        if threads <= self.max_pool_connections or not self._own_client:
            return
        self.max_pool_connections = threads
        self.client = _make_client(threads, *self._timeouts)

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        """``list`` with sizes and times, from the same pages (no HEAD per object; gc uses it)."""
        for obj in self._listed(prefix):
            yield ObjectInfo(obj["Key"][len(self.prefix):], int(obj["Size"]),
                             obj["LastModified"].timestamp())

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete keys with DeleteObjects, up to 1000 per request (garbage collection)."""
        batch: builtins.list[str] = []
        for key in keys:
            batch.append(key)
            if len(batch) == DELETE_BATCH:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, keys: builtins.list[str]) -> None:
        resp = self._call("DeleteObjects", keys[0], lambda: self.client.delete_objects(
            Bucket=self.bucket,
            Delete={"Objects": [{"Key": self.prefix + k} for k in keys], "Quiet": True}))
        failed = [e for e in resp.get("Errors", []) if e.get("Code") not in _MISSING_CODES]
        if failed:
            raise self._delete_failed(failed, f"{len(keys)} objects")

    # -- object locks ------------------------------------------------------------------
    def check_object_lock(self) -> None:
        """GetObjectLockConfiguration: refuse a bucket without Object Lock (one request, no write)."""
        try:
            resp = self.client.get_object_lock_configuration(Bucket=self.bucket)
            enabled = resp.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
        except ClientError as e:
            code, status = _code(e), _status(e)
            if code == "NotImplemented" or status == 501:
                raise BadInput(f"the S3 store at {self.endpoint} does not implement Object Lock, so "
                               f"fleece cannot make restore points in {self.url} immutable; nothing "
                               "was changed") from e
            if code != "ObjectLockConfigurationNotFoundError":
                raise self._error(e, "GetObjectLockConfiguration", "") from e
            enabled = False
        except BotoCoreError as e:
            raise self._error(e, "GetObjectLockConfiguration", "") from e
        if not enabled:
            raise BadInput(f"S3 bucket {self.bucket} does not have Object Lock enabled, so fleece cannot "
                           "make restore points immutable there (Object Lock is chosen when a bucket "
                           "is created: aws s3api create-bucket --object-lock-enabled-for-bucket); "
                           "nothing was changed")
        self._versioned = True

    def put_locked(self, key: str, data: bytes, retention: Retention) -> bool:
        """PutObject with ``If-None-Match: *``, ``x-amz-object-lock-mode`` and ``-retain-until-date``."""
        return self._create(key, data, retention)

    def lock_of(self, key: str) -> Retention | None:
        """HeadObject's ``ObjectLockMode`` and ``ObjectLockRetainUntilDate`` (S3 returns both)."""
        head = self._call("HeadObject", key, lambda: self.client.head_object(
            Bucket=self.bucket, Key=self.prefix + key))
        mode, until = head.get("ObjectLockMode"), head.get("ObjectLockRetainUntilDate")
        if not mode or until is None:
            return None
        return Retention(str(mode).lower(), until.timestamp())

    def extend_lock(self, key: str, retention: Retention) -> Retention:
        """PutObjectRetention of the current version.

        A lock that ends later already (set by a host whose clock runs ahead)
        cannot be shortened, and S3 refuses the request: then the lock found
        is returned if it covers ``retention``.
        """
        lock: Any = {"Mode": retention.mode.upper(),
                     "RetainUntilDate": datetime.fromtimestamp(retention.until, UTC)}
        try:
            self._call("PutObjectRetention", key, lambda: self.client.put_object_retention(
                Bucket=self.bucket, Key=self.prefix + key, Retention=lock))
        except ObjectMissing:
            raise
        except RepositoryError:
            found = self.lock_of(key)
            if found is not None and found.until >= retention.until:
                return found
            raise
        return retention

    def delete_unlocked(self, keys: Iterable[str]) -> builtins.list[str]:
        """Delete every version of each key with DeleteObjects (1000 versions per request).

        Versions come from ListObjectVersions: per key, or per directory when
        more than :data:`LIST_DIRECTORY_ABOVE` keys of one directory go (gc).
        Delete markers go too, so nothing stays hidden. A version under a
        lock is refused by S3 (AccessDenied) and its key returned. Outside an
        Object Lock bucket this is :meth:`delete_many`.
        """
        if not self._versioned:
            self.delete_many(keys)
            return []
        locked: dict[str, None] = {}
        batch: builtins.list[tuple[str, str]] = []
        for version in self._versions_of(builtins.list(keys)):
            batch.append(version)
            if len(batch) == DELETE_BATCH:
                locked.update(dict.fromkeys(self._delete_versions(batch)))
                batch = []
        if batch:
            locked.update(dict.fromkeys(self._delete_versions(batch)))
        return builtins.list(locked)

    def _versions_of(self, keys: builtins.list[str]) -> Iterator[tuple[str, str]]:
        """``(key, version id)`` of every version and delete marker of ``keys``."""
        by_directory: dict[str, builtins.list[str]] = {}
        for key in keys:
            by_directory.setdefault(key.rpartition("/")[0], []).append(key)
        for directory, members in by_directory.items():
            wanted = set(members)
            prefixes = ([directory + "/" if directory else ""] if len(members) > LIST_DIRECTORY_ABOVE
                        else members)
            for prefix in prefixes:
                for page in self._version_pages(prefix):
                    for v in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
                        key = v["Key"][len(self.prefix):]
                        if key in wanted:
                            yield key, str(v.get("VersionId") or "null")

    def _version_pages(self, prefix: str) -> Iterator[Any]:
        pages = iter(self.client.get_paginator("list_object_versions").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix))
        while True:
            page = self._call("ListObjectVersions", prefix, lambda: next(pages, None))
            if page is None:
                return
            yield page

    def _delete_versions(self, versions: builtins.list[tuple[str, str]]) -> builtins.list[str]:
        """One DeleteObjects naming versions; the keys whose versions a lock kept."""
        resp = self._call("DeleteObjects", versions[0][0], lambda: self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": [{"Key": self.prefix + k, "VersionId": v}
                                                    for k, v in versions], "Quiet": True}))
        locked: builtins.list[str] = []
        failed = []
        for error in resp.get("Errors", []):
            code = error.get("Code")
            if code in _MISSING_CODES or code == "NoSuchVersion":
                continue
            key = str(error.get("Key") or "").removeprefix(self.prefix)
            if code == "AccessDenied" and self._held_by_lock(key, str(error.get("Message") or "")):
                locked.append(key)
            else:
                failed.append(error)
        if failed:
            raise self._delete_failed(failed, f"{len(versions)} object versions")
        return locked

    def _held_by_lock(self, key: str, message: str) -> bool:
        """Whether an AccessDenied for deleting ``key`` came from a lock, not from IAM."""
        if any(word in message.lower() for word in ("lock", "worm", "retention")):
            return True
        try:  # a store whose message does not say: ask the object itself
            lock = self.lock_of(key)
        except RepositoryError:
            return False
        return lock is not None

    def _locked_message(self, key: str) -> str:
        try:
            lock = self.lock_of(key)
        except RepositoryError:
            lock = None
        until = (f" ({lock.mode}) until {datetime.fromtimestamp(lock.until, UTC):%Y-%m-%dT%H:%M:%SZ}"
                 if lock else "")
        return f"{self._where(key)} is locked by S3 Object Lock{until}; it cannot be deleted before then"

    # -- internals ---------------------------------------------------------------------
    def _listed(self, prefix: str) -> Iterator[Any]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix)
        it = iter(pages)
        while True:
            page = self._call("ListObjectsV2", prefix, lambda: next(it, None))
            if page is None:
                return
            yield from page.get("Contents", [])

    def _delete_failed(self, failed: builtins.list[Any], what: str) -> RepositoryError:
        """One line for the errors a DeleteObjects answered (S3 may send an empty message)."""
        first = failed[0]
        key = str(first.get("Key") or "?").removeprefix(self.prefix)
        return RepositoryError(
            f"S3 DeleteObjects could not delete {len(failed)} of {what}, "
            f"first {self._where(key)}: {first.get('Code') or 'no error code'}"
            + (f" {msg}" if (msg := _one_line(first.get("Message"))) else ""))

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def _get_or_none(self, key: str) -> bytes | None:
        try:
            return self.get(key)
        except ObjectMissing:
            return None

    def _get_with_etag(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag, or None when it is absent."""
        try:
            resp = self._call("GetObject", key, lambda: self.client.get_object(
                Bucket=self.bucket, Key=self.prefix + key))
        except ObjectMissing:
            return None
        try:
            return resp["Body"].read(), str(resp["ETag"])
        except _BODY_ERRORS as e:
            resp["Body"].close()
            raise self._error(e, "GetObject", key) from e

    def _replace_by_rereading(self, key: str, data: bytes) -> bool:
        self.put(key, data)
        return self._get_or_none(key) == data

    def _disable_conditional_replace(self) -> None:
        with self._fallback_lock:
            if self._conditional_replace:
                self._conditional_replace = False
                log.warning("%s does not support If-Match on PutObject; lock renewals fall back to "
                            "read, compare, write, read again, which a takeover landing in between "
                            "can defeat", self.endpoint)

    def _put_if_absent_by_head(self, key: str, data: bytes, lock: Retention | None = None) -> bool:
        if self.exists(key):
            return False
        self._put(key, data, False, lock)
        return True

    def _check_store(self) -> None:
        """Run (or read the cached) store check once; refuse what the store cannot guarantee."""
        with self._check_lock:
            if not self._check_pending:
                return
            ops = ProbeOps(put=self._probe_put, put_if_absent=self._probe_create,
                           put_if_match=self._probe_replace, get=self.get, delete=self.delete)
            check = cached_check(ops, self.endpoint) or probe_store(ops, self.endpoint, self._where)
            check = StoreCheck(check.endpoint, check.checked, check.conditional_create,
                               check.conditional_replace, self.unsafe_locks, check.cached)
            self.store_check = check
            if not check.locks_safe and not self.unsafe_locks:
                raise RepositoryError(refusal(check, self.url))
            if not check.cached:
                save_check(ops, check)
            if not check.locks_safe:
                self._conditional_writes = False  # HEAD-then-PUT: catches all but true races
                log.warning("unsafe_locks: the S3 store at %s does not enforce conditional creates; "
                            "not guaranteed: %s", self.endpoint, "; ".join(check.guarantees_not_held()))
            self._check_pending = False

    def _probe_put(self, key: str, data: bytes) -> str:
        """A plain write for the probe; the object's ETag."""
        resp = self._call("PutObject", key, lambda: self.client.put_object(
            Bucket=self.bucket, Key=self.prefix + key, Body=data, **self._checksums(data)))
        return str(resp["ETag"])

    def _probe_replace(self, key: str, data: bytes, etag: str) -> str | None:
        """A write with ``If-Match: etag`` for the probe: the new ETag, None when refused (412)."""
        return self._probe_conditional(key, data, IfMatch=etag, **self._checksums(data))

    def _probe_conditional(self, key: str, data: bytes, **conditions: Any) -> str | None:
        """One conditional PutObject of the store check: its ETag, None when the precondition
        failed (412); NotImplementedError where the store answers 501."""
        try:
            resp = self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data,
                                          **conditions)
            return str(resp["ETag"])
        except ClientError as e:
            if _code(e) == "PreconditionFailed" or _status(e) == 412:
                return None
            if _code(e) == "NotImplemented" or _status(e) == 501:
                raise NotImplementedError from e
            raise self._error(e, "PutObject", key) from e
        except BotoCoreError as e:
            raise self._error(e, "PutObject", key) from e

    def _checksums(self, data: bytes) -> dict[str, Any]:
        """The checksum headers every upload carries (never aws-chunked; module docstring)."""
        extra: dict[str, Any] = {
            "ChecksumAlgorithm": "CRC32",
            "ChecksumCRC32": base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()}
        if self._send_md5:
            extra["ContentMD5"] = base64.b64encode(hashlib.md5(data).digest()).decode()
        return extra

    def _probe_create(self, key: str, data: bytes) -> bool:
        """A conditional create for the probe: NotImplementedError where the store answers 501."""
        return self._probe_conditional(key, data, IfNoneMatch="*") is not None

    def _disable_conditional_writes(self) -> None:
        with self._fallback_lock:
            if self._conditional_writes:
                self._conditional_writes = False
                log.warning("%s does not support conditional writes (If-None-Match); falling back "
                            "to HEAD-then-PUT, which is not safe against concurrent writers", self.endpoint)

    def _call(self, op: str, key: str, request: Callable[[], T]) -> T:
        """Run one botocore call (retries happen inside it) and map its failure."""
        try:
            return request()
        except ClientError as e:
            if _code(e) in _MISSING_CODES or (_status(e) == 404 and _code(e) != "NoSuchBucket"):
                raise ObjectMissing(key) from e
            raise self._error(e, op, key) from e
        except BotoCoreError as e:
            raise self._error(e, op, key) from e

    def _error(self, e: Exception, op: str, key: str) -> RepositoryError:
        """One line naming the bucket, the key and the cause; never a credential."""
        where = self._where(key)
        if isinstance(e, ClientError):
            code, status = _code(e), _status(e)
            message = _one_line(e.response.get("Error", {}).get("Message"))
            tries = e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
            if code == "NoSuchBucket":
                return RepositoryError(f"S3 bucket {self.bucket} does not exist at {self.endpoint}")
            if code in _DENIED_CODES or status == 403:
                return RepositoryError(
                    f"S3 denied {op} on {where} ({code}): check the credentials and that they "
                    f"allow {_ACTIONS.get(op, 's3:*')}")
            if code in _BAD_DIGEST_CODES:
                return RepositoryError(
                    f"S3 refused {op} {where}: the body did not match its checksum ({code})")
            cause = f"HTTP {status}" + (f" {code}" if code and code != str(status) else "")
            return RepositoryError(
                f"S3 {op} {where} failed after {tries} attempt{'s' if tries > 1 else ''}: "
                f"{cause}{': ' + message if message else ''}")
        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return RepositoryError(
                f"no usable AWS credentials for {self.url}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an instance role")
        if isinstance(e, (EndpointConnectionError, ConnectTimeoutError)):
            return RepositoryError(
                f"cannot reach the S3 endpoint {self.endpoint} for {op} {where} "
                f"(retried up to {self.max_attempts} attempts): {_one_line(str(e))}")
        # botocore repeats the request's whole URL; the line already names the object.
        detail = _ENDPOINT_URL_RE.sub("", str(e)).rstrip(".")
        return RepositoryError(
            f"S3 {op} {where} failed after retries (up to {self.max_attempts} attempts): "
            f"{type(e).__name__}: {_one_line(detail)}")


def _code(e: ClientError) -> str:
    # Stores such as Ceph RGW send empty elements, which botocore parses as None.
    return str(e.response.get("Error", {}).get("Code") or "")


def _status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _one_line(text: object) -> str:
    return " ".join(str(text or "").split())[:300]
