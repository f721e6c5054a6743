"""Running ``fleece backup`` from a test: to completion, or held at a phase to be killed or let go.

A held backup uses the test hook in :mod:`fleece.testing`: the process
stops at the named phase and writes a marker file; the test waits for the
marker (no sleep-and-hope), then SIGKILLs the process or deletes the marker
to let it finish.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from conftest import FLEECE

MiB = 1 << 20
CHUNK = 4 * MiB


def identical(a: Path, b: Path) -> bool:
    """Whether two raw images hold the same bytes (``qemu-img compare``)."""
    res = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(a), str(b)])
    return res.returncode == 0


def random_image(path: Path, size: int, seed: int) -> Path:
    """A raw image of incompressible bytes."""
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def write_from_file(vm: Any, drive: str, offset: int, src: Path) -> None:
    """The guest writes the bytes of ``src`` at ``offset`` (mirrored in the shadow)."""
    data = src.read_bytes()
    vm.qemu_io(drive, f"write -s {src} {offset} {len(data)}")
    vm._shadow_write(drive, offset, data)


def backup(fleece: Any, vm: Any, repo: Any, *extra: str, drive: str = "vda") -> Any:
    """A backup that must succeed; its ``--json`` object."""
    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", drive, "--repo", repo, "--json", *extra)
    assert res.rc == 0, res.err
    return res.json()


def restore(fleece: Any, repo: Any, point: str, out: Path, drive: str = "vda") -> Path:
    """Restore one disk of ``point`` to a raw file; must succeed."""
    res = fleece("restore", "--repo", repo, point, "--drive", drive, "--output", out)
    assert res.rc == 0, res.err
    return out


def point_ids(fleece: Any, repo: Any) -> list[str]:
    """The ids ``fleece list`` shows."""
    res = fleece("list", "--repo", repo, "--json")
    assert res.rc == 0, res.err
    return [p["id"] for p in res.json()["points"]]


def repo_files(repo: Path) -> list[str]:
    """Every file under a file repository (temporaries included), for before/after comparisons.

    Lease generations (``leases/``) are left out: taking and releasing a lease adds one by design
    (docs/format.md "Lock leases"); what a run must not leave is data, an index or a point.
    """
    if not repo.exists():
        return []
    return sorted(str(p.relative_to(repo)) for p in repo.rglob("*")
                  if p.is_file() and not str(p.relative_to(repo)).startswith("leases/"))


class HeldBackup:
    """A ``fleece backup`` subprocess that stops at ``phase`` (``fleece.testing.PHASES``)."""

    def __init__(self, vm: Any, repo: Any, phase: str, marker: Path, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.marker = marker
        # A libvirt test domain names itself (tests/libvirt_host.py); a QEMU VM by its socket.
        target = (vm.backup_target if hasattr(vm, "backup_target")
                  else ["--qmp", vm.qmp_path, "--drive", "vda"])
        self.proc = subprocess.Popen(
            [FLEECE, "backup", "--init", *target, "--repo", str(repo), "--json", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            env={**os.environ, **(env or {}), "FLEECE_TEST_PAUSE_AT": phase,
                 "FLEECE_TEST_PAUSE_FILE": str(marker)},
        )

    def wait_held(self, timeout: float = 60) -> None:
        """Return once the backup is held at its phase; fail if it ends first."""
        deadline = time.monotonic() + timeout
        while not self.marker.exists():
            if self.proc.poll() is not None:
                _, err = self.proc.communicate()
                raise AssertionError(f"the backup ended before its phase: rc {self.proc.returncode}\n{err}")
            assert time.monotonic() < deadline, "the backup never reached its phase"
            time.sleep(0.005)

    def kill(self) -> None:
        """SIGKILL it where it is held: nothing of its own clean-up runs."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=30)
        assert self.proc.returncode == -signal.SIGKILL
        self.marker.unlink(missing_ok=True)

    def release(self, timeout: float = 120) -> tuple[int, str, str]:
        """Let it go on; (exit status, stdout, stderr) once it ends."""
        self.marker.unlink()
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def close(self) -> None:
        """Kill it if a failed test left it running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=30)
