"""Reading a point-in-time export over NBD: block-status planning and parallel reads.

The plan is made on the repository's chunk grid and keeps the extents block
status reported, at the export's own granularity: where the data is
(``base:allocation`` says not all zero) and, for an incremental, what the
frozen dirty bitmap marks (at the bitmap's granularity, 64 KiB by default).
A full backup touches every chunk that holds any data and reads only its
data extents (holes become zeroes without crossing the socket); an
incremental touches every chunk the bitmap marks and reads only its dirty
extents that hold data. Chunks that are all zero are recorded as zero
without a read; chunks an incremental skips keep the parent's content.

libnbd's blocking calls release the GIL, so each reader thread owns one
connection (QEMU's export advertises multi-conn).

On QEMU before 8.0 the export answers a request wrongly when it starts in a
cluster the guest has overwritten since the point and reaches past it
(docs/design.md §2.4): there ``max_request`` is the copy-before-write
cluster, and every block-status request and every read stays inside one
cluster aligned to it (many in flight at once, so the cost is in requests,
not round trips).
"""

from __future__ import annotations

import bisect
import contextlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import nbd

from fleece.errors import ExportError
from fleece.fleecing.transport import ClientTls, NbdHandle, configure_client

BASE_ALLOCATION = "base:allocation"
STATE_ZERO = 2  # base:allocation: the range reads as zeroes
DIRTY = 1  # qemu:dirty-bitmap:*: the range was written
# One block-status request must cover less than 4 GiB (NBD 32-bit lengths, no
# extended headers in libnbd 1.14); 2 GiB keeps every request chunk-aligned.
MAX_STATUS_SPAN = 1 << 31
MAX_READ = 32 << 20  # QEMU's NBD server refuses larger reads
# pread_into asks for at most this much per request. QEMU's NBD server reads
# a request whole before it sends any of it; four 1 MiB requests in flight
# let it send one while it reads the next (a --compress none full backup of
# bench --speed's 2 GiB-data disk, interleaved A/B: median 2.52 -> 1.88 s).
READ_SPLIT = 1 << 20
# Block-status requests in flight at once on one connection when each may
# cover only one cluster (QEMU < 8.0); QEMU serves a client's requests in parallel.
STATUS_WINDOW = 64

Run = tuple[int, int]
"""``[start, end)`` on the disk."""
Extent = tuple[int, int]
"""``(offset, length)``."""


@dataclass(frozen=True)
class ChunkPlan:
    """The chunks a backup must touch, on a grid of ``chunk_size``."""

    chunk_size: int
    size: int
    read: bytes
    """One byte per chunk: 1 = read it, 2 = record it as zero, 0 = keep the parent's."""
    data_runs: Sequence[Run] | None = None
    """Sorted, merged runs that may hold data; None: every byte of a chunk to read may."""
    dirty_runs: Sequence[Run] | None = None
    """Sorted, merged runs the dirty bitmap marks (incremental); None: whole chunks."""

    @property
    def n_chunks(self) -> int:
        """Chunks on the grid, the last one possibly short."""
        return (self.size + self.chunk_size - 1) // self.chunk_size

    def chunk_range(self, i: int) -> tuple[int, int]:
        """(offset, length) of chunk ``i``; the tail chunk may be short."""
        off = i * self.chunk_size
        return off, min(self.chunk_size, self.size - off)

    def to_read(self) -> Iterator[int]:
        """Indexes of the chunks to read, in disk order."""
        i = self.read.find(1)
        while i != -1:
            yield i
            i = self.read.find(1, i + 1)

    def zero(self) -> Iterator[int]:
        """Indexes of the chunks to record as zero without reading."""
        i = self.read.find(2)
        while i != -1:
            yield i
            i = self.read.find(2, i + 1)

    def data_extents(self, i: int) -> list[Extent]:
        """``(disk offset, length)`` of chunk ``i``'s parts that may hold data."""
        return _clip(self.data_runs, *self.chunk_range(i))

    def dirty_extents(self, i: int) -> list[Extent]:
        """``(disk offset, length)`` of chunk ``i``'s parts the dirty bitmap marks."""
        return _clip(self.dirty_runs, *self.chunk_range(i))

    @property
    def bytes_dirty(self) -> int:
        """What the bitmap marks (incremental), or what may hold data (full)."""
        runs = self.dirty_runs if self.dirty_runs is not None else self.data_runs
        if runs is None:
            return self.bytes_to_read
        return sum(end - start for start, end in runs)

    @property
    def bytes_to_read(self) -> int:
        """Bytes the plan will read (the short tail counted as it is)."""
        n = self.read.count(1) * self.chunk_size
        last = self.n_chunks - 1
        if last >= 0 and self.read[last] == 1:
            n -= self.chunk_size - self.chunk_range(last)[1]
        return n


