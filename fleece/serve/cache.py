"""A restore point's disk as a block device: lazy chunk fetches, an LRU, read-ahead.

NBD clients read in small pieces (QEMU: 64 KiB to 2 MiB; nbdcopy: 256 KiB)
while the repository stores whole chunks of up to 16 MiB, so every chunk a
client touches is decoded once and kept in a bounded LRU for the reads that
follow. When a client reads chunk ``i`` right after chunk ``i - 1`` the
access looks sequential and the next few chunks are fetched in the
background, so the repository's latency (S3: tens of ms) overlaps with the
client's reads. Concurrent requests for one chunk share a single fetch.
All-zero chunks are never fetched or cached: they read as zeroes and are
reported as holes.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor

from fleece.restore.image import DiskImage

DEFAULT_CACHE_BYTES = 256 << 20
DEFAULT_READAHEAD = 4
"""Chunks fetched ahead of a sequential reader."""
DEFAULT_FETCHERS = 4
"""Threads doing read-ahead (clients' own misses are fetched on their threads)."""


class CachedDisk:
    """Thread-safe random reads of one :class:`DiskImage` through a chunk cache."""

    def __init__(
        self,
        image: DiskImage,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        readahead: int = DEFAULT_READAHEAD,
        fetchers: int = DEFAULT_FETCHERS,
    ) -> None:
        self.image = image
        self.size = image.size
        self.chunk_size = image.chunk_size
        self.readahead = max(0, readahead)
        # Never so small that read-ahead evicts what it fetched before use.
        self.capacity = max(cache_bytes // self.chunk_size, 2 * self.readahead + fetchers + 2)
        self._fetchers = max(1, fetchers)
        self._lru: OrderedDict[int, bytes] = OrderedDict()
        self._loading: dict[int, Future[bytes]] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._zeros = memoryview(bytes(self.chunk_size))
        self.fetches = 0
        """Chunks fetched from the repository so far (for tests and stats)."""

    def close(self) -> None:
        """Stop the read-ahead threads (waits for fetches already running)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            # Read-aheads cancelled before they started would leave waiters hanging.
            orphans, self._loading = self._loading, {}
        for future in orphans.values():
            if not future.done():
                future.set_exception(RuntimeError("the served disk was closed"))

    def is_zero(self, i: int) -> bool:
        """Whether chunk ``i`` reads as zeroes with no object read (a hole): the index's one answer."""
        return self.image.index.is_zero(i)

    # -- chunks -------------------------------------------------------------

    def chunk(self, i: int) -> bytes:
        """The plaintext of stored chunk ``i``, from the cache or fetched now."""
        with self._lock:
            data = self._lru.get(i)
            future = None
            mine = False
            if data is not None:
                self._lru.move_to_end(i)
            else:
                future = self._loading.get(i)
                if future is None:
                    future = self._loading[i] = Future()
                    mine = True
            sequential = i == 0 or (i - 1) in self._lru
        if data is None:
            assert future is not None
            if mine:
                self._fetch(i, future)
            data = future.result()
        if sequential and self.readahead:
            self._read_ahead(i)
        return data

    def _fetch(self, i: int, future: Future[bytes]) -> None:
        """Fetch chunk ``i`` into the cache and resolve ``future`` (never raises)."""
        try:
            data = self.image.read_chunk(i)
        except BaseException as exc:
            with self._lock:
                self._loading.pop(i, None)
            with contextlib.suppress(InvalidStateError):  # close() got there first
                future.set_exception(exc)
            return
        with self._lock:
            self.fetches += 1
            self._loading.pop(i, None)
            self._lru[i] = data
            while len(self._lru) > self.capacity:
                self._lru.popitem(last=False)
        with contextlib.suppress(InvalidStateError):
            future.set_result(data)

    def _read_ahead(self, i: int) -> None:
        last = min(i + self.readahead, self.image.index.n_chunks - 1)
        with self._lock:
            if self._pool is None:
                # Started lazily: nbdkit may fork after loading the plugin,
                # and threads do not survive a fork.
                self._pool = ThreadPoolExecutor(self._fetchers, thread_name_prefix="fleece-ahead")
            for j in range(i + 1, last + 1):
                if j in self._lru or j in self._loading or self.is_zero(j):
                    continue
                future: Future[bytes] = Future()
                self._loading[j] = future
                self._pool.submit(self._fetch, j, future)

    # -- block device -------------------------------------------------------

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        """Fill ``buf`` with the disk's bytes at ``offset`` (the range must lie within the disk)."""
        out = memoryview(buf).cast("B")
        if offset < 0 or offset + len(out) > self.size:
            raise ValueError(f"read of {len(out)} bytes at {offset} is outside the {self.size}-byte disk")
        pos = 0
        while pos < len(out):
            off = offset + pos
            i, within = divmod(off, self.chunk_size)
            n = min(len(out) - pos, self.image.index.chunk_length(i) - within)
            if self.is_zero(i):
                out[pos : pos + n] = self._zeros[:n]
            else:
                out[pos : pos + n] = memoryview(self.chunk(i))[within : within + n]
            pos += n

    def extents(self, offset: int, length: int, max_extents: int = 1024
                ) -> list[tuple[int, int, bool]]:
        """``(offset, length, is_hole)`` runs covering ``[offset, offset + length)``.

        Neighbouring chunks of the same kind are merged; at most
        ``max_extents`` runs are returned (the client asks again for the rest).
        """
        end = min(offset + length, self.size)
        runs: list[tuple[int, int, bool]] = []
        pos = offset
        while pos < end and len(runs) < max_extents:
            i = pos // self.chunk_size
            hole = self.is_zero(i)
            run_end = min((i + 1) * self.chunk_size, self.size)
            while run_end < end and self.is_zero(run_end // self.chunk_size) == hole:
                run_end = min(run_end + self.chunk_size, self.size)
            run_end = min(run_end, end)
            runs.append((pos, run_end - pos, hole))
            pos = run_end
        return runs
