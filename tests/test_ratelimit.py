"""Bandwidth limits: the token bucket, the backend wrapper, and backups and restores held to a rate."""

from __future__ import annotations

import random
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from fleece.errors import BadInput
from fleece.repo.backends.file import FileBackend
from fleece.repo.backends.ratelimit import (
    BURST_CHUNKS,
    RateLimitedBackend,
    TokenBucket,
    bucket_for,
    parse_rate,
)
from fleece.testing.memory_backend import MemoryBackend

MiB = 1 << 20
CHUNK = 4 * MiB


class FakeClock:
    """Time that passes only when someone sleeps (or the test says so)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize(("text", "rate"), [
    ("20M", 20 * MiB), ("20MiB/s", 20 * MiB), ("512k", 512 * 1024), ("1.5G", 1.5 * (1 << 30)),
    ("1048576", MiB), ("20 MB/s", 20 * MiB),
])
def test_rates_are_binary_units_per_second(text: Any, rate: Any) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "20X", "-5M", "100", "0"])
def test_a_bad_rate_is_bad_input(text: Any) -> None:
    with pytest.raises(BadInput):
        parse_rate(text, "--limit-upload")


def run_for_a_minute(stalls: bool) -> tuple[int, float, int]:
    """Simulated requests of mixed sizes through one bucket: (bytes, seconds, largest instant)."""
    clock = FakeClock()
    bucket = TokenBucket(20 * MiB, BURST_CHUNKS * CHUNK, clock=clock, sleep=clock.sleep)
    rng = random.Random(7)
    per_instant: dict[float, int] = {}
    start, sent = clock(), 0
    while clock() - start < 60:
        if stalls and rng.random() < 0.05:
            clock.now += rng.uniform(0, 3)  # the pipeline stalls now and then (reading, a slow HEAD)
        n = rng.choice([CHUNK, CHUNK // 3, 64 * 1024, 2 * CHUNK])
        bucket.take(n)
        sent += n
        per_instant[clock()] = per_instant.get(clock(), 0) + n
    return sent, clock() - start, max(per_instant.values())


def test_over_a_minute_the_average_is_the_rate_and_bursts_are_a_few_chunks() -> None:
    rate = 20 * MiB
    sent, elapsed, _ = run_for_a_minute(stalls=False)
    assert 0.9 * rate <= sent / elapsed <= 1.1 * rate
    # Idle spells save up at most the burst: never more than the rate allows.
    sent, elapsed, largest = run_for_a_minute(stalls=True)
    assert sent <= rate * elapsed + BURST_CHUNKS * CHUNK
    assert largest <= BURST_CHUNKS * CHUNK + 2 * CHUNK  # a burst, then one request on credit


class ArrivalLog(MemoryBackend):
    """A store that notes when each body arrives and how big it is: what was actually sent."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[tuple[float, int]] = []

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        with self._lock:
            self.arrivals.append((time.monotonic(), len(data)))
        return super().put(key, data, if_absent=if_absent)


def test_threads_share_one_budget_and_what_arrives_never_runs_ahead_of_the_rate() -> None:
    rate = 32 * MiB
    store = ArrivalLog()
    backend = RateLimitedBackend(store, upload=bucket_for(rate))
    start = time.monotonic()  # the bucket starts empty: nothing is owed before now
    data = bytes(CHUNK)
    with ThreadPoolExecutor(16) as pool:  # 16 storers, as on S3
        list(pool.map(lambda i: backend.put(f"chunks/{i}", data), range(24)))
    # Everything arrived, once; at no moment had more arrived than the rate allows since the
    # start (a slow host only arrives later: the bound does not depend on its speed).
    assert sorted(store.objects) == sorted(f"chunks/{i}" for i in range(24))
    arrived = 0
    for at, size in sorted(store.arrivals):
        arrived += size
        assert arrived <= rate * (at - start) * 1.01 + 64 * 1024, (arrived, at - start)
    assert arrived == 24 * CHUNK
    assert time.monotonic() - start >= 24 * CHUNK / rate * 0.99  # 3 s


