"""The ``file`` backend: atomic puts, conditional creates, listing, and failures."""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fleece.errors import BadInput, RepositoryError
from fleece.repo.backends import file as file_backend
from fleece.repo.backends.base import Backend, ObjectMissing
from fleece.repo.backends.file import FileBackend
from fleece.repo.backends.url import open_backend


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


@pytest.fixture
def backend(tmp_path: Path) -> FileBackend:
    return FileBackend(tmp_path / "repo")


def test_is_a_backend(backend: FileBackend) -> None:
    assert isinstance(backend, Backend)


def test_put_get_exists_delete(backend: FileBackend) -> None:
    assert not backend.exists("points/vm1/a.json")
    assert backend.put("points/vm1/a.json", b"hello") is True
    assert backend.exists("points/vm1/a.json")
    assert backend.get("points/vm1/a.json") == b"hello"
    assert (backend.root / "points" / "vm1" / "a.json").read_bytes() == b"hello"
    assert backend.put("points/vm1/a.json", b"replaced") is True
    assert backend.get("points/vm1/a.json") == b"replaced"
    backend.delete("points/vm1/a.json")
    assert not backend.exists("points/vm1/a.json")
    backend.delete("points/vm1/a.json")  # absent: not an error
    assert leftovers(backend.root) == []


def test_missing_objects(backend: FileBackend) -> None:
    with pytest.raises(ObjectMissing, match="config"):
        backend.get("config")
    with pytest.raises(ObjectMissing):
        backend.mtime("config")
    backend.put("chunks/ab/x", b"1")
    with pytest.raises(ObjectMissing):
        backend.get("chunks/ab")  # a directory is not an object
    with pytest.raises(ObjectMissing):
        backend.get("chunks/ab/x/y")


def test_mtime(backend: FileBackend) -> None:
    backend.put("config", b"{}")
    os.utime(backend.root / "config", (1_000_000, 1_000_000))
    assert backend.mtime("config") == 1_000_000


def test_if_absent_keeps_the_first_object(backend: FileBackend) -> None:
    assert backend.put("locks/vms/a", b"first", if_absent=True) is True
    assert backend.put("locks/vms/a", b"second", if_absent=True) is False
    assert backend.get("locks/vms/a") == b"first"
    assert leftovers(backend.root) == []


