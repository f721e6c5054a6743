"""Bad input to every command: one line on stderr, no traceback, the right exit status, nothing changed.

The contract (docs/design.md §4.1): exit 2 for bad usage or input, 1
for an operation that failed; the one line says why. Every case here runs
against one VM and one repository holding two restore points, and after
each the VM's block graph and the repository's files must be exactly as
they were. Cases already covered beside their command are not repeated:
``test_backup.py::test_bad_backup_input_gets_one_line_and_changes_nothing``,
``test_export_errors.py``, ``test_list_restore.py::test_restore_bad_input``,
``test_serve.py::test_bad_input_is_refused_before_nbdkit_starts`` and
``test_prune_gc.py::test_cli_bad_input_is_one_line_and_exit_2``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from backups import MiB, repo_files
from conftest import FLEECE, TestVM, VMFactory

pytestmark = pytest.mark.qemu


@dataclass
class World:
    """One VM, one repository with two points of it, and a few files to point commands at."""

    vm: TestVM
    repo: Path
    points: list[str]
    dir: Path

    @property
    def qmp(self) -> str:
        return self.vm.qmp_path

    def file(self, name: str, text: str = "") -> Path:
        path = self.dir / name
        path.write_text(text)
        return path


def boot(w: World, *extra: str) -> list[str | Path]:
    """``verify --boot`` of web1's newest point with ``extra``."""
    return ["verify", "--repo", w.repo, "--vm", "web1", "--boot", *extra]


def fleece(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLEECE, *map(str, args)], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("bad-input")
    factory = VMFactory(base / "vms")
    try:
        vm = factory([("qcow2", "16M")], name="web1")
        repo = base / "repo"
        points = []
        for pattern in (0x41, 0x42):
            vm.write("vda", 0, MiB, pattern)
            res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, "--json")
            assert res.returncode == 0, res.stderr
            points.append(res.stdout.split('"point": "')[1].split('"')[0])
        files = base / "files"
        files.mkdir()
        (files / "precious.raw").write_text("mine")
        yield World(vm, repo, points, files)
    finally:
        factory.close()


Argv = Callable[[World], list[str | Path]]


def backup(w: World, *extra: str | Path) -> list[str | Path]:
    return ["backup", "--qmp", w.qmp, "--drive", "vda", "--repo", w.repo, *extra]


