"""The storage contract every repository backend implements, and the base for wrappers.

Deliberately small (after restic's backend layer): a backend stores opaque
objects under string keys and knows nothing of chunks or restore points.
Retries, rate limits, fault injection and logging are wrappers around a
``Backend`` (:class:`ForwardingBackend`), never flags inside one.

Everything a caller may use is declared here, with a default that is correct
for any backend, so nobody probes for a method at run time and a wrapper can
never hide one: six methods are abstract (``put``, ``get``, ``exists``,
``list``, ``delete``, ``mtime``); the rest are *capabilities* a backend
overrides where it can do better (ranged reads, listing with sizes, bulk
deletes, staged writes with batched durability, connection pools, object
locks that keep an object from being deleted or overwritten until a date).

Keys are ``/``-separated relative paths such as ``chunks/ab/ab12…`` or
``points/vm1/20261123T073600.123456Z-3f9a1c.json``.
"""

from __future__ import annotations

import abc
import builtins
import math
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from fleece.errors import BadInput, RepositoryError


class ObjectMissing(RepositoryError):
    """``get`` asked for a key the backend does not hold."""

    def __init__(self, key: str) -> None:
        super().__init__(f"object {key} is missing from the repository")
        self.key = key


class ObjectLocked(RepositoryError):
    """A delete was refused because the object is locked (S3 Object Lock) until a date."""


class Retention(NamedTuple):
    """An object lock: nobody may delete or overwrite the object before ``until``.

    ``mode`` is ``governance`` (a principal with s3:BypassGovernanceRetention
    may still remove it) or ``compliance`` (nobody may, the root account
    included); ``until`` is Unix seconds.
    """

    mode: str
    until: float


class ObjectInfo(NamedTuple):
    """One listed object: its key, size in bytes (-1: unknown) and last-modified time (NaN: unknown)."""

    key: str
    size: int
    mtime: float


class Backend(abc.ABC):
    """Opaque object storage: the seven abstract operations plus capabilities with defaults."""

    url: str
    """Where the objects live, for messages (no secrets)."""

    @property
    def preferred_concurrency(self) -> int | None:
        """How many storer threads this backend wants (None: the pipeline's default)."""
        return None

    @property
    def atomic_conditional_create(self) -> bool:
        """Whether ``put(if_absent=True)`` is atomic against other writers (leases rely on it)."""
        return True

    # -- the contract -------------------------------------------------------------------

    @abc.abstractmethod
    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Store ``data`` under ``key`` atomically: readers see all of it or nothing.

        With ``if_absent`` the write happens only when ``key`` does not exist
        yet (a conditional create); returns False when it already existed.
        Otherwise an existing object is replaced and True is returned.
        """

    @abc.abstractmethod
    def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        """Replace the object at ``key`` with ``data`` only if it holds exactly ``expected``.

        A compare-and-swap, for lock leases: returns False and changes nothing
        when ``key`` is absent (it is never created) or holds other bytes. No
        write by another ``replace_if``, ``put`` or ``delete`` can land between
        the compare and the swap and be overwritten: S3 sends ``If-Match``
        with the ETag it compared; the file backend compares under an
        ``flock`` and swaps with ``RENAME_EXCHANGE`` (atomic between processes
        of one host, see :mod:`fleece.repo.backends.file` for its limits).
        """

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """Return the whole object; raise :class:`ObjectMissing` if absent."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` is stored."""

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[str]:
        """Every key that starts with ``prefix``, in no particular order."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; removing an absent key is not an error."""

    @abc.abstractmethod
    def mtime(self, key: str) -> float:
        """Last-modified time (Unix seconds) of ``key``; :class:`ObjectMissing` if absent."""

    # -- capabilities (override where the store does better) ----------------------------

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the object from ``offset`` (fewer at its end); :class:`ObjectMissing`.

        The default fetches the whole object; stores with ranged reads fetch
        only the part (packs hold many small deltas).
        """
        return self.get(key)[offset : offset + length]

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` with its size and time, where the listing has them.

        The default lists keys only (size -1, time NaN); S3 and directories
        return both in the listing itself, so gc needs no request per object.
        """
        for key in self.list(prefix):
            yield ObjectInfo(key, -1, math.nan)

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove every key (absent ones are fine); S3 does 1000 per request."""
        for key in keys:
            self.delete(key)

    def stage(self, key: str, data: bytes | memoryview) -> bool:
        """Write an immutable object that becomes visible (and durable) at :meth:`flush`.

        Returns False when ``key`` already existed. The default is a
        conditional create, visible at once; the file backend batches the
        durability of many objects into one sync. ``data`` may be a view of
        the caller's buffer, which stays unchanged until this returns.
        """
        return self.put(key, data if isinstance(data, bytes) else bytes(data), if_absent=True)

    def flush(self) -> None:
        """Make every staged object durable, then visible (a no-op where puts already are)."""
        return None

    def discard_staged(self) -> None:
        """Drop staged objects that were never flushed (a backup that failed)."""
        return None

    def sweep_temporaries(self, older_than: float, *, delete: bool) -> tuple[int, int]:
        """Count (and with ``delete`` remove) a killed writer's temporaries older than ``older_than``.

        Returns ``(objects, bytes)``. Only backends that keep hidden
        temporaries (the file backend's staged chunks) have any.
        """
        return 0, 0

    def reserve_connections(self, threads: int) -> None:
        """Size connection pools for ``threads`` concurrent callers (S3); a no-op elsewhere."""
        return None

    def store_report(self) -> dict[str, Any] | None:
        """What this run's check of the store found (S3: does it enforce conditional
        creates, does it keep bodies whole), for ``--json``; None where nothing was checked."""
        return None

    # -- object locks (S3 Object Lock; docs/s3.md "Immutable restore points") ------------

    def check_object_lock(self) -> None:
        """Refuse (:class:`BadInput`) unless this store can lock objects; changes nothing.

        A store that can (an S3 bucket with Object Lock enabled, which is
        always versioned) from then on removes *every version* of a key it
        deletes, so that a deleted object is gone rather than hidden behind a
        delete marker, and a locked version makes the delete fail with
        :class:`ObjectLocked`.
        """
        raise BadInput(f"{self.url} cannot lock objects: --object-lock-days needs an S3 bucket "
                       "with Object Lock enabled; nothing was changed")

    def put_locked(self, key: str, data: bytes, retention: Retention) -> bool:
        """A conditional create (as ``put(if_absent=True)``) of an object locked until ``retention.until``.

        Returns False, writing nothing, when ``key`` exists already.
        """
        raise RepositoryError(f"{self.url} cannot lock objects (internal error: no object lock here)")

    def lock_of(self, key: str) -> Retention | None:
        """The object's lock (None: not locked); :class:`ObjectMissing` if absent. One HEAD on S3."""
        if not self.exists(key):
            raise ObjectMissing(key)
        return None

    def extend_lock(self, key: str, retention: Retention) -> Retention:
        """Keep ``key`` locked until at least ``retention.until`` (a lock is never shortened).

        Returns the lock the object has afterwards; :class:`ObjectMissing` if absent.
        """
        raise RepositoryError(f"{self.url} cannot lock objects (internal error: no object lock here)")

    def delete_unlocked(self, keys: Iterable[str]) -> builtins.list[str]:
        """Remove every key (every version of it, where the store keeps versions) that no lock holds.

        Returns the keys left in place because a lock holds them (gc reports
        them); absent keys are fine. The default is :meth:`delete_many`.
        """
        self.delete_many(keys)
        return []


