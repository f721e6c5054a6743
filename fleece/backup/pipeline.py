"""The backup data path for one disk: read → hash → dedup → compress → store → trim.

Each chunk position the plan touches becomes one piece of :class:`Work`:
a *full* chunk (its data extents read, holes left zero) or, in a format-2
repository, a *delta* of the few extents an incremental changed (read only
those; :mod:`fleece.repo.format.delta` says when a position is rewritten whole
instead). Threads, because every stage is a blocking C call that releases
the GIL (libnbd, hashlib, zstd, file and socket writes):

* reader threads, one NBD connection each, take the next piece of work,
  read it, test it for zeroes, hash it, skip it if an index already names
  it, and compress the rest (compute stays with the read so a chunk crosses
  no queue until it is small);
* storer threads take encoded chunks and deltas from a bounded queue; a
  chunk is probed (on S3 a round trip, which must not stall the readers)
  and stored if new, a delta goes into the backup's current pack (stored
  when it fills up); then what was read is trimmed from the snapshot when
  that is safe.

Memory is bounded by (readers + queue depth + storers) chunks plus one
open pack, whatever the disk size: a chunk is read into one of that many
page-aligned *frames*, which leave room for the object header in front, so
a chunk stored plain goes from the frame to the file (``O_DIRECT``) with no
copy, and the frame comes back to the readers once it is stored. The chunk index is filled in place: a
chunk's digest is recorded only once its object is stored (or known to
be), a delta's reference once its pack is.
"""

from __future__ import annotations

import logging
import mmap
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fleece.backup.reader import ChunkPlan, Extent, connect, disconnect, pread_into
from fleece.errors import ExportError
from fleece.fleecing.transport import ClientTls
from fleece.repo.format.codec import HEADER, ZERO_BLOCK, encode_chunk_in_place, is_zero
from fleece.repo.format.defaults import DEFAULT_ZSTD_LEVEL
from fleece.repo.format.delta import (
    MAX_DELTA_FRACTION,
    MAX_DEPTH,
    PackWriter,
    encode_delta,
    encode_delta_body,
)
from fleece.repo.format.index import ChunkIndex
from fleece.repo.repository import Repository
from fleece.testing import Phase, pause_point

log = logging.getLogger(__name__)

FULL = 1
DELTA = 2
TRIMS_IN_FLIGHT = 8
"""Trims each storer leaves unanswered before it waits for one."""
_ZEROS = memoryview(ZERO_BLOCK)


class _ChunkToStore(NamedTuple):
    """A reader's whole chunk, encoded, for a storer to put (reader → storer queue)."""

    i: int
    offset: int
    digest: bytes
    blob: bytes | memoryview
    frame: _Frame | None
    """The frame ``blob`` is a view of (stored plain), given back once stored; else None."""


class _DeltaToStore(NamedTuple):
    """A reader's encoded delta, for a storer to add to the open pack."""

    i: int
    digest: bytes
    blob: bytes
    extents: tuple[Extent, ...]


class _Done:
    """The end of the queue: one per storer."""


_DONE = _Done()
_StoreItem = _ChunkToStore | _DeltaToStore | _Done


class Work(NamedTuple):
    """One chunk position to back up."""

    i: int
    kind: int
    """:data:`FULL` (the whole chunk, as a chunk object) or :data:`DELTA`."""
    reads: tuple[tuple[int, int, int], ...]
    """``(disk offset, length, where in the buffer)`` of each read; holes stay zero."""
    extents: tuple[Extent, ...]
    """A delta's changed extents (disk offsets); empty for a full chunk."""


def plan_work(plan: ChunkPlan, index: ChunkIndex, deltas: bool) -> Iterator[Work]:
    """What to do with each chunk the plan reads, in disk order.

    With ``deltas`` (an incremental into a format-2 repository) a position
    whose dirty extents are few becomes a delta; it is rewritten whole once
    it would carry more than ``MAX_DEPTH`` deltas or its deltas would cover
    more than ``MAX_DELTA_FRACTION`` of it, so reads stay bounded.
    """
    for i in plan.to_read():
        offset, length = plan.chunk_range(i)
        data = plan.data_extents(i)
        if deltas:
            dirty = plan.dirty_extents(i)
            layers = index.deltas_of(i)
            covered = sum(r.covered for r in layers) + sum(n for _, n in dirty)
            if dirty and len(layers) < MAX_DEPTH and covered <= length * MAX_DELTA_FRACTION:
                yield Work(i, DELTA, _reads_within(dirty, data), tuple(dirty))
                continue
        yield Work(i, FULL, tuple((o, n, o - offset) for o, n in data), ())


