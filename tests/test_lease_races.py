"""Leases that cannot be stolen silently: takeover, renewal race, ``unlock --force`` during a backup.

Each race is forced, not hoped for: the other process's move is made from a
hook that runs exactly between the holder's read of its lease and its write
(``before-parameter-build`` of the holder's PutObject on S3, the temporary
file of its write on a directory), or while a real backup is held at a phase
(:mod:`fleece.testing`). The holder must notice, keep nothing of the other's
lease overwritten, and a backup must commit nothing.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from backups import point_ids

from fleece.errors import LockHeld
from fleece.repo.backends.base import Backend
from fleece.repo.backends.file import FileBackend
from fleece.repo.backends.s3 import S3Backend
from fleece.repo.backends.url import open_backend
from fleece.repo.format.keys import vm_lock_key
from fleece.repo.lock import Lease, acquire, break_lease

KEY = vm_lock_key("web1")


def take_over(url: str) -> Lease:
    """Another process breaks the lease (``unlock --force``) and a new backup takes it."""
    other = open_backend(url)
    break_lease(other, KEY, "VM web1")
    return acquire(other, KEY, "VM web1", heartbeat=False)


def stored_token(url: str) -> str:
    return str(json.loads(open_backend(url).get(KEY))["token"])


def before_lease_write(backend: Backend, action: Callable[[], object]) -> list[int]:
    """Run ``action`` once, just before ``backend``'s next write of the lease reaches the store.

    That is after every read the holder makes first. Returns a list that
    gets one entry when the action ran.
    """
    ran: list[int] = []

    def fire() -> None:
        if not ran:
            ran.append(1)
            action()

    if isinstance(backend, S3Backend):
        def hook(params: dict[str, Any], **_: Any) -> None:
            if str(params.get("Key", "")).endswith(KEY):
                fire()
        backend.client.meta.events.register("before-parameter-build.s3.PutObject", hook)
    else:
        assert isinstance(backend, FileBackend)
        write_temp = backend._write_temp
        lock_dir = backend.root / "locks" / "vms"

        def wrapped(directory: Path, data: bytes | memoryview, durable: bool = True) -> Path:
            if directory == lock_dir:
                fire()
            return write_temp(directory, data, durable)
        backend._write_temp = wrapped  # type: ignore[method-assign]
    return ran


def test_the_pre_commit_check_rereads_the_lease_and_sees_a_takeover(repo_url: str) -> None:
    holder = acquire(open_backend(repo_url), KEY, "VM web1", heartbeat=False)
    holder.check()
    taker = take_over(repo_url)
    with pytest.raises(LockHeld, match=r"lost the lock on VM web1.*nothing was committed"):
        holder.check()
    assert stored_token(repo_url) == taker.info.token
    holder.release()  # not ours any more: the taker's lease stays
    assert stored_token(repo_url) == taker.info.token


def test_the_pre_commit_check_sees_a_broken_lease(repo_url: str) -> None:
    holder = acquire(open_backend(repo_url), KEY, "VM web1", heartbeat=False)
    break_lease(open_backend(repo_url), KEY, "VM web1")
    with pytest.raises(LockHeld, match="removed or taken over"):
        holder.check()
    assert not open_backend(repo_url).exists(KEY)


def test_a_takeover_between_the_renewals_read_and_write_is_not_overwritten(repo_url: str) -> None:
    backend = open_backend(repo_url)
    holder = acquire(backend, KEY, "VM web1", heartbeat=False)
    takers: list[Lease] = []
    ran = before_lease_write(backend, lambda: takers.append(take_over(repo_url)))
    with pytest.raises(LockHeld, match="lost the lock on VM web1"):
        holder.renew()
    assert ran, "the takeover did not land inside the renewal"
    assert stored_token(repo_url) == takers[0].info.token  # the taker's lease survived
    with pytest.raises(LockHeld):
        holder.check()


def test_a_break_between_the_renewals_read_and_write_does_not_bring_the_lease_back(
        repo_url: str) -> None:
    backend = open_backend(repo_url)
    holder = acquire(backend, KEY, "VM web1", heartbeat=False)
    ran = before_lease_write(backend, lambda: break_lease(open_backend(repo_url), KEY, "VM web1"))
    with pytest.raises(LockHeld, match="lost the lock on VM web1"):
        holder.record_uses(["20261122T073600.000001Z-0b7e55"])
    assert ran
    # Resurrected, it would tell a gc that started meanwhile nothing, and the
    # holder would believe it had held it all along.
    assert not open_backend(repo_url).exists(KEY)


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


def test_replace_if_changes_nothing_unless_the_object_holds_what_was_expected(repo_url: str) -> None:
    backend = open_backend(repo_url)
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


def test_file_a_break_between_the_compare_and_the_swap_is_not_undone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compare holds only against other swaps (flock): a delete can still land before the
    swap, which then must fail rather than recreate the object."""
    from fleece.repo.backends import file as file_backend

    backend = FileBackend(tmp_path / "repo")
    holder = acquire(backend, KEY, "VM web1", heartbeat=False)
    exchange = file_backend._exchange
    ran: list[int] = []

    def break_first(a: Path, b: Path) -> None:
        if not ran:
            ran.append(1)
            break_lease(FileBackend(tmp_path / "repo"), KEY, "VM web1")
        exchange(a, b)

    monkeypatch.setattr(file_backend, "_exchange", break_first)
    with pytest.raises(LockHeld, match="removed or taken over"):
        holder.renew()
    assert ran and not backend.exists(KEY)
    assert not list((tmp_path / "repo").rglob(".tmp-*"))


