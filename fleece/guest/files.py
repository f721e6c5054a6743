"""A point's files through the libguestfs appliance: list them, copy them out (``fleece files``).

The point is served from the repository (:mod:`.served`) and read by one
appliance per command (:mod:`.appliance`); no guest file system is ever
mounted in the host's kernel. A backup is untrusted input, so what is
written out is checked here, on the host: every path written lies under the
output directory, no symlink of the point is followed when writing (each
parent directory is checked with ``lstat``; files are created with
``O_EXCL|O_NOFOLLOW`` under a temporary name and renamed at the end), and a
file that is not finished has no final name.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fleece.errors import BadInput, FleeceError
from fleece.guest.appliance import Appliance
from fleece.guest.scratch import Scratch, interruptible
from fleece.guest.served import ServedPoint
from fleece.repo.format.point import RestorePoint

TMP_PREFIX = ".fleece-partial-"
BLOCK = 1 << 16


class NotInPoint(FleeceError):
    """The path (or device) is not in the point (exit 1)."""


@dataclass(frozen=True)
class Where:
    """A parsed PATH: ``device`` None means the file system that holds the guest's ``/``."""

    device: str | None
    path: str

    @property
    def overview(self) -> bool:
        return self.device is None and self.path == "/"


def parse_path(text: str) -> Where:
    """``/`` (overview), ``/path`` or ``DEVICE:/path``; ``BadInput`` otherwise (before anything starts)."""
    if text.startswith("/dev/") and ":" in text:
        device, _, path = text.partition(":")
        if not path.startswith("/"):
            raise BadInput(f"{text!r}: after DEVICE: comes an absolute path (DEVICE:/path)")
        return Where(device, _norm(path))
    if text.startswith("/"):
        return Where(None, _norm(text))
    raise BadInput(f"{text!r}: give /path (in the guest's root file system), DEVICE:/path "
                   "(e.g. /dev/sda1:/etc) or / for the file systems")


def _norm(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadInput(f"{path!r}: '..' is not allowed in a path of the point")
    return "/" + "/".join(parts)


@dataclass
class Filesystem:
    """One file system of the point, as the appliance sees it."""

    device: str
    disk: str
    type: str
    label: str
    size: int
    used: int | None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Entry:
    """One directory entry (``ls``)."""

    name: str
    type: str
    size: int
    mode: int
    uid: int
    gid: int
    mtime: int
    target: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_TYPES = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
          stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}


def _type(mode: int) -> str:
    return _TYPES.get(stat.S_IFMT(mode), "unknown")


@contextlib.contextmanager
def point_appliance(repo_url: str, point: RestorePoint, *, drives: list[str] | None = None,
                    passphrase: bytes | None = None, scratch_parent: Path | None = None,
                    say: Callable[[str], None] = lambda line: None) -> Iterator[Appliance]:
    """Serve the point, boot one appliance over it; everything goes when the block ends."""
    with Scratch(scratch_parent) as scratch, interruptible(), \
            ServedPoint(repo_url, point, scratch, drives=drives, passphrase=passphrase) as served:
        app = Appliance(served.disks, scratch)
        say(f"starting the libguestfs appliance ({app.accel.upper()}) on "
            f"{', '.join(d.name for d in served.disks)} of {point.id}")
        with app:
            yield app


def _disk_of(app: Appliance, device: str) -> str:
    from fleece.guest.fsck import _disk_of as disk_of

    return disk_of(app, device)


def filesystems(app: Appliance) -> list[Filesystem]:
    """Every file system libguestfs finds (partitions, LVM volumes, whole disks), with size and use."""
    g = app.g
    out = []
    for device, fstype in sorted(g.list_filesystems().items()):
        if fstype in ("unknown", "swap", "LVM2_member", ""):
            continue
        try:
            label = str(g.vfs_label(device))
        except RuntimeError:
            label = ""
        try:
            size = int(g.blockdev_getsize64(device))
        except RuntimeError:
            size = 0
        used, error = None, None
        try:
            g.mount_ro(device, "/")
            st = g.statvfs("/")
            used = (st["blocks"] - st["bfree"]) * st["frsize"]
        except RuntimeError as exc:
            error = str(exc).strip().splitlines()[0] if str(exc).strip() else "cannot be mounted"
        finally:
            g.umount_all()
        out.append(Filesystem(device, _disk_of(app, device), fstype, label, size, used, error))
    return out


