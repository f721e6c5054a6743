"""The backup data path for one disk: read → hash → dedup → compress → store → trim.

Threads, because every stage is a blocking C call that releases the GIL
(libnbd, hashlib, zstd, file and socket writes):

* reader threads, one NBD connection each, take the next chunk of the plan,
  read it, test it for zeroes, hash it, skip it if an index already names
  it, and compress the rest (compute stays with the read so a chunk crosses
  no queue until it is small);
* storer threads take encoded chunks from a bounded queue, ask the
  repository whether it holds the chunk already (on S3 a round trip, which
  must not stall the readers), store it if not, then trim it from the
  snapshot when that is safe.

Memory is bounded by (readers + queue depth + storers) chunks, whatever the
disk size. The chunk index is filled in place: a chunk's digest is recorded
only once its object is stored (or known to be).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fleece.codec import digest_function, encode_chunk, is_zero
from fleece.errors import ExportError
from fleece.fleecing.transport import ClientTls
from fleece.reader import ChunkPlan, connect, disconnect, pread_chunk
from fleece.repo.index import ChunkIndex
from fleece.repo.repository import Repository

log = logging.getLogger(__name__)

_DONE = object()


@dataclass
class DiskStats:
    """What one disk's backup did; the keys of ``--json``'s per-disk entry and more."""

    bytes_read: int = 0
    bytes_stored: int = 0
    chunks_new: int = 0
    chunks_reused: int = 0
    chunks_zero: int = 0
    chunks_unchanged: int = 0
    bytes_trimmed: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        """Add to counters from any thread."""
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, Any]:
        """Counters for the restore point and ``--json``."""
        return {
            "bytes_read": self.bytes_read,
            "bytes_stored": self.bytes_stored,
            "chunks_new": self.chunks_new,
            "chunks_reused": self.chunks_reused,
            "chunks_zero": self.chunks_zero,
            "chunks_unchanged": self.chunks_unchanged,
            "bytes_trimmed": self.bytes_trimmed,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class PipelineSettings:
    """How many threads and how much in flight."""

    readers: int = 4
    storers: int = 4
    queue_depth: int = 4
    compression_level: int | None = 3
    trim_alignment: int | None = None
    """Trim each stored chunk from the snapshot when set (writable export with discard)."""
    tls: ClientTls | None = None
    """Client credentials for an ``nbds://`` export on another host."""


class _Failed(Exception):
    """Another thread failed; this one stops."""


