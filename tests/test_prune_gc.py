"""Prune and gc on the file backend: which points go, which objects go, and that the rest restores.

Repositories are built through the Python API with chosen point ids and
chunk contents, so every test can name the exact objects it expects; the
scenario at the end does the same with real backups of a real VM.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import FLEECE

from fleece.errors import BadInput, LockHeld, RepositoryCorrupt, RepositoryError
from fleece.maintenance.gc import collect_garbage
from fleece.maintenance.prune import prune
from fleece.maintenance.retention import Policy
from fleece.maintenance.verify import verify_points
from fleece.repo.backends.file import FileBackend
from fleece.repo.format import keys
from fleece.repo.format.codec import encode_chunk
from fleece.repo.format.index import ChunkIndex
from fleece.repo.format.point import DiskRecord, RestorePoint, iso_utc
from fleece.repo.lock import acquire, break_lease, vm_lock
from fleece.repo.protect import protect
from fleece.repo.repository import Repository
from fleece.restore.image import restore_raw

CS = 64 * 1024


def block(byte: int) -> bytes:
    """One chunk of a repeated byte."""
    return bytes([byte]) * CS


def make_point(repo: Repository, vm: str, day: int, disks: dict[str, list[bytes | None]],
               parent: RestorePoint | None = None) -> RestorePoint:
    """Store the chunks, indexes and point of a backup taken on 2026-11-<day> at 01:00 UTC."""
    when = datetime(2026, 11, day, 1, 0, tzinfo=UTC)
    point_id = when.strftime("%Y%m%dT%H%M%S.%fZ") + f"-{day:06x}"
    records = []
    for name, chunks in disks.items():
        index = ChunkIndex.empty(CS, len(chunks) * CS)
        for i, data in enumerate(chunks):
            if data is not None:
                digest = repo.chunk_name(data)
                repo.put_chunk(digest, encode_chunk(data, 3))
                index.set(i, digest)
        key, digest_hex = repo.write_index(point_id, name, index)
        records.append(DiskRecord(name, "incremental" if parent else "full", len(chunks) * CS,
                                  key, digest_hex))
    point = RestorePoint(point_id, vm, iso_utc(when), parent.id if parent else None, CS, records,
                         "test")
    repo.write_point(point)
    return point


def chunk_keys(repo: Repository, *chunks: bytes) -> set[str]:
    return {keys.chunk_key(repo.chunk_name(c)) for c in chunks}


def objects(repo: Repository, prefix: str) -> set[str]:
    return set(repo.backend.list(prefix))


def data_objects(repo: Repository) -> set[str]:
    """Every object but the leases, whose generations each prune or gc run moves on."""
    return {o for o in objects(repo, "") if not o.startswith(("leases/", "locks/"))}


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(FileBackend(tmp_path / "repo"), chunk_size=CS, hash="sha256")


@pytest.fixture
def four(repo: Repository) -> list[RestorePoint]:
    """Four points of web1, each changing chunk 0; chunk 1 is shared by all; chunk 2 appears in P3."""
    shared = block(0x22)
    p1 = make_point(repo, "web1", 20, {"vda": [block(0x11), shared, None]})
    p2 = make_point(repo, "web1", 21, {"vda": [block(0x33), shared, None]}, p1)
    p3 = make_point(repo, "web1", 22, {"vda": [block(0x66), shared, block(0x44)]}, p2)
    p4 = make_point(repo, "web1", 23, {"vda": [block(0x55), shared, block(0x44)]}, p3)
    return [p1, p2, p3, p4]


def expected_image(chunks: Sequence[bytes | None]) -> bytes:
    return b"".join(c if c is not None else bytes(CS) for c in chunks)


def test_keep_last_two_then_gc_frees_exactly_the_chunks_only_the_removed_points_used(
        repo: Repository, four: list[RestorePoint], tmp_path: Path) -> None:
    p1, p2, p3, p4 = four
    all_chunks = objects(repo, keys.CHUNKS_PREFIX)
    report = prune(repo, Policy(last=2), vm="web1")
    assert [d.point_id for d in report.vms[0].removed] == [p1.id, p2.id]
    assert {d.point_id: d.reasons for d in report.vms[0].kept} == {
        p3.id: ("last 2",), p4.id: ("last 1", "newest")}
    assert [p.id for p in repo.list_points()] == [p3.id, p4.id]
    # The points' own objects are gone; chunks are gc's job.
    assert objects(repo, keys.INDEXES_PREFIX) == {p3.disks[0].index_key, p4.disks[0].index_key}
    assert objects(repo, keys.CHUNKS_PREFIX) == all_chunks
    assert not repo.backend.exists(keys.vm_lock_key("web1"))

    gone = chunk_keys(repo, block(0x11), block(0x33))
    sizes = sum((tmp_path / "repo" / k).stat().st_size for k in gone)
    gc = collect_garbage(repo)
    assert (gc.chunks_deleted, gc.chunks_kept, gc.indexes_deleted, gc.points) == (2, 4, 0, 2)
    assert gc.bytes_freed == sizes > 0
    assert objects(repo, keys.CHUNKS_PREFIX) == all_chunks - gone
    assert objects(repo, keys.CHUNKS_PREFIX) == chunk_keys(
        repo, block(0x22), block(0x66), block(0x44), block(0x55))
    assert not repo.backend.exists(keys.repo_lock_key("gc"))

    # P3 is an incremental whose parent (P2) is gone: it still restores whole.
    for point, chunks in ((p3, [block(0x66), block(0x22), block(0x44)]),
                          (p4, [block(0x55), block(0x22), block(0x44)])):
        out = tmp_path / f"{point.id}.raw"
        restore_raw(repo, point, "vda", out)
        assert out.read_bytes() == expected_image(chunks)
    assert verify_points(repo, repo.point_refs(), deep=True).ok
    # A second gc finds nothing more to do.
    assert collect_garbage(repo).chunks_deleted == 0


def test_dry_runs_change_nothing(repo: Repository, four: list[RestorePoint]) -> None:
    before = data_objects(repo)
    report = prune(repo, Policy(last=1), dry_run=True)
    assert len(report.vms[0].removed) == 3 and report.as_dict()["dry_run"] is True
    assert data_objects(repo) == before
    prune(repo, Policy(last=1))
    after_prune = data_objects(repo)
    gc = collect_garbage(repo, dry_run=True)
    assert gc.chunks_deleted == 3 and gc.bytes_freed > 0
    assert data_objects(repo) == after_prune
    assert collect_garbage(repo).as_dict() | {"seconds": 0} == gc.as_dict() | {
        "seconds": 0, "dry_run": False}


def test_protected_points_survive_prune_and_their_chunks_survive_gc(
        repo: Repository, four: list[RestorePoint]) -> None:
    p1, _p2, _p3, p4 = four
    assert protect(repo, p1) and not protect(repo, p1)
    assert repo.backend.exists(f"protect/web1/{p1.id}")
    report = prune(repo, Policy(last=1))
    assert {d.point_id: d.reasons for d in report.vms[0].kept} == {
        p1.id: ("protected",), p4.id: ("last 1", "newest")}
    collect_garbage(repo)
    assert repo.backend.exists(keys.chunk_key(repo.chunk_name(block(0x11))))
    assert verify_points(repo, repo.point_refs(), deep=True).ok


def test_points_a_running_backup_reads_are_kept_and_vms_without_them_are_skipped(
        repo: Repository, four: list[RestorePoint]) -> None:
    p1, p2, p3, p4 = four
    web2 = make_point(repo, "web2", 20, {"vda": [block(0x77)]})
    make_point(repo, "web2", 21, {"vda": [block(0x78)]}, web2)
    backup = acquire(repo.backend, keys.vm_lock_key("web1"), "VM web1", heartbeat=False)
    starting = acquire(repo.backend, keys.vm_lock_key("web2"), "VM web2", heartbeat=False)
    try:
        backup.record_uses([p2.id, p4.id])  # an incremental on top of an older checkpoint
        report = prune(repo, Policy(last=1))
    finally:
        backup.release()
        starting.release()
    web1, web2_result = report.vms
    assert {d.point_id: d.reasons for d in web1.kept} == {
        p2.id: ("used by a running backup",),
        p4.id: ("last 1", "newest", "used by a running backup")}
    assert [d.point_id for d in web1.removed] == [p1.id, p3.id]
    assert web2_result.skipped is not None and "a backup is starting" in web2_result.skipped
    assert len(repo.point_refs("web2")) == 2
    assert report.as_dict()["skipped"] == [{"vm": "web2", "reason": web2_result.skipped}]


def test_orphan_indexes_go_after_the_grace_period_and_spare_their_chunks_before(
        repo: Repository, four: list[RestorePoint], tmp_path: Path) -> None:
    # A backup that died after writing its index but before its point.
    orphan = ChunkIndex.empty(CS, 2 * CS)
    repo.put_chunk(repo.chunk_name(block(0x99)), encode_chunk(block(0x99), 3))
    orphan.set(0, repo.chunk_name(block(0x99)))
    key, _ = repo.write_index("20261124T010000.000000Z-dead00", "vda", orphan)
    # And one whose chunk never made it anywhere else.
    unreferenced = chunk_keys(repo, block(0xAB))
    repo.put_chunk(repo.chunk_name(block(0xAB)), encode_chunk(block(0xAB), 3))
    repo.flush()  # as a backup does before it writes an index

    young = collect_garbage(repo, grace=timedelta(hours=1))
    assert (young.indexes_spared, young.indexes_deleted, young.chunks_deleted) == (1, 0, 1)
    assert repo.backend.exists(key) and repo.backend.exists(keys.chunk_key(repo.chunk_name(block(0x99))))
    assert not (objects(repo, keys.CHUNKS_PREFIX) & unreferenced)

    later = time.time() + 2 * 3600  # the injected clock: two hours on
    old = collect_garbage(repo, grace=timedelta(hours=1), now=lambda: later)
    assert (old.indexes_spared, old.indexes_deleted, old.chunks_deleted) == (0, 1, 1)
    assert not repo.backend.exists(key)
    assert not (tmp_path / "repo" / "indexes" / "20261124T010000.000000Z-dead00").exists()
    assert verify_points(repo, repo.point_refs(), deep=True).ok


def test_gc_refuses_while_a_backup_holds_its_vm_lease(repo: Repository, four: list[RestorePoint]) -> None:
    prune(repo, Policy(last=1))
    before = data_objects(repo)
    with vm_lock(repo.backend, "web1"), pytest.raises(
            LockHeld, match=r"VM web1 is locked .* gc deleted nothing"):
        collect_garbage(repo)
    assert data_objects(repo) == before
    dry = collect_garbage(repo, dry_run=True)
    assert dry.running_backups == [] and dry.chunks_deleted == 3


def test_a_dead_backups_expired_lease_does_not_block_gc_once_past_the_skew_allowance(
        repo: Repository, four: list[RestorePoint]) -> None:
    def lease(expires: datetime) -> bytes:
        return json.dumps({"format": 1, "key": "locks/vms/web1", "host": "elsewhere", "pid": 1,
                           "token": "t", "created": "2026-01-01T00:00:00.000000Z",
                           "expires": iso_utc(expires)}).encode()

    now = datetime.now(UTC)
    repo.backend.put("locks/vms/web1", lease(now - timedelta(seconds=10)))  # within the allowance
    with pytest.raises(LockHeld):
        collect_garbage(repo)
    repo.backend.put("locks/vms/web1", lease(now - timedelta(minutes=5)))
    assert collect_garbage(repo).chunks_deleted == 0


def test_a_backup_does_not_start_while_gc_holds_its_lease(repo: Repository) -> None:
    from fleece.repo.gc_lock import check_no_gc, gc_lock

    with gc_lock(repo.backend) as lease:
        assert lease.info.host == socket.gethostname()
        with pytest.raises(LockHeld, match=r"garbage collection is running .* did not start"):
            check_no_gc(repo.backend)
        with pytest.raises(LockHeld):
            collect_garbage(repo)  # nor a second gc
    check_no_gc(repo.backend)


def test_gc_deletes_nothing_when_a_point_or_index_cannot_be_read(
        repo: Repository, four: list[RestorePoint], tmp_path: Path) -> None:
    _p1, _p2, p3, p4 = four
    prune(repo, Policy(last=3))
    before = data_objects(repo)
    index_file = tmp_path / "repo" / p3.disks[0].index_key
    data = bytearray(index_file.read_bytes())
    data[40] ^= 1
    index_file.write_bytes(bytes(data))
    with pytest.raises(RepositoryCorrupt, match="deleted nothing"):
        collect_garbage(repo)
    assert data_objects(repo) == before
    point_file = tmp_path / "repo" / keys.point_key("web1", p4.id)
    point_file.write_text(point_file.read_text().replace('"test"', '"tested"'))
    with pytest.raises(RepositoryCorrupt, match="deleted nothing"):
        collect_garbage(repo)
    assert data_objects(repo) == before


def test_gc_stops_deleting_when_its_lease_is_lost(
        repo: Repository, four: list[RestorePoint], monkeypatch: pytest.MonkeyPatch) -> None:
    import fleece.maintenance.gc

    prune(repo, Policy(last=1))
    monkeypatch.setattr(fleece.maintenance.gc, "DELETE_BATCH", 1)
    real_delete = repo.backend.delete
    calls: list[str] = []
    broken: list[object] = []

    def delete(key: str) -> None:
        calls.append(key)
        real_delete(key)
        if key.startswith("chunks/") and not broken:  # someone breaks the gc lease after the first chunk
            broken.append(break_lease(repo.backend, keys.repo_lock_key("gc"), "gc"))

    monkeypatch.setattr(repo.backend, "delete", delete)
    with pytest.raises(LockHeld, match=r"gc stopped after deleting 1 unreferenced objects: .*lost"):
        collect_garbage(repo)
    assert len([c for c in calls if c.startswith("chunks/")]) == 1
    assert verify_points(repo, repo.point_refs(), deep=True).ok


def test_a_failed_prune_deletion_reports_what_was_done(
        repo: Repository, four: list[RestorePoint], monkeypatch: pytest.MonkeyPatch) -> None:
    _p1, p2, p3, p4 = four
    real_delete = repo.backend.delete

    def delete(key: str) -> None:
        if p2.id in key:
            raise RepositoryError(f"cannot delete {key}: disk on fire")
        real_delete(key)

    monkeypatch.setattr(repo.backend, "delete", delete)
    with pytest.raises(RepositoryError, match="stopped after removing 1 point"):
        prune(repo, Policy(last=1))
    assert [p.id for p in repo.list_points()] == [p2.id, p3.id, p4.id]


def test_prune_refuses_an_empty_policy_and_an_unknown_vm(repo: Repository, four: Any) -> None:
    with pytest.raises(BadInput, match="at least one --keep"):
        prune(repo, Policy(last=0))
    with pytest.raises(BadInput, match="no restore points of VM 'nope'"):
        prune(repo, Policy(last=1), vm="nope")


def test_file_backend_lists_sizes_and_times(repo: Repository, four: list[RestorePoint]) -> None:
    infos = {i.key: i for i in repo.backend.list_info(keys.CHUNKS_PREFIX)}
    assert set(infos) == objects(repo, keys.CHUNKS_PREFIX)
    for key, info in infos.items():
        assert info.size == len(repo.backend.get(key))
        assert abs(info.mtime - os.path.getmtime(Path(repo.url) / key)) < 1e-6


# -- the command line -----------------------------------------------------------------
def test_cli_prune_and_gc_print_one_json_object_each(
        repo: Repository, four: list[RestorePoint], fleece: Any) -> None:
    p1, p2, p3, p4 = four
    r = fleece("prune", "--repo", repo.url, "--keep-last", "2", "--json")
    assert r.rc == 0, r.err
    assert r.json() == {
        "dry_run": False,
        "policy": {"last": 2, "hourly": 0, "daily": 0, "weekly": 0, "monthly": 0, "yearly": 0,
                   "within": None},
        "kept": [{"vm": "web1", "id": p3.id, "reasons": ["last 2"]},
                 {"vm": "web1", "id": p4.id, "reasons": ["last 1", "newest"]}],
        "removed": [{"vm": "web1", "id": p1.id, "reason": "no keep rule selects it"},
                    {"vm": "web1", "id": p2.id, "reason": "no keep rule selects it"}],
        "skipped": [],
    }
    listed = fleece("list", "--repo", repo.url, "--json").json()
    assert [p["id"] for p in listed["points"]] == [p3.id, p4.id]
    r = fleece("gc", "--repo", repo.url, "--json")
    assert r.rc == 0, r.err
    doc = r.json()
    assert {k: doc[k] for k in ("dry_run", "points", "chunks_kept", "chunks_deleted", "indexes_deleted",
                                "objects_deleted", "running_backups")} == {
        "dry_run": False, "points": 2, "chunks_kept": 4, "chunks_deleted": 2, "indexes_deleted": 0,
        "objects_deleted": 2, "running_backups": []}
    assert doc["bytes_freed"] > 0
    r = fleece("verify", "--repo", repo.url, "--deep")
    assert r.rc == 0, r.out + r.err


def test_cli_prints_what_it_keeps_and_why(repo: Repository, four: list[RestorePoint], fleece: Any) -> None:
    p1, _p2, p3, p4 = four
    r = fleece("prune", "--repo", repo.url, "--keep-daily", "1", "--keep-last", "2", "--dry-run")
    assert r.rc == 0, r.err
    assert f"keep    {p4.id}  (last 1, daily 2026-11-23, newest)" in r.out
    assert f"keep    {p3.id}  (last 2)" in r.out
    assert f"remove {p1.id}" in r.out and "would remove 2 points, kept 2" in r.out
    assert len(repo.point_refs()) == 4
    r = fleece("gc", "--repo", repo.url, "--dry-run")
    assert r.rc == 0 and "gc would delete 0 chunks" in r.out


@pytest.mark.parametrize("argv, message", [
    (["prune"], "at least one --keep"),
    (["prune", "--keep-last", "0"], "at least one --keep"),
    (["prune", "--keep-daily", "-3"], "must be 0 or more"),
    (["prune", "--keep-weekly", "two"], "not a whole number"),
    (["prune", "--keep-within", "soon"], "not a duration"),
    (["prune", "--keep-last", "1", "--vm", "nope"], "no restore points of VM 'nope'"),
    (["gc", "--grace=-1h"], "not a duration"),
    (["protect", "20991231"], "no restore point '20991231'"),
    (["unprotect", "latest", "--vm", "nope"], "no restore point 'latest'"),
])
def test_cli_bad_input_is_one_line_and_exit_2(
        repo: Repository, four: list[RestorePoint], fleece: Any, argv: list[str], message: str) -> None:
    r = fleece(*argv, "--repo", repo.url)
    assert r.rc == 2, r.err
    assert message in r.err and len(r.err.strip().splitlines()) == 1
    assert len(repo.point_refs()) == 4


def test_cli_protect_and_unprotect(repo: Repository, four: list[RestorePoint], fleece: Any) -> None:
    p1 = four[0]
    r = fleece("protect", "--repo", repo.url, p1.id[:16], "--note", "before the upgrade")
    assert r.rc == 0 and f"{p1.id} of VM web1 is now protected" in r.out, r.err
    marker = json.loads(repo.backend.get(f"protect/web1/{p1.id}"))
    assert marker["point"] == p1.id and marker["note"] == "before the upgrade"
    assert fleece("protect", "--repo", repo.url, p1.id).out.endswith("was already protected\n")
    r = fleece("prune", "--repo", repo.url, "--keep-last", "1", "--json")
    assert {k["id"]: k["reasons"] for k in r.json()["kept"]}[p1.id] == ["protected"]
    r = fleece("unprotect", "--repo", repo.url, p1.id)
    assert r.rc == 0 and "is no longer protected" in r.out
    assert not repo.backend.exists(f"protect/web1/{p1.id}")
    fleece("prune", "--repo", repo.url, "--keep-last", "1")
    assert [p.id for p in repo.list_points()] == [four[3].id]


def test_cli_reads_prune_and_gc_settings_from_the_backup_config(
        repo: Repository, four: list[RestorePoint], fleece: Any, tmp_path: Path) -> None:
    config = tmp_path / "web1.toml"
    config.write_text(f'''
qmp = "/run/web1/qmp.sock"
drive = ["vda"]
repo = "{repo.url}"
vm = "web1"

[prune]
keep_last = 1
keep_daily = 2

[gc]
grace = "2h"
wait = "1m"
''')
    r = fleece("prune", "--config", config, "--json")
    assert r.rc == 0, r.err
    assert [k["id"] for k in r.json()["kept"]] == [four[2].id, four[3].id]
    r = fleece("gc", "--config", config, "--json")
    assert r.rc == 0 and r.json()["chunks_deleted"] == 2, r.err


def test_cli_gc_waits_for_a_running_backup_with_wait(
        repo: Repository, four: list[RestorePoint], fleece: Any) -> None:
    prune(repo, Policy(last=1))
    with vm_lock(repo.backend, "web1"):
        r = fleece("gc", "--repo", repo.url)
        assert r.rc == 1 and "VM web1 is locked by" in r.err and "gc deleted nothing" in r.err
        assert len(r.err.strip().splitlines()) == 1
    lease = acquire(repo.backend, keys.vm_lock_key("web1"), "VM web1")
    # Ordering, not speed: the lease goes only once gc says it waits for it (however long gc
    # took to start), and gc must then finish, having deleted what it should.
    gc = subprocess.Popen([FLEECE, "gc", "--repo", repo.url, "--wait", "1m", "--json"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    assert gc.stderr is not None
    said = gc.stderr.readline()
    assert "waiting up to 1m" in said, said
    assert gc.poll() is None  # still waiting while the lease is held
    lease.release()
    out, err = gc.communicate(timeout=120)
    assert gc.returncode == 0, said + err
    assert json.loads(out)["chunks_deleted"] == 3


# -- with real backups of a real VM ------------------------------------------------------
MiB = 1 << 20


@pytest.mark.qemu
def test_four_backups_keep_last_two_gc_and_the_rest_restores_identical(
        make_vm: Any, fleece: Any, tmp_path: Path) -> None:
    vm = make_vm(name="web1")
    repo_dir = tmp_path / "repo"
    disk = bytearray(64 * MiB)  # what the guest's disk holds, write by write
    images: dict[str, bytes] = {}

    def write(offset: int, length: int, pattern: int) -> None:
        vm.write("vda", offset, length, pattern)
        disk[offset:offset + length] = bytes([pattern]) * length

    def backup() -> str:
        r = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo_dir, "--json")
        assert r.rc == 0, r.err
        point = str(r.json()["point"])
        images[point] = bytes(disk)
        return point

    write(0, 4 * MiB, 0x11)
    write(8 * MiB, 1 * MiB, 0x22)
    p1 = backup()
    write(0, 4 * MiB, 0x33)
    p2 = backup()
    write(0, 4 * MiB, 0x66)
    write(16 * MiB, 4 * MiB, 0x44)
    p3 = backup()
    write(0, 4 * MiB, 0x55)
    p4 = backup()

    repo = Repository.open(FileBackend(repo_dir))
    assert [p.parent for p in repo.list_points()] == [None, p1, p2, p3]
    r = fleece("prune", "--repo", repo_dir, "--keep-last", "2", "--json")
    assert r.rc == 0, r.err
    assert [x["id"] for x in r.json()["removed"]] == [p1, p2]
    listed = fleece("list", "--repo", repo_dir, "--json").json()["points"]
    assert [p["id"] for p in listed] == [p3, p4]

    before = objects(repo, keys.CHUNKS_PREFIX)
    only_removed = {keys.chunk_key(repo.chunk_name(bytes([b]) * 4 * MiB)) for b in (0x11, 0x33)}
    assert only_removed <= before
    r = fleece("gc", "--repo", repo_dir, "--json")
    assert r.rc == 0, r.err
    assert r.json()["chunks_deleted"] == 2 and r.json()["bytes_freed"] > 0
    assert objects(repo, keys.CHUNKS_PREFIX) == before - only_removed

    # P3's parent is gone; it is an incremental and restores whole anyway.
    assert repo.find_point(p3).disks[0].level == "incremental"
    for point in (p3, p4):
        out = tmp_path / f"{point}.raw"
        r = fleece("restore", "--repo", repo_dir, point, "--output", out)
        assert r.rc == 0, r.err
        assert out.read_bytes() == images[point]
    r = fleece("verify", "--repo", repo_dir, "--deep", "--json")
    assert r.rc == 0, r.out + r.err

    # The chain goes on from the newest point.
    write(32 * MiB, 1 * MiB, 0x77)
    p5 = backup()
    assert repo.find_point(p5).parent == p4 and repo.find_point(p5).disks[0].level == "incremental"


# -- S3 ---------------------------------------------------------------------------------
@pytest.mark.s3
def test_on_s3_gc_lists_with_sizes_and_deletes_in_batches(s3_bucket: str, monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    import fleece.maintenance.gc
    from fleece.repo.backends.s3 import S3Backend
    from fleece.testing.s3_faults import inject_http_faults

    backend = S3Backend(s3_bucket, "repo")
    repo = Repository.init(backend, chunk_size=CS, hash="sha256")
    points = [make_point(repo, "web1", 10 + n, {"vda": [block(n), block(0xF0)]}) for n in range(7)]
    prune(repo, Policy(last=1))
    sizes = {i.key: i.size for i in backend.list_info(keys.CHUNKS_PREFIX)}
    assert len(sizes) == 8
    monkeypatch.setattr(fleece.maintenance.gc, "DELETE_BATCH", 4)
    with inject_http_faults(backend) as seen:
        report = collect_garbage(repo)
    assert report.chunks_deleted == 6
    assert report.bytes_freed == sum(sizes[keys.chunk_key(repo.chunk_name(block(n)))] for n in range(6))
    # + the gc lease: its guard for older versions, and the generation each of its two renewals
    # and its release superseded.
    assert seen.requests["DeleteObjects"] == 2 and seen.requests["DeleteObject"] == 1 + 3
    assert seen.requests["HeadObject"] == 0  # sizes came from the listing
    assert objects(repo, keys.CHUNKS_PREFIX) == chunk_keys(repo, block(6), block(0xF0))
    assert verify_points(repo, repo.point_refs(), deep=True).ok
    assert [p.id for p in repo.list_points()] == [points[-1].id]


# -- configs/ stays in step with the command line -----------------------------------------
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_the_example_units_and_config_parse_as_fleece_commands(tmp_path: Path) -> None:
    import shlex

    from fleece.cli import build_parser
    from fleece.commands import backup as backup_cmd
    from fleece.commands import gc as gc_cmd
    from fleece.commands import prune as prune_cmd
    from fleece.commands.config import apply_config

    config = CONFIGS / "web1.toml"
    parser = build_parser()
    commands = []
    for unit in ("fleece-backup@.service", "fleece-prune@.service"):
        for line in (CONFIGS / unit).read_text().splitlines():
            if line.startswith("ExecStart="):
                argv = shlex.split(line.removeprefix("ExecStart="))
                assert argv[0].endswith("/fleece") and "/etc/fleece/%i.toml" in argv
                argv = [str(config) if a == "/etc/fleece/%i.toml" else a for a in argv[1:]]
                commands.append(argv[0])
                args = parser.parse_args(argv)
                keys_for = {"backup": backup_cmd.CONFIG_KEYS, "prune": prune_cmd.CONFIG_KEYS,
                            "gc": gc_cmd.CONFIG_KEYS}[argv[0]]
                apply_config(args, keys_for, argv[0])
                assert args.repo == "s3://backups/fleece" and args.vm == "web1"
                if argv[0] == "prune":
                    assert (args.keep_last, args.keep_daily, args.keep_weekly, args.keep_monthly) == (
                        3, 7, 4, 12)
                if argv[0] == "gc":
                    assert (args.wait, args.grace) == ("2h", "24h")
                if argv[0] == "backup":
                    assert args.drive == ["vda"] and args.qmp.endswith(".sock")
    assert commands == ["backup", "prune", "gc"]
    assert "OnSuccess=fleece-prune@%i.service" in (CONFIGS / "fleece-backup@.service").read_text()
    assert "OnCalendar=" in (CONFIGS / "fleece-backup@.timer").read_text()


def test_gc_removes_a_killed_backups_unpublished_chunks_after_the_grace_period(
        repo: Repository, four: list[RestorePoint], tmp_path: Path) -> None:
    # A backup killed before its chunks were made durable leaves hidden
    # temporary files that never became objects.
    repo.put_chunk(repo.chunk_name(block(0x77)), encode_chunk(block(0x77), 3))  # staged, not flushed
    temps = list((tmp_path / "repo").rglob(".tmp-*"))
    assert len(temps) == 1
    assert collect_garbage(repo, grace=timedelta(hours=1)).temporaries_deleted == 0
    assert temps[0].exists()  # young: its backup may still be running
    later = time.time() + 2 * 3600
    dry = collect_garbage(repo, grace=timedelta(hours=1), dry_run=True, now=lambda: later)
    assert dry.temporaries_deleted == 1 and temps[0].exists()
    report = collect_garbage(repo, grace=timedelta(hours=1), now=lambda: later)
    assert report.temporaries_deleted == 1 and report.bytes_freed > 0
    assert not list((tmp_path / "repo").rglob(".tmp-*"))
    assert verify_points(repo, repo.point_refs(), deep=True).ok