def root_device(app: Appliance) -> str:
    """The file system that holds the guest's ``/`` (libguestfs inspection), else the only one."""
    g = app.g
    roots = g.inspect_os()
    if len(roots) == 1:
        return str(roots[0])
    mountable = [d for d, t in g.list_filesystems().items()
                 if t not in ("unknown", "swap", "LVM2_member", "")]
    if len(mountable) == 1 and not roots:
        return str(mountable[0])
    found = ", ".join(sorted(mountable)) or "none"
    raise NotInPoint(f"the point has no single root file system (operating systems found: "
                     f"{len(roots)}; file systems: {found}): give DEVICE:/path")


def mount(app: Appliance, where: Where) -> str:
    """Mount the file system of ``where`` read-only at the appliance's ``/``; its device."""
    device = where.device or root_device(app)
    known = app.g.list_filesystems()
    if device not in known:
        raise NotInPoint(f"{device}: no such file system in the point (it has "
                         f"{', '.join(sorted(known)) or 'none'})")
    app.g.umount_all()
    try:
        app.g.mount_ro(device, "/")
    except RuntimeError as exc:
        raise FleeceError(f"{device} ({known[device]}) cannot be read: {str(exc).strip()}") from None
    return device


def _lstat(app: Appliance, path: str, device: str) -> dict[str, Any]:
    try:
        return dict(app.g.lstatns(path))
    except RuntimeError:
        raise NotInPoint(f"{device}:{path}: no such file or directory in the point") from None
    except UnicodeError:
        raise NotInPoint(f"{device}:{path}: not found (a path of bytes that are not UTF-8 can be "
                         "listed but not named here yet)") from None


def sh_path(path: str) -> str:
    """``path`` as a shell word that survives any bytes (octal escapes through ``printf``)."""
    raw = os.fsencode(path)
    return "\"$(printf '" + "".join(f"\\{b:03o}" for b in raw) + "x')\""


FIELDS = "%m %U %G %s %T@ %y\\0%P\\0%l\\0"
"""find -printf: the fields of an entry, its name, its target; each ended by a NUL."""


def _find(app: Appliance, path: str, device: str, children: bool) -> list[tuple[bytes, list[bytes], bytes]]:
    """``find -printf`` in the appliance, every byte hex-encoded on the way out: names of any bytes."""
    depth = "-mindepth 1 -maxdepth 1" if children else "-maxdepth 0"
    fmt = FIELDS
    # In a subshell: an ``exit`` must not end the shell that reports the status.
    try:
        rc, out = app.sh(f"(p={sh_path('/sysroot' + path.rstrip('/') if path != '/' else '/sysroot')}; "
                         f"p=\"${{p%x}}\"; test -e \"$p\" -o -L \"$p\" || exit 3; "
                         f"find \"$p\" {depth} -printf '{fmt}' | od -An -v -tx1)")
    except RuntimeError as exc:
        raise FleeceError(f"{device}:{path}: the appliance could not list it: {str(exc).strip()}") from None
    if rc == 3:
        raise NotInPoint(f"{device}:{path}: no such file or directory in the point")
    if rc != 0:
        raise FleeceError(f"{device}:{path}: cannot be listed: {out.strip()[:300]}")
    data = bytes.fromhex("".join(out.split()))
    parts = data.split(b"\0")
    found = []
    for i in range(0, len(parts) - 2, 3):
        fields, name, target = parts[i].split(b" "), parts[i + 1], parts[i + 2]
        if not children:
            name = os.fsencode(path.rsplit("/", 1)[-1])
        found.append((name, fields, target))
    return found


