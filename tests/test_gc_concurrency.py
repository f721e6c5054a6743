"""A backup and a gc at the same time, on a directory and on S3 (moto): no point loses a chunk.

The hazard: a backup finds a chunk already stored (here, garbage left by a
pruned point) and reuses it without uploading; a gc deleting it before the
backup commits would leave the new point naming a missing chunk. Backups
hold their VM lease and gc an exclusive lease, each checking for the other
after creating its own (fleece.repo.gc_lock), so one of them backs off.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import FLEECE

from fleece.backup.job import BackupRequest, BackupResult, run_backup
from fleece.backup.pipeline import PipelineSettings
from fleece.errors import LockHeld
from fleece.maintenance.gc import collect_garbage
from fleece.maintenance.verify import verify_points
from fleece.repo import gc_lock
from fleece.repo.backends.base import Backend, ForwardingBackend
from fleece.repo.backends.url import open_backend
from fleece.repo.format import keys
from fleece.repo.repository import Repository

MiB = 1 << 20
CHUNK = 4 * MiB

pytestmark = pytest.mark.qemu


class ProbeHook:
    """A backend that calls ``on_probe`` right after the dedup probe of one chunk answers."""

    def __init__(self, inner: Backend, key: str, on_probe: Callable[[], None]) -> None:
        self.inner = inner
        self.url = inner.url
        self.key = key
        self.on_probe = on_probe
        self.probed = 0

    def exists(self, key: str) -> bool:
        found = self.inner.exists(key)
        if key == self.key:
            self.probed += 1
            self.on_probe()
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class HeldAfterLease(ForwardingBackend):
    """A backend whose reads wait, once gc holds its lease, until the test releases them.

    It pins gc inside its leased section for as long as the test needs (a
    whole backup process), however slow the machine is.
    """

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.leased = threading.Event()
        self.release = threading.Event()

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """The inner ``put``; taking the gc lease arms the gate."""
        stored = self.inner.put(key, data, if_absent=if_absent)
        if key == keys.repo_lock_key("gc") and stored:
            self.leased.set()
        return stored

    def get(self, key: str) -> bytes:
        """The inner ``get``, once the test has released the gate (if gc holds its lease)."""
        if self.leased.is_set():
            self.release.wait(300)
        return self.inner.get(key)


class Guest:
    """The VM plus what its disk should hold."""

    def __init__(self, vm: Any) -> None:
        self.vm = vm
        self.disk = bytearray(64 * MiB)

    def fill(self, chunk: int, pattern: int) -> bytes:
        self.vm.write("vda", chunk * CHUNK, CHUNK, pattern)
        self.disk[chunk * CHUNK:(chunk + 1) * CHUNK] = bytes([pattern]) * CHUNK
        return bytes([pattern]) * CHUNK


def cli_backup(fleece: Any, guest: Guest, url: str) -> str:
    r = fleece("backup", "--qmp", guest.vm.qmp_path, "--drive", "vda", "--repo", url, "--json")
    assert r.rc == 0, r.err
    return str(r.json()["point"])


def api_backup(guest: Guest, backend: Backend, storers: int = 4) -> BackupResult:
    req = BackupRequest(qmp=guest.vm.qmp_path, drives=["vda"], repo=Repository.open(backend),
                        settings=PipelineSettings(storers=storers))
    return asyncio.run(run_backup(req))


def with_garbage(fleece: Any, guest: Guest, url: str, pattern: int) -> bytes:
    """Back up ``pattern`` in chunk 0, overwrite and back up again, prune the first point.

    Returns the chunk that only the pruned point named: garbage for gc.
    """
    garbage = guest.fill(0, pattern)
    cli_backup(fleece, guest, url)
    guest.fill(0, pattern ^ 0xFF)
    cli_backup(fleece, guest, url)
    r = fleece("prune", "--repo", url, "--keep-last", "1")
    assert r.rc == 0, r.err
    assert open_backend(url).exists(keys.chunk_key(repo_digest(url, garbage)))
    return garbage


def repo_digest(url: str, data: bytes) -> bytes:
    """``data``'s chunk name in the repository at ``url`` (by its own hash)."""
    return Repository.open(open_backend(url)).chunk_name(data)


def verify_deep(fleece: Any, url: str) -> None:
    r = fleece("verify", "--repo", url, "--deep", "--json")
    assert r.rc == 0, r.out + r.err


@pytest.fixture
def guest(make_vm: Any) -> Iterator[Guest]:
    yield Guest(make_vm(name="web1"))


