"""Verification of restore points: does every point still restore?

Two depths, both over the plain :class:`~fleece.repo.backend.Backend`
protocol (so S3 works like a directory):

* shallow: every restore point and chunk index is read and checked against
  its checksums, and every chunk object an index names exists;
* deep: additionally every chunk is fetched, decoded and hashed, and its
  length checked against each position that uses it; every delta (format 2)
  is fetched from its pack, decoded, hashed and checked to fit its chunk.

Each distinct chunk or delta is checked once per run however many points share it,
by a thread pool with a bounded number of requests in flight (hashlib,
zstd and backend I/O release the GIL). A bad chunk is then mapped back to
every (point, disk, byte range) that uses it, so the report says what is
lost, not just which object.

In an Object Lock repository verify also reads every object's lock (the
HEAD of a shallow run returns it; a deep run adds one HEAD per object) and
reports each point's *lock horizon*: the earliest lock end of everything it
needs. An object whose lock ends before the horizon the point recorded (a
governance lock shortened by someone allowed to) is damage: the point is no
longer as immutable as promised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fleece.errors import BadInput, RepositoryCorrupt, RepositoryError
from fleece.machine.record import machine_of
from fleece.maintenance.damage import ByteRange, chunk_ranges, describe_ranges
from fleece.repo.backends.base import ObjectMissing, Retention
from fleece.repo.format import keys
from fleece.repo.format.codec import decode_chunk
from fleece.repo.format.delta import DeltaRef, delta_extent_end
from fleece.repo.format.index import ChunkIndex
from fleece.repo.format.point import RestorePoint, iso_utc
from fleece.repo.repository import Repository

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 8

Progress = Callable[[str, int], Callable[[int], None]]
Item = bytes | DeltaRef
"""What verify checks: a chunk (by digest) or one delta in a pack."""


@dataclass
class Damage:
    """One kind of problem on one disk of one point (or on the point itself)."""

    disk: str | None
    """The disk, or None when the point object itself is unusable."""
    problem: str
    """Short kind: ``chunk missing``, ``chunk damaged``, ``index damaged``, …"""
    ranges: list[ByteRange]
    """Half-open ``[start, end)`` byte ranges of the disk that cannot be restored."""
    objects: list[str]
    """Keys of the objects at fault."""
    detail: str
    """The first fault's own message, for the operator."""

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` form."""
        return {
            "disk": self.disk,
            "ranges": [[a, b] for a, b in self.ranges],
            "objects": self.objects,
            "problem": self.problem,
            "detail": self.detail,
        }

    def describe(self) -> str:
        """One line: ``vda: chunk damaged at bytes 0-65536 (1 object)``."""
        where = f"{self.disk}: " if self.disk is not None else ""
        at = f" at bytes {describe_ranges(self.ranges)}" if self.ranges else ""
        n = len(self.objects)
        return f"{where}{self.problem}{at} ({n} object{'s' if n != 1 else ''}; {self.detail})"


@dataclass
class PointReport:
    """The verdict on one restore point."""

    id: str
    vm: str
    damage: list[Damage] = field(default_factory=list)
    lock_until: float | None = None
    """Object Lock repositories: the earliest lock end of every object the point needs."""

    @property
    def ok(self) -> bool:
        """Whether nothing the point needs is missing or damaged."""
        return not self.damage

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` form (``lock_until`` only in Object Lock repositories)."""
        doc: dict[str, Any] = {"id": self.id, "vm": self.vm, "ok": self.ok,
                               "damage": [d.as_dict() for d in self.damage]}
        if self.lock_until is not None:
            doc["lock_until"] = _iso(self.lock_until)
        return doc


@dataclass
class VerifyReport:
    """The outcome of one verification run."""

    points: list[PointReport]
    deep: bool
    chunks_checked: int
    bytes_checked: int
    """Plaintext bytes fetched, decoded and hashed (0 without ``deep``)."""
    seconds: float
    object_lock: dict[str, Any] | None = None
    """Object Lock repositories: the config's ``mode`` and ``days``."""

    @property
    def ok(self) -> bool:
        """Whether every point verified."""
        return all(p.ok for p in self.points)

    @property
    def lock_horizon(self) -> float | None:
        """The earliest lock end over every point checked (None: no lock, or nothing read)."""
        ends = [p.lock_until for p in self.points if p.lock_until is not None]
        return min(ends) if ends else None

    def as_dict(self) -> dict[str, Any]:
        """The ``verify --json`` object (``object_lock`` only in Object Lock repositories)."""
        doc: dict[str, Any] = {
            "points": [p.as_dict() for p in self.points],
            "ok": self.ok,
            "deep": self.deep,
            "chunks_checked": self.chunks_checked,
            "bytes_checked": self.bytes_checked,
            "seconds": round(self.seconds, 3),
        }
        if self.object_lock is not None:
            horizon = self.lock_horizon
            doc["object_lock"] = {**self.object_lock,
                                  "horizon": None if horizon is None else _iso(horizon)}
        return doc


