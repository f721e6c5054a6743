"""Leases that cannot be stolen silently: takeover, renewal race, ``unlock --force`` during a backup.

Each race is forced, not hoped for: the other process's move is made from a
hook that runs exactly between the holder's read of its lease and its write
(``before-parameter-build`` of the holder's PutObject on S3, the temporary
file of its write on a directory), or while a real backup is held at a phase
(:mod:`fleece.testing`). The holder must notice, keep nothing of the other's
lease overwritten, and a backup must commit nothing.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from backups import point_ids
from conftest import S3_SERVER_FIXTURES

from fleece.errors import LockHeld, RepositoryError
from fleece.repo.backends.base import Backend, ForwardingBackend
from fleece.repo.backends.file import FileBackend
from fleece.repo.backends.s3 import S3Backend
from fleece.repo.backends.url import open_backend
from fleece.repo.format.keys import lease_generation_key, lease_generations_prefix, vm_lock_key
from fleece.repo.lock import Lease, acquire, break_lease, read_lease

KEY = vm_lock_key("web1")
GENERATIONS = lease_generations_prefix(KEY)
LEASE_STORES = ("file", "moto", "ceph-http", "ceph-https")
"""Where leases are safe: every store here enforces ``If-None-Match`` (s3rver does not)."""


@pytest.fixture(params=LEASE_STORES)
def lease_store(request: pytest.FixtureRequest) -> str:
    """The store a lease test runs on."""
    return str(request.param)


@pytest.fixture
def s3_server(lease_store: str, request: pytest.FixtureRequest) -> Any:
    """The S3 server of ``lease_store`` (moto for the tests that always use S3)."""
    name = "moto" if lease_store == "file" else lease_store
    return request.getfixturevalue(S3_SERVER_FIXTURES[name])


@pytest.fixture
def repo_url(lease_store: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A repository location on ``lease_store``."""
    if lease_store == "file":
        return str(tmp_path / "repo")
    return f"s3://{request.getfixturevalue('s3_bucket')}/fleece"


def take_over(url: str) -> Lease:
    """Another process breaks the lease (``unlock --force``) and a new backup takes it."""
    other = open_backend(url)
    break_lease(other, KEY, "VM web1")
    return acquire(other, KEY, "VM web1", heartbeat=False)


def stored_token(url: str) -> str | None:
    info = read_lease(open_backend(url), KEY)
    return None if info is None else info.token


class BeforeCreate(ForwardingBackend):
    """A backend that runs ``action`` once, just before its first create of a lease generation
    reaches the store (after every read its caller made first)."""

    def __init__(self, inner: Backend, action: Callable[[], object]) -> None:
        super().__init__(inner)
        self.action = action
        self.ran = False

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        if key.startswith(GENERATIONS) and not self.ran:
            self.ran = True
            self.action()
        return self.inner.put(key, data, if_absent=if_absent)


def test_the_pre_commit_check_rereads_the_lease_and_sees_a_takeover(repo_url: str) -> None:
    holder = acquire(open_backend(repo_url), KEY, "VM web1", heartbeat=False)
    holder.check()
    taker = take_over(repo_url)
    with pytest.raises(LockHeld, match=r"lost the lock on VM web1: .* pid \d+ took it over at .*"
                                       r"nothing was committed"):
        holder.check()
    assert stored_token(repo_url) == taker.info.token
    holder.release()  # not ours any more: the taker's lease stays
    assert stored_token(repo_url) == taker.info.token
    taker.release()
    assert stored_token(repo_url) is None


def test_the_pre_commit_check_sees_a_broken_lease(repo_url: str) -> None:
    holder = acquire(open_backend(repo_url), KEY, "VM web1", heartbeat=False)
    break_lease(open_backend(repo_url), KEY, "VM web1")
    with pytest.raises(LockHeld, match=r"broke it at .*\(fleece unlock\).*nothing was committed"):
        holder.check()
    assert stored_token(repo_url) is None


