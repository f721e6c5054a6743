"""``fleece files ls|get``: a point's files back through the libguestfs appliance, from the repository.

The test disk is a GPT disk whose partition holds an ext4 made with
``mkfs.ext4 -d`` (nothing mounted on the host). Its tree has awkward names
(spaces, a newline, non-UTF-8 bytes), symlinks crafted to point outside
(absolute, ``../..``, dangling), a hard link and a sparse file.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from disks import MiB, Part, blank, partitioned
from verifying import back_up_images, leftovers

AWKWARD = [b"with space.txt", b"new\nline", b"latin1-\xe9\xff.bin"]


def _tree(root: Path) -> Path:
    """The guest's tree (as bytes paths)."""
    top = os.fsencode(root / "data")
    os.makedirs(os.path.join(top, b"sub dir"))
    for i, name in enumerate(AWKWARD):
        with open(os.path.join(top, name), "wb") as f:
            f.write(name * (i + 1))
    with open(os.path.join(top, b"sub dir", b"conf"), "wb") as f:
        f.write(b"key=value\n")
    os.chmod(os.path.join(top, b"sub dir", b"conf"), 0o640)
    os.chown(os.path.join(top, b"sub dir", b"conf"), 1234, 4321)
    os.utime(os.path.join(top, b"sub dir", b"conf"), (1_600_000_000, 1_600_000_000))
    with open(os.path.join(top, b"sparse"), "wb") as f:
        f.seek(8 * MiB)
        f.write(b"end")
    os.link(os.path.join(top, b"sub dir", b"conf"), os.path.join(top, b"hard"))
    os.symlink(b"/etc/passwd", os.path.join(top, b"abs-link"))
    os.symlink(b"../../escape", os.path.join(top, b"up-link"))
    os.symlink(b"sub dir", os.path.join(top, b"dir-link"))
    os.symlink(b"nowhere", os.path.join(top, b"dangling"))
    return root


@pytest.fixture
def point(make_vm: Any, fleece: Any, tmp_path: Path) -> tuple[Path, str, Path]:
    src = _tree(tmp_path / "src")
    fs = blank(tmp_path / "fs.ext4", 60 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "data", "-d", str(src), str(fs)], check=True)
    disk = partitioned(tmp_path / "disk.raw", 64 * MiB, "gpt",
                       [Part(60, "0FC63DAF-8483-4772-8E79-3D69D8477DE4", fs)])
    repo = tmp_path / "repo"
    return repo, back_up_images(make_vm, fleece, repo, [disk]), src