def connect(uri: str, contexts: tuple[str, ...] = (), *, tls: ClientTls | None = None) -> NbdHandle:
    """An NBD handle on ``uri`` with the given meta contexts requested.

    ``tls`` are the client credentials for an ``nbds://`` URI (see
    :mod:`fleece.fleecing.transport`, which owns how fleece reaches an NBD server).
    """
    h: NbdHandle = nbd.NBD()
    h.set_handle_name("fleece")
    # libnbd zeroes every read buffer first by default (a guard for callers
    # that ignore errors): 5 % of a full backup's CPU. fleece never uses a
    # buffer whose read failed, and libnbd fails a read the server did not
    # answer in full.
    h.set_pread_initialize(False)
    configure_client(h, uri, tls)
    for ctx in contexts:
        h.add_meta_context(ctx)
    try:
        h.connect_uri(uri)
    except nbd.Error as exc:
        raise ExportError(f"cannot connect to NBD export {uri}: {exc}") from None
    for ctx in contexts:
        if not h.can_meta_context(ctx):
            disconnect(h)
            raise ExportError(f"NBD export {uri} does not offer meta context {ctx}")
    return h


def disconnect(h: NbdHandle) -> None:
    """Close an NBD connection politely (libnbd 1.14 handles have no ``close``)."""
    with contextlib.suppress(nbd.Error):  # already gone: nothing to say goodbye to
        h.shutdown()


def _clip(runs: Sequence[Run] | None, offset: int, length: int) -> list[Extent]:
    """The parts of ``runs`` inside ``[offset, offset + length)``, as extents."""
    end = offset + length
    if runs is None:
        return [(offset, length)]
    out: list[Extent] = []
    k = bisect.bisect_right(runs, (offset, end)) - 1
    k = max(k, 0)
    while k < len(runs) and runs[k][0] < end:
        a, b = max(runs[k][0], offset), min(runs[k][1], end)
        if a < b:
            out.append((a, b - a))
        k += 1
    return out


def _add_run(runs: list[list[int]], start: int, end: int) -> None:
    """Append ``[start, end)`` to sorted ``runs``, merging with the last one when they touch."""
    if end <= start:
        return
    if runs and runs[-1][1] >= start:
        runs[-1][1] = max(runs[-1][1], end)
    else:
        runs.append([start, end])


def _mark(flags: bytearray, chunk_size: int, start: int, end: int, value: int) -> None:
    """Set ``flags`` to ``value`` for every chunk that [start, end) touches."""
    if end <= start:
        return
    first, last = start // chunk_size, (end - 1) // chunk_size
    flags[first : last + 1] = bytes([value]) * (last - first + 1)


def _collector(answers: dict[str, list[int]]) -> Any:
    """A block-status callback that appends each context's entries to ``answers``."""

    def collect(ctx: str, off: int, entries: list[int], err: Any) -> int:
        answers.setdefault(ctx, []).extend(entries)
        return 0

    return collect


def _covered(offset: int, end: int, answers: dict[str, list[int]], contexts: Sequence[str]) -> int:
    """How far every context answered from ``offset`` (each may answer for less than asked)."""
    covered = end
    for ctx in contexts:
        entries = answers.get(ctx)
        if not entries:
            raise ExportError(f"the export sent no block status for {ctx} at offset {offset}")
        covered = min(covered, offset + sum(entries[0::2]))
    if covered <= offset:  # asking again from here would loop for ever
        raise ExportError(f"the export's block status at offset {offset} covered nothing")
    return covered


