"""Bandwidth limits as a backend wrapper: ``--limit-upload`` and ``--limit-download``.

:class:`RateLimitedBackend` wraps any backend and paces the bytes of object
bodies through one :class:`TokenBucket` per direction, shared by every
thread that uses the backend, so 16 storers together stay under the limit.
Uploads wait *before* they are sent; downloads are charged when their body
has arrived (its size is not known before), so the next request waits. Keys,
listings and HEADs are not counted: they are a rounding error beside chunks.

The bucket starts empty and holds at most :data:`BURST_CHUNKS` chunks' worth
of tokens, so an idle spell buys a burst of a few chunks, never more; over a
minute the average is the rate.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from fleece.errors import BadInput
from fleece.repo.backend import Backend, ObjectInfo

MiB = 1 << 20
BURST_CHUNKS = 2
"""The most chunks' worth of bytes that may go out at once after an idle spell."""
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?(?:/S)?\s*$")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_rate(text: str, option: str = "rate") -> float:
    """``20M`` → 20 MiB/s in bytes per second (``K``, ``M``, ``G``; ``20MiB/s`` too).

    A plain number is bytes per second. ``BadInput`` for anything else or for
    a rate below 1 KiB/s (surely a typo, and it would take days).
    """
    m = _RATE_RE.match(str(text).upper())
    if not m:
        raise BadInput(f"{option}: not a rate: {text!r} (examples: 20M = 20 MiB/s, 512K, 1G)")
    rate = float(m.group(1)) * _UNITS[m.group(2)]
    if rate < 1024:
        raise BadInput(f"{option}: {text!r} is below 1 KiB/s")
    return rate


class TokenBucket:
    """A byte budget refilled at ``rate`` bytes/s, shared between threads.

    :meth:`take` lets the balance go negative and sleeps until it is paid
    back, so a request larger than the bucket (a chunk) still passes, and
    callers are served in the order they asked.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """``rate`` bytes per second; at most ``burst`` bytes saved up while idle."""
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = 0.0  # start empty: no free burst at the start of a run
        self._last = clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> float:
        """Account for ``n`` bytes, sleeping as long as the budget requires; returns the wait."""
        if n <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


def bucket_for(rate: float | None, chunk_size: int = 4 * MiB) -> TokenBucket | None:
    """The bucket for a ``--limit-*`` rate (None: unlimited), bursts of a few chunks at most."""
    if rate is None:
        return None
    return TokenBucket(rate, BURST_CHUNKS * chunk_size)


class RateLimitedBackend:
    """``inner`` with object bodies paced by an upload and a download :class:`TokenBucket`.

    Every method of the backend interface is forwarded explicitly. The
    optional ones (``stage``, ``flush``, ``list_info``, ``delete_many``…) exist
    here only when ``inner`` has them: callers probe for them with
    ``getattr(backend, name, None)``, and a wrapper must not make a backend
    look as if it could do what it cannot.
    """

    def __init__(self, inner: Backend, upload: TokenBucket | None = None,
                 download: TokenBucket | None = None) -> None:
        """Wrap ``inner``; a None bucket leaves that direction unlimited."""
        self.inner = inner
        self.upload = upload
        self.download = download
        self.url = inner.url

    def _up(self, n: int) -> None:
        if self.upload is not None:
            self.upload.take(n)

    def _down(self, n: int) -> None:
        if self.download is not None:
            self.download.take(n)

    # -- the Backend protocol ------------------------------------------------------
    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Wait for the upload budget, then ``inner.put``."""
        self._up(len(data))
        return self.inner.put(key, data, if_absent=if_absent)

    def get(self, key: str) -> bytes:
        """``inner.get``, then charge the download budget (the next request waits)."""
        data = self.inner.get(key)
        self._down(len(data))
        return data

    def exists(self, key: str) -> bool:
        """Forwarded; not counted."""
        return self.inner.exists(key)

    def list(self, prefix: str) -> Iterator[str]:
        """Forwarded; not counted."""
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        """Forwarded; not counted."""
        self.inner.delete(key)

    def mtime(self, key: str) -> float:
        """Forwarded; not counted."""
        return self.inner.mtime(key)

    # -- optional extensions: present exactly when the inner backend has them --------
    @property
    def stage(self) -> Callable[[str, bytes], None]:
        """``inner.stage`` (file backend: write a chunk, publish at flush), paced as an upload."""
        inner_stage: Callable[[str, bytes], None] = self.inner.stage  # type: ignore[attr-defined]

        def stage(key: str, data: bytes) -> None:
            self._up(len(data))
            inner_stage(key, data)
        return stage

    @property
    def flush(self) -> Callable[[], None]:
        """``inner.flush``."""
        return self.inner.flush  # type: ignore[attr-defined,no-any-return]

    @property
    def discard_staged(self) -> Callable[[], None]:
        """``inner.discard_staged``."""
        return self.inner.discard_staged  # type: ignore[attr-defined,no-any-return]

    @property
    def stale_temporaries(self) -> Callable[[float], Iterator[tuple[Path, int]]]:
        """``inner.stale_temporaries`` (file backend, for gc)."""
        return self.inner.stale_temporaries  # type: ignore[attr-defined,no-any-return]

    @property
    def list_info(self) -> Callable[[str], Iterator[ObjectInfo]]:
        """``inner.list_info``; not counted."""
        return self.inner.list_info  # type: ignore[attr-defined,no-any-return]

    @property
    def delete_many(self) -> Callable[[Iterable[str]], None]:
        """``inner.delete_many``; not counted."""
        return self.inner.delete_many  # type: ignore[attr-defined,no-any-return]

    @property
    def reserve_connections(self) -> Callable[[int], None]:
        """``inner.reserve_connections`` (S3: size the connection pool)."""
        return self.inner.reserve_connections  # type: ignore[attr-defined,no-any-return]

    @property
    def preferred_concurrency(self) -> int:
        """``inner.preferred_concurrency`` (S3: 16 uploads in flight)."""
        return int(self.inner.preferred_concurrency)  # type: ignore[attr-defined]

    @property
    def store_check(self) -> object:
        """``inner.store_check`` (S3: what the store check found)."""
        return self.inner.store_check  # type: ignore[attr-defined]


def limit_backend(backend: Backend, upload: float | None, download: float | None,
                  chunk_size: int = 4 * MiB) -> Backend:
    """``backend`` paced to ``upload``/``download`` bytes per second; itself when both are None."""
    if upload is None and download is None:
        return backend
    return RateLimitedBackend(backend, bucket_for(upload, chunk_size), bucket_for(download, chunk_size))