def test_a_takeover_between_the_renewals_read_and_write_is_not_overwritten(repo_url: str) -> None:
    takers: list[Lease] = []
    backend = BeforeCreate(open_backend(repo_url), lambda: takers.append(take_over(repo_url)))
    holder = acquire(open_backend(repo_url), KEY, "VM web1", heartbeat=False)
    holder.backend = backend
    with pytest.raises(LockHeld, match=r"lost the lock on VM web1: .* took it over at"):
        holder.renew()
    assert backend.ran, "the takeover did not land inside the renewal"
    assert stored_token(repo_url) == takers[0].info.token  # the taker's lease survived
    with pytest.raises(LockHeld):
        holder.check()
    takers[0].check()


def test_a_break_between_the_renewals_read_and_write_does_not_bring_the_lease_back(
        repo_url: str) -> None:
    backend = BeforeCreate(open_backend(repo_url),
                           lambda: break_lease(open_backend(repo_url), KEY, "VM web1"))
    holder = acquire(open_backend(repo_url), KEY, "VM web1", heartbeat=False)
    holder.backend = backend
    with pytest.raises(LockHeld, match=r"lost the lock on VM web1: .* broke it at"):
        holder.record_uses(["20261122T073600.000001Z-0b7e55"])
    assert backend.ran
    # Resurrected, it would tell a gc that started meanwhile nothing, and the
    # holder would believe it had held it all along.
    assert stored_token(repo_url) is None


class Overlap(ForwardingBackend):
    """Holds each create of a lease generation at a barrier until the other writer's is ready:
    both writers have read the same newest generation and both send the same next one."""

    def __init__(self, inner: Backend, barrier: threading.Barrier) -> None:
        super().__init__(inner)
        self.barrier: threading.Barrier | None = barrier

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        if key.startswith(GENERATIONS) and if_absent and self.barrier is not None:
            barrier, self.barrier = self.barrier, None  # the first create only
            barrier.wait(30)
        return self.inner.put(key, data, if_absent=if_absent)


