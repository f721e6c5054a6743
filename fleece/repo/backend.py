"""The storage interface every repository backend implements.

Deliberately small (after restic's backend layer): a backend stores opaque
objects under string keys and knows nothing of chunks or restore points.
Retries, rate limits, fault injection and logging are wrappers around a
``Backend``, never flags inside one.

Keys are ``/``-separated relative paths such as ``chunks/ab/ab12…`` or
``points/vm1/20261123T073600.123456Z-3f9a1c.json``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, Protocol, runtime_checkable

from fleece.errors import RepositoryError


class ObjectMissing(RepositoryError):
    """``get`` asked for a key the backend does not hold."""

    def __init__(self, key: str) -> None:
        super().__init__(f"object {key} is missing from the repository")
        self.key = key


@runtime_checkable
class Backend(Protocol):
    """Opaque object storage: put, replace_if, get, exists, list, delete."""

    url: str
    """Where the objects live, for messages (no secrets)."""

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Store ``data`` under ``key`` atomically: readers see all of it or nothing.

        With ``if_absent`` the write happens only when ``key`` does not exist
        yet (a conditional create); returns False when it already existed.
        Otherwise an existing object is replaced and True is returned.
        """
        ...

    def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        """Replace the object at ``key`` with ``data`` only if it holds exactly ``expected``.

        A compare-and-swap, for lock leases: returns False and changes nothing
        when ``key`` is absent (it is never created) or holds other bytes. No
        write by another ``replace_if``, ``put`` or ``delete`` can land between
        the compare and the swap and be overwritten: S3 sends ``If-Match``
        with the ETag it compared; the file backend compares under an
        ``flock`` and swaps with ``RENAME_EXCHANGE`` (atomic between processes
        of one host, see :mod:`fleece.repo.file_backend` for its limits).
        """
        ...

    def get(self, key: str) -> bytes:
        """Return the whole object; raise :class:`ObjectMissing` if absent."""
        ...

    def exists(self, key: str) -> bool:
        """Whether ``key`` is stored."""
        ...

    def list(self, prefix: str) -> Iterator[str]:
        """Every key that starts with ``prefix``, in no particular order."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; removing an absent key is not an error."""
        ...

    def mtime(self, key: str) -> float:
        """Last-modified time (Unix seconds) of ``key``; :class:`ObjectMissing` if absent.

        Garbage collection uses it for its grace period.
        """
        ...


class ObjectInfo(NamedTuple):
    """One listed object: its key, size in bytes and last-modified time (Unix seconds)."""

    key: str
    size: int
    mtime: float


@runtime_checkable
class ListsInfo(Protocol):
    """Optional backend extension: list keys with sizes and times in one pass.

    S3 returns both in every ListObjectsV2 page, a directory in one ``stat``;
    garbage collection uses it to report bytes freed and to age orphans
    without a request per object. Not part of :class:`Backend`: callers fall
    back to ``list`` and ``mtime`` when a backend (or wrapper) lacks it.
    """

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in no particular order."""
        ...