def test_downloads_are_paced_and_uncounted_operations_are_not() -> None:
    inner = MemoryBackend()
    for i in range(4):
        inner.put(f"chunks/{i}", bytes(CHUNK))
    clock = FakeClock()  # time passes only in the bucket's sleeps: nothing here depends on speed
    backend = RateLimitedBackend(inner, download=TokenBucket(16 * MiB, BURST_CHUNKS * CHUNK,
                                                             clock=clock, sleep=clock.sleep))
    start = clock()
    for _ in range(3):
        assert sorted(backend.list("chunks/")) == [f"chunks/{i}" for i in range(4)]
        assert backend.exists("chunks/0") and backend.mtime("chunks/0") > 0
    assert clock() == start  # listings, HEADs and times cost no budget
    for i in range(4):
        assert backend.get(f"chunks/{i}") == bytes(CHUNK)
    assert clock() - start == pytest.approx(4 * CHUNK / (16 * MiB))  # exactly the bodies' bytes


def test_the_wrapper_has_exactly_the_optional_methods_of_what_it_wraps(tmp_path: Path) -> None:
    optional = ("stage", "flush", "discard_staged", "stale_temporaries", "list_info", "delete_many",
                "reserve_connections", "preferred_concurrency", "store_check")
    for inner in (MemoryBackend(), FileBackend(tmp_path / "repo")):
        wrapped = RateLimitedBackend(inner, upload=bucket_for(64 * MiB))
        for name in optional:
            assert (getattr(wrapped, name, None) is None) == (getattr(inner, name, None) is None), name
    # And they do the inner backend's work: a staged chunk appears at flush.
    file_backend = RateLimitedBackend(FileBackend(tmp_path / "repo"), upload=bucket_for(64 * MiB))
    file_backend.stage("chunks/aa/aa", b"staged")
    file_backend.flush()
    assert FileBackend(tmp_path / "repo").get("chunks/aa/aa") == b"staged"


# -- through the CLI, on a running VM ------------------------------------------------------------
def random_disk(path: Path, size: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(rng.randbytes(MiB))
    return path


@pytest.mark.qemu
def test_a_backup_of_200_mib_new_data_at_20m_takes_at_least_ten_seconds_less_five_percent(
        make_vm: Any, fleece: Any, tmp_path: Any) -> None:
    seed = random_disk(tmp_path / "seed.raw", 208 * MiB, 11)  # random: zstd cannot shrink it
    vm = make_vm([("qcow2", "208M")], name="web1", contents={"vda": seed})
    repo = tmp_path / "repo"
    start = time.monotonic()
    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, "--json",
                 "--limit-upload", "20M", timeout=120)
    elapsed = time.monotonic() - start
    assert res.rc == 0, res.err
    # What actually reached the store (the chunk files), not the backup's own count.
    sent = sum(p.stat().st_size for p in (repo / "chunks").rglob("*") if p.is_file())
    disk = res.json()["disks"][0]
    assert sent >= 200 * MiB and disk["bytes_stored"] - disk["bytes_metadata"] <= sent  # the data
    # Never faster than the limit (+10 %, and the burst the bucket may save up): a bound no host's
    # speed can break, and the one a limiter without effect (or without its lock) would.
    assert sent <= 1.1 * 20 * MiB * elapsed + BURST_CHUNKS * CHUNK, (sent, elapsed)
    assert elapsed >= 9.5
    # Nor held far below it (a limiter charging twice would be at half the rate); this side is
    # loose because a loaded 2-core host may read and hash slower than 20 MiB/s.
    assert sent >= 0.5 * 20 * MiB * elapsed, (sent, elapsed)


