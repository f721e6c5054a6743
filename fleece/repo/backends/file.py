"""The ``file`` backend: one file per object under a local directory.

Durability and atomicity come from the usual dance: write a temporary file in
the target directory, fsync it, rename (or, for a conditional create, hard
link) it into place, fsync the directory. Readers therefore see a whole
object or none, and a crash leaves at most a hidden ``.tmp-*`` file that
``list`` ignores.

Chunks take a faster road (:meth:`FileBackend.stage`): an fsync per 4 MiB
object costs ten times the write itself (measured: 520 vs 4,960 MiB/s), so
staged objects are written to hidden temporary files without fsync and made
durable in batches by one ``syncfs`` — and only then linked into place. A
visible object is therefore always a durable one, which matters because
another backup may find it by name and reuse it without reading it.

Objects of a mebibyte or more (chunks, packs) are written with ``O_DIRECT``,
past the page cache (``_write_temp`` says why); the rule above is the same
for them.

Lock leases need a compare-and-swap (:meth:`FileBackend.replace_if`): it
compares under an ``flock`` of the object's directory, so two swaps of one key
never interleave, and swaps with ``renameat2(RENAME_EXCHANGE)``, which fails
when the object was deleted meanwhile (a broken lease is never brought back)
and hands back what it displaced, so a plain ``put`` or a conditional create
that slipped in between is noticed and put back. This is atomic between
processes of one host on a local file system. On a file system without
``RENAME_EXCHANGE`` (NFS, for one) the swap is an ``os.replace`` after the
compare, and a ``delete`` landing between the two is undone: the lease comes
back. Hosts sharing a repository directory over NFS are not covered.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

from fleece.errors import BadInput, RepositoryError
from fleece.repo.backends.base import Backend, ObjectInfo, ObjectMissing

TMP_PREFIX = ".tmp-"
STAGE_BATCH_BYTES = 256 << 20
"""Staged bytes after which a batch is made durable and published."""

SPARSE_BLOCK = 64 << 10
"""All-zero, aligned blocks of this size are left as holes in the object's file."""
_ZERO_BLOCK = bytes(SPARSE_BLOCK)

DIRECT_MIN = 1 << 20
"""Objects at least this big are written with ``O_DIRECT``, past the page cache (see ``_write_temp``)."""
DIRECT_ALIGN = 4096
"""Alignment of memory, file offsets and lengths for ``O_DIRECT`` (the largest logical block in use)."""
_BOUNCE = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> None:
    """Swap the directory entries ``a`` and ``b`` atomically; ``OSError`` as ``renameat2`` fails.

    ``FileNotFoundError`` when either is absent; ``errno.EINVAL`` (or
    ``ENOSYS``) where the file system or the C library cannot exchange.
    """
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(b))