def _iso(seconds: float) -> str:
    return iso_utc(datetime.fromtimestamp(seconds, UTC))


@dataclass
class _Loaded:
    """A point as read back, with the indexes that could be read."""

    report: PointReport
    point: RestorePoint | None
    indexes: dict[str, ChunkIndex] = field(default_factory=dict)


def resolve_points(repo: Repository, selectors: Iterable[str], vm: str | None = None
                   ) -> list[tuple[str, str]]:
    """``(vm, point id)`` of the points named by ids, unique prefixes or ``latest``.

    Resolution uses the keys alone, so a point whose object is damaged can
    still be named (and then reported). No selectors means every point.
    """
    refs = repo.point_refs(vm)
    chosen: dict[tuple[str, str], None] = {}
    selectors = list(selectors)
    if not selectors:
        return refs
    where = repo.url if vm is None else f"{repo.url} for VM {vm}"
    for sel in selectors:
        if sel == "latest":
            vms = sorted({v for v, _ in refs})
            if len(vms) > 1:
                raise BadInput(f"'latest' is ambiguous: {repo.url} holds points of VMs "
                               f"{', '.join(vms)} (add --vm)")
            matches = refs[-1:]
        else:
            matches = [r for r in refs if r[1] == sel] or [r for r in refs if r[1].startswith(sel)]
        if not matches:
            raise BadInput(f"no restore point {sel!r} in {where}")
        if len(matches) > 1:
            raise BadInput(f"{sel!r} matches {len(matches)} restore points; give more of the id")
        chosen[matches[0]] = None
    return sorted(chosen, key=lambda r: (r[1], r[0]))


def verify_points(
    repo: Repository,
    refs: list[tuple[str, str]],
    *,
    deep: bool = False,
    workers: int = DEFAULT_WORKERS,
    progress: Progress | None = None,
) -> VerifyReport:
    """Verify the points ``refs`` (``(vm, id)``, see :func:`resolve_points`)."""
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fleece-verify") as pool:
        loaded = list(pool.map(lambda ref: _load(repo, *ref), refs))
    checker = _ChunkChecker(repo, deep, workers)
    checker.run(_distinct(loaded), progress)
    for item in loaded:
        _map_damage(item, checker)
        if repo.lock is not None:
            _check_locks(repo, item, checker)
    return VerifyReport([item.report for item in loaded], deep, checker.chunks_checked,
                        checker.bytes_checked, time.monotonic() - started,
                        None if repo.lock is None else repo.lock.document())