class ForwardingBackend(Backend):
    """A wrapper that passes every operation and capability to ``inner``.

    Wrappers (fault injection, rate limits, encryption, metrics) derive from
    it and override only what they change, so wrapping never hides a
    capability of the backend underneath.
    """

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.url = inner.url

    @property
    def preferred_concurrency(self) -> int | None:
        """The inner backend's."""
        return self.inner.preferred_concurrency

    @property
    def atomic_conditional_create(self) -> bool:
        """The inner backend's."""
        return self.inner.atomic_conditional_create

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """The inner ``put``."""
        return self.inner.put(key, data, if_absent=if_absent)

    def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        """The inner ``replace_if``."""
        return self.inner.replace_if(key, data, expected)

    def get(self, key: str) -> bytes:
        """The inner ``get``."""
        return self.inner.get(key)

    def exists(self, key: str) -> bool:
        """The inner ``exists``."""
        return self.inner.exists(key)

    def list(self, prefix: str) -> Iterator[str]:
        """The inner ``list``."""
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        """The inner ``delete``."""
        self.inner.delete(key)

    def mtime(self, key: str) -> float:
        """The inner ``mtime``."""
        return self.inner.mtime(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """The inner ``get_range``."""
        return self.inner.get_range(key, offset, length)

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        """The inner ``list_info``."""
        return self.inner.list_info(prefix)

    def delete_many(self, keys: Iterable[str]) -> None:
        """The inner ``delete_many``."""
        self.inner.delete_many(keys)

    def stage(self, key: str, data: bytes | memoryview) -> bool:
        """The inner ``stage``."""
        return self.inner.stage(key, data)

    def flush(self) -> None:
        """The inner ``flush``."""
        self.inner.flush()

    def discard_staged(self) -> None:
        """The inner ``discard_staged``."""
        self.inner.discard_staged()

    def sweep_temporaries(self, older_than: float, *, delete: bool) -> tuple[int, int]:
        """The inner ``sweep_temporaries``."""
        return self.inner.sweep_temporaries(older_than, delete=delete)

    def reserve_connections(self, threads: int) -> None:
        """The inner ``reserve_connections``."""
        self.inner.reserve_connections(threads)

    def store_report(self) -> dict[str, Any] | None:
        """The inner ``store_report``."""
        return self.inner.store_report()

    def check_object_lock(self) -> None:
        """The inner ``check_object_lock``."""
        self.inner.check_object_lock()

    def put_locked(self, key: str, data: bytes, retention: Retention) -> bool:
        """The inner ``put_locked``."""
        return self.inner.put_locked(key, data, retention)

    def lock_of(self, key: str) -> Retention | None:
        """The inner ``lock_of``."""
        return self.inner.lock_of(key)

    def extend_lock(self, key: str, retention: Retention) -> Retention:
        """The inner ``extend_lock``."""
        return self.inner.extend_lock(key, retention)

    def delete_unlocked(self, keys: Iterable[str]) -> builtins.list[str]:
        """The inner ``delete_unlocked``."""
        return self.inner.delete_unlocked(keys)