def _syncfs(path: Path) -> None:
    """Flush every dirty page and inode of the filesystem holding ``path`` to stable storage."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs = getattr(_libc, "syncfs", None)
        if syncfs is None or syncfs(fd) != 0:
            os.sync()  # no syncfs(2): the whole machine, slower but as safe
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (new, renamed, removed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _flocked(directory: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory`` (every process of this host waits for it)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
def sparse_runs(view: memoryview) -> list[tuple[int, int]]:
    """``[start, end)`` runs of ``view`` outside its aligned all-zero blocks of :data:`SPARSE_BLOCK`."""
    size = len(view)
    runs = []
    pos = 0  # start of the data not yet in a run
    if size >= 2 * SPARSE_BLOCK:
        for off in range(0, size - SPARSE_BLOCK + 1, SPARSE_BLOCK):
            # startswith takes any buffer as its prefix: one memcmp, no copy of the block.
            if _ZERO_BLOCK.startswith(view[off : off + SPARSE_BLOCK]):
                if off > pos:
                    runs.append((pos, off))
                pos = off + SPARSE_BLOCK
    if pos < size:
        runs.append((pos, size))
    return runs


def _write_sparse(fd: int, data: bytes | memoryview, direct: _DirectWriter | None = None) -> None:
    """Write ``data`` to the new, empty file ``fd``, leaving aligned all-zero blocks as holes.

    An uncompressed chunk of a fragmented disk is mostly the zeroes between
    its extents; copying them into the page cache and onto the disk cost as
    much as the data. The file reads back the same, holes as zeroes.

    With ``direct`` (``fd`` was opened ``O_DIRECT``) every run is written
    straight to the device, except the unaligned tail of the last, which is
    written through the page cache once ``O_DIRECT`` is turned off.
    """
    view = memoryview(data)
    size = len(view)
    runs = sparse_runs(view)
    for start, end in runs:
        if direct is None:
            _write_at(fd, view[start:end], start)
            continue
        # Runs start at 0 or after a zero block: aligned. Only the object's end may not be.
        aligned = end - end % DIRECT_ALIGN
        if aligned > start:
            direct.write(fd, view[start:aligned], start)
        if aligned < end:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            _write_at(fd, view[aligned:end], aligned)
    if size and (not runs or runs[-1][1] < size):
        os.ftruncate(fd, size)  # ends in a hole


class _DirectWriter:
    """``O_DIRECT`` writes: from the caller's memory where it is aligned, else through a bounce buffer.

    The pipeline's chunk frames are page-aligned, so a chunk stored plain
    goes from the buffer it was read into to the device with no copy at all.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def write(self, fd: int, view: memoryview, offset: int) -> None:
        """Write ``view`` (a multiple of :data:`DIRECT_ALIGN` long) at the aligned ``offset``."""
        if is_aligned(view, DIRECT_ALIGN):
            _pwrite_all(fd, view, offset)
            return
        bounce: mmap.mmap | None = getattr(self._local, "bounce", None)
        if bounce is None:
            bounce = self._local.bounce = mmap.mmap(-1, _BOUNCE)  # page-aligned
        for pos in range(0, len(view), _BOUNCE):
            part = view[pos : pos + _BOUNCE]
            bounce[: len(part)] = part
            with memoryview(bounce) as b:
                _pwrite_all(fd, b[: len(part)], offset + pos)