def _reads_within(dirty: list[Extent], data: list[Extent]) -> tuple[tuple[int, int, int], ...]:
    """The data parts of the dirty extents, placed in the dirty bytes laid end to end."""
    reads: list[tuple[int, int, int]] = []
    pos = 0
    k = 0
    for d_off, d_len in dirty:
        d_end = d_off + d_len
        while k < len(data) and data[k][0] + data[k][1] <= d_off:
            k += 1
        j = k
        while j < len(data) and data[j][0] < d_end:
            a, b = max(data[j][0], d_off), min(data[j][0] + data[j][1], d_end)
            if a < b:
                reads.append((a, b - a, pos + a - d_off))
            j += 1
        pos += d_len
    return tuple(reads)


def planned_bytes(work: Iterator[Work]) -> int:
    """Bytes the work will read from the export."""
    return sum(n for w in work for _, n, _ in w.reads)


@dataclass
class DiskStats:
    """What one disk's backup did; the keys of ``--json``'s per-disk entry and more."""

    bytes_dirty: int = 0
    bytes_read: int = 0
    bytes_stored: int = 0
    objects_written: int = 0
    bytes_metadata: int = 0
    """Of ``bytes_stored``, what the index (and its pages, format 3) took."""
    deltas: int = 0
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
            "bytes_dirty": self.bytes_dirty,
            "bytes_read": self.bytes_read,
            "bytes_stored": self.bytes_stored,
            "objects_written": self.objects_written,
            "bytes_metadata": self.bytes_metadata,
            "deltas": self.deltas,
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
    compression_level: int | None = DEFAULT_ZSTD_LEVEL
    trim_alignment: int | None = None
    """Trim each stored chunk from the snapshot when set (writable export with discard)."""
    tls: ClientTls | None = None
    """Client credentials for an ``nbds://`` export on another host."""
    max_request: int | None = None
    """No read may cross a multiple of this on the disk (QEMU < 8.0, :mod:`fleece.backup.reader`)."""


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
        deltas: bool = False,
    ) -> None:
        """``deltas``: store small changes as deltas (an incremental into format 2)."""
        self.repo = repo
        self.uri = uri
        self.plan = plan
        self.index = index
        self.known = known
        """Digests already stored (parent and latest indexes): no lookup, no upload."""
        self.settings = settings
        self.progress = progress or (lambda n: None)
        self.stats = DiskStats()
        self._digest = repo.digest
        self._chunk_name = repo.chunk_name
        self._next = plan_work(plan, index, deltas)
        self._packs = PackWriter(repo.put_pack)
        self._next_lock = threading.Lock()
        self._pending: set[bytes] = set()  # digests some storer is writing now
        self._known_lock = threading.Lock()
        self._store_q: queue.Queue[_StoreItem] = queue.Queue(maxsize=settings.queue_depth)
        self._failed = threading.Event()
        self._error: BaseException | None = None
        # One trim connection per thread that trims: a shared handle behind a
        # lock made every storer wait for the others' round trips.
        self._local = threading.local()  # each reader thread's delta buffers
        # Chunk frames (header room + chunk_size), handed from reader to storer
        # and back: a chunk is read into one and, stored plain, written from it.
        # Page-aligned (mmap), so the file backend writes them with O_DIRECT as they are.
        self._frames: queue.Queue[_Frame] = queue.Queue()
        self._frames_made = 0
        self._frames_max = settings.readers + settings.queue_depth + settings.storers
        self._frames_lock = threading.Lock()
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
        self.stats.bytes_dirty = self.plan.bytes_dirty
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
                self._drain_trims(h)
                disconnect(h)
        self.stats.seconds = time.monotonic() - start
        if self._error is not None:
            # Chunks staged but never flushed are invisible temporary files: drop them.
            self.repo.discard_staged()
            raise self._error
        # The last pack; then every delta has a name the index can hold.
        for i, ref in self._packs.close():
            self.index.add_delta(i, ref)
        self.repo.flush()  # every chunk the index will name is durable when run() returns
        self.stats.bytes_stored += self._packs.bytes_written
        self.stats.objects_written = self.stats.chunks_new + self._packs.packs_written
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

    def _put(self, item: _StoreItem) -> None:
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

    def _work(self) -> Iterator[Work]:
        while not self._failed.is_set():
            with self._next_lock:
                w = next(self._next, None)
            if w is None:
                return
            yield w

    # -- stages ------------------------------------------------------------------------
    def _read_loop(self) -> None:
        h = connect(self.uri, tls=self.settings.tls)
        # This thread's read buffers, by size (the chunk size, the disk's short
        # tail, a delta's dirty bytes): reused, so no chunk costs an allocation.
        self._local.buffers = {}
        try:
            for w in self._work():
                offset, length = self.plan.chunk_range(w.i)
                if w.kind == FULL:
                    frame = self._frame()
                    self._read(h, w, length, offset, frame)
                    self._process(w, offset, length, frame)
                else:
                    self._delta(h, w, offset)
                self.progress(sum(n for _, n, _ in w.reads))
        finally:
            disconnect(h)

    def _frame(self) -> _Frame:
        """A free chunk frame; made while fewer than the bound exist, else waited for."""
        while True:
            try:
                return self._frames.get_nowait()
            except queue.Empty:
                pass
            with self._frames_lock:
                if self._frames_made < self._frames_max:
                    self._frames_made += 1
                    return _Frame(self.plan.chunk_size)
            try:
                return self._frames.get(timeout=0.2)
            except queue.Empty:
                if self._failed.is_set():
                    raise _Failed from None

    def _read(self, h: Any, w: Work, size: int, offset: int,
              frame: _Frame | None = None) -> memoryview:
        """The ``size`` bytes ``w`` reads, zero where no read is.

        Laid into ``frame`` after its header room, or else into this
        thread's buffer of ``size``, which its next read reuses: whatever is
        kept must be copied.
        """
        if frame is not None:
            view = frame.prepare(w.reads, size)
        else:
            buffers: dict[int, bytearray] = self._local.buffers
            buf = buffers.get(size)
            if buf is None:
                if len(buffers) >= 4:
                    buffers.clear()  # delta sizes vary: keep only a few
                buf = buffers[size] = bytearray(size)
            view = memoryview(buf)
            for start, end in _holes(w.reads, size):
                _fill_zero(view, start, end)  # a hole: zeroes without crossing the socket
        try:
            pread_into(h, view, w.reads, self.settings.max_request)
        except Exception as exc:
            raise ExportError(
                f"reading the snapshot at offset {offset} failed: {exc} "
                "(a full reverse delta breaks the snapshot)"
            ) from None
        self.stats.add(bytes_read=sum(n for _, n, _ in w.reads))
        return view

    def _delta(self, h: Any, w: Work, offset: int) -> None:
        """Read a delta's extents, encode it and queue it for the pack."""
        covered = sum(n for _, n in w.extents)
        data = self._read(h, w, covered, offset)
        body = encode_delta_body([(o - offset, n) for o, n in w.extents], data)
        del data
        digest = self._digest(body)
        blob = encode_delta(body, self.settings.compression_level)
        self._put(_DeltaToStore(w.i, digest, blob, w.extents))

    def _process(self, w: Work, offset: int, length: int, frame: _Frame) -> None:
        """Hash, dedup and encode the chunk read into ``frame``; queue it, or give the frame back."""
        i = w.i
        data = memoryview(frame.buf)[HEADER.size : HEADER.size + length]
        # The holes were filled with zeroes here: only what was read can be non-zero.
        if all(is_zero(data[at : at + n]) for _, n, at in w.reads):
            self._frames.put(frame)
            self.index.set(i, None)
            self.stats.add(chunks_zero=1)
            self._trim(offset, length)
            return
        digest = self._chunk_name(data)
        with self._known_lock:
            seen = digest in self.known or digest in self._pending
            if not seen:
                self._pending.add(digest)
        if seen:
            self._frames.put(frame)
            self.index.set(i, digest)
            self.stats.add(chunks_reused=1)
            self._trim(offset, length)
            return
        del data
        blob = encode_chunk_in_place(frame.buf, length, self.settings.compression_level)
        if isinstance(blob, memoryview):
            self._put(_ChunkToStore(i, offset, digest, blob, frame))  # the storer gives the frame back
        else:
            self._frames.put(frame)  # compressed: the frame is free again
            self._put(_ChunkToStore(i, offset, digest, blob, None))

    def _store_loop(self) -> None:
        while True:
            try:
                item = self._store_q.get(timeout=0.2)
            except queue.Empty:
                if self._failed.is_set():
                    return
                continue
            if isinstance(item, _Done):
                return
            if self._failed.is_set():
                continue  # drop: the backup has failed; keep draining so readers never block
            if isinstance(item, _DeltaToStore):
                self._packs.add(item.i, item.blob, sum(n for _, n in item.extents), item.digest)
                pause_point(Phase.CHUNK_STORED)
                self.stats.add(deltas=1)
                for off, n in item.extents:
                    self._trim(off, n)
                continue
            i, offset, digest, blob, frame = item
            # put_chunk probes before it writes; that runs here, `storers` at a
            # time, not in the readers: on S3 it is a round trip, and readers
            # waiting on it starve the pipeline.
            present = not self.repo.put_chunk(digest, blob)
            size = len(blob)
            if frame is not None:
                del blob  # a view of the frame: stored, so the frame is free again
                self._frames.put(frame)
            with self._known_lock:
                self._pending.discard(digest)
                self.known.add(digest)
            self.index.set(i, digest)
            if present:
                self.stats.add(chunks_reused=1)
            else:
                self.stats.add(chunks_new=1, bytes_stored=size)
            self._trim(offset, self.plan.chunk_range(i)[1])

    def _trim(self, offset: int, length: int) -> None:
        """Discard what we have stored from the snapshot, if safe.

        QEMU < 9.0 aborts on an unaligned trim of snapshot-access
        (docs/design.md): only the aligned part of the range, rounded
        inward, so never the disk's unaligned tail.
        """
        align = self.settings.trim_alignment
        if not align:
            return
        start = -(-offset // align) * align
        end = (offset + length) // align * align
        if end <= start:
            return
        offset, length = start, end - start
        try:
            h = getattr(self._trim_local, "handle", None)
            if h is None:
                h = self._trim_local.handle = connect(self.uri, tls=self.settings.tls)
                with self._trim_lock:
                    self._trim_handles.append(h)
            # Not waited for: a storer does not spend a round trip per chunk
            # on it. A few stay in flight; the rest are reaped as they answer.
            h.aio_trim(length, offset, completion=self._trimmed(offset, length))
            while h.aio_in_flight() >= TRIMS_IN_FLIGHT:
                h.poll(-1)
        except Exception as exc:
            # Trim only keeps the reverse delta small; losing one is harmless.
            log.debug("trim at %d failed: %s", offset, exc)

    def _trimmed(self, offset: int, length: int) -> Callable[[Any], int]:
        """The completion of one trim: count it, or say why it failed (harmless)."""

        def done(error: Any) -> int:
            err = getattr(error, "value", error)  # libnbd passes the errno as a ctypes int
            if err:
                log.debug("trim at %d failed: errno %s", offset, err)
            else:
                self.stats.add(bytes_trimmed=length)
            return 1  # retire the command

        return done

    @staticmethod
    def _drain_trims(h: Any) -> None:
        """Wait for the trims still in flight on ``h`` (before its connection closes)."""
        try:
            while h.aio_in_flight() > 0:
                h.poll(-1)
        except Exception as exc:  # the export went away: the trims no longer matter
            log.debug("trims not completed: %s", exc)


def _fill_zero(view: memoryview, start: int, end: int) -> None:
    """Zero ``view[start:end]`` from a shared block of zeroes (no allocation, unlike ``bytes(n)``)."""
    step = len(_ZEROS)
    for pos in range(start, end, step):
        n = min(step, end - pos)
        view[pos : pos + n] = _ZEROS[:n]


def _holes(reads: tuple[tuple[int, int, int], ...], size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of a buffer of ``size`` that no read covers."""
    holes = []
    pos = 0
    for _, n, at in sorted(reads, key=lambda r: r[2]):
        if at > pos:
            holes.append((pos, at))
        pos = max(pos, at + n)
    if pos < size:
        holes.append((pos, size))
    return holes


class _Frame:
    """A page-aligned chunk buffer with room for the object header, and where it may hold data.

    A fresh frame is all zeroes (anonymous memory); a reused one holds the
    last chunk read into it. Preparing it for the next chunk zeroes only
    what the last one wrote and this one will not read over, so the holes
    of a fragmented chunk are neither copied nor (in a fresh frame) touched.
    """

    __slots__ = ("_written", "buf")

    def __init__(self, chunk_size: int) -> None:
        self.buf = mmap.mmap(-1, HEADER.size + chunk_size)
        self._written: list[tuple[int, int]] = []
        """``[start, end)`` of the data area that may not be zero."""

    def prepare(self, reads: tuple[tuple[int, int, int], ...], size: int) -> memoryview:
        """The data area of ``size`` bytes, zero wherever ``reads`` (``(_, length, at)``) will not land."""
        view = memoryview(self.buf)[HEADER.size : HEADER.size + size]
        for start, end in _holes(reads, size):
            for a, b in self._written:
                a, b = max(a, start), min(b, end)
                if a < b:
                    _fill_zero(view, a, b)
        beyond = [(max(a, size), b) for a, b in self._written if b > size]  # past a short tail chunk
        self._written = [(at, at + n) for _, n, at in reads] + beyond
        return view