# (id, argv, exit status, what the line must say)
CASES: list[tuple[str, Argv, int, str]] = [
    # status, export, cleanup
    ("status-qmp-is-a-file", lambda w: ["status", "--qmp", w.file("notes.txt", "hi")], 1,
     "is not a socket (expected QEMU's QMP socket)"),
    ("status-tcp-nobody-listens", lambda w: ["status", "--qmp", "127.0.0.1:1"], 1,
     "cannot connect to QMP at 127.0.0.1:1"),
    ("export-start-bad-level", lambda w: ["export", "start", "--bounded-requests",
                                          "--qmp", w.qmp, "--drive", "vda",
                                          "--level", "sideways"], 2, "invalid choice: 'sideways'"),
    ("export-start-checkpoint-before-parent",
     lambda w: ["export", "start", "--bounded-requests", "--qmp", w.qmp, "--drive", "vda",
                "--checkpoint", "20000101T000000.000000Z-aaaaaa"], 2, "does not sort after vda's parent"),
    ("export-stop-commit-and-abort", lambda w: ["export", "stop", "--qmp", w.qmp, "--abort", "--commit"],
     2, "argument --commit: not allowed with argument --abort"),
    ("cleanup-unknown-option", lambda w: ["cleanup", "--qmp", w.qmp, "--drive", "vda"], 2,
     "unrecognized arguments: --drive vda"),
    # backup: repository URLs
    ("backup-ftp-url", lambda w: [*backup(w)[:-1], "ftp://x"], 2,
     "unsupported repository URL scheme 'ftp'"),
    ("backup-relative-file-url", lambda w: [*backup(w)[:-1], "file://relative/path"], 2,
     "names host 'relative'; use file:///abs/path"),
    ("backup-s3-url-without-bucket", lambda w: [*backup(w)[:-1], "s3://"], 2, "does not name an S3 bucket"),
    ("backup-repo-is-not-a-repository", lambda w: [*backup(w)[:-1], w.dir], 2,
     "is not a fleece repository"),
    # backup: options
    ("backup-unknown-drive", lambda w: ["backup", "--qmp", w.qmp, "--drive", "vdz", "--repo", w.repo], 2,
     "no disk named 'vdz'"),
    ("backup-bad-level", lambda w: backup(w, "--level", "sideways"), 2, "invalid choice: 'sideways'"),
    ("backup-unknown-compression", lambda w: backup(w, "--compress", "lz4"), 2, "lz4"),
    ("backup-chunk-size-not-a-size", lambda w: backup(w, "--chunk-size", "huge"), 2, "not a size: 'huge'"),
    ("backup-no-readers", lambda w: backup(w, "--readers", "0"), 2, "--readers must be between 1 and 64"),
    ("backup-label-without-value", lambda w: backup(w, "--label", "tier"), 2, "--label wants KEY=VALUE"),
    ("backup-scratch-dir-missing", lambda w: backup(w, "--scratch-dir", w.dir / "no" / "dir"), 2,
     "cannot make a scratch directory in"),
    ("backup-into-a-new-location-scratch-dir-missing",
     lambda w: ["backup", "--qmp", w.qmp, "--drive", "vda", "--repo", w.dir / "new-repo",
                "--scratch-dir", w.dir / "no" / "dir"], 2,
     "cannot make a scratch directory in"),
    # config files
    ("backup-config-not-toml", lambda w: ["backup", "--config", w.file("bad.toml", "qmp = [unclosed\n")], 2,
     "is not valid TOML"),
    ("backup-config-wrong-type", lambda w: backup(w, "--config", w.file("t.toml", "readers = 'four'\n")), 2,
     "readers must be a int"),
    ("prune-config-unknown-key",
     lambda w: ["prune", "--config", w.file("p.toml", "[prune]\nkeep-lsat = 3\n"), "--repo", w.repo], 2,
     "unknown setting 'keep-lsat'"),
    # list, restore, verify, serve, gc, protect, unlock
    ("list-file-url-without-path", lambda w: ["list", "--repo", "file://localhost"], 2,
     "needs an absolute path"),
    ("list-repo-does-not-exist", lambda w: ["list", "--repo", w.dir / "nowhere"], 2,
     "is not a fleece repository (no config)"),
    ("restore-ambiguous-prefix", lambda w: ["restore", "--repo", w.repo, w.points[0][:4], "-o",
                                            w.dir / "out.raw"], 2, "matches 2 restore points"),
    ("restore-into-a-missing-directory", lambda w: ["restore", "--repo", w.repo, "latest", "-o",
                                                    w.dir / "no" / "out.raw"], 2, "cannot create output"),
    ("restore-over-a-file-without-force", lambda w: ["restore", "--repo", w.repo, "latest", "-o",
                                                     w.dir / "precious.raw"], 2, "--force"),
    ("restore-qcow2-onto-nbd", lambda w: ["restore", "--repo", w.repo, "latest", "--format", "qcow2",
                                          "--force", "-o", "nbd+unix:///?socket=/x.sock"], 2,
     "an NBD export takes the disk's raw bytes; drop --format qcow2"),
    ("restore-onto-nbd-without-force", lambda w: ["restore", "--repo", w.repo, "latest",
                                                  "-o", "nbd+unix:///?socket=/x.sock"], 2, "add --force"),
    ("verify-latest-of-unknown-vm", lambda w: ["verify", "--repo", w.repo, "latest", "--vm", "web9"], 2,
     "no restore point 'latest'"),
    ("verify-no-workers", lambda w: ["verify", "--repo", w.repo, "--workers", "0"], 2,
     "--workers must be between 1 and 256"),
    # verify --fsck: refused before any nbdkit or appliance starts, and no verdict is recorded
    ("verify-fsck-without-vm", lambda w: ["verify", "--repo", w.repo, "--fsck"], 2, "--fsck needs --vm VM"),
    ("verify-fsck-unknown-vm", lambda w: ["verify", "--repo", w.repo, "--fsck", "--vm", "web9"], 2,
     "no restore points of VM web9"),
    ("verify-fsck-unknown-point", lambda w: ["verify", "--repo", w.repo, "--fsck", "--vm", "web1",
                                             "20990101T000000.000000Z-000000"], 2, "no restore point"),
    ("verify-fsck-unknown-drive", lambda w: ["verify", "--repo", w.repo, "--fsck", "--vm", "web1",
                                             "--drive", "vdz"], 2, "has no disk 'vdz'"),
    ("verify-fsck-and-deep", lambda w: ["verify", "--repo", w.repo, "--fsck", "--deep", "--vm", "web1"], 2,
     "cannot be combined with --deep"),
    ("verify-drive-without-fsck", lambda w: ["verify", "--repo", w.repo, "--drive", "vda"], 2,
     "go with --fsck or --boot"),
    # verify --boot: refused before any nbdkit or QEMU starts
    ("verify-boot-bad-regex", lambda w: boot(w, "--expect", "serial", "(unclosed"), 2,
     "not a regular expression"),
    ("verify-boot-nothing-to-judge", lambda w: boot(w), 2, "nothing to judge the boot by"),
    ("verify-boot-bad-expect", lambda w: boot(w, "--expect", "banana"), 2, "give 'agent' or 'serial REGEX'"),
    ("verify-boot-run-without-agent", lambda w: boot(w, "--expect", "serial", "x", "--run", "true"), 2,
     "--run needs the guest agent"),
    ("verify-boot-network-qemu-arg", lambda w: boot(w, "--expect", "agent", "--qemu-arg",
                                                    "-netdev user,id=n0"), 2, "has no network"),
    ("verify-boot-unusable-qemu-arg", lambda w: boot(w, "--expect", "agent", "--qemu-arg=-no-such-option"),
     2, "QEMU refuses this machine"),
    ("verify-boot-unknown-machine", lambda w: boot(w, "--expect", "agent", "--machine", "nonesuch"), 2,
     "QEMU refuses this machine"),
    ("verify-boot-and-fsck", lambda w: boot(w, "--fsck"), 2, "give one"),
    ("verify-limit-without-unverified", lambda w: boot(w, "--expect", "agent", "--limit", "2"), 2,
     "--limit N (N ≥ 1) goes with --unverified"),
    ("serve-cache-size-not-a-size", lambda w: ["serve", "--repo", w.repo, "latest", "--socket",
                                               w.dir / "s.sock", "--cache-size", "lots"], 2, "not a size"),
    ("gc-wait-not-a-duration", lambda w: ["gc", "--repo", w.repo, "--wait", "forever"], 2,
     "not a duration: 'forever'"),
    ("protect-unknown-point", lambda w: ["protect", "--repo", w.repo, "19990101"], 2,
     "no restore point '19990101'"),
    ("unlock-vm-and-gc", lambda w: ["unlock", "--repo", w.repo, "--vm", "web1", "--gc"], 2,
     "not allowed with argument --vm"),
    # copy
    ("copy-to-itself", lambda w: ["copy", "--from", w.repo, "--to", f"file://{w.repo}/"], 2,
     "--from and --to name the same repository"),
    ("copy-into-a-directory-of-other-files", lambda w: ["copy", "--from", w.repo, "--to", w.dir], 2,
     "is not a fleece repository"),
    ("copy-unknown-point", lambda w: ["copy", "--from", w.repo, "--to", w.dir / "offsite", "19990101"], 2,
     "no restore point '19990101'"),
    ("copy-no-workers", lambda w: ["copy", "--from", w.repo, "--to", w.dir / "offsite", "--workers", "0"],
     2, "--workers must be between 1 and 64"),
    # init --object-lock-days (S3 refusals: tests/test_s3_object_lock.py)
    ("init-object-lock-on-a-directory", lambda w: ["init", "--repo", w.dir / "locked", "--encryption",
                                                   "none", "--object-lock-days", "7"], 2,
     "cannot lock objects: --object-lock-days needs an S3 bucket with Object Lock enabled"),
    ("init-object-lock-zero-days", lambda w: ["init", "--repo", w.dir / "locked", "--encryption", "none",
                                              "--object-lock-days", "0"], 2, "between 1 and 36500"),
    ("init-object-lock-mode-alone", lambda w: ["init", "--repo", w.dir / "locked", "--encryption", "none",
                                               "--object-lock-mode", "compliance"], 2,
     "--object-lock-mode needs --object-lock-days N"),
]


@pytest.mark.parametrize(("argv", "rc", "says"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_the_right_exit_and_changes_nothing(
        world: World, argv: Argv, rc: int, says: str) -> None:
    args = argv(world)
    before, files_before = world.vm.block_graph(), repo_files(world.repo)
    others_before = sorted(p.name for p in world.dir.iterdir())

    res = fleece(*args)

    assert res.returncode == rc, res.stderr
    assert res.stdout == ""
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleece: error: "), res.stderr
    assert says in lines[0]
    assert world.vm.block_graph() == before
    assert repo_files(world.repo) == files_before
    assert sorted(p.name for p in world.dir.iterdir()) == others_before  # no new repository, no output
    assert (world.dir / "precious.raw").read_text() == "mine"



def test_a_regular_file_as_repository_is_bad_input(fleece: Any, tmp_path: Any) -> None:
    target = tmp_path / "disk.img"
    target.write_bytes(b"not a repository")
    res = fleece("list", "--repo", target)
    assert res.rc == 2 and "is not a directory" in res.err
    assert len(res.err.strip().splitlines()) == 1 and "Traceback" not in res.err
    assert target.read_bytes() == b"not a repository"
