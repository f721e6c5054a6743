"""Writer locks as lease objects: held, renewed, released, taken over, broken."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from fleece.errors import LockHeld
from fleece.repo.backends.base import Backend
from fleece.repo.backends.file import FileBackend
from fleece.repo.lock import Lease, acquire, break_lease, repo_lock, vm_lock
from fleece.testing.memory_backend import MemoryBackend


@pytest.fixture(params=["file", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Leases rely only on the Backend protocol: check them on two backends."""
    if request.param == "memory":
        return MemoryBackend()
    return FileBackend(tmp_path / "repo")


def lease_doc(backend: Backend, key: str) -> dict[str, object]:
    doc: dict[str, object] = json.loads(backend.get(key))
    return doc


def test_lease_object_names_its_holder(backend: Backend) -> None:
    with vm_lock(backend, "web1") as lease:
        doc = lease_doc(backend, "locks/vms/web1")
        assert doc["host"] == socket.gethostname()
        assert doc["pid"] == os.getpid()
        assert doc["token"] == lease.info.token
        assert doc["format"] == 1
        assert str(doc["created"]) < str(doc["expires"])
    assert not backend.exists("locks/vms/web1")


def test_second_writer_is_refused_with_holder_details(backend: Backend) -> None:
    with vm_lock(backend, "web1"):
        with pytest.raises(LockHeld) as e, vm_lock(backend, "web1"):
            pass
        message = str(e.value)
        assert socket.gethostname() in message
        assert f"pid {os.getpid()}" in message
        assert "since 20" in message
        assert "nothing was changed" in message
        assert e.value.exit_code == 1
        # Another VM and the repository-wide lock are independent.
        with vm_lock(backend, "db1"), repo_lock(backend, "gc"):
            assert backend.exists("locks/repo/gc")
    with vm_lock(backend, "web1"):  # released: free again
        pass


def test_lock_is_released_when_the_block_fails(backend: Backend) -> None:
    with pytest.raises(RuntimeError), vm_lock(backend, "web1"):
        raise RuntimeError("backup failed")
    assert not backend.exists("locks/vms/web1")


def test_expired_lease_of_a_dead_writer_is_taken_over(backend: Backend) -> None:
    stale = {"format": 1, "key": "locks/vms/web1", "host": "gone-host", "pid": 99999,
             "token": "deadbeef", "created": "2020-01-01T00:00:00.000000Z",
             "expires": "2020-01-01T00:10:00.000000Z"}
    backend.put("locks/vms/web1", json.dumps(stale).encode())
    with vm_lock(backend, "web1") as lease:
        doc = lease_doc(backend, "locks/vms/web1")
        assert doc["token"] == lease.info.token != "deadbeef"
        assert doc["host"] == socket.gethostname()


def test_heartbeat_keeps_a_short_lease_alive(backend: Backend) -> None:
    with vm_lock(backend, "web1", lease_seconds=2.0) as lease:
        first_expiry = str(lease.info.expires)
        # Past the first lease's end (by the lease's own clock), and renewed at least twice: only
        # renewals can have kept it held. Waits for those events, not for a fixed time.
        renewals, seen = 0, first_expiry
        deadline = time.monotonic() + 60
        first = lease.info
        while renewals < 2 or not first.expired():
            assert time.monotonic() < deadline, "the heartbeat never renewed the lease"
            now = str(lease_doc(backend, "locks/vms/web1")["expires"])
            renewals, seen = renewals + (now != seen), now
            time.sleep(0.05)
        with pytest.raises(LockHeld):
            acquire(backend, "locks/vms/web1", "VM web1", heartbeat=False)
        assert str(lease_doc(backend, "locks/vms/web1")["expires"]) > first_expiry
        lease.check()


def test_without_heartbeat_a_lease_expires_and_is_taken_over(backend: Backend) -> None:
    dead = acquire(backend, "locks/vms/web1", "VM web1", lease_seconds=0.2, heartbeat=False)
    deadline = time.monotonic() + 60
    while not dead.info.expired():  # until its end has passed, however long that takes
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(LockHeld, match="expired"):
        dead.check()
    successor = acquire(backend, "locks/vms/web1", "VM web1", heartbeat=False)
    # The old holder wakes up: its release must not remove the successor's lease,
    # and a renewal reports the loss.
    dead.release()
    assert lease_doc(backend, "locks/vms/web1")["token"] == successor.info.token
    with pytest.raises(LockHeld, match="lost"):
        dead.renew()
    successor.release()
    assert not backend.exists("locks/vms/web1")


def test_break_lease(backend: Backend) -> None:
    holder = acquire(backend, "locks/vms/web1", "VM web1", heartbeat=False)
    with pytest.raises(LockHeld, match="changed hands meanwhile"):
        break_lease(backend, "locks/vms/web1", "VM web1", expected=replace(holder.info, token="other"))
    assert backend.exists("locks/vms/web1")
    info = break_lease(backend, "locks/vms/web1", "VM web1", expected=holder.info)
    assert info is not None and info.token == holder.info.token
    assert not backend.exists("locks/vms/web1")
    with pytest.raises(LockHeld, match="removed or taken over"):
        holder.renew()
    assert break_lease(backend, "locks/vms/web1", "VM web1") is None


def test_unreadable_lease_blocks_until_it_ages_out(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path)
    backend.put("locks/vms/web1", b"garbage")
    with pytest.raises(LockHeld, match="unknown host"):
        acquire(backend, "locks/vms/web1", "VM web1", heartbeat=False)
    old = time.time() - 3600
    os.utime(backend.root / "locks" / "vms" / "web1", (old, old))
    with vm_lock(backend, "web1"):
        assert lease_doc(backend, "locks/vms/web1")["host"] == socket.gethostname()


def test_names_are_escaped_in_lock_keys(backend: Backend) -> None:
    with vm_lock(backend, "/run/vm1/qmp.sock"):
        assert list(backend.list("locks/")) == ["locks/vms/%2Frun%2Fvm1%2Fqmp.sock"]


def test_simultaneous_writers_get_exactly_one_lock(backend: Backend) -> None:
    barrier = threading.Barrier(8)
    held: list[Lease] = []
    refused: list[LockHeld] = []

    def contend() -> None:
        barrier.wait()
        try:
            held.append(acquire(backend, "locks/vms/web1", "VM web1", heartbeat=False))
        except LockHeld as exc:
            refused.append(exc)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(held), len(refused)) == (1, 7)
    assert lease_doc(backend, "locks/vms/web1")["token"] == held[0].info.token
    held[0].release()


def test_unexpired_lease_of_a_killed_writer_on_this_host_is_taken_over(backend: Backend) -> None:
    # A backup killed with SIGKILL cannot release its lease; on its own host
    # the next writer sees the pid is gone and does not wait for expiry.
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    now = time.time()
    fresh = {"format": 1, "key": "locks/vms/web1", "host": socket.gethostname(), "pid": dead.pid,
             "token": "cafe", "created": "2026-01-01T00:00:00.000000Z",
             "expires": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(now + 600))}
    backend.put("locks/vms/web1", json.dumps(fresh).encode())
    with vm_lock(backend, "web1") as lease:
        assert lease_doc(backend, "locks/vms/web1")["token"] == lease.info.token
    # A live process of this host still blocks.
    alive = dict(fresh, pid=os.getpid(), token="beef")
    backend.put("locks/vms/web1", json.dumps(alive).encode())
    with pytest.raises(LockHeld), vm_lock(backend, "web1"):
        pass
