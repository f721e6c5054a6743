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
from collections.abc import Callable

from fleece.errors import BadInput
from fleece.repo.backends.base import Backend, ForwardingBackend, Retention

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


class RateLimitedBackend(ForwardingBackend):
    """``inner`` with object bodies paced by an upload and a download :class:`TokenBucket`.

    Everything else is forwarded (:class:`ForwardingBackend`): listings,
    HEADs and deletes are not counted.
    """

    def __init__(self, inner: Backend, upload: TokenBucket | None = None,
                 download: TokenBucket | None = None) -> None:
        """Wrap ``inner``; a None bucket leaves that direction unlimited."""
        super().__init__(inner)
        self.upload = upload
        self.download = download

    def _up(self, n: int) -> None:
        if self.upload is not None:
            self.upload.take(n)

    def _down(self, n: int) -> None:
        if self.download is not None:
            self.download.take(n)

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Wait for the upload budget, then ``inner.put``."""
        self._up(len(data))
        return self.inner.put(key, data, if_absent=if_absent)

    def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        """Wait for the upload budget, then ``inner.replace_if``."""
        self._up(len(data))
        return self.inner.replace_if(key, data, expected)

    def put_locked(self, key: str, data: bytes, retention: Retention) -> bool:
        """Wait for the upload budget, then ``inner.put_locked``."""
        self._up(len(data))
        return self.inner.put_locked(key, data, retention)

    def stage(self, key: str, data: bytes | memoryview) -> bool:
        """Wait for the upload budget, then ``inner.stage``."""
        self._up(len(data))
        return self.inner.stage(key, data)

    def get(self, key: str) -> bytes:
        """``inner.get``, then charge the download budget (the next request waits)."""
        data = self.inner.get(key)
        self._down(len(data))
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``inner.get_range``, then charge the download budget."""
        data = self.inner.get_range(key, offset, length)
        self._down(len(data))
        return data


def limit_backend(backend: Backend, upload: float | None, download: float | None,
                  chunk_size: int = 4 * MiB) -> Backend:
    """``backend`` paced to ``upload``/``download`` bytes per second; itself when both are None."""
    if upload is None and download is None:
        return backend
    return RateLimitedBackend(backend, bucket_for(upload, chunk_size), bucket_for(download, chunk_size))
