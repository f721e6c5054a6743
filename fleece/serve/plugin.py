"""nbdkit Python plugin: one disk of a restore point as a read-only NBD export.

Run by ``fleece serve`` as ``nbdkit … python …/plugin.py repo=URL vm=VM
point=ID [drive=NAME] [cache=BYTES] [readahead=N]``. nbdkit embeds the
system's Python, whose ``dist-packages`` hold old copies of libraries fleece
uses (docs/design.md §6), so before anything else is imported this file puts
fleece's own package root and environment first on ``sys.path``: the
entries named by ``FLEECE_SYS_PATH`` (set by ``fleece serve``), else a
``.venv`` beside the package root of a source checkout.
"""

import os
import sys


def _put_fleece_first_on_path() -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    extra = [p for p in os.environ.get("FLEECE_SYS_PATH", "").split(os.pathsep) if p]
    if not extra:
        venv = os.path.join(root, ".venv", "lib",
                            f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
        extra = [venv] if os.path.isdir(venv) else []
    for path in reversed([root, *extra]):
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
    import site

    for path in extra:
        # .pth files (editable installs, namespace packages); the directory
        # itself is already first, so addsitedir does not append it again.
        site.addsitedir(path)


_put_fleece_first_on_path()

import errno  # noqa: E402
from typing import Any  # noqa: E402

import nbdkit  # noqa: E402

from fleece.errors import FleeceError  # noqa: E402
from fleece.repo.backends.ratelimit import limit_backend  # noqa: E402
from fleece.repo.backends.url import open_backend  # noqa: E402
from fleece.repo.repository import Repository  # noqa: E402
from fleece.restore.image import DiskImage  # noqa: E402
from fleece.serve.cache import DEFAULT_CACHE_BYTES, DEFAULT_READAHEAD, CachedDisk  # noqa: E402

API_VERSION = 2
MAX_REQUEST = 32 << 20

_settings: dict[str, str] = {}
_disk: CachedDisk | None = None


def config(key: str, value: str) -> None:
    """Collect ``key=value`` parameters."""
    if key not in ("repo", "vm", "point", "drive", "cache", "readahead", "limit_download",
                   "passphrase_fd"):
        raise ValueError(f"unknown parameter {key!r}")
    _settings[key] = value


def config_complete() -> None:
    """Open the repository, the point and its index once, shared by every connection."""
    global _disk
    for key in ("repo", "vm", "point"):
        if key not in _settings:
            raise ValueError(f"missing parameter {key}=")
    try:
        secret = _read_passphrase(int(_settings["passphrase_fd"])) if "passphrase_fd" in _settings else None
        passphrase = None if secret is None else (lambda: secret)
        limit = _settings.get("limit_download")
        store = limit_backend(open_backend(_settings["repo"]), None, float(limit) if limit else None)
        repo = Repository.open(store, passphrase)
        point = repo.load_point(_settings["vm"], _settings["point"])
        image = DiskImage(repo, point, _settings.get("drive"))
    except FleeceError as exc:
        raise RuntimeError(f"fleece: {exc}") from None
    _disk = CachedDisk(
        image,
        cache_bytes=int(_settings.get("cache", DEFAULT_CACHE_BYTES)),
        readahead=int(_settings.get("readahead", DEFAULT_READAHEAD)),
    )


def _read_passphrase(fd: int) -> bytes:
    """The passphrase ``fleece serve`` wrote into the pipe nbdkit inherited (then closed)."""
    chunks = []
    try:
        while block := os.read(fd, 4096):
            chunks.append(block)
    finally:
        os.close(fd)
    return b"".join(chunks)


def cleanup() -> None:
    """Stop read-ahead threads when nbdkit exits."""
    if _disk is not None:
        _disk.close()


def thread_model() -> int:
    """Requests run in parallel: fetches and decoding release the GIL."""
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def open(readonly: bool) -> CachedDisk:  # the name nbdkit looks up, shadowing the builtin
    """Every connection shares the one cached disk."""
    assert _disk is not None
    return _disk


def get_size(h: CachedDisk) -> int:
    """The disk's virtual size."""
    return h.size


def block_size(h: CachedDisk) -> tuple[int, int, int]:
    """Any alignment works; whole chunks are cheapest."""
    return 1, min(h.chunk_size, MAX_REQUEST), MAX_REQUEST


def can_write(h: CachedDisk) -> bool:
    """Restore points are immutable."""
    return False


def can_multi_conn(h: CachedDisk) -> bool:
    """Read-only data is consistent across connections."""
    return True


def can_extents(h: CachedDisk) -> bool:
    """Zero chunks are reported as holes."""
    return True


def can_cache(h: CachedDisk) -> int:
    """NBD_CMD_CACHE prefetches chunks into the cache."""
    return int(nbdkit.CACHE_NATIVE)


def is_rotational(h: CachedDisk) -> bool:
    """Random access costs one fetch, like an SSD."""
    return False


def pread(h: CachedDisk, buf: bytearray, offset: int, flags: int) -> None:
    """Fill ``buf`` from the restore point; a damaged chunk is an I/O error."""
    try:
        h.read_into(buf, offset)
    except FleeceError as exc:
        nbdkit.set_error(errno.EIO)
        raise RuntimeError(f"fleece: {exc}") from None


def cache(h: CachedDisk, count: int, offset: int, flags: int) -> None:
    """Fetch the chunks under ``[offset, offset + count)`` into the cache."""
    end = min(offset + count, h.size)
    for start, length, hole in h.extents(offset, end - offset):
        if not hole:
            for i in range(start // h.chunk_size, (start + length - 1) // h.chunk_size + 1):
                h.chunk(i)


def extents(h: CachedDisk, count: int, offset: int, flags: int) -> list[tuple[int, int, Any]]:
    """Zero chunks as holes that read as zeroes, stored chunks as data."""
    hole = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
    limit = 1 if flags & nbdkit.FLAG_REQ_ONE else 1024
    return [(start, length, hole if is_hole else 0)
            for start, length, is_hole in h.extents(offset, count, limit)]