def test_ls_and_get_round_trip_and_nothing_escapes(point: tuple[Path, str, Path], fleece: Any,
                                                    tmp_path: Path, scratch_tmpdir: Path) -> None:
    repo, pid, src = point
    base = ("--repo", repo, pid, "--vm", "vm1")

    # Bad input: exit 2 before anything starts.
    assert fleece("files", "ls", *base, "etc").rc == 2
    assert fleece("files", "ls", "--repo", repo, pid, "--vm", "nope").rc == 2
    assert fleece("files", "ls", *base, "--drive", "vdz").rc == 2
    assert fleece("files", "get", *base, "/data", "-o", tmp_path / "missing-dir").rc == 2
    assert leftovers(scratch_tmpdir) == []

    overview = fleece("files", "ls", *base, "/", "--json")
    assert overview.rc == 0, overview.err
    [fs] = overview.json()["filesystems"]
    assert (fs["device"], fs["disk"], fs["type"], fs["label"]) == ("/dev/sda1", "vda", "ext4", "data")
    assert 0 < fs["used"] < fs["size"]

    listed = fleece("files", "ls", *base, "/dev/sda1:/data", "--json")
    assert listed.rc == 0, listed.err
    entries = {e["name"]: e for e in listed.json()["entries"]}
    assert entries["abs-link"]["target"] == "/etc/passwd"
    assert entries["sub dir"]["type"] == "dir"
    assert sorted(os.fsencode(n) for n in entries) == sorted(os.listdir(os.fsencode(src / "data")))
    assert entries["sub dir"]["mode"] == 0o755 and entries["hard"]["uid"] == 1234

    missing = fleece("files", "ls", *base, "/data/not-there")
    assert missing.rc == 1 and "/data/not-there" in missing.err

    out = tmp_path / "out"
    out.mkdir()
    got = fleece("files", "get", *base, "/data", "-o", out, "--json")
    assert got.rc == 0, got.err
    a, b = os.fsencode(src / "data"), os.fsencode(out / "data")
    for dirpath, dirnames, filenames in os.walk(a):
        rel = os.path.relpath(dirpath, a)
        for name in dirnames + filenames:
            s, d = os.path.join(dirpath, name), os.path.join(b, rel, name)
            ss, ds = os.lstat(s), os.lstat(d)  # the awkward names came back byte for byte
            assert (ss.st_mode, ss.st_uid, ss.st_gid) == (ds.st_mode, ds.st_uid, ds.st_gid), d
            if os.path.islink(s):
                assert os.readlink(s) == os.readlink(d)
            elif os.path.isfile(s):
                assert open(s, "rb").read() == open(d, "rb").read()
                assert int(ss.st_mtime) == int(ds.st_mtime)
    assert sorted(os.listdir(b)) == sorted(os.listdir(a))
    conf, hard = os.lstat(out / "data" / "sub dir" / "conf"), os.lstat(out / "data" / "hard")
    assert conf.st_ino == hard.st_ino and conf.st_nlink == 2  # the hard link stays one
    assert os.stat(out / "data" / "sparse").st_blocks * 512 < MiB  # holes stay holes
    # The crafted symlinks were restored as symlinks and nothing was written outside -o.
    assert not (tmp_path / "escape").exists()
    assert sorted(os.listdir(out)) == ["data"]
    assert not [n for n in os.listdir(b) if n.startswith(b".fleece-partial-")]

    again = fleece("files", "get", *base, "/data", "-o", out)
    assert again.rc == 2 and "exists" in again.err

    one = fleece("files", "get", *base, "/data/sub dir/conf", "-o", "-")
    assert one.rc == 0, one.err
    assert one.out == "key=value\n"
    assert leftovers(scratch_tmpdir) == []


def _crafted_tar(path: Path, members: list[tuple[str, bytes, str]]) -> Path:
    """A tar as a hostile point (or appliance) could hand it over: (name, type, link or data)."""
    import io

    with tarfile.open(path, "w") as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value.encode()))
            else:
                info.linkname = value
                tar.addfile(info)
    return path


@pytest.mark.parametrize("members", [
    [("./evil", tarfile.SYMTYPE, "/ESCAPE"), ("./evil/file", tarfile.REGTYPE, "x")],
    [("./up", tarfile.SYMTYPE, "../.."), ("./up/ESCAPE/file", tarfile.REGTYPE, "x")],
    [("./../ESCAPE", tarfile.REGTYPE, "x")],
    [("./hard", tarfile.LNKTYPE, "../../ESCAPE")],
], ids=["absolute-symlink-parent", "dotdot-symlink-parent", "dotdot-name", "dotdot-hardlink"])
def test_a_crafted_archive_cannot_write_outside_the_output_directory(
        tmp_path: Path, members: list[tuple[str, bytes, str]]) -> None:
    from fleece.errors import FleeceError
    from fleece.guest.files import Writer, extract_tar

    outside = tmp_path / "ESCAPE"
    root = tmp_path / "a" / "b" / "out"
    root.mkdir(parents=True)
    tar = _crafted_tar(tmp_path / "x.tar", members)
    for target in ("/ESCAPE", str(outside)):
        assert not Path(target).exists()
    with pytest.raises(FleeceError, match=r"refused|was not written"):
        extract_tar(tar, Writer(root, force=True), "top", lambda line: None)
    assert not Path("/ESCAPE").exists() and not outside.exists()
    assert not (tmp_path / "a" / "ESCAPE").exists() and not (tmp_path / "a" / "b" / "ESCAPE").exists()
    # The archive's symlink is there as a symlink; nothing was written through it.
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            assert os.path.islink(p) or os.path.realpath(p).startswith(str(root) + "/")

