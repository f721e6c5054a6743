"""FaultyBackend and MemoryBackend: the tools other layers' failure tests stand on."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fleece.errors import RepositoryError
from fleece.repo.backends.base import Backend, ObjectMissing
from fleece.repo.backends.file import FileBackend
from fleece.repo.format import keys
from fleece.repo.repository import Repository
from fleece.testing.faults import FaultyBackend, InjectedFault
from fleece.testing.memory_backend import MemoryBackend


def test_memory_backend_keeps_the_backend_promises() -> None:
    mem = MemoryBackend("t")
    assert isinstance(mem, Backend) and mem.url == "memory://t"
    assert mem.put("a/1", b"one") and mem.put("a/2", b"two") and mem.put("b/1", b"three")
    assert mem.put("a/1", b"other", if_absent=True) is False
    assert mem.get("a/1") == b"one"
    assert sorted(mem.list("a/")) == ["a/1", "a/2"]
    assert mem.mtime("a/1") <= time.time()
    mem.delete("a/1")
    mem.delete("a/1")
    mem.delete_many(["a/2", "never"])
    assert list(mem.list("")) == ["b/1"]
    with pytest.raises(ObjectMissing):
        mem.get("a/1")
    with pytest.raises(ObjectMissing):
        mem.mtime("a/1")


def test_memory_backend_conditional_create_has_one_winner() -> None:
    mem = MemoryBackend()
    start = threading.Barrier(16)

    def write(n: int) -> bool:
        start.wait()
        return mem.put("locks/vms/vm1", str(n).encode(), if_absent=True)

    with ThreadPoolExecutor(16) as pool:
        won = list(pool.map(write, range(16)))
    assert won.count(True) == 1
    assert mem.get("locks/vms/vm1") == str(won.index(True)).encode()


def test_the_first_calls_fail_then_the_backend_recovers() -> None:
    mem = MemoryBackend()
    faulty = FaultyBackend(mem, fail_first=2, ops={"put"})
    assert isinstance(faulty, Backend) and faulty.url == mem.url
    for _ in range(2):
        with pytest.raises(InjectedFault, match="injected fault: put chunks/aa/aa"):
            faulty.put("chunks/aa/aa", b"data")
    assert not mem.exists("chunks/aa/aa")  # a failed put stored nothing
    assert faulty.put("chunks/aa/aa", b"data") is True
    assert faulty.get("chunks/aa/aa") == b"data"  # other operations were never failed
    assert faulty.calls == {"put": 3, "get": 1}
    assert faulty.failures == {"put": 2}
    assert issubclass(InjectedFault, RepositoryError)


def test_a_lost_reply_means_the_write_happened_anyway() -> None:
    mem = MemoryBackend()
    faulty = FaultyBackend(mem, fail_first=1, lose_replies=True)
    with pytest.raises(InjectedFault, match=r"reply to put locks/vms/vm1 on memory://.* lost"):
        faulty.put("locks/vms/vm1", b"lease", if_absent=True)
    assert mem.get("locks/vms/vm1") == b"lease"
    # A naive retry of the conditional create now sees "already exists".
    assert faulty.put("locks/vms/vm1", b"lease", if_absent=True) is False


def test_an_outage_fails_every_chosen_operation_until_it_ends() -> None:
    mem = MemoryBackend()
    mem.put("config", b"{}")
    faulty = FaultyBackend(mem, outage=True, ops={"put", "get", "list", "delete_many"})
    with pytest.raises(InjectedFault):
        faulty.put("x", b"x")
    with pytest.raises(InjectedFault):
        faulty.get("config")
    with pytest.raises(InjectedFault):
        faulty.list("")  # fails at the call, not at the first key
    with pytest.raises(InjectedFault):
        faulty.delete_many(["config"])
    assert faulty.exists("config") and faulty.mtime("config") > 0  # not in ops
    with pytest.raises(InjectedFault):
        faulty.list_info("")  # faulted as "list"
    faulty.outage = False
    assert [(i.key, i.size) for i in faulty.list_info("")] == [("config", 2)]
    assert faulty.get("config") == b"{}"
    faulty.delete_many(["config"])
    assert list(faulty.list("")) == []


def test_random_failures_follow_the_seed_and_the_rate() -> None:
    def pattern(seed: int) -> list[bool]:
        faulty = FaultyBackend(MemoryBackend(), fail_rate=0.3, seed=seed)
        out = []
        for i in range(1000):
            try:
                faulty.put(f"k{i}", b"")
                out.append(True)
            except InjectedFault:
                out.append(False)
        return out

    first = pattern(7)
    assert first == pattern(7) != pattern(8)
    assert 230 <= first.count(False) <= 370


def test_slowness_is_added_to_chosen_operations_only() -> None:
    faulty = FaultyBackend(MemoryBackend(), delay=0.1, ops={"get"})
    faulty.put("k", b"v")
    start = time.monotonic()
    assert faulty.exists("k")
    assert time.monotonic() - start < 0.05
    start = time.monotonic()
    assert faulty.get("k") == b"v"
    assert time.monotonic() - start >= 0.1


def test_an_outage_mid_way_loses_nothing_that_was_acknowledged() -> None:
    """Writers racing an outage: every acknowledged put is readable afterwards."""
    mem = MemoryBackend()
    faulty = FaultyBackend(mem, fail_rate=0.1, seed=1)
    acknowledged: set[str] = set()
    lock = threading.Lock()

    def write(i: int) -> None:
        if i == 150:
            faulty.outage = True
        try:
            faulty.put(f"chunks/{i:04d}", f"chunk {i}".encode())
        except InjectedFault:
            return
        with lock:
            acknowledged.add(f"chunks/{i:04d}")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(300)))
    assert 50 < len(acknowledged) < 160
    faulty.outage = False
    faulty.fail_rate = 0
    assert acknowledged == set(faulty.list("chunks/"))
    assert all(faulty.get(k) == f"chunk {int(k[7:])}".encode() for k in acknowledged)


def test_unknown_operations_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown backend operations"):
        FaultyBackend(MemoryBackend(), ops={"gett"})


def test_a_faulty_file_backend_still_stages_chunks_and_publishes_them_only_at_flush(tmp_path: Path) -> None:
    # Wrapping must not hide a capability: production's staged path (write
    # hidden, publish once durable) is what runs under faults too.
    faulty = FaultyBackend(FileBackend(tmp_path / "repo"), ops={"put"})
    repo = Repository.init(faulty, chunk_size=64 * 1024, hash="sha256")
    faulty.fail_first = faulty.calls["put"] + 1  # the next put-like call fails
    data = b"x" * 1000
    digest = repo.digest(data)
    with pytest.raises(InjectedFault):
        repo.put_chunk(digest, b"blob")  # stage is faulted as a put
    assert repo.put_chunk(digest, b"blob") is True
    key = keys.chunk_key(digest)
    assert not faulty.exists(key), "a staged chunk is visible before flush"
    assert faulty.calls["exists"] >= 1
    repo.flush()
    assert faulty.exists(key) and faulty.get(key) == b"blob"
