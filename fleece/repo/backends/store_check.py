"""What an S3 store really does with fleece's writes, checked before fleece relies on it.

S3-compatible stores differ in ways that only show once data is lost: some
silently ignore ``If-None-Match: *`` (so two writers can both "create" one
lease), some store a body other than the one sent (the ``aws-chunked``
framing of a streamed upload, typically). Before the first conditional
create of a process (the repository's config, a lease, a chunk) the S3
backend runs :func:`probe_store`:

1. write a probe object of random bytes, read it back, compare every byte;
2. rewrite it with ``If-Match: <its current ETag>`` (must succeed), then with
   ``If-Match: <the ETag it had before>`` (must be refused);
3. create a second probe object with a conditional create, twice: the
   first must succeed, the second must be refused.

Each conditional behaviour is thus tried both ways, with a right and a
wrong precondition, and recorded as ``enforced``, ``ignored`` (the wrong
precondition was accepted), ``refuses-valid`` (the right one was refused:
Ceph RGW answers 412 to ``If-Match`` with the current ETag) or
``not-implemented`` (501). Leases need only the conditional create
(:mod:`fleece.repo.lock`); ``If-Match`` is used only by
:meth:`~fleece.repo.backends.base.Backend.replace_if`, which the S3 backend
refuses unless the check found it enforced.

The result is cached in the repository (``store/check.json``) for
:data:`CACHE_SECONDS`, so a nightly backup costs one GET for it, not eight
requests; a store that is refused is not written to at all (the probe
objects, ``store/probe-*``, are always deleted again). A store
that returned other bytes is refused outright; one that ignores
``If-None-Match`` is refused for leases unless the operator opted in with
``unsafe_locks = true``, and then :meth:`StoreCheck.guarantees_not_held`
names what no longer holds.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from fleece.errors import RepositoryCorrupt, RepositoryError
from fleece.repo.backends.base import ObjectMissing

log = logging.getLogger(__name__)

STORE_PREFIX = "store/"
CHECK_KEY = "store/check.json"
CACHE_SECONDS = 3600.0
"""How long a probe result stored in the repository is trusted (a store is rarely swapped)."""
PROBE_SIZE = 64 * 1024 + 17  # odd-sized, larger than one aws-chunked frame of some clients
CHECK_FORMAT = 2
"""Format 1 (no If-Match probe) is not trusted: such a cache is probed again."""

ENFORCED = "enforced"
IGNORED = "ignored"
REFUSES_VALID = "refuses-valid"
NOT_IMPLEMENTED = "not-implemented"
OUTCOMES = (ENFORCED, IGNORED, REFUSES_VALID, NOT_IMPLEMENTED)

BEHAVIOURS = {
    "conditional_create": "If-None-Match: * on PutObject",
    "conditional_replace": "If-Match: <ETag> on PutObject",
}
"""Each probed behaviour → how it is named in messages and docs/s3.md."""

UNSAFE_GUARANTEES = (
    "two hosts backing up one VM at once can both take its lock and both commit",
    "gc running beside a backup on another host can delete chunks that backup is about to name",
    "a restore point id, though random, is not protected against being written twice",
)
"""What does not hold on a store whose conditional creates are not enforced."""


@dataclass(frozen=True)
class StoreCheck:
    """The outcome of :func:`probe_store`, as cached in ``store/check.json``."""

    endpoint: str
    checked: float
    """Unix time of the probe."""
    conditional_create: str
    """``enforced``, ``ignored`` (a second create succeeded), ``refuses-valid`` (a create of an
    absent key was refused) or ``not-implemented`` (501)."""
    conditional_replace: str = NOT_IMPLEMENTED
    """``If-Match``: ``enforced``, ``ignored`` (a stale ETag was accepted), ``refuses-valid`` (the
    current ETag was refused) or ``not-implemented`` (501)."""
    unsafe_locks: bool = False
    """Whether the operator opted in to leases on a store that does not enforce them."""
    cached: bool = False

    @property
    def locks_safe(self) -> bool:
        """Whether leases and conditional creates are enforced by the store itself."""
        return self.conditional_create == ENFORCED

    @property
    def replace_safe(self) -> bool:
        """Whether ``If-Match`` was proven both ways (a compare-and-swap may rely on it)."""
        return self.conditional_replace == ENFORCED

    def guarantees_not_held(self) -> list[str]:
        """The guarantees that do not hold here (empty on a store that enforces conditional creates)."""
        return [] if self.locks_safe else list(UNSAFE_GUARANTEES)

    def as_dict(self) -> dict[str, object]:
        """For ``--json`` output."""
        return {
            "endpoint": self.endpoint,
            "checked": self.checked,
            "conditional_create": self.conditional_create,
            "conditional_replace": self.conditional_replace,
            "read_back": "identical",
            "unsafe_locks": self.unsafe_locks,
            "guarantees_not_held": self.guarantees_not_held(),
        }

    def to_json(self) -> bytes:
        """The cache object's bytes."""
        doc = {"format": CHECK_FORMAT, "endpoint": self.endpoint, "checked": self.checked,
               "conditional_create": self.conditional_create,
               "conditional_replace": self.conditional_replace, "read_back": "identical"}
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_json(cls, blob: bytes) -> StoreCheck | None:
        """Parse a cache object; None for anything this version did not write."""
        try:
            doc = json.loads(blob)
            if doc.get("format") != CHECK_FORMAT or doc.get("read_back") != "identical":
                return None
            if doc["conditional_create"] not in OUTCOMES or doc["conditional_replace"] not in OUTCOMES:
                return None
            return cls(str(doc["endpoint"]), float(doc["checked"]), str(doc["conditional_create"]),
                       str(doc["conditional_replace"]), cached=True)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