def require_new_point_intact(
    repo: Repository,
    point: RestorePoint,
    parent: RestorePoint | None,
    *,
    workers: int = DEFAULT_WORKERS,
    progress: Progress | None = None,
) -> VerifyReport:
    """Deep-verify what a backup stored for ``point``; :class:`RepositoryCorrupt` on any damage.

    ``fleece backup --verify`` calls this before writing the point, so a
    failure leaves no point and aborts the checkpoint. The point's indexes
    are read back from the repository and checked; its chunks are fetched
    and hashed, except those its parent's indexes already name (they were
    there before this backup; ``fleece verify`` covers them).
    """
    started = time.monotonic()
    item = _Loaded(PointReport(point.id, point.vm), point)
    _load_indexes(repo, item)
    skip: set[Item] = set()
    if parent is not None:
        for disk in parent.disks:
            try:
                parent_index = repo.read_index(parent, disk.name)
                skip |= parent_index.digests()
                skip |= {ref for _, ref in parent_index.delta_refs()}
            except RepositoryError as exc:
                log.warning("cannot read parent index %s (%s); verifying every chunk",
                            disk.index_key, exc)
    wanted = {d: n for d, n in _distinct([item]).items() if d not in skip}
    checker = _ChunkChecker(repo, True, workers)
    checker.run(wanted, progress)
    _map_damage(item, checker)
    report = VerifyReport([item.report], True, checker.chunks_checked, checker.bytes_checked,
                          time.monotonic() - started)
    if not report.ok:
        found = "; ".join(d.describe() for d in report.points[0].damage)
        raise RepositoryCorrupt(f"--verify found damage in what this backup stored ({found}); "
                                f"restore point {point.id} was not written")
    log.info("verified %d new chunks (%d bytes) of %s in %.1f s", report.chunks_checked,
             report.bytes_checked, point.id, report.seconds)
    return report


def _load(repo: Repository, vm: str, point_id: str) -> _Loaded:
    report = PointReport(point_id, vm)
    key = keys.point_key(vm, point_id)
    try:
        point = repo.load_point(vm, point_id)
    except ObjectMissing as exc:
        report.damage.append(Damage(None, "point missing", [], [key], str(exc)))
        return _Loaded(report, None)
    except RepositoryCorrupt as exc:
        report.damage.append(Damage(None, "point damaged", [], [key], str(exc)))
        return _Loaded(report, None)
    except RepositoryError as exc:
        report.damage.append(Damage(None, "point unreadable", [], [key], str(exc)))
        return _Loaded(report, None)
    item = _Loaded(report, point)
    _load_indexes(repo, item)
    return item


def _load_indexes(repo: Repository, item: _Loaded) -> None:
    assert item.point is not None
    for disk in item.point.disks:
        try:
            item.indexes[disk.name] = repo.read_index(item.point, disk.name)
        except RepositoryError as exc:
            # A missing index reads as corrupt; tell the two apart for the operator.
            if not isinstance(exc, RepositoryCorrupt):
                problem = "index unreadable"
            elif repo.backend.exists(disk.index_key):
                problem = "index damaged"
            else:
                problem = "index missing"
            item.report.damage.append(
                Damage(disk.name, problem, [(0, disk.virtual_size)], [disk.index_key], str(exc)))


def _distinct(loaded: Iterable[_Loaded]) -> dict[Item, int]:
    """Every distinct chunk and delta the loaded indexes name, with a length for progress."""
    wanted: dict[Item, int] = {}
    for item in loaded:
        for index in item.indexes.values():
            for i, digest in index.stored():
                if digest not in wanted:
                    wanted[digest] = index.chunk_length(i)
            for _, ref in index.delta_refs():
                wanted.setdefault(ref, ref.covered)
        for _, _start, length, digest in _machine_chunks(item):
            wanted.setdefault(digest, length)
    return wanted


def _machine_chunks(item: _Loaded) -> list[tuple[str, int, int, bytes]]:
    """``(file role, offset, length, digest)`` of every chunk of the point's machine record."""
    if item.point is None or item.point.machine is None:
        return []
    try:
        record = machine_of(item.point)
    except RepositoryCorrupt as exc:
        if not any(d.problem == "machine record damaged" for d in item.report.damage):
            item.report.damage.append(Damage("machine", "machine record damaged", [],
                                             [keys.point_key(item.point.vm, item.point.id)], str(exc)))
        return []
    assert record is not None
    size = item.point.chunk_size
    return [(role, n * size, min(size, f.size - n * size), d)
            for role, f in sorted(record.files.items()) for n, d in enumerate(f.digests())]


