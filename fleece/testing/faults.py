"""Fault injection at the backend level: a wrapper that fails or stalls on demand.

:class:`FaultyBackend` wraps any :class:`~fleece.repo.backend.Backend` and
makes chosen operations fail (the first N calls, at random, or all of them
during an outage) or slow. Layers above the backend — the repository, the
backup pipeline, locks — are tested against it: a persistent outage must end
a backup with one clear error and leave nothing half-written.

Faults below botocore's retry handler, to prove that S3 retries really
happen, are in :mod:`fleece.testing.s3_faults`.
"""

from __future__ import annotations

import builtins
import random
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from typing import Any

from fleece.errors import RepositoryError
from fleece.repo.backends.base import Backend, ForwardingBackend, ObjectInfo

BACKEND_OPS = frozenset({"put", "replace_if", "get", "exists", "list", "delete", "mtime"})


class InjectedFault(RepositoryError):
    """The error :class:`FaultyBackend` raises in place of a real storage failure."""


class FaultyBackend(ForwardingBackend):
    """A :class:`Backend` whose operations fail or stall on demand.

    Everything else is forwarded (:class:`ForwardingBackend`), so a faulty
    file backend still stages and flushes as production does. ``stage`` is
    faulted as a ``put`` and ``get_range`` as a ``get``: they are the same
    requests to the store.

    For every call of an operation in ``ops`` (default: all of them):
    sleep ``delay`` seconds; then fail with :class:`InjectedFault` if
    ``outage`` is set (attribute, may be flipped at any time), if this is
    one of the first ``fail_first`` calls of that operation, or with
    probability ``fail_rate`` (seeded by ``seed``). With ``lose_replies``
    the inner operation runs first and only its reply is lost — the write
    happened but the caller was told it failed, as after a reset connection.
    ``calls`` and ``failures`` count per operation name.
    """

    def __init__(self, inner: Backend, *, fail_rate: float = 0.0, fail_first: int = 0,
                 outage: bool = False, delay: float = 0.0, seed: int | None = None,
                 ops: Collection[str] | None = None, lose_replies: bool = False) -> None:
        unknown = set(ops or ()) - BACKEND_OPS - {"delete_many"}
        if unknown:
            raise ValueError(f"unknown backend operations: {sorted(unknown)}")
        super().__init__(inner)
        self.fail_rate = fail_rate
        self.fail_first = fail_first
        self.outage = outage
        self.delay = delay
        self.ops = frozenset(ops) if ops is not None else BACKEND_OPS | {"delete_many"}
        self.lose_replies = lose_replies
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def _should_fail(self, op: str) -> bool:
        with self._lock:
            self.calls[op] += 1
            if op not in self.ops:
                return False
            fail = (self.outage or self.calls[op] <= self.fail_first
                    or (self.fail_rate > 0 and self._rng.random() < self.fail_rate))
            if fail:
                self.failures[op] += 1
            return fail

    def _run(self, op: str, what: str, call: Any) -> Any:
        if self.delay and op in self.ops:
            time.sleep(self.delay)
        fail = self._should_fail(op)
        if fail and not self.lose_replies:
            raise InjectedFault(f"injected fault: {op} {what} on {self.url}")
        result = call()
        if fail:
            raise InjectedFault(f"injected fault: reply to {op} {what} on {self.url} lost")
        return result

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """The inner ``put``, unless a fault is due."""
        return bool(self._run("put", key, lambda: self.inner.put(key, data, if_absent=if_absent)))

    def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        """The inner ``replace_if``, unless a fault is due."""
        return bool(self._run("replace_if", key, lambda: self.inner.replace_if(key, data, expected)))

    def get(self, key: str) -> bytes:
        """The inner ``get``, unless a fault is due."""
        return bytes(self._run("get", key, lambda: self.inner.get(key)))

    def exists(self, key: str) -> bool:
        """The inner ``exists``, unless a fault is due."""
        return bool(self._run("exists", key, lambda: self.inner.exists(key)))

    def list(self, prefix: str) -> Iterator[str]:
        """The inner ``list`` (materialized, so the fault hits before the first key)."""
        keys: list[str] = self._run("list", prefix + "*", lambda: list(self.inner.list(prefix)))
        return iter(keys)

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        """The inner ``list_info`` (materialized), faulted as ``list``."""
        infos: list[ObjectInfo] = self._run("list", prefix + "*",
                                            lambda: list(self.inner.list_info(prefix)))
        return iter(infos)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """The inner ``get_range``, faulted as ``get``."""
        return bytes(self._run("get", key, lambda: self.inner.get_range(key, offset, length)))

    def stage(self, key: str, data: bytes | memoryview) -> bool:
        """The inner ``stage``, faulted as ``put``."""
        return bool(self._run("put", key, lambda: self.inner.stage(key, data)))

    def delete(self, key: str) -> None:
        """The inner ``delete``, unless a fault is due."""
        self._run("delete", key, lambda: self.inner.delete(key))

    def mtime(self, key: str) -> float:
        """The inner ``mtime``, unless a fault is due."""
        return float(self._run("mtime", key, lambda: self.inner.mtime(key)))

    def delete_many(self, keys: Iterable[str]) -> None:
        """The inner ``delete_many``, unless a fault is due."""
        keys = list(keys)
        self._run("delete_many", f"{len(keys)} keys", lambda: self.inner.delete_many(keys))

    def delete_unlocked(self, keys: Iterable[str]) -> builtins.list[str]:
        """The inner ``delete_unlocked``, faulted as ``delete_many`` (gc deletes with it)."""
        keys = list(keys)
        kept = self._run("delete_many", f"{len(keys)} keys", lambda: self.inner.delete_unlocked(keys))
        return list(kept)
