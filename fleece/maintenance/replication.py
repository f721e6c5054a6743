"""``fleece copy``: restore points from one repository into another, with everything they need.

For each point the destination lacks, oldest first: every chunk it needs
that the destination does not hold is fetched, checked against its digest
and stored as it is (the destination's dedup decides what to send), then its
indexes, and the point object last, with a conditional create. So a point
appears in the destination only once all it names is there; a copy that is
interrupted leaves at most chunks and indexes, which the next copy reuses
(or gc collects). Points the destination already holds are skipped: copying
again is idempotent.

The destination is written under the same protocol as a backup: the VM's
lease is held while its points are copied, a running gc is waited out
(refused, as a backup is), and each point is committed by
:func:`fleece.repo.commit.commit_point` (the lease checked before and
after). A destination that does not exist yet is created
with the source's chunk size, hash and compression — and, from an encrypted
source, with its master key and key objects (the same passphrases open
both), so that sealed objects then move as they are. An existing destination
must have the source's chunk size; how the objects travel (as they are,
sealed as they are, or renamed for another key or hash) is
:mod:`fleece.maintenance.transfer`'s business.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from fleece.errors import BadInput, NotARepository, RepositoryError, RepositoryExists
from fleece.maintenance.transfer import CopyReport, Renamed, SameNames, Sealed, Transfer, names_agree
from fleece.repo.backends.base import Backend
from fleece.repo.commit import commit_point, writer_lease
from fleece.repo.format.point import RestorePoint
from fleece.repo.repository import Passphrase, Repository, RepositoryConfig, holds_objects, read_config

__all__ = ["DEFAULT_WORKERS", "CopyReport", "copy_points", "open_destination"]

DEFAULT_WORKERS = 8


def open_destination(source: Repository, backend: Backend, passphrase: Passphrase | None = None,
                     asked: str = "its passphrase") -> Repository:
    """The destination repository, created like the source if the location is empty.

    An encrypted destination opens with the source's key when it shares it
    (no passphrase asked), else with ``passphrase``; without one, a
    :class:`RepositoryError` says to give ``asked``. Nothing is written
    before it opens.
    """
    try:
        config = read_config(backend)
    except NotARepository:
        if holds_objects(backend):
            raise
        try:
            return _checked(source, _create_like(source, backend))
        except RepositoryExists:  # another process made it between our look and our put
            config = read_config(backend)
    _check_geometry(source, config, backend.url)
    if config.encryption == "none":
        return Repository.open(backend)
    if source.shares_key(config):
        return Repository.open_with_key_of(backend, config, source)
    if passphrase is None:
        raise RepositoryError(f"repository {backend.url} is encrypted with another key than "
                              f"{source.url}: give {asked}; nothing was copied")
    return _checked(source, Repository.open(backend, passphrase))


def _create_like(source: Repository, backend: Backend) -> Repository:
    if source.master is not None:
        return Repository.init_sharing_key(backend, source)
    c = source.config
    return Repository.init(backend, c.chunk_size, c.compression_level, hash=c.hash)


def _check_geometry(source: Repository, config: RepositoryConfig, url: str) -> None:
    if config.chunk_size != source.config.chunk_size:
        raise BadInput(
            f"cannot copy from {source.url} (chunk size {source.config.chunk_size}) to {url} (chunk "
            f"size {config.chunk_size}): indexes name chunks by position, so both must use the same; "
            "nothing was copied")


def _checked(source: Repository, dest: Repository) -> Repository:
    _check_geometry(source, dest.config, dest.url)
    return dest


def pick_transfer(source: Repository, dest: Repository) -> type[Transfer]:
    """How objects travel from ``source`` to ``dest`` (:mod:`fleece.maintenance.transfer`)."""
    if not names_agree(source, dest):
        return Renamed
    return Sealed if source.master is not None else SameNames


def copy_points(source: Repository, dest: Repository, points: list[RestorePoint], *,
                workers: int = DEFAULT_WORKERS, say: Callable[[str], None] | None = None) -> CopyReport:
    """Copy ``points`` (grouped by VM, oldest first) that ``dest`` lacks; see the module docstring."""
    started = time.monotonic()
    report = CopyReport()
    have = set(dest.point_refs())
    by_vm: dict[str, list[RestorePoint]] = {}
    for p in sorted(points, key=lambda p: p.id):
        by_vm.setdefault(p.vm, []).append(p)
    with ThreadPoolExecutor(workers, thread_name_prefix="fleece-copy") as pool:
        transfer = pick_transfer(source, dest)(source, dest, pool, report)
        for vm, vm_points in by_vm.items():
            todo = [p for p in vm_points if (vm, p.id) not in have]
            report.skipped += [p.id for p in vm_points if (vm, p.id) in have]
            if not todo:
                continue
            with writer_lease(dest, vm) as lease:
                transfer.seed(vm, sorted(i for v, i in source.point_refs(vm) if (v, i) in have))
                for point in todo:
                    committed = transfer.objects(point)
                    if dest.lock is not None:
                        committed = _lock_copied(transfer, dest, committed)
                    commit_point(dest, lease, committed, transfer.commit)
                    report.copied.append(point.id)
                    report.objects_written += 1
                    if say is not None:
                        say(f"copied point {point.id} of VM {vm}")
    report.seconds = time.monotonic() - started
    return report


def _lock_copied(transfer: Transfer, dest: Repository, point: RestorePoint) -> RestorePoint:
    """Object Lock destinations: lock everything ``point`` names N days ahead; the point to commit.

    Objects the copy wrote are locked already; those the destination held
    get their lock extended where it ends too soon (one request each, as a
    backup's first extension round). The point then records the horizon
    measured here, so the next backup trusts it — except a sealed point,
    whose bytes move as they are and keep their own (untrusted) record.
    """
    indexes = [dest.read_index(point, disk.name) for disk in point.disks]
    lock = dest.lock_new_point(indexes, [])
    return point if isinstance(transfer, Sealed) else replace(point, object_lock=lock)
