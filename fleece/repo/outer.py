"""Checking an encrypted repository without its key: is every sealed object whole?

A job on the storage side (or any host without the passphrase) can tell
damaged or truncated objects from whole ones by each sealed object's
trailing sha256 (:func:`fleece.repo.crypto.check_outer`). It proves nothing
about who wrote them — ``verify --deep`` with the key authenticates — but it
finds bit rot and broken uploads without trusting the checker with the data.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fleece.errors import BadInput, RepositoryError
from fleece.repo.backends.base import Backend, ObjectMissing
from fleece.repo.format import keys
from fleece.repo.format.crypto import check_outer
from fleece.repo.repository import read_config

SEALED_KINDS = frozenset(p.rstrip("/") for p in (
    keys.CHUNKS_PREFIX, keys.PACKS_PREFIX, keys.PAGES_PREFIX, keys.INDEXES_PREFIX, keys.POINTS_PREFIX,
    keys.PROTECT_PREFIX, "locks/", keys.LEASES_PREFIX))
"""The objects an encrypted repository seals (``config``, ``keys/`` and the store
check's ``store/`` are in clear)."""


def check_outer_checksums(backend: Backend, workers: int = 8) -> dict[str, Any]:
    """``{"ok", "objects_checked", "bytes_checked", "damaged": [stored keys]}``."""
    config = read_config(backend)
    if config.encryption == "none":
        raise BadInput(f"repository {backend.url} is not encrypted: use 'fleece verify --deep'")
    sealed = [k for k in backend.list("") if k.split("/", 1)[0] in SEALED_KINDS]

    def check(key: str) -> tuple[str, int, bool]:
        try:
            blob = backend.get(key)
        except ObjectMissing:
            return key, 0, True  # deleted meanwhile (gc, prune): not damage
        except RepositoryError:
            return key, 0, False
        return key, len(blob), check_outer(blob)

    with ThreadPoolExecutor(workers, thread_name_prefix="fleece-outer") as pool:
        results = list(pool.map(check, sealed))
    damaged = sorted(k for k, _, ok in results if not ok)
    return {"ok": not damaged, "objects_checked": len(results),
            "bytes_checked": sum(n for _, n, _ in results), "damaged": damaged}