def is_aligned(view: memoryview, align: int) -> bool:
    """Whether ``view`` starts at a multiple of ``align`` (never for read-only or empty memory,
    which ctypes cannot map)."""
    if view.readonly or not view.nbytes:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % align == 0


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _write_at(fd: int, view: memoryview, offset: int) -> None:
    """Write all of ``view`` at ``offset`` (seeking over a hole before it)."""
    if not view:
        return
    if os.lseek(fd, 0, os.SEEK_CUR) != offset:
        os.lseek(fd, offset, os.SEEK_SET)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class FileBackend(Backend):
    """Objects as files under ``root``; keys are relative ``/``-separated paths.

    Only the owner may read what this backend makes: directories 0700,
    objects 0600 — in a plain repository the objects are the VMs' disks, in
    an encrypted one the key objects are what an offline guess needs. With
    ``group_access`` (the config key ``group_access = true``) the group may
    read too: 0750 and 0640.
    """

    def __init__(self, root: Path, *, group_access: bool = False) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        self.group_access = group_access
        self._dir_mode = 0o750 if group_access else 0o700
        self._file_mode = 0o640 if group_access else 0o600
        self._staged: list[tuple[Path, Path]] = []  # (temporary file, final path)
        self._staged_bytes = 0
        self._stage_lock = threading.Lock()
        self._unsynced_dirs: set[Path] = set()  # made by stage(), durable at the next syncfs
        self._direct: _DirectWriter | None = _DirectWriter()  # None once O_DIRECT has failed here

    def __repr__(self) -> str:
        return f"FileBackend({self.url!r})"

    # -- keys ---------------------------------------------------------------

    def _path(self, key: str) -> Path:
        """Map a key to its file, refusing anything that could leave the root."""
        parts = key.split("/")
        if (
            not key
            or key.startswith("/")
            or "\0" in key
            or any(p in ("", ".", "..") or p.startswith(TMP_PREFIX) for p in parts)
        ):
            raise BadInput(f"invalid object key {key!r} for repository {self.url}")
        return self.root.joinpath(*parts)

    # -- writing ------------------------------------------------------------

    def _make_dirs(self, directory: Path, durable: bool = True) -> None:
        """Create missing directories, fsyncing each parent (if ``durable``) so the entry survives a crash.

        Staged objects pass ``durable=False``: nothing under a new directory
        is visible before :meth:`flush`, whose ``syncfs`` makes the new
        entries durable together (an fsync per new directory cost a journal
        commit each: 256 of them for the ``chunks/xx`` fan-out of a new
        repository).
        """
        missing: list[Path] = []
        d = directory
        while not d.is_dir():
            missing.append(d)
            if d.parent == d:
                break
            d = d.parent
        for d in reversed(missing):
            try:
                os.mkdir(d, self._dir_mode)
            except FileExistsError:
                continue  # another writer made it
            if self.group_access:
                os.chmod(d, self._dir_mode)  # past a umask that would take the group's bits
            if durable:
                fsync_dir(d.parent)
            else:
                with self._stage_lock:
                    self._unsynced_dirs.add(d)
        if durable and self._unsynced_dirs:
            # A durable put below a directory a stage made and no flush has
            # synced yet: make that directory's entry durable now.
            with self._stage_lock:
                pending = [p for p in self._unsynced_dirs if p == directory or p in directory.parents]
                self._unsynced_dirs.difference_update(pending)
            for p in pending:
                fsync_dir(p.parent)

    def _write_temp(self, directory: Path, data: bytes | memoryview, durable: bool = True) -> Path:
        """Write ``data`` to a new temporary file in ``directory``, fsynced if ``durable``.

        Objects of :data:`DIRECT_MIN` or more (chunks, packs) bypass the page
        cache with ``O_DIRECT``: on a small host, filling the page cache with
        backup data cost more CPU than anything else in a backup (and evicted
        the VMs' own cache), while the device takes the same bytes from our
        buffer directly. The durability rule is unchanged: the data is on
        the device but maybe in its volatile cache, so the fsync (or the
        flush's syncfs) still comes before the object becomes visible. Where
        the file system refuses ``O_DIRECT`` (tmpfs before Linux 6.6, some
        FUSE), this backend writes through the page cache from then on.
        """
        direct = self._direct if len(data) >= DIRECT_MIN else None
        # delete() prunes empty directories, so a concurrent delete may remove
        # the directory between mkdir and open: recreate and try again.
        for attempt in range(5):
            tmp = directory / f"{TMP_PREFIX}{secrets.token_hex(8)}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            try:
                self._make_dirs(directory, durable)
                try:
                    fd = os.open(tmp, flags | (os.O_DIRECT if direct else 0), self._file_mode)
                except OSError as exc:
                    if direct is None or exc.errno != errno.EINVAL:
                        raise
                    self._direct = direct = None
                    fd = os.open(tmp, flags, self._file_mode)
                if self.group_access:
                    os.fchmod(fd, self._file_mode)
            except FileNotFoundError:
                if attempt == 4:
                    raise
                continue
            try:
                try:
                    _write_sparse(fd, data, direct)
                except OSError as exc:
                    if direct is None or exc.errno != errno.EINVAL:
                        raise
                    # O_DIRECT opens here but refuses our alignment: write the usual way.
                    self._direct = None
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                    os.ftruncate(fd, 0)
                    _write_sparse(fd, data)
                if durable:
                    os.fsync(fd)
            except BaseException:
                os.close(fd)
                _unlink_quietly(tmp)
                raise
            os.close(fd)
            return tmp
        raise AssertionError("unreachable")

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Store ``data`` under ``key`` atomically (see :class:`Backend`)."""
        path = self._path(key)
        tmp: Path | None = None
        try:
            tmp = self._write_temp(path.parent, data)
            if if_absent:
                # link() fails if the name exists: an atomic conditional
                # create that never exposes a partly written file.
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
                finally:
                    _unlink_quietly(tmp)
            else:
                os.replace(tmp, path)
            tmp = None
            fsync_dir(path.parent)
            return True
        except OSError as exc:
            if tmp is not None:
                _unlink_quietly(tmp)
            raise RepositoryError(
                f"cannot write {path}: {exc.strerror or exc}; the object was not stored"
            ) from None

    def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        """Replace ``key``'s bytes by ``data`` if they are ``expected`` (see the module docstring)."""
        path = self._path(key)
        tmp: Path | None = None
        try:
            # The new bytes go in first, so the directory cannot be pruned as
            # empty under the flock we take on it.
            tmp = self._write_temp(path.parent, data)
            with _flocked(path.parent):
                try:
                    if path.read_bytes() != expected:
                        return False
                except (FileNotFoundError, NotADirectoryError):
                    return False
                swapped = self._swap(tmp, path, expected)
            if swapped:
                fsync_dir(path.parent)
            return swapped
        except OSError as exc:
            raise RepositoryError(
                f"cannot replace {path}: {exc.strerror or exc}; the object was not changed"
            ) from None
        finally:
            if tmp is not None:
                _unlink_quietly(tmp)

    @staticmethod
    def _swap(tmp: Path, path: Path, expected: bytes) -> bool:
        """Put ``tmp`` in ``path``'s place if ``path`` still holds ``expected``; True if done."""
        try:
            _exchange(tmp, path)
        except FileNotFoundError:
            return False  # deleted since we compared: do not bring it back
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            os.replace(tmp, path)  # no exchange here: see the module docstring
            return True
        # ``tmp`` now holds what we displaced: a writer that does not take the
        # flock (a put, a conditional create) may have slipped in.
        if tmp.read_bytes() == expected:
            return True
        try:
            _exchange(tmp, path)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        return False

    def stage(self, key: str, data: bytes | memoryview) -> bool:
        """Store an immutable object that need not be visible before the next :meth:`flush`.

        It becomes visible (if no object of that name exists yet) once it is
        durable: at the latest when :meth:`flush` returns, earlier when a
        batch of :data:`STAGE_BATCH_BYTES` fills up. Always True: whether a
        concurrent writer published the same name first is only known at the
        flush, and immutable objects of one name are identical.
        """
        path = self._path(key)
        try:
            tmp = self._write_temp(path.parent, data, durable=False)
        except OSError as exc:
            raise RepositoryError(
                f"cannot write {path}: {exc.strerror or exc}; the object was not stored"
            ) from None
        with self._stage_lock:
            self._staged.append((tmp, path))
            self._staged_bytes += len(data)
            full = self._staged_bytes >= STAGE_BATCH_BYTES
        if full:
            self.flush()
        return True

    def flush(self) -> None:
        """Make every staged object durable, then publish it under its name."""
        with self._stage_lock:
            batch, self._staged, self._staged_bytes = self._staged, [], 0
        if not batch:
            return
        try:
            with self._stage_lock:
                self._unsynced_dirs.clear()
            _syncfs(self.root)  # the staged bytes and every directory made for them
            for tmp, path in batch:
                with contextlib.suppress(FileExistsError):  # immutable: the first copy stays
                    os.link(tmp, path)
                _unlink_quietly(tmp)
            # The links are metadata: one more barrier makes them durable too.
            _syncfs(self.root)
        except OSError as exc:
            for tmp, _ in batch:
                _unlink_quietly(tmp)
            raise RepositoryError(
                f"cannot make {len(batch)} objects durable in {self.url}: {exc.strerror or exc}; "
                "they were not stored"
            ) from None

    def sweep_temporaries(self, older_than: float, *, delete: bool) -> tuple[int, int]:
        """Hidden temporary files last written before ``older_than`` (Unix time): count, bytes.

        Left by a writer killed between writing and publishing; gc removes them.
        """
        count = size = 0
        if not self.root.is_dir():
            return count, size
        for path in self.root.rglob(f"{TMP_PREFIX}*"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if st.st_mtime >= older_than:
                continue
            if delete:
                _unlink_quietly(path)
            count += 1
            size += st.st_size
        return count, size

    def discard_staged(self) -> None:
        """Forget staged objects that were never flushed (a failed backup)."""
        with self._stage_lock:
            batch, self._staged, self._staged_bytes = self._staged, [], 0
        for tmp, _ in batch:
            _unlink_quietly(tmp)

    # -- reading ------------------------------------------------------------

    def get(self, key: str) -> bytes:
        """Return the whole object; :class:`ObjectMissing` if absent."""
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectMissing(key) from None
        except OSError as exc:
            raise RepositoryError(f"cannot read {path}: {exc.strerror or exc}") from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` with one ``pread``; :class:`ObjectMissing` if absent."""
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectMissing(key) from None
        except OSError as exc:
            raise RepositoryError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            return os.pread(fd, length, offset)
        except OSError as exc:
            raise RepositoryError(f"cannot read {path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)

    def exists(self, key: str) -> bool:
        """Whether ``key`` is stored."""
        return self._path(key).is_file()

    def list(self, prefix: str) -> Iterator[str]:
        """Every key starting with ``prefix`` (temporary files excluded)."""
        if prefix.startswith("/") or ".." in prefix.split("/") or "\0" in prefix:
            raise BadInput(f"invalid key prefix {prefix!r} for repository {self.url}")
        # Walk only the deepest directory the prefix names in full.
        base = prefix.rpartition("/")[0]
        start = self.root.joinpath(*base.split("/")) if base else self.root
        yield from self._walk(start, f"{base}/" if base else "", prefix)

    def _walk(self, directory: Path, rel: str, prefix: str) -> Iterator[str]:
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise RepositoryError(f"cannot list {directory}: {exc.strerror or exc}") from None
        for entry in entries:
            if entry.name.startswith(TMP_PREFIX):
                continue
            key = rel + entry.name
            if entry.is_dir(follow_symlinks=False):
                # Descend only where keys can still match the prefix.
                if (key + "/").startswith(prefix) or prefix.startswith(key + "/"):
                    yield from self._walk(Path(entry.path), key + "/", prefix)
            elif key.startswith(prefix):
                yield key

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        """``list`` with each object's size and mtime (objects gone meanwhile are skipped)."""
        for key in self.list(prefix):
            try:
                st = self._path(key).stat()
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise RepositoryError(f"cannot stat {key} in {self.url}: {exc.strerror or exc}") from None
            yield ObjectInfo(key, st.st_size, st.st_mtime)

    def mtime(self, key: str) -> float:
        """Last-modified time of ``key``; :class:`ObjectMissing` if absent."""
        path = self._path(key)
        try:
            return path.stat().st_mtime
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectMissing(key) from None
        except OSError as exc:
            raise RepositoryError(f"cannot stat {path}: {exc.strerror or exc}") from None

    # -- removing -----------------------------------------------------------

    def delete(self, key: str) -> None:
        """Remove ``key`` (absent is fine) and any directories it leaves empty."""
        path = self._path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise RepositoryError(
                f"cannot delete {path}: {exc.strerror or exc}; the object is still there"
            ) from None
        # Prune empty directories up to (not including) the root, so that
        # deleted points do not leave one directory each behind forever.
        d = path.parent
        while d != self.root and self.root in d.parents:
            try:
                os.rmdir(d)
            except OSError:
                break  # not empty (the usual case), or gone already
            d = d.parent