@pytest.mark.qemu
def test_restore_and_deep_verify_are_held_to_the_download_limit(
        make_vm: Any, fleece: Any, tmp_path: Any) -> None:
    seed = random_disk(tmp_path / "seed.raw", 24 * MiB, 12)
    vm = make_vm([("qcow2", "24M")], name="web1", contents={"vda": seed})
    repo = tmp_path / "repo"
    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, "--json")
    assert res.rc == 0, res.err
    point = res.json()["point"]
    for args in (("restore", "--repo", repo, point, "--drive", "vda", "--output", tmp_path / "r.raw"),
                 ("verify", "--repo", repo, "--deep")):
        start = time.monotonic()
        res = fleece(*args, "--limit-download", "8M")
        assert res.rc == 0, res.err
        assert time.monotonic() - start >= 24 * MiB / (8 * MiB) * 0.95, args  # 3 s for 24 MiB
    cmp = subprocess.run(["cmp", str(tmp_path / "r.raw"), str(vm.shadow("vda"))])
    assert cmp.returncode == 0


def test_a_bad_limit_is_one_line_and_exit_2(fleece: Any, tmp_path: Any) -> None:
    for cmd in (("restore", "--repo", tmp_path, "latest", "--output", tmp_path / "x"),
                ("verify", "--repo", tmp_path), ("gc", "--repo", tmp_path),
                ("prune", "--repo", tmp_path, "--keep-last", "1")):
        res = fleece(*cmd, "--limit-download", "lots")
        assert res.rc == 2, (cmd, res.err)
        assert res.err.strip() == ("fleece: error: --limit-download: not a rate: 'lots' "
                                   "(examples: 20M = 20 MiB/s, 512K, 1G)"), res.err
    assert not (tmp_path / "x").exists()


class YieldingRate(float):
    """A rate whose arithmetic lets another thread in: the bucket multiplies by its rate between
    reading its balance and writing it back, so an unguarded take loses another's update here."""

    def __rmul__(self, other: float) -> float:
        time.sleep(0.0001)
        return float(other) * float(self)


def test_the_bucket_is_thread_safe_under_contention() -> None:
    """Eight threads take at once from a bucket whose clock stands still: each byte must be owed
    exactly once (no update lost to a race), so the last taker waits for every byte taken.
    Without the bucket's lock the takes interleave (``YieldingRate``) and bytes go unpaid."""
    rate, n, size = 64 * MiB, 100, 64 * 1024
    bucket = TokenBucket(YieldingRate(rate), BURST_CHUNKS * CHUNK, clock=lambda: 1000.0,
                         sleep=lambda s: None)
    waits: list[float] = []
    waits_lock = threading.Lock()

    def worker() -> None:
        for _ in range(n):
            w = bucket.take(size)
            with waits_lock:
                waits.append(w)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = 8 * n * size
    assert len(waits) == 8 * n
    assert max(waits) == pytest.approx(total / rate)  # the last taker owes every byte taken
    assert bucket.take(size) == pytest.approx((total + size) / rate)


@pytest.mark.qemu
def test_serve_is_held_to_the_download_limit(
        make_vm: Any, fleece: Any, tmp_path: Any, short_tmp: Any) -> None:
    from test_serve import serving

    seed = random_disk(tmp_path / "seed.raw", 8 * MiB, 13)
    vm = make_vm([("qcow2", "8M")], name="web1", contents={"vda": seed})
    repo = tmp_path / "repo"
    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, "--json")
    assert res.rc == 0, res.err
    with serving("--repo", repo, res.json()["point"], "--socket", short_tmp / "s.sock",
                 "--limit-download", "4M") as uri:
        start = time.monotonic()
        subprocess.run(["nbdcopy", uri, str(tmp_path / "copy.raw")], check=True)
        assert time.monotonic() - start >= 8 * MiB / (4 * MiB) * 0.95  # 2 s for 8 MiB
    assert (tmp_path / "copy.raw").read_bytes() == seed.read_bytes()
