"""The ``memory`` backend: a dict behind the :class:`~fleece.repo.backend.Backend` protocol.

For tests of the layers above storage (repository, pipeline, locks, gc) that
need neither a directory nor a server. Thread-safe; ``put`` with
``if_absent`` is atomic, like the real backends promise.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Iterator

from fleece.repo.backends.base import Backend, ObjectInfo, ObjectMissing

_names = itertools.count()


class MemoryBackend(Backend):
    """Objects in a dict, with the time each was last written."""

    def __init__(self, name: str | None = None) -> None:
        self.url = f"memory://{name if name is not None else next(_names)}"
        self.objects: dict[str, bytes] = {}
        self.mtimes: dict[str, float] = {}
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Store a copy of ``data``; with ``if_absent``, only if ``key`` is new."""
        with self._lock:
            if if_absent and key in self.objects:
                return False
            self.objects[key] = bytes(data)
            self.mtimes[key] = time.time()
            return True

    def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        """Swap in ``data`` if ``key`` holds ``expected`` (atomic: one lock)."""
        with self._lock:
            if self.objects.get(key) != expected:
                return False
            self.objects[key] = bytes(data)
            self.mtimes[key] = time.time()
            return True

    def get(self, key: str) -> bytes:
        """The stored bytes; :class:`ObjectMissing` if absent."""
        with self._lock:
            try:
                return self.objects[key]
            except KeyError:
                raise ObjectMissing(key) from None

    def exists(self, key: str) -> bool:
        """Whether ``key`` is stored."""
        with self._lock:
            return key in self.objects

    def list(self, prefix: str) -> Iterator[str]:
        """The keys starting with ``prefix``, as they were when the call was made."""
        with self._lock:
            keys = [k for k in self.objects if k.startswith(prefix)]
        return iter(keys)

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        """``list`` with each object's size and write time."""
        with self._lock:
            infos = [ObjectInfo(k, len(v), self.mtimes[k])
                     for k, v in self.objects.items() if k.startswith(prefix)]
        return iter(infos)

    def delete(self, key: str) -> None:
        """Forget ``key``; an absent key is not an error."""
        with self._lock:
            self.objects.pop(key, None)
            self.mtimes.pop(key, None)

    def delete_many(self, keys: Iterable[str]) -> None:
        """Forget every key in ``keys``."""
        for key in keys:
            self.delete(key)

    def mtime(self, key: str) -> float:
        """When ``key`` was last written; :class:`ObjectMissing` if absent."""
        with self._lock:
            try:
                return self.mtimes[key]
            except KeyError:
                raise ObjectMissing(key) from None