class _ChunkChecker:
    """Checks each distinct chunk once and remembers what was wrong with it."""

    def __init__(self, repo: Repository, deep: bool, workers: int) -> None:
        self.repo = repo
        self.deep = deep
        self.workers = workers
        self.bad: dict[Item, tuple[str, str]] = {}
        """digest or delta → (problem, detail)."""
        self.lengths: dict[Item, int] = {}
        """Plaintext length of every chunk that decoded, the end of every delta's last
        extent (deep only)."""
        self._packs: dict[bytes, bool] = {}
        """Shallow: whether each pack exists, asked once."""
        self.lock_ends: dict[str, float] = {}
        """Object Lock repositories: object key → its lock end (0: not locked)."""
        self._locking = repo.lock is not None
        self.chunks_checked = 0
        self.bytes_checked = 0

    def check(self, item: Item) -> tuple[int, tuple[str, str] | None]:
        """``(plaintext length, problem or None)`` of one chunk or delta. Runs in a worker thread."""
        if isinstance(item, DeltaRef):
            return self._check_delta(item)
        digest = item
        key = keys.chunk_key(digest)
        if not self.deep:
            try:
                present = self._exists(key)
            except RepositoryError as exc:
                return 0, ("chunk unreadable", str(exc))
            return 0, None if present else ("chunk missing", f"{key} is missing")
        try:
            blob = self.repo.backend.get(key)
        except ObjectMissing:
            return 0, ("chunk missing", f"{key} is missing")
        except RepositoryCorrupt as exc:  # a sealed object that fails authentication
            return 0, ("chunk damaged", str(exc))
        except RepositoryError as exc:
            return 0, ("chunk unreadable", str(exc))
        try:
            length = len(decode_chunk(blob, digest, self.repo.chunk_name))
        except RepositoryCorrupt as exc:
            return 0, ("chunk damaged", str(exc))
        if self._locking:
            try:
                self._exists(key)
            except RepositoryError as exc:
                return 0, ("chunk unreadable", str(exc))
        return length, None

    def _exists(self, key: str) -> bool:
        """Whether ``key`` exists; in an Object Lock repository the same HEAD notes its lock."""
        if not self._locking:
            return self.repo.backend.exists(key)
        try:
            lock: Retention | None = self.repo.backend.lock_of(key)
        except ObjectMissing:
            return False
        self.lock_ends[key] = 0.0 if lock is None else lock.until
        return True

    def _check_delta(self, ref: DeltaRef) -> tuple[int, tuple[str, str] | None]:
        key = keys.pack_key(ref.pack)
        if not self.deep:
            present = self._packs.get(ref.pack)
            if present is None:
                try:
                    present = self._packs[ref.pack] = self._exists(key)
                except RepositoryError as exc:
                    return 0, ("pack unreadable", str(exc))
            return 0, None if present else ("pack missing", f"{key} is missing")
        try:
            body = self.repo.get_delta(ref)
            if self._locking and key not in self.lock_ends:
                self._exists(key)
            return delta_extent_end(body, f"delta at {ref.offset} of {key}"), None
        except RepositoryCorrupt as exc:
            if not self.repo.backend.exists(key):
                return 0, ("pack missing", f"{key} is missing")
            return 0, ("delta damaged", str(exc))
        except RepositoryError as exc:
            return 0, ("pack unreadable", str(exc))

    def run(self, wanted: dict[Item, int], progress: Progress | None) -> None:
        """Check every digest in ``wanted`` (digest → expected length)."""
        label = "verify (deep)" if self.deep else "verify"
        advance = progress(label, sum(wanted.values())) if progress and wanted else None
        for digest, expected, (length, problem) in self._checked(wanted):
            self.chunks_checked += 1
            self.bytes_checked += expected if isinstance(digest, DeltaRef) and self.deep else length
            if problem is not None:
                self.bad[digest] = problem
            elif self.deep:
                self.lengths[digest] = length
            if advance is not None:
                advance(expected)

    def _checked(self, wanted: dict[Item, int]
                 ) -> Iterator[tuple[Item, int, tuple[int, tuple[str, str] | None]]]:
        """Results in completion order, at most ``2 * workers`` chunks in flight."""
        max_in_flight = 2 * self.workers
        pending: dict[Future[tuple[int, tuple[str, str] | None]], Item] = {}
        with ThreadPoolExecutor(self.workers, thread_name_prefix="fleece-verify") as pool:
            try:
                for digest in wanted:
                    while len(pending) >= max_in_flight:
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for f in done:
                            d = pending.pop(f)
                            yield d, wanted[d], f.result()
                    pending[pool.submit(self.check, digest)] = digest
                for f, d in list(pending.items()):
                    yield d, wanted[d], f.result()
                    del pending[f]
            finally:
                for f in pending:
                    f.cancel()