def test_gc_in_the_window_between_the_dedup_probe_and_the_commit_backs_off(
        guest: Guest, fleece: Any, repo_url: str) -> None:
    garbage = with_garbage(fleece, guest, repo_url, 0xAA)
    guest.fill(0, 0xAA)  # the guest writes the pruned data again: the backup will find it stored
    attempts: list[BaseException | None] = []

    def gc_now() -> None:
        try:
            collect_garbage(Repository.open(open_backend(repo_url)))
            attempts.append(None)
        except LockHeld as exc:
            attempts.append(exc)

    hook = ProbeHook(open_backend(repo_url), keys.chunk_key(repo_digest(repo_url, garbage)), gc_now)
    result = api_backup(guest, hook)  # type: ignore[arg-type]
    assert hook.probed == 1 and result.disks[0].stats.chunks_reused == 1
    assert len(attempts) == 1 and isinstance(attempts[0], LockHeld)
    assert "VM web1 is locked" in str(attempts[0])
    verify_deep(fleece, repo_url)
    # With the backup done, gc runs and the chunk is the new point's.
    report = collect_garbage(Repository.open(open_backend(repo_url)))
    assert report.chunks_deleted == 0
    verify_deep(fleece, repo_url)


def test_without_the_lease_check_the_same_race_loses_a_chunk(
        guest: Guest, fleece: Any, repo_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: proof that the test above would see the damage if gc ignored backups."""
    garbage = with_garbage(fleece, guest, repo_url, 0xAA)
    guest.fill(0, 0xAA)
    monkeypatch.setattr(gc_lock, "running_backups", lambda backend: [])

    def gc_now() -> None:
        collect_garbage(Repository.open(open_backend(repo_url)))

    key = keys.chunk_key(repo_digest(repo_url, garbage))
    result = api_backup(guest, ProbeHook(open_backend(repo_url), key, gc_now))  # type: ignore[arg-type]
    assert not open_backend(repo_url).exists(key)
    repo = Repository.open(open_backend(repo_url))
    report = verify_points(repo, [("web1", result.point.id)], deep=True)
    assert not report.ok and "chunk missing" in report.points[0].damage[0].problem


class HeldWhileStoring(ForwardingBackend):
    """A backend whose chunk writes wait, from the first one on, until the test releases them.

    It pins a backup inside its leased section, storing chunks, for as long as the test needs
    (a gc refused, another waiting), however slow or fast the machine is.
    """

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.storing = threading.Event()
        self.release = threading.Event()

    def _hold(self, key: str) -> None:
        if key.startswith(keys.CHUNKS_PREFIX):
            self.storing.set()
            self.release.wait(300)

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """The inner ``put``, held while the gate is shut (chunks only)."""
        self._hold(key)
        return self.inner.put(key, data, if_absent=if_absent)

    def stage(self, key: str, data: bytes | memoryview) -> bool:
        """The inner ``stage``, held while the gate is shut (chunks only)."""
        self._hold(key)
        return self.inner.stage(key, data)


def test_gc_started_during_a_slow_backup_waits_for_it_then_frees_only_garbage(
        guest: Guest, fleece: Any, repo_url: str) -> None:
    garbage = with_garbage(fleece, guest, repo_url, 0xCC)
    for chunk in range(1, 9):
        guest.fill(chunk, 0x60 + chunk)  # none equals 0xCC ^ 0xFF
    held = HeldWhileStoring(open_backend(repo_url))
    outcome: dict[str, Any] = {}

    def back_up() -> None:
        outcome["result"] = api_backup(guest, held, storers=1)

    backup = threading.Thread(target=back_up)
    backup.start()
    try:
        assert held.storing.wait(120), "the backup never stored a chunk"
        assert open_backend(repo_url).exists(keys.vm_lock_key("web1"))  # its lease is up
        refused = fleece("gc", "--repo", repo_url, "--json")
        assert refused.rc == 1 and "VM web1 is locked by" in refused.err and refused.out == ""
        gc = subprocess.Popen([FLEECE, "gc", "--repo", repo_url, "--wait", "2m", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              text=True)
        assert gc.stderr is not None
        said = gc.stderr.readline()  # gc says it waits, while the backup is still held: they overlap
        assert "waiting up to 2m" in said, said
        assert backup.is_alive() and gc.poll() is None
    finally:
        held.release.set()
    backup.join(120)
    out, err = gc.communicate(timeout=120)
    assert gc.returncode == 0, said + err
    assert json.loads(out)["chunks_deleted"] == 1  # the pruned point's chunk, nothing of the new one
    assert not open_backend(repo_url).exists(keys.chunk_key(repo_digest(repo_url, garbage)))
    point = outcome["result"].point
    assert point.parent is not None and outcome["result"].disks[0].stats.chunks_new == 8
    verify_deep(fleece, repo_url)


def test_a_backup_started_during_gc_backs_off_and_leaves_the_vm_as_it_was(
        guest: Guest, fleece: Any, repo_url: str) -> None:
    with_garbage(fleece, guest, repo_url, 0xEE)
    guest.fill(3, 0x42)
    graph = guest.vm.block_graph()
    held = HeldAfterLease(open_backend(repo_url))
    outcome: dict[str, Any] = {}
    gc = threading.Thread(target=lambda: outcome.update(report=collect_garbage(Repository.open(held))))
    gc.start()
    try:
        assert held.leased.wait(60), "gc never took its lease"
        r = fleece("backup", "--qmp", guest.vm.qmp_path, "--drive", "vda", "--repo", repo_url)
        assert gc.is_alive(), "gc finished too soon to overlap"
    finally:
        held.release.set()
    assert r.rc == 1 and "garbage collection is running" in r.err, r.err
    assert guest.vm.block_graph() == graph
    assert not open_backend(repo_url).exists(keys.vm_lock_key("web1"))
    gc.join(120)
    assert outcome["report"].chunks_deleted == 1
    point = cli_backup(fleece, guest, repo_url)
    verify_deep(fleece, repo_url)
    repo = Repository.open(open_backend(repo_url))
    assert repo.find_point(point).disks[0].level == "incremental"


def test_unlock_force_and_gc_in_the_window_between_the_dedup_probe_and_the_commit(
        guest: Guest, fleece: Any, repo_url: str) -> None:
    """The operator breaks a running backup's lease and gc runs at the worst moment.

    The backup has just decided to reuse a garbage chunk; gc, seeing no VM
    lease, deletes it. The backup must notice its lease is gone and commit
    nothing (the point would name the deleted chunk); QEMU is left as found.
    """
    garbage = with_garbage(fleece, guest, repo_url, 0xAA)
    guest.fill(0, 0xAA)
    before = sorted(Repository.open(open_backend(repo_url)).point_refs())
    graph = guest.vm.block_graph()
    ran: list[Any] = []

    def break_and_collect() -> None:
        ran.append(fleece("unlock", "--repo", repo_url, "--vm", "web1", "--force"))
        ran.append(fleece("gc", "--repo", repo_url, "--json"))

    key = keys.chunk_key(repo_digest(repo_url, garbage))
    with pytest.raises(LockHeld, match=r"lost the lock on VM web1.*nothing was committed"):
        api_backup(guest, ProbeHook(open_backend(repo_url), key, break_and_collect))  # type: ignore[arg-type]
    assert [r.rc for r in ran] == [0, 0], [r.err for r in ran]
    assert ran[1].json()["chunks_deleted"] == 1 and not open_backend(repo_url).exists(key)
    assert sorted(Repository.open(open_backend(repo_url)).point_refs()) == before
    assert guest.vm.block_graph() == graph
    verify_deep(fleece, repo_url)
    point = cli_backup(fleece, guest, repo_url)  # the next backup uploads the chunk again
    verify_deep(fleece, repo_url)
    assert point not in {p for _, p in before}


class PointHook:
    """A backend that calls ``before`` just before the restore point's object is written."""

    def __init__(self, inner: Backend, before: Callable[[], None]) -> None:
        self.inner = inner
        self.url = inner.url
        self.before = before

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        if key.startswith(keys.POINTS_PREFIX):
            self.before()
        return self.inner.put(key, data, if_absent=if_absent)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_lease_broken_between_the_pre_commit_check_and_the_point_withdraws_the_point(
        guest: Guest, fleece: Any, repo_url: str) -> None:
    """The break lands after the backup's check, just before its point is written, and gc runs:
    the re-read after the write sees the lease gone and deletes the point again."""
    guest.fill(0, 0x11)
    first = cli_backup(fleece, guest, repo_url)
    guest.fill(1, 0x22)
    graph = guest.vm.block_graph()
    ran: list[Any] = []

    def break_and_collect() -> None:
        ran.append(fleece("unlock", "--repo", repo_url, "--vm", "web1", "--force"))
        ran.append(fleece("gc", "--repo", repo_url, "--json"))

    with pytest.raises(LockHeld, match=r"lost the lock on VM web1.*nothing was committed"):
        api_backup(guest, PointHook(open_backend(repo_url), break_and_collect))  # type: ignore[arg-type]
    assert [r.rc for r in ran] == [0, 0], [r.err for r in ran]
    assert [p for _, p in Repository.open(open_backend(repo_url)).point_refs()] == [first]
    assert guest.vm.block_graph() == graph
    verify_deep(fleece, repo_url)
    point = cli_backup(fleece, guest, repo_url)
    assert Repository.open(open_backend(repo_url)).find_point(point).disks[0].level == "incremental"