def _status_error(offset: int, exc: nbd.Error) -> ExportError:
    # A full reverse delta breaks the snapshot (on-cbw-error=break-snapshot):
    # from then on QEMU answers every request on it with EINVAL.
    hint = " (a full reverse delta breaks the snapshot)" if exc.errno == "EINVAL" else ""
    return ExportError(f"block status at offset {offset} failed: {exc}{hint}")


def _block_status(h: NbdHandle, size: int, contexts: Sequence[str], max_request: int | None,
                  start: int = 0) -> Iterator[tuple[int, int, dict[str, list[int]]]]:
    """``(offset, covered, answers)`` in disk order until the whole disk is covered.

    Unbounded: one request per 2 GiB span. Bounded (``max_request``): one request per
    aligned block of that size, :data:`STATUS_WINDOW` of them in flight.
    """
    span = MAX_STATUS_SPAN if max_request is None else max_request
    pending: deque[tuple[int, int, dict[str, list[int]], int]] = deque()
    ask = start  # where the next request starts
    while pending or ask < size:
        while ask < size and (len(pending) < STATUS_WINDOW if max_request else not pending):
            end = min(size, (ask // span + 1) * span)
            answers: dict[str, list[int]] = {}
            try:
                cookie = h.aio_block_status(end - ask, ask, _collector(answers))
            except nbd.Error as exc:
                raise _status_error(ask, exc) from None
            pending.append((ask, end, answers, cookie))
            ask = end
        offset, end, answers, cookie = pending.popleft()
        try:
            while not h.aio_command_completed(cookie):  # raises the command's error, if any
                h.poll(-1)
        except nbd.Error as exc:
            raise _status_error(offset, exc) from None
        covered = _covered(offset, end, answers, contexts)
        yield offset, covered, answers
        while covered < end:  # a short answer: ask again from there, within the same block
            answers = {}
            try:
                h.block_status(end - covered, covered, _collector(answers))
            except nbd.Error as exc:
                raise _status_error(covered, exc) from None
            start, covered = covered, _covered(covered, end, answers, contexts)
            yield start, covered, answers


def _status_plan(h: NbdHandle, size: int, chunk_size: int, dirty_context: str | None,
                 max_request: int | None
                 ) -> Iterator[tuple[int, int, dict[str, list[int]], Sequence[str]]]:
    """Block status answers for planning, each with the contexts to trust in it.

    Unbounded, or a full backup: every context over the whole disk. Bounded
    (QEMU < 8.0) incremental: the dirty bitmap first, in long spans — its
    context is read from the frozen bitmap itself, not through the
    copy-before-write filter whose status the bug answers wrongly — then
    allocation, bounded, only over the chunks the bitmap marks: a small
    incremental of a large disk asks a few requests, not one per 64 KiB.
    """
    if dirty_context is None or max_request is None:
        contexts = [BASE_ALLOCATION] + ([dirty_context] if dirty_context else [])
        for offset, covered, answers in _block_status(h, size, contexts, max_request):
            yield offset, covered, answers, contexts
        return
    dirty_chunks: list[list[int]] = []  # [first, end) chunk numbers the bitmap marks
    for offset, covered, answers in _block_status(h, size, [dirty_context], None):
        yield offset, covered, answers, [dirty_context]
        pos = offset
        entries = answers[dirty_context]
        for length, flags in zip(entries[0::2], entries[1::2], strict=True):
            end = min(pos + length, covered)
            if flags & DIRTY and end > pos:
                first, last = pos // chunk_size, (end - 1) // chunk_size + 1
                if dirty_chunks and first <= dirty_chunks[-1][1]:
                    dirty_chunks[-1][1] = max(dirty_chunks[-1][1], last)
                else:
                    dirty_chunks.append([first, last])
            pos += length
            if pos >= covered:
                break
    for first, last in dirty_chunks:
        for offset, covered, answers in _block_status(h, min(size, last * chunk_size),
                                                      [BASE_ALLOCATION], max_request,
                                                      start=first * chunk_size):
            yield offset, covered, answers, [BASE_ALLOCATION]


def plan_chunks(h: NbdHandle, chunk_size: int, dirty_context: str | None = None,
                max_request: int | None = None) -> ChunkPlan:
    """Ask the export for block status and decide, chunk by chunk, what to do.

    ``h`` must have been connected with ``base:allocation`` (and
    ``dirty_context`` for an incremental) requested. ``max_request``: no
    request may reach past the next multiple of it (QEMU < 8.0, see the
    module docstring); None: spans of :data:`MAX_STATUS_SPAN`.
    """
    size = int(h.get_size())
    n = (size + chunk_size - 1) // chunk_size
    data = bytearray(n)  # 1 where any byte may be non-zero
    dirty = bytearray(n) if dirty_context else None
    data_runs: list[list[int]] = []
    dirty_runs: list[list[int]] = []

    for offset, covered, answers, asked in _status_plan(h, size, chunk_size, dirty_context, max_request):
        # Trust only the part that every context asked for covered.
        for ctx in asked:
            pos = offset
            entries = answers[ctx]
            for length, flags in zip(entries[0::2], entries[1::2], strict=True):
                end = min(pos + length, covered)
                if ctx == BASE_ALLOCATION:
                    if not flags & STATE_ZERO:
                        _mark(data, chunk_size, pos, end, 1)
                        _add_run(data_runs, pos, end)
                elif flags & DIRTY and dirty is not None:
                    _mark(dirty, chunk_size, pos, end, 1)
                    _add_run(dirty_runs, pos, end)
                pos += length
                if pos >= covered:
                    break

    # 1 = read, 2 = zero, 0 = keep the parent's digest (incremental, clean).
    read = bytearray(n)
    for i in range(n):
        if dirty is not None and not dirty[i]:
            continue
        read[i] = 1 if data[i] else 2
    return ChunkPlan(chunk_size, size, bytes(read), tuple((a, b) for a, b in data_runs),
                     tuple((a, b) for a, b in dirty_runs) if dirty is not None else None)


def _pieces(offset: int, length: int, max_request: int | None) -> Iterator[tuple[int, int]]:
    """``(disk offset, length)`` of the requests that read ``length`` bytes at ``offset``.

    Unbounded: pieces of :data:`READ_SPLIT` from ``offset``. Bounded: split at
    every multiple of ``max_request`` on the disk, so no piece crosses one.
    """
    end = offset + length
    while offset < end:
        if max_request is None:
            step = min(READ_SPLIT, end - offset)
        else:
            step = min(max_request - offset % max_request, end - offset)
        yield offset, step
        offset += step


def pread_chunk(h: NbdHandle, offset: int, length: int, max_request: int | None = None) -> bytes:
    """Read ``length`` bytes at ``offset`` (split into requests of at most 32 MiB, or within
    ``max_request``-aligned blocks when it is set)."""
    if max_request is None and length <= MAX_READ:
        return bytes(h.pread(length, offset))
    buf = bytearray(length)
    pread_into(h, buf, [(offset, length, 0)], max_request)
    return bytes(buf)


def _shared(view: memoryview) -> Any:
    """``view`` as something ``aio_pread`` fills in place (libnbd 1.14 needs an ``nbd.Buffer``)."""
    from_buffer = getattr(nbd.Buffer, "from_buffer", None)
    return from_buffer(view) if from_buffer is not None else view


def pread_into(h: NbdHandle, buf: bytearray | memoryview, reads: Sequence[tuple[int, int, int]],
               max_request: int | None = None) -> None:
    """Fill ``buf`` from the export: each ``(disk offset, length, where in buf)`` read in place.

    Every read (split at :data:`READ_SPLIT`, or at each multiple of
    ``max_request`` on the disk when it is set) is in flight at once on ``h``, so the
    scattered extents of a fragmented chunk cost one round trip, not one
    each; the bytes land in ``buf`` directly, with no allocation or copy
    per chunk. The caller zeroes what no read covers.
    """
    view = memoryview(buf)
    cookies = []
    try:
        for off, n, pos in reads:
            for piece, k in _pieces(off, n, max_request):
                p = pos + piece - off
                cookies.append(h.aio_pread(_shared(view[p : p + k]), piece))
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for cookie in cookies:
            h.aio_command_completed(cookie)  # raises the command's error, if any
    finally:
        view.release()