def test_two_writers_racing_for_one_lease_exactly_one_wins_every_time(repo_url: str) -> None:
    """Forced overlap, four rounds: a fresh lease, an expired one, a released one; each time both
    writers create the same generation at once and exactly one holds the lease afterwards."""
    from fleece.repo.lock import LeaseInfo

    for backend in (open_backend(repo_url), open_backend(repo_url)):
        backend.put("warm-up", b"", if_absent=True)  # the store check, once per backend, first
    for round_ in range(4):
        if round_ % 3 == 1:  # a dead holder's expired lease, to be taken over
            dead = LeaseInfo(key=KEY, host="gone-host", pid=4242, token="d" * 32,
                             created="2026-01-01T00:00:00.000000Z",
                             expires="2026-01-01T00:10:00.000000Z", generation=round_ * 10 + 1)
            open_backend(repo_url).put(lease_generation_key(KEY, dead.generation), dead.to_json())
        barrier = threading.Barrier(2)
        won: list[Lease] = []
        refused: list[LockHeld] = []

        def contend(barrier: threading.Barrier = barrier, won: list[Lease] = won,
                    refused: list[LockHeld] = refused) -> None:
            try:
                won.append(acquire(Overlap(open_backend(repo_url), barrier), KEY, "VM web1",
                                   heartbeat=False))
            except LockHeld as exc:
                refused.append(exc)

        threads = [threading.Thread(target=contend) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert (len(won), len(refused)) == (1, 1), (won, refused)
        assert "VM web1 is locked by" in str(refused[0])
        assert stored_token(repo_url) == won[0].info.token
        won[0].check()
        won[0].release()
        assert stored_token(repo_url) is None
    # Superseded generations are cleaned up: one object is left, the release.
    assert len(list(open_backend(repo_url).list(GENERATIONS))) == 1


def _swap_many(root: str, worker: int, rounds: int, wins: Any) -> None:
    backend = FileBackend(Path(root))
    won = 0
    for _ in range(rounds):
        while True:
            current = backend.get("counter")
            if backend.replace_if("counter", str(int(current) + 1).encode(), current):
                won += 1
                break
    wins[worker] = won


def test_file_replace_if_is_atomic_between_processes(tmp_path: Path) -> None:
    """Four processes increment one object by compare-and-swap: no increment is lost."""
    backend = FileBackend(tmp_path / "repo")
    backend.put("counter", b"0")
    ctx = multiprocessing.get_context("fork")
    wins: Any = ctx.Array("i", 4)
    procs = [ctx.Process(target=_swap_many, args=(str(backend.root), w, 150, wins))
             for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert sum(wins) == 600
    assert backend.get("counter") == b"600"
    assert not list(backend.root.glob(".tmp-*"))


def test_replace_if_changes_nothing_unless_the_object_holds_what_was_expected(
        repo_url: str, lease_store: str) -> None:
    backend = open_backend(repo_url)
    if lease_store.startswith("ceph"):
        # RGW refuses If-Match even with the current ETag: the swap is refused, never assumed.
        backend.put("locks/x", b"old")
        with pytest.raises(RepositoryError, match=r"refuses If-Match: <ETag> on PutObject even when "
                                                  r"the precondition holds \(412\)"):
            backend.replace_if("locks/x", b"new", b"old")
        assert backend.get("locks/x") == b"old"
        return
    assert not backend.replace_if("locks/x", b"new", b"old")  # absent: not created
    assert not backend.exists("locks/x")
    backend.put("locks/x", b"old")
    assert not backend.replace_if("locks/x", b"new", b"other")
    assert backend.get("locks/x") == b"old"
    assert backend.replace_if("locks/x", b"new", b"old")
    assert backend.get("locks/x") == b"new"


# -- a real backup whose lease is broken while it runs ------------------------------------
@pytest.mark.qemu
def test_unlock_force_and_gc_while_a_backup_is_held_commit_nothing(
        make_vm: Any, fleece: Any, repo_url: str, hold_backup: Any) -> None:
    """The backup is held before its point; the operator breaks its lease and gc runs.

    The backup then fails with one line, commits no point, and QEMU is left as
    it was before the backup; the repository verifies and the next backup works.
    """
    vm = make_vm(name="web1")
    vm.write("vda", 0, 4 << 20, 0x5A)
    first = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo_url, "--json")
    assert first.rc == 0, first.err
    vm.write("vda", 8 << 20, 4 << 20, 0x6B)
    graph = vm.block_graph()
    held = hold_backup(vm, repo_url, "before-point")
    held.wait_held()
    broken = fleece("unlock", "--repo", repo_url, "--vm", "web1", "--force")
    assert broken.rc == 0, broken.err
    gc = fleece("gc", "--repo", repo_url, "--json")
    assert gc.rc == 0, gc.err  # nothing told gc a backup was running
    rc, out, err = held.release()
    assert rc == 1, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "lost the lock" in lines[0] and "nothing was committed" in lines[0]
    assert "Traceback" not in err and out == ""
    assert point_ids(fleece, repo_url) == [first.json()["point"]]
    assert vm.block_graph() == graph
    verified = fleece("verify", "--repo", repo_url, "--deep")
    assert verified.rc == 0, verified.out + verified.err
    again = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo_url, "--json")
    assert again.rc == 0, again.err
    assert again.json()["disks"][0]["level"] == "incremental"


def test_two_takers_of_one_stale_lease_do_not_both_win(repo_url: str) -> None:
    """Both read the dead holder's lease; one takes it over first. The other must not then
    remove the winner's fresh lease and take it too."""
    from fleece.repo.lock import LeaseInfo

    dead = LeaseInfo(key=KEY, host="gone-host", pid=4242, token="d" * 32,
                     created="2026-01-01T00:00:00.000000Z", expires="2026-01-01T00:10:00.000000Z",
                     generation=7)
    open_backend(repo_url).put(lease_generation_key(KEY, 7), dead.to_json())
    first: list[Lease] = []
    late = BeforeCreate(open_backend(repo_url), lambda: first.append(
        acquire(open_backend(repo_url), KEY, "VM web1", heartbeat=False)))
    with pytest.raises(LockHeld, match="VM web1 is locked by"):
        acquire(late, KEY, "VM web1", heartbeat=False)
    assert late.ran and len(first) == 1
    assert stored_token(repo_url) == first[0].info.token
    first[0].check()