@dataclass
class ProbeOps:
    """The raw operations a probe needs, bypassing the check itself."""

    put: Callable[[str, bytes], str]
    """A plain write; returns the object's new ETag."""
    put_if_absent: Callable[[str, bytes], bool]
    """A conditional create; raises :class:`NotImplementedError` when the store answers 501."""
    put_if_match: Callable[[str, bytes, str], str | None]
    """A write with ``If-Match``: the new ETag, or None when refused (412);
    :class:`NotImplementedError` on 501."""
    get: Callable[[str], bytes]
    delete: Callable[[str], None]


def cached_check(ops: ProbeOps, endpoint: str, now: float | None = None) -> StoreCheck | None:
    """The result cached in the repository, if it is recent and for this endpoint."""
    try:
        check = StoreCheck.from_json(ops.get(CHECK_KEY))
    except (ObjectMissing, RepositoryCorrupt):  # a damaged cache is no cache: probe again
        return None
    now = time.time() if now is None else now
    if check is None or check.endpoint != endpoint or not 0 <= now - check.checked < CACHE_SECONDS:
        return None
    return check


def probe_store(ops: ProbeOps, endpoint: str, where: Callable[[str], str]) -> StoreCheck:
    """Probe the store (see module docstring); raise if it returned bytes other than those written.

    ``where`` turns a key into the object's full name for messages.
    """
    token = secrets.token_hex(8)
    data_key, create_key = f"{STORE_PREFIX}probe-{token}", f"{STORE_PREFIX}probe-{token}-create"
    try:
        sent = os.urandom(PROBE_SIZE)
        etag = ops.put(data_key, sent)
        try:
            got = ops.get(data_key)
            detail = f"{len(got)} bytes read back, {len(sent)} written"
        except RepositoryCorrupt:  # a store that kept the checksum sent with the bytes
            got, detail = b"", "the body read back did not match its checksum"
        if got != sent:
            raise RepositoryCorrupt(
                f"the S3 store at {endpoint} returned other bytes than were written to "
                f"{where(data_key)} ({detail}): it mangles uploads, so fleece will not store "
                "backups there; nothing was changed")
        try:
            current = ops.put_if_match(data_key, b"second", etag)
            stale = ops.put_if_match(data_key, b"third", etag) if current is not None else None
            replace = (REFUSES_VALID if current is None else IGNORED if stale is not None
                       else ENFORCED)
        except NotImplementedError:
            replace = NOT_IMPLEMENTED
        try:
            first = ops.put_if_absent(create_key, b"first")
            second = ops.put_if_absent(create_key, b"second") if first else True
            outcome = REFUSES_VALID if not first else IGNORED if second else ENFORCED
        except NotImplementedError:
            outcome = NOT_IMPLEMENTED
    finally:
        for key in (data_key, create_key):
            try:
                ops.delete(key)
            except RepositoryError as exc:  # the probe's leftovers are tiny; say so, go on
                log.warning("could not delete the store probe %s: %s", where(key), exc)
    return StoreCheck(endpoint, time.time(), outcome, replace)


def save_check(ops: ProbeOps, check: StoreCheck) -> None:
    """Cache ``check`` in the repository (best effort: without it, the next process probes again)."""
    try:
        ops.put(CHECK_KEY, check.to_json())
    except RepositoryError as exc:
        log.debug("could not cache the store check: %s", exc)


def missing(behaviour: str, outcome: str) -> str:
    """What the store does wrong with ``behaviour`` (a key of :data:`BEHAVIOURS`), in words."""
    name = BEHAVIOURS[behaviour]
    return {
        IGNORED: f"ignores {name} (a write with a wrong precondition succeeded)",
        REFUSES_VALID: f"refuses {name} even when the precondition holds (412)",
        NOT_IMPLEMENTED: f"does not implement {name} (501)",
    }.get(outcome, f"enforces {name}")


def refusal(check: StoreCheck, where: str) -> str:
    """The one line refusing leases on a store that does not enforce conditional creates."""
    return (f"the S3 store at {check.endpoint} {missing('conditional_create', check.conditional_create)}"
            f", so two writers could both take one lock in {where}; fleece refuses to take locks "
            "there (set unsafe_locks = true in the config to accept that risk); nothing was changed")