def race_for(backend: FileBackend, key: str, contenders: int) -> list[bytes]:
    """``contenders`` threads create ``key`` at the same instant; returns who won."""
    barrier = threading.Barrier(contenders)
    wins: list[bytes] = []

    def contend(me: bytes) -> None:
        barrier.wait()
        if backend.put(key, me * 1000, if_absent=True):
            wins.append(me)

    threads = [threading.Thread(target=contend, args=(bytes([65 + i]),)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return wins


def test_if_absent_race_has_exactly_one_winner(backend: FileBackend) -> None:
    for round_ in range(20):
        key = f"locks/vms/race{round_}"
        wins = race_for(backend, key, 8)
        assert len(wins) == 1
        assert backend.get(key) == wins[0] * 1000
    assert leftovers(backend.root) == []


def test_list_under_prefix(backend: FileBackend) -> None:
    keys = ["config", "chunks/ab/ab01", "chunks/cd/cd02", "points/vm1/p1.json",
            "points/vm1/p2.json", "points/vm10/p3.json"]
    for k in keys:
        backend.put(k, b"x")
    (backend.root / "points" / "vm1" / ".tmp-deadbeef").write_bytes(b"half")
    assert sorted(backend.list("")) == sorted(keys)
    assert sorted(backend.list("chunks/")) == ["chunks/ab/ab01", "chunks/cd/cd02"]
    assert sorted(backend.list("points/vm1/")) == ["points/vm1/p1.json", "points/vm1/p2.json"]
    assert sorted(backend.list("points/vm1")) == [
        "points/vm1/p1.json", "points/vm1/p2.json", "points/vm10/p3.json"]
    assert sorted(backend.list("points/vm1/p2")) == ["points/vm1/p2.json"]
    assert list(backend.list("nothing/")) == []


def test_list_of_a_missing_root_is_empty(tmp_path: Path) -> None:
    assert list(FileBackend(tmp_path / "nowhere").list("")) == []


@pytest.mark.parametrize(
    "key", ["", "/etc/passwd", "../outside", "a/../../outside", "a//b", "a/./b", "a/", "x/.tmp-1"]
)
def test_keys_cannot_escape_the_root(backend: FileBackend, key: str) -> None:
    with pytest.raises(BadInput):
        backend.put(key, b"x")
    with pytest.raises(BadInput):
        backend.get(key)
    assert not (backend.root.parent / "outside").exists()


def test_delete_prunes_empty_directories_but_not_the_root(backend: FileBackend) -> None:
    backend.put("indexes/p1/vda", b"x")
    backend.put("indexes/p2/vda", b"x")
    backend.delete("indexes/p1/vda")
    assert not (backend.root / "indexes" / "p1").exists()
    assert (backend.root / "indexes" / "p2").is_dir()
    backend.delete("indexes/p2/vda")
    assert not (backend.root / "indexes").exists()
    assert backend.root.is_dir()
    backend.put("indexes/p1/vda", b"again")  # directories come back on demand
    assert backend.get("indexes/p1/vda") == b"again"


def test_disk_full_leaves_nothing_behind(
    backend: FileBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend.put("chunks/ab/old", b"old")

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(file_backend.os, "write", full)  # type: ignore[attr-defined]
    with pytest.raises(RepositoryError, match=r"cannot write .*chunks/ab/new: No space left") as e:
        backend.put("chunks/ab/new", b"new data")
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    assert not backend.exists("chunks/ab/new")
    assert leftovers(backend.root) == []
    assert backend.get("chunks/ab/old") == b"old"


def test_unwritable_location_is_a_repository_error(tmp_path: Path) -> None:
    # A regular file where the repository directory should be: mkdir fails for
    # real, even as root.
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"")
    backend = FileBackend(blocker / "repo")
    with pytest.raises(RepositoryError, match="blocker"):
        backend.put("config", b"{}")


def test_permission_denied(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    # Root ignores directory modes (CAP_DAC_OVERRIDE): as root, the probe runs
    # without that capability, so the kernel refuses it as it refuses any user.
    drop = (["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
            if os.geteuid() == 0 else [])
    probe = ("import sys; from pathlib import Path; from fleece.errors import RepositoryError; "
             "from fleece.repo.backends.file import FileBackend\n"
             "try:\n    FileBackend(Path(sys.argv[1])).put('config', b'{}')\n"
             "except RepositoryError as exc:\n    print('refused:', exc)")
    try:
        res = subprocess.run([*drop, sys.executable, "-c", probe, str(root)], capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("refused: ") and "Permission denied" in res.stdout, res.stdout
        assert list(root.iterdir()) == []
    finally:
        root.chmod(0o700)


def test_open_backend_urls(tmp_path: Path) -> None:
    b = open_backend(str(tmp_path))
    assert isinstance(b, FileBackend) and b.root == tmp_path
    b = open_backend(f"file://{tmp_path}/with%20space")
    assert isinstance(b, FileBackend) and b.root == tmp_path / "with space"
    for bad in ["", "file://host/x", "http://example.com/repo", "file://relative/x"]:
        with pytest.raises(BadInput):
            open_backend(bad)
    with pytest.raises(BadInput, match="bucket"):
        open_backend("s3:///prefix")


def test_open_backend_hands_s3_urls_to_the_s3_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    from fleece.repo.backends import s3 as s3_backend

    made: list[tuple[str, str]] = []

    class FakeS3:
        def __init__(self, bucket: str, prefix: str, *, unsafe_locks: bool = False) -> None:
            made.append((bucket, prefix))

    monkeypatch.setattr(s3_backend, "S3Backend", FakeS3)
    assert isinstance(open_backend("s3://bucket/some/prefix/"), FakeS3)
    assert isinstance(open_backend("s3://bucket"), FakeS3)
    assert made == [("bucket", "some/prefix/"), ("bucket", "")]
    with pytest.raises(BadInput):
        open_backend("s3://bucket/a/../b")


def test_staged_objects_appear_only_once_durable_and_failed_ones_leave_nothing(tmp_path: Path) -> None:
    from fleece.repo.backends import file as file_backend

    b = FileBackend(tmp_path / "repo")
    b.stage("chunks/aa/one", b"1" * 100)
    b.stage("chunks/bb/two", b"2" * 100)
    # Not visible before the barrier: another backup must not reuse a chunk
    # whose bytes a crash could still lose.
    assert not b.exists("chunks/aa/one")
    assert list(b.list("chunks/")) == []
    b.flush()
    assert b.get("chunks/aa/one") == b"1" * 100
    assert sorted(b.list("chunks/")) == ["chunks/aa/one", "chunks/bb/two"]
    # Immutable: a second copy of an existing name changes nothing.
    b.stage("chunks/aa/one", b"x" * 100)
    b.flush()
    assert b.get("chunks/aa/one") == b"1" * 100
    # A failed backup's staged objects vanish, temporary files included.
    b.stage("chunks/cc/three", b"3")
    b.discard_staged()
    b.flush()
    assert not b.exists("chunks/cc/three")
    assert not [p for p in (tmp_path / "repo").rglob(".tmp-*")]
    # A full batch publishes itself without waiting for flush().
    old = file_backend.STAGE_BATCH_BYTES
    file_backend.STAGE_BATCH_BYTES = 150
    try:
        b.stage("chunks/dd/four", b"4" * 100)
        b.stage("chunks/dd/five", b"5" * 100)
        assert b.exists("chunks/dd/four") and b.exists("chunks/dd/five")
    finally:
        file_backend.STAGE_BATCH_BYTES = old


def test_staged_objects_are_linked_only_after_a_syncfs_that_follows_their_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The durability rule, as the order of system calls: write, syncfs, link, syncfs.

    A visible chunk may be reused by another backup without being read, so
    its bytes (and the directories holding it, made without an fsync of
    their own) must be on stable storage before its name appears. Big
    objects are written with O_DIRECT (``pwrite``), which reaches the device
    but maybe only its volatile cache: the same syncfs must come after them.
    """
    events: list[tuple[str, str]] = []
    real_write, real_pwrite, real_link, real_mkdir = os.write, os.pwrite, os.link, os.mkdir
    real_open = os.open
    direct_opens: list[str] = []

    def write(fd: int, data: object) -> int:
        events.append(("write", os.readlink(f"/proc/self/fd/{fd}")))
        return real_write(fd, data)  # type: ignore[arg-type]

    def pwrite(fd: int, data: object, offset: int) -> int:
        events.append(("write", os.readlink(f"/proc/self/fd/{fd}")))
        return real_pwrite(fd, data, offset)  # type: ignore[arg-type]

    def open_(path: object, flags: int, *args: object) -> int:
        if flags & os.O_DIRECT:
            direct_opens.append(str(path))
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    def link(src: object, dst: object) -> None:
        events.append(("link", str(src)))
        real_link(src, dst)  # type: ignore[arg-type]

    def mkdir(path: object, *args: object) -> None:
        events.append(("mkdir", str(path)))
        real_mkdir(path, *args)  # type: ignore[arg-type]

    def fsync_dir(path: Path) -> None:
        events.append(("fsync_dir", str(path)))

    monkeypatch.setattr(file_backend.os, "write", write)  # type: ignore[attr-defined]
    monkeypatch.setattr(file_backend.os, "pwrite", pwrite)  # type: ignore[attr-defined]
    monkeypatch.setattr(file_backend.os, "open", open_)  # type: ignore[attr-defined]
    monkeypatch.setattr(file_backend.os, "link", link)  # type: ignore[attr-defined]
    monkeypatch.setattr(file_backend.os, "mkdir", mkdir)  # type: ignore[attr-defined]
    monkeypatch.setattr(file_backend, "fsync_dir", fsync_dir)
    monkeypatch.setattr(file_backend, "_syncfs", lambda path: events.append(("syncfs", "")))

    b = FileBackend(tmp_path / "repo")
    b.put("config", b"{}")  # the root: made durably
    for n in range(3):
        b.stage(f"chunks/{n:02x}/obj{n}", bytes([n]) * 64)
    # A chunk as the backup pipeline hands it over: a view of a page-aligned frame.
    frame = mmap.mmap(-1, file_backend.DIRECT_MIN + 14)
    frame[:] = b"\x07" * len(frame)
    b.stage("chunks/03/obj3", memoryview(frame))
    assert len(direct_opens) == 1 and "chunks/03" in direct_opens[0], direct_opens
    assert not any(kind in ("link", "syncfs") for kind, _ in events)
    assert not any(kind == "fsync_dir" and "chunks" in path for kind, path in events), \
        "a staged object's new directory is made durable by the flush's syncfs, not one by one"
    b.flush()
    kinds = [kind for kind, _ in events]
    first_link = kinds.index("link")
    last_write = max(i for i, k in enumerate(kinds) if k == "write")
    last_mkdir = max(i for i, k in enumerate(kinds) if k == "mkdir")
    assert "syncfs" in kinds[max(last_write, last_mkdir) : first_link], kinds
    assert kinds.count("link") == 4 and kinds[-1] == "syncfs", kinds
    assert sorted(b.list("chunks/")) == ["chunks/00/obj0", "chunks/01/obj1", "chunks/02/obj2",
                                         "chunks/03/obj3"]
    assert b.get("chunks/03/obj3") == bytes(frame)

    # A durable put below a directory that only a stage made (not yet synced)
    # fsyncs that directory's entry itself.
    b.stage("packs/aa/p", b"p")
    events.clear()
    b.put("packs/aa/q", b"q")
    assert ("fsync_dir", str(tmp_path / "repo" / "packs")) in events, events
    assert ("fsync_dir", str(tmp_path / "repo")) in events, events


@pytest.mark.parametrize("aligned", [True, False], ids=["page-aligned frame", "bytes"])
@pytest.mark.parametrize("tail", [b"", b"\0" * (64 << 10), b"end"])
def test_big_objects_bypass_the_page_cache_and_read_back_exactly(
        backend: FileBackend, aligned: bool, tail: bytes) -> None:
    """O_DIRECT: an aligned source is written as it is, another through a bounce buffer; holes
    and an unaligned end (written through the page cache) come back as they were."""
    block = 64 << 10
    data = (b"\x01" * 14 + os.urandom(17 * block) + bytes(3 * block) + os.urandom(block - 14)
            + bytes(2 * block) + tail)
    assert len(data) >= file_backend.DIRECT_MIN
    source: bytes | memoryview = data
    if aligned:
        frame = mmap.mmap(-1, len(data))
        frame[:] = data
        source = memoryview(frame)
    backend.stage("chunks/ab/direct", source)
    backend.flush()
    assert backend._direct is not None  # O_DIRECT worked here: the write path under test ran
    assert backend.get("chunks/ab/direct") == data
    st = (backend.root / "chunks" / "ab" / "direct").stat()
    assert st.st_size == len(data)
    assert st.st_blocks * 512 <= 20 * block + len(tail), st.st_blocks  # the zero blocks are holes
    backend.put("packs/ab/direct", data)  # durable puts too
    assert backend.get("packs/ab/direct") == data


@pytest.mark.parametrize("refused", ["open", "write"])
def test_a_file_system_without_o_direct_gets_buffered_writes(
        backend: FileBackend, monkeypatch: pytest.MonkeyPatch, refused: str) -> None:
    """tmpfs before Linux 6.6 refuses O_DIRECT at open; some file systems at the first write."""
    real_open, real_pwrite = os.open, os.pwrite

    def open_(path: object, flags: int, *args: object) -> int:
        if refused == "open" and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    def pwrite(fd: int, data: object, offset: int) -> int:
        if refused == "write":
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(file_backend.os, "open", open_)  # type: ignore[attr-defined]
    monkeypatch.setattr(file_backend.os, "pwrite", pwrite)  # type: ignore[attr-defined]
    data = os.urandom(file_backend.DIRECT_MIN + 5)
    backend.stage("chunks/ab/one", data)
    backend.stage("chunks/ab/two", data[::-1])
    backend.flush()
    assert backend._direct is None
    assert backend.get("chunks/ab/one") == data and backend.get("chunks/ab/two") == data[::-1]
    assert not leftovers(backend.root)


@pytest.mark.parametrize("tail", [b"", b"\0" * (64 << 10), b"end"])
def test_zero_blocks_of_an_object_are_holes_and_read_back_as_zeroes(
        backend: FileBackend, tail: bytes) -> None:
    """An uncompressed chunk of a fragmented disk costs its data, not its zeroes, on disk."""
    block = 64 << 10
    data = b"\x01" * 14 + bytes(3 * block) + b"\x02" * block + bytes(4 * block) + tail
    backend.stage("chunks/ab/sparse", data)
    backend.flush()
    path = backend.root / "chunks" / "ab" / "sparse"
    assert backend.get("chunks/ab/sparse") == data
    assert backend.get_range("chunks/ab/sparse", 5, block) == data[5 : 5 + block]
    st = path.stat()
    assert st.st_size == len(data)
    # Data: the first block (the header), the 0x02 block straddling two, the tail.
    assert st.st_blocks * 512 <= 4 * block + len(tail), st.st_blocks
    backend.put("points/vm/p.json", data)  # durable puts too
    assert backend.get("points/vm/p.json") == data
