"""The backend wrapper that encrypts a repository: sealed objects, names that reveal nothing.

Everything above it (repository, locks, gc, verify, restore) sees logical
keys and plaintext, exactly as on an unencrypted repository; everything
below it (the store, its listings, its administrators) sees only:

* object keys whose user-supplied names (VM, disk, lock names) are replaced
  by AES-SIV tokens (:meth:`~fleece.repo.crypto.Sealer.name_token`), while
  chunk and pack names are already keyed hashes (the repository computes
  them with the id key) and point ids are times;
* sealed object bodies (:meth:`~fleece.repo.crypto.Sealer.seal`), each bound
  to its logical key, so moving an object to another key fails to open.

Ranged reads (one delta inside a pack) fetch the envelope header and only
the 64 KiB segments the range touches; headers of recently read objects are
cached (objects are immutable, or replaced whole with a new header).
"""

from __future__ import annotations

import builtins
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator

from fleece.errors import RepositoryError
from fleece.repo.backends.base import Backend, ForwardingBackend, ObjectInfo, ObjectMissing, Retention
from fleece.repo.format import keys
from fleece.repo.format.crypto import ENVELOPE_HEADER, Sealer

# Which components of a logical key are user-supplied names, by its first component.
_NAME_AT = {
    keys.INDEXES_PREFIX.rstrip("/"): (2,),      # indexes/<point-id>/<disk>
    keys.POINTS_PREFIX.rstrip("/"): (1,),       # points/<vm>/<point-id>.json
    keys.PROTECT_PREFIX.rstrip("/"): (1,),      # protect/<vm>/<point-id>
    keys.VERIFIED_PREFIX.rstrip("/"): (1,),     # verified/<vm>/<point-id>/<stamp>.json
    "locks": (2,),                              # locks/vms/<vm>, locks/repo/<name>
    keys.CHUNKS_PREFIX.rstrip("/"): (),
    keys.PACKS_PREFIX.rstrip("/"): (),
}
_HEADER_CACHE = 4096


class EncryptedBackend(ForwardingBackend):
    """Seals what it stores and hides names in keys; see the module docstring."""

    def __init__(self, inner: Backend, sealer: Sealer) -> None:
        super().__init__(inner)
        self.sealer = sealer
        self._headers: OrderedDict[str, bytes] = OrderedDict()
        self._headers_lock = threading.Lock()

    # -- keys --------------------------------------------------------------------------------

    def stored_key(self, key: str) -> str:
        """The key under which logical ``key`` is stored."""
        parts = key.split("/")
        names = _NAME_AT.get(parts[0])
        if names is None:
            raise RepositoryError(f"internal error: {key!r} is not an object an encrypted repository seals")
        for i in names:
            if i < len(parts):
                parts[i] = self.sealer.name_token(keys.unescape_name(parts[i]))
        return "/".join(parts)

    def logical_key(self, stored: str) -> str | None:
        """Inverse of :meth:`stored_key`; None for keys this repository did not write."""
        parts = stored.split("/")
        names = _NAME_AT.get(parts[0])
        if names is None:
            return None
        for i in names:
            if i < len(parts):
                name = self.sealer.name_of(parts[i])
                if name is None:
                    return None
                parts[i] = keys.escape_name(name)
        return "/".join(parts)

    def _listed(self, prefix: str) -> str:
        """The stored prefix to list for logical ``prefix`` (its complete components only)."""
        complete, _, _ = prefix.rpartition("/")
        return (self.stored_key(complete) + "/") if complete else ""

    # -- the contract ------------------------------------------------------------------------

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Seal and store."""
        stored = self.stored_key(key)
        self._forget(stored)
        return self.inner.put(stored, self.sealer.seal(key, data), if_absent=if_absent)

    def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        """Compare-and-swap on plaintext: the swap itself compares the sealed bytes we opened."""
        stored = self.stored_key(key)
        try:
            current = self.inner.get(stored)
        except ObjectMissing:
            return False
        if self.sealer.open(key, current) != expected:
            return False
        self._forget(stored)
        return self.inner.replace_if(stored, self.sealer.seal(key, data), current)

    def stage(self, key: str, data: bytes | memoryview) -> bool:
        """Seal and stage."""
        return self.inner.stage(self.stored_key(key), self.sealer.seal(key, data))

    def get(self, key: str) -> bytes:
        """Fetch and open (authenticated against ``key``)."""
        return self.sealer.open(key, self.inner.get(self.stored_key(key)))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Plaintext ``[offset, offset + length)``: the header, then only the segments it spans."""
        stored = self.stored_key(key)
        header = self._header(stored)
        first, last, start, size = self.sealer.segment_span(header, key, offset, length)
        if last < first:
            return b""
        sealed = self.inner.get_range(stored, start, size)
        return self.sealer.open_range(key, header, sealed, first, last, offset, length)

    def exists(self, key: str) -> bool:
        """Whether the sealed object is stored."""
        return self.inner.exists(self.stored_key(key))

    def list(self, prefix: str) -> Iterator[str]:
        """Logical keys under ``prefix`` (names decrypted; foreign objects skipped)."""
        stored_prefix = self._listed(prefix)
        for stored in self.inner.list(stored_prefix):
            key = self.logical_key(stored)
            if key is not None and key.startswith(prefix):
                yield key

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        """:meth:`list` with the stored (sealed) sizes and times."""
        stored_prefix = self._listed(prefix)
        for info in self.inner.list_info(stored_prefix):
            key = self.logical_key(info.key)
            if key is not None and key.startswith(prefix):
                yield ObjectInfo(key, info.size, info.mtime)

    def delete(self, key: str) -> None:
        """Delete the sealed object."""
        stored = self.stored_key(key)
        self._forget(stored)
        self.inner.delete(stored)

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete many sealed objects."""
        stored = [self.stored_key(k) for k in keys]
        for s in stored:
            self._forget(s)
        self.inner.delete_many(stored)

    def mtime(self, key: str) -> float:
        """The sealed object's time."""
        return self.inner.mtime(self.stored_key(key))

    # -- object locks: the lock sits on the sealed object --------------------------------------

    def put_locked(self, key: str, data: bytes, retention: Retention) -> bool:
        """Seal and store locked."""
        stored = self.stored_key(key)
        self._forget(stored)
        return self.inner.put_locked(stored, self.sealer.seal(key, data), retention)

    def lock_of(self, key: str) -> Retention | None:
        """The sealed object's lock."""
        return self.inner.lock_of(self.stored_key(key))

    def extend_lock(self, key: str, retention: Retention) -> Retention:
        """Extend the sealed object's lock."""
        return self.inner.extend_lock(self.stored_key(key), retention)

    def delete_unlocked(self, keys: Iterable[str]) -> builtins.list[str]:
        """Delete sealed objects; the logical keys of those a lock keeps."""
        logical = {self.stored_key(k): k for k in keys}
        for s in logical:
            self._forget(s)
        return [logical.get(s, s) for s in self.inner.delete_unlocked(list(logical))]

    # -- envelope headers --------------------------------------------------------------------

    def _header(self, stored: str) -> bytes:
        with self._headers_lock:
            header = self._headers.get(stored)
            if header is not None:
                self._headers.move_to_end(stored)
                return header
        header = self.inner.get_range(stored, 0, ENVELOPE_HEADER.size)
        if not header:
            raise ObjectMissing(stored)
        with self._headers_lock:
            self._headers[stored] = header
            if len(self._headers) > _HEADER_CACHE:
                self._headers.popitem(last=False)
        return header

    def _forget(self, stored: str) -> None:
        with self._headers_lock:
            self._headers.pop(stored, None)