_FIND_TYPES = {b"d": "dir", b"f": "file", b"l": "symlink", b"c": "char", b"b": "block", b"p": "fifo",
               b"s": "socket"}


def listing(app: Appliance, where: Where) -> tuple[str, list[Entry]]:
    """The entries of directory ``where`` (or the one entry it names); its device. Names of any
    bytes: they are decoded with ``surrogateescape`` (``os.fsencode`` gives the bytes back)."""
    device = mount(app, where)
    [(_, top, _)] = _find(app, where.path, device, children=False)
    rows = _find(app, where.path, device, children=True) if top[5] == b"d" else \
        _find(app, where.path, device, children=False)
    entries = []
    for name, f, target in sorted(rows):
        kind = _FIND_TYPES.get(f[5], "unknown")
        entries.append(Entry(os.fsdecode(name), kind, int(f[3]), int(f[0], 8), int(f[1]), int(f[2]),
                             int(float(f[4])), os.fsdecode(target) if kind == "symlink" else None))
    return device, entries


# --- writing out: nothing outside DIR, nothing followed, nothing looks complete before it is ----------


class Escape(FleeceError):
    """The point asked for a write outside the output directory (refused, exit 1)."""


class Writer:
    """Writes entries below ``root`` safely; ``force`` allows replacing existing files."""

    def __init__(self, root: Path, force: bool) -> None:
        self.root = os.path.realpath(root)
        self.force = force
        self.dir_times: list[tuple[str, int, int]] = []
        self.files = 0

    def target(self, rel: str) -> str:
        """``root/rel`` after checking that ``rel`` stays below root and no parent is a symlink."""
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if not parts or ".." in parts:
            raise Escape(f"refused the member {rel!r} of the point: it would be written outside the "
                         "output directory")
        cur = self.root
        for p in parts[:-1]:
            cur = os.path.join(cur, p)
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                os.mkdir(cur, 0o700)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise Escape(f"refused {rel!r}: its parent {cur} is not a directory (a symlink of the "
                             "point is never followed)")
        return os.path.join(cur, parts[-1])

    def _check_existing(self, path: str) -> None:
        if os.path.lexists(path) and not self.force:
            raise FleeceError(f"{path} exists; nothing of it was overwritten (--force replaces it)")

    def _place(self, tmp: str, path: str) -> None:
        if os.path.isdir(path) and not os.path.islink(path):
            os.unlink(tmp)
            raise FleeceError(f"{path} is a directory; not replaced by a file")
        os.rename(tmp, path)

    def _tmp(self, path: str) -> str:
        return os.path.join(os.path.dirname(path), f"{TMP_PREFIX}{os.getpid()}-{self.files}")

    def file(self, rel: str, src: Any, size: int, meta: tarfile.TarInfo | dict[str, int]) -> None:
        """A regular file from the readable ``src``, sparse where its blocks are zero."""
        path = self.target(rel)
        self._check_existing(path)
        self.files += 1
        tmp = self._tmp(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                left = size
                while left > 0:
                    block = src.read(min(BLOCK, left))
                    if not block:
                        raise FleeceError(f"{rel}: the point gave {size - left} of {size} bytes")
                    left -= len(block)
                    if block.count(0) == len(block):
                        out.seek(len(block), os.SEEK_CUR)
                    else:
                        out.write(block)
                out.truncate(size)
            self._meta(tmp, meta)
            self._place(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def symlink(self, rel: str, target: str, meta: tarfile.TarInfo | dict[str, int]) -> None:
        """A symlink, as a symlink (never followed)."""
        path = self.target(rel)
        self._check_existing(path)
        self.files += 1
        tmp = self._tmp(path)
        os.symlink(target, tmp)
        self._meta(tmp, meta)
        self._place(tmp, path)

    def hardlink(self, rel: str, to_rel: str) -> None:
        """A hard link to an entry already written below root."""
        path, source = self.target(rel), self.target(to_rel)
        self._check_existing(path)
        if not os.path.lexists(source):
            raise FleeceError(f"{rel}: its hard link target {to_rel} was not written")
        self.files += 1
        tmp = self._tmp(path)
        os.link(source, tmp, follow_symlinks=False)
        self._place(tmp, path)

    def directory(self, rel: str, meta: tarfile.TarInfo | dict[str, int]) -> None:
        """A directory (made or reused); its times are set at the end."""
        path = self.target(rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.mkdir(path, 0o700)
        else:
            if not stat.S_ISDIR(st.st_mode):
                raise FleeceError(f"{path} exists and is not a directory; not replaced")
        uid, gid, mode, mtime = _fields(meta)
        with contextlib.suppress(PermissionError):
            os.lchown(path, uid, gid)
        os.chmod(path, mode)
        self.dir_times.append((path, mtime, mtime))

    def finish(self) -> None:
        for path, atime, mtime in reversed(self.dir_times):
            os.utime(path, (atime, mtime), follow_symlinks=False)

    def _meta(self, path: str, meta: tarfile.TarInfo | dict[str, int]) -> None:
        uid, gid, mode, mtime = _fields(meta)
        with contextlib.suppress(PermissionError):
            os.lchown(path, uid, gid)
        if not os.path.islink(path):
            os.chmod(path, mode)
        os.utime(path, (mtime, mtime), follow_symlinks=False)


def _fields(meta: tarfile.TarInfo | dict[str, int]) -> tuple[int, int, int, int]:
    if isinstance(meta, tarfile.TarInfo):
        return meta.uid, meta.gid, meta.mode & 0o7777, int(meta.mtime)
    return (meta["st_uid"], meta["st_gid"], stat.S_IMODE(meta["st_mode"]), meta["st_mtime_sec"])


def extract_tar(tar_path: Path, writer: Writer, top: str, say: Callable[[str], None]) -> None:
    """Write the members of a ``tar_out`` archive below ``top`` (relative to the writer's root)."""
    with tarfile.open(tar_path, "r:", encoding="utf-8", errors="surrogateescape") as tar:
        for m in tar:
            name = m.name[2:] if m.name.startswith("./") else m.name
            rel = top if name in ("", ".") else f"{top}/{name}"
            if m.isdir():
                writer.directory(rel, m)
            elif m.isreg():
                src = tar.extractfile(m)
                assert src is not None
                writer.file(rel, src, m.size, m)
            elif m.issym():
                writer.symlink(rel, m.linkname, m)
            elif m.islnk():
                link = m.linkname[2:] if m.linkname.startswith("./") else m.linkname
                writer.hardlink(rel, f"{top}/{link}")
            else:
                say(f"skipped {rel}: a device, FIFO or socket is not written out")


def get(app: Appliance, where: Where, writer: Writer, scratch: Path,
        say: Callable[[str], None]) -> tuple[str, str]:
    """Copy ``where`` (file, symlink or directory tree) below the writer's root; (device, type)."""
    device = mount(app, where)
    g = app.g
    st = _lstat(app, where.path, device)
    name = where.path.rsplit("/", 1)[-1] or device.rsplit("/", 1)[-1]
    kind = _type(st["st_mode"])
    if kind == "dir":
        tar = scratch / f"get{writer.files}.tar"
        g.tar_out(where.path, str(tar), numericowner=True)
        try:
            extract_tar(tar, writer, name, say)
        finally:
            tar.unlink(missing_ok=True)
    elif kind == "file":
        tmp = scratch / f"get{writer.files}.data"
        g.download(where.path, str(tmp))
        try:
            with open(tmp, "rb") as src:
                writer.file(name, src, int(st["st_size"]), st)
        finally:
            tmp.unlink(missing_ok=True)
    elif kind == "symlink":
        writer.symlink(name, g.readlink(where.path), st)
    else:
        raise FleeceError(f"{device}:{where.path} is a {kind}; only files, symlinks and directories "
                          "are copied out")
    return device, kind