def test_an_older_fleeces_live_lease_is_honoured_and_its_expired_one_taken_over(repo_url: str) -> None:
    """Mixed versions: a fleece before lease generations holds ``locks/vms/web1`` itself."""
    from fleece.repo.lock import LeaseInfo

    backend = open_backend(repo_url)
    old = LeaseInfo(key=KEY, host="old-host", pid=77, token="o" * 32,
                    created="2026-01-01T00:00:00.000000Z", expires="2999-01-01T00:00:00.000000Z")
    backend.put(KEY, old.to_json())
    older = r"VM web1 is locked by old-host pid 77 .*, a fleece older than lease generations"
    with pytest.raises(LockHeld, match=older):
        acquire(backend, KEY, "VM web1", heartbeat=False)
    assert read_lease(backend, KEY) == old  # still its lease; ours was released again
    backend.put(KEY, replace(old, expires="2026-01-01T00:10:00.000000Z").to_json())
    holder = acquire(backend, KEY, "VM web1", heartbeat=False)
    # What an older fleece reads at the old key now: our guard, held by us, far from expiry.
    seen = LeaseInfo.from_json(backend.get(KEY))
    assert (seen.host, seen.pid, seen.token) == (holder.info.host, holder.info.pid, holder.info.token)
    assert not seen.expired(time.time() + 86400)
    holder.release()
    assert not backend.exists(KEY) and read_lease(backend, KEY) is None


@pytest.mark.parametrize("lease_store", ["moto"], indirect=True)
def test_s3_replace_if_survives_a_lost_reply_and_falls_back_without_if_match(
        s3_bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    from fleece.testing.s3_faults import inject_http_faults

    backend = S3Backend(s3_bucket, "fleece")
    backend.put("locks/x", b"old")
    # The swap happened but its reply was lost: botocore's retry meets 412 (the ETag moved on)
    # and that is our own write, not someone else's.
    with inject_http_faults(backend, lost_replies=1, ops={"PutObject"}) as faults:
        assert backend.replace_if("locks/x", b"new", b"old")
    assert faults.injected["lost_replies"] == 1 and backend.get("locks/x") == b"new"
    # A store without If-Match: refused, unless unsafe_locks accepts read, compare, write,
    # read again (with one warning).
    with inject_http_faults(backend, statuses=[(501, "NotImplemented")], ops={"PutObject"}), \
            pytest.raises(RepositoryError, match="answered 501 NotImplemented to If-Match"):
        backend.replace_if("locks/x", b"newer", b"new")
    assert backend.get("locks/x") == b"new"
    backend.unsafe_locks = True
    with inject_http_faults(backend, statuses=[(501, "NotImplemented")], ops={"PutObject"}):
        assert backend.replace_if("locks/x", b"newer", b"new")
    assert backend.get("locks/x") == b"newer"
    assert "does not support If-Match" in caplog.text
    assert not backend.replace_if("locks/x", b"x", b"new")  # the compare still holds
    assert backend.get("locks/x") == b"newer"


def stored_lease_token(backend: Backend) -> str | None:
    info = read_lease(backend, KEY)
    return None if info is None else info.token


def test_a_renewal_whose_reply_was_lost_is_still_ours_at_the_next_renewal() -> None:
    """The swap happened, the holder was told it failed: its next renewal and check must
    recognise its own write rather than call the lease stolen."""
    from fleece.testing.faults import FaultyBackend, InjectedFault
    from fleece.testing.memory_backend import MemoryBackend

    mem = MemoryBackend()
    holder = acquire(mem, KEY, "VM web1", heartbeat=False)
    holder.backend = FaultyBackend(mem, fail_first=1, lose_replies=True, ops={"put"})
    with pytest.raises(InjectedFault):
        holder.renew()
    stored = read_lease(mem, KEY)
    assert stored is not None and stored.expires != holder.info.expires  # it did happen
    holder.check()
    holder.renew()
    holder.check()
    assert stored_lease_token(mem) == holder.info.token
    holder.release()
    assert read_lease(mem, KEY) is None and not mem.exists(KEY)


def test_file_replace_if_without_rename_exchange_still_compares(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a file system without RENAME_EXCHANGE (NFS) the swap is a plain rename after the
    compare under the flock: a changed object is still never overwritten."""
    import errno

    from fleece.repo.backends import file as file_backend

    def no_exchange(a: Path, b: Path) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(file_backend, "_exchange", no_exchange)
    backend = FileBackend(tmp_path / "repo")
    backend.put("locks/x", b"old")
    assert not backend.replace_if("locks/x", b"new", b"other")
    assert backend.replace_if("locks/x", b"new", b"old")
    assert backend.get("locks/x") == b"new"
    assert not list((tmp_path / "repo").rglob(".tmp-*"))