class DiskBackup:
    """Back up one exported disk into ``index`` according to ``plan``."""

    def __init__(
        self,
        repo: Repository,
        uri: str,
        plan: ChunkPlan,
        index: ChunkIndex,
        known: set[bytes],
        settings: PipelineSettings,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.repo = repo
        self.uri = uri
        self.plan = plan
        self.index = index
        self.known = known
        """Digests already stored (parent and latest indexes): no lookup, no upload."""
        self.settings = settings
        self.progress = progress or (lambda n: None)
        self.stats = DiskStats()
        self._digest = digest_function(repo.config.hash)
        self._next = plan.to_read()
        self._next_lock = threading.Lock()
        self._pending: set[bytes] = set()  # digests some storer is writing now
        self._known_lock = threading.Lock()
        self._store_q: queue.Queue[Any] = queue.Queue(maxsize=settings.queue_depth)
        self._failed = threading.Event()
        self._error: BaseException | None = None
        # One trim connection per thread that trims: a shared handle behind a
        # lock made every storer wait for the others' round trips.
        self._trim_local = threading.local()
        self._trim_handles: list[Any] = []
        self._trim_lock = threading.Lock()

    # -- driver ------------------------------------------------------------------------
    def run(self) -> DiskStats:
        """Do the whole disk; raise the first error any thread met."""
        start = time.monotonic()
        for i in self.plan.zero():
            self.index.set(i, None)
            self.stats.add(chunks_zero=1)
        self.stats.chunks_unchanged = self.plan.read.count(0)
        readers = [
            threading.Thread(target=self._guard, args=(self._read_loop,), name=f"fleece-read-{n}")
            for n in range(self.settings.readers)
        ]
        storers = [
            threading.Thread(target=self._guard, args=(self._store_loop,), name=f"fleece-store-{n}")
            for n in range(self.settings.storers)
        ]
        try:
            for t in readers + storers:
                t.start()
            for t in readers:
                t.join()
            for _ in storers:
                self._put(_DONE)
            for t in storers:
                t.join()
        finally:
            for h in self._trim_handles:
                disconnect(h)
        self.stats.seconds = time.monotonic() - start
        if self._error is not None:
            # Chunks staged but never flushed are invisible temporary files: drop them.
            discard = getattr(self.repo, "discard_staged", None)
            if discard is not None:
                discard()
            raise self._error
        flush = getattr(self.repo, "flush", None)
        if flush is not None:
            flush()  # every chunk the index will name is durable when run() returns
        return self.stats

    def _guard(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except _Failed:
            pass
        except BaseException as exc:  # handed to the driver thread, which re-raises it
            if self._error is None:
                self._error = exc
            self._failed.set()

    def _put(self, item: Any) -> None:
        while True:
            if self._failed.is_set() and item is not _DONE:
                raise _Failed
            try:
                self._store_q.put(item, timeout=0.2)
                return
            except queue.Full:
                if self._failed.is_set():
                    if item is _DONE:
                        return
                    raise _Failed from None

    def _chunks(self) -> Iterator[int]:
        while not self._failed.is_set():
            with self._next_lock:
                i = next(self._next, None)
            if i is None:
                return
            yield i

    # -- stages ------------------------------------------------------------------------
    def _read_loop(self) -> None:
        h = connect(self.uri, tls=self.settings.tls)
        try:
            for i in self._chunks():
                offset, length = self.plan.chunk_range(i)
                try:
                    data = pread_chunk(h, offset, length)
                except Exception as exc:
                    raise ExportError(
                        f"reading the snapshot at offset {offset} failed: {exc} "
                        "(a full reverse delta breaks the snapshot)"
                    ) from None
                self.stats.add(bytes_read=length)
                self._process(i, offset, data)
                self.progress(length)
        finally:
            disconnect(h)

    def _process(self, i: int, offset: int, data: bytes) -> None:
        if is_zero(data):
            self.index.set(i, None)
            self.stats.add(chunks_zero=1)
            self._trim(offset, len(data))
            return
        digest = self._digest(data)
        with self._known_lock:
            seen = digest in self.known or digest in self._pending
            if not seen:
                self._pending.add(digest)
        if seen:
            self.index.set(i, digest)
            self.stats.add(chunks_reused=1)
            self._trim(offset, len(data))
            return
        blob = encode_chunk(data, self.settings.compression_level)
        del data
        self._put((i, offset, digest, blob))

    def _store_loop(self) -> None:
        while True:
            try:
                item = self._store_q.get(timeout=0.2)
            except queue.Empty:
                if self._failed.is_set():
                    return
                continue
            if item is _DONE:
                return
            if self._failed.is_set():
                continue  # drop: the backup has failed; keep draining so readers never block
            i, offset, digest, blob = item
            # put_chunk probes before it writes; that runs here, `storers` at a
            # time, not in the readers: on S3 it is a round trip, and readers
            # waiting on it starve the pipeline.
            present = not self.repo.put_chunk(digest, blob)
            with self._known_lock:
                self._pending.discard(digest)
                self.known.add(digest)
            self.index.set(i, digest)
            if present:
                self.stats.add(chunks_reused=1)
            else:
                self.stats.add(chunks_new=1, bytes_stored=len(blob))
            self._trim(offset, self.plan.chunk_range(i)[1])

    def _trim(self, offset: int, length: int) -> None:
        """Discard a chunk we have stored from the snapshot, if safe.

        QEMU < 9.0 aborts on an unaligned trim of snapshot-access (DESIGN.md):
        only whole aligned chunks, never the disk's unaligned tail.
        """
        align = self.settings.trim_alignment
        if not align or offset % align or length % align:
            return
        try:
            h = getattr(self._trim_local, "handle", None)
            if h is None:
                h = self._trim_local.handle = connect(self.uri, tls=self.settings.tls)
                with self._trim_lock:
                    self._trim_handles.append(h)
            h.trim(length, offset)
        except Exception as exc:
            # Trim only keeps the reverse delta small; losing one is harmless.
            log.debug("trim at %d failed: %s", offset, exc)
            return
        self.stats.add(bytes_trimmed=length)