class BeforeWrite:
    """A backend that runs ``action`` once, just before its first delete or swap of the lease."""

    def __init__(self, inner: Backend, action: Callable[[], object]) -> None:
        self.inner = inner
        self.url = inner.url
        self.action = action
        self.ran = False

    def _fire(self, key: str) -> None:
        if key == KEY and not self.ran:
            self.ran = True
            self.action()

    def delete(self, key: str) -> None:
        self._fire(key)
        self.inner.delete(key)

    def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        self._fire(key)
        return self.inner.replace_if(key, data, expected)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_two_takers_of_one_stale_lease_do_not_both_win(repo_url: str) -> None:
    """Both read the dead holder's lease; one takes it over first. The other must not then
    remove the winner's fresh lease and take it too."""
    from fleece.repo.lock import LeaseInfo

    dead = LeaseInfo(key=KEY, host="gone-host", pid=4242, token="d" * 32,
                     created="2026-01-01T00:00:00.000000Z", expires="2026-01-01T00:10:00.000000Z")
    open_backend(repo_url).put(KEY, dead.to_json())
    first: list[Lease] = []
    late = BeforeWrite(open_backend(repo_url), lambda: first.append(
        acquire(open_backend(repo_url), KEY, "VM web1", heartbeat=False)))
    with pytest.raises(LockHeld, match="VM web1 is locked by"):
        acquire(late, KEY, "VM web1", heartbeat=False)  # type: ignore[arg-type]
    assert late.ran and len(first) == 1
    assert stored_token(repo_url) == first[0].info.token
    first[0].check()


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
    # A store without If-Match: read, compare, write, read again, with one warning.
    with inject_http_faults(backend, statuses=[(501, "NotImplemented")], ops={"PutObject"}):
        assert backend.replace_if("locks/x", b"newer", b"new")
    assert backend.get("locks/x") == b"newer"
    assert "does not support If-Match" in caplog.text
    assert not backend.replace_if("locks/x", b"x", b"new")  # the compare still holds
    assert backend.get("locks/x") == b"newer"


def test_a_renewal_whose_reply_was_lost_is_still_ours_at_the_next_renewal() -> None:
    """The swap happened, the holder was told it failed: its next renewal and check must
    recognise its own write rather than call the lease stolen."""
    from fleece.testing.faults import FaultyBackend, InjectedFault
    from fleece.testing.memory_backend import MemoryBackend

    mem = MemoryBackend()
    faulty = FaultyBackend(mem, fail_first=1, lose_replies=True, ops={"replace_if"})
    holder = acquire(faulty, KEY, "VM web1", heartbeat=False)
    with pytest.raises(InjectedFault):
        holder.renew()
    assert json.loads(mem.get(KEY))["expires"] != holder.info.expires  # it did happen
    holder.check()
    holder.renew()
    holder.check()
    assert json.loads(mem.get(KEY))["token"] == holder.info.token
    holder.release()
    assert not mem.exists(KEY)


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