def _check_locks(repo: Repository, item: _Loaded, checker: _ChunkChecker) -> None:
    """The point's lock horizon from its objects' locks; damage where one ends before the recorded one.

    The point object and its indexes are asked here (a HEAD each); chunks
    and packs were asked by the checker.
    """
    point = item.point
    if point is None:
        return
    ends: dict[str, float] = {}
    for key in [keys.point_key(point.vm, point.id), *(d.index_key for d in point.disks)]:
        try:
            lock = repo.backend.lock_of(key)
        except RepositoryError:
            continue  # missing or unreadable: reported as such already
        ends[key] = 0.0 if lock is None else lock.until
    for index in item.indexes.values():
        for _, digest in index.stored():
            key = keys.chunk_key(digest)
            if key in checker.lock_ends:
                ends[key] = checker.lock_ends[key]
        for _, ref in index.delta_refs():
            key = keys.pack_key(ref.pack)
            if key in checker.lock_ends:
                ends[key] = checker.lock_ends[key]
    if not ends:
        return
    item.report.lock_until = min(ends.values())
    recorded = point.lock_horizon
    if recorded is None or point.object_lock is None or (
            point.object_lock.get("repository") != repo.config.id):
        return  # no promise made here (a copied point's horizon is its source's)
    # S3 keeps lock ends to the second.
    short = sorted(k for k, end in ends.items() if end + 1 < recorded.timestamp())
    if short:
        first = ends[short[0]]
        item.report.damage.append(Damage(
            None, "lock too short", [], short,
            f"{short[0]} is {'not locked' if not first else 'locked only until ' + _iso(first)}, "
            f"the point promises {iso_utc(recorded)}"))


def _map_damage(item: _Loaded, checker: _ChunkChecker) -> None:
    """Turn bad digests into per-disk byte ranges of ``item``'s point."""
    if item.point is None:
        return
    for role, start, expected, digest in _machine_chunks(item):
        problem = checker.bad.get(digest)
        length = checker.lengths.get(digest)
        if problem is None and checker.deep and length is not None and length != expected:
            problem = ("chunk has the wrong length", f"chunk {digest.hex()} holds {length} bytes")
        if problem is not None:
            item.report.damage.append(Damage(f"machine:{role}", problem[0], [(start, start + expected)],
                                             [keys.chunk_key(digest)], problem[1]))
    for disk in item.point.disks:
        index = item.indexes.get(disk.name)
        if index is None:
            continue
        # problem → (chunk numbers, object keys in order, first detail)
        found: dict[str, tuple[list[int], dict[str, None], str]] = {}
        for i, digest in index.stored():
            problem = checker.bad.get(digest)
            if problem is None and checker.deep:
                length = checker.lengths.get(digest)
                expected = index.chunk_length(i)
                if length is not None and length != expected:
                    problem = ("chunk has the wrong length",
                               f"chunk {digest.hex()} holds {length} bytes where {expected} belong")
            if problem is None:
                continue
            kind, detail = problem
            chunks, objects, _ = found.setdefault(kind, ([], {}, detail))
            chunks.append(i)
            objects[keys.chunk_key(digest)] = None
        for i, ref in index.delta_refs():
            problem = checker.bad.get(ref)
            if problem is None and checker.deep:
                end = checker.lengths.get(ref)
                if end is not None and end > index.chunk_length(i):
                    problem = ("delta does not fit its chunk",
                               f"a delta in pack {ref.pack.hex()} writes up to byte {end} of a "
                               f"{index.chunk_length(i)}-byte chunk")
            if problem is None:
                continue
            kind, detail = problem
            chunks, objects, _ = found.setdefault(kind, ([], {}, detail))
            chunks.append(i)
            objects[keys.pack_key(ref.pack)] = None
        for kind, (chunks, objects, detail) in found.items():
            item.report.damage.append(Damage(
                disk.name, kind, chunk_ranges(chunks, index.chunk_size, index.disk_size),
                list(objects), detail))
