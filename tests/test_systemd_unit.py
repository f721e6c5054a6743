"""The shipped systemd unit backs up a VM whose QEMU runs outside the unit's namespace.

systemd is not PID 1 here (nor in CI's container), so the unit cannot be
started with ``systemd-run``. Instead the test reads the unit's namespace
settings (``PrivateTmp``, ``Environment``, ``StateDirectory``) and the
shipped config's ``scratch_dir``, and runs ``fleece backup`` the way the unit
would: in its own mount namespace with fresh, private ``/tmp`` and
``/var/tmp`` (what ``PrivateTmp=yes`` gives it), with the unit's environment,
against a QEMU started outside that namespace. ``systemd-analyze verify``
checks the unit's syntax where it is installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
from backups import identical, restore
from conftest import FLEECE, VMFactory

from fleece.commands.stop_signals import STOP_DEADLINE

ROOT = Path(__file__).parent.parent
UNIT = ROOT / "configs" / "fleece-backup@.service"
CONFIG = ROOT / "configs" / "web1.toml"
MiB = 1 << 20


def service_settings(unit: Path) -> dict[str, list[str]]:
    """``[Service]`` key → every value given (systemd allows a key several times)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service" and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def unit_environment(settings: dict[str, list[str]]) -> dict[str, str]:
    env = {}
    for value in settings.get("Environment", []):
        for item in shlex.split(value):
            key, _, val = item.partition("=")
            env[key] = val
    return env


def scratch_parent(settings: dict[str, list[str]], config: dict[str, Any]) -> Path:
    """Where fleece run by the unit makes its scratch directory (as fleece decides it)."""
    if config.get("scratch_dir"):
        return Path(config["scratch_dir"])
    return Path(unit_environment(settings).get("TMPDIR") or "/var/tmp")


def test_the_units_scratch_directory_is_outside_its_private_tmp_and_made_by_systemd() -> None:
    settings = service_settings(UNIT)
    config = tomllib.loads(CONFIG.read_text())
    parent = scratch_parent(settings, config)
    if settings.get("PrivateTmp", ["no"])[-1] in ("yes", "true", "1", "on"):
        for private in (Path("/tmp"), Path("/var/tmp")):
            assert parent != private and private not in parent.parents, (
                f"{parent} is in the unit's private {private}: QEMU cannot see it")
    # Also without the config's scratch_dir (a config that leaves it out).
    assert scratch_parent(settings, {}) == parent
    # systemd creates it (and its parent) before the service starts.
    made = {Path("/var/lib") / d for value in settings.get("StateDirectory", [])
            for d in value.split()}
    assert parent in made
    assert settings.get("StateDirectoryMode") == ["0700"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    unit = tmp_path / "fleece-backup@web1.service"
    unit.write_text(UNIT.read_text())
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    # The one complaint allowed: fleece is not installed at the unit's path on this machine.
    problems = [line for line in r.stderr.splitlines()
                if line.strip() and "/usr/local/bin/fleece is not executable" not in line]
    assert problems == [], r.stderr


def in_private_tmp(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run fleece with fresh private /tmp and /var/tmp, as PrivateTmp=yes does.

    A checkout that itself lives under /tmp or /var/tmp (a CI clone) is
    bind-mounted back at its path inside the new ones, so fleece still runs.
    """
    root = Path(__file__).resolve().parent.parent
    keep = ""
    if root.is_relative_to("/tmp") or root.is_relative_to("/var/tmp"):
        keep = f"/run/fleece-unit-checkout-{os.getpid()}"
        os.makedirs(keep, exist_ok=True)
    steps = []
    if keep:
        steps.append(f"mount --bind {shlex.quote(str(root))} {keep}")
    steps += ["mount -t tmpfs -o mode=1777 fleece-private /tmp",
              "mount -t tmpfs -o mode=1777 fleece-private /var/tmp"]
    if keep:
        steps.append(f"mkdir -p {shlex.quote(str(root))} && mount --bind {keep} {shlex.quote(str(root))}")
    script = " && ".join(steps) + f" && exec {shlex.join([FLEECE, *args])}"
    try:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, **env}, stdin=subprocess.DEVNULL)
    finally:
        if keep:
            os.rmdir(keep)


@pytest.mark.qemu
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="a mount namespace needs root and unshare")
def test_a_backup_run_as_the_unit_runs_it_reaches_a_qemu_outside_its_namespace(
        fleece: Any, tmp_path: Path) -> None:
    settings = service_settings(UNIT)
    env = unit_environment(settings)
    parent = scratch_parent(settings, tomllib.loads(CONFIG.read_text()))
    made = not parent.exists()
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # what StateDirectory= does
    # QEMU's sockets and the repository live where a unit sees them: not in /tmp.
    outside = Path(tempfile.mkdtemp(prefix="fleece-unit-test-", dir="/run"))
    vms = VMFactory(outside / "vms")
    try:
        vm = vms([("qcow2", "16M")], running=True)
        vm.write("vda", 0, MiB, 0x7A)
        repo = outside / "repo"
        graph = vm.block_graph()
        # Control: the old unit's scratch in the private /var/tmp cannot work.
        r = in_private_tmp(env, "backup", "--init", "--qmp", vm.qmp_path, "--drive", "vda", "--repo",
                           str(repo), "--scratch-dir", "/var/tmp")
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "QEMU cannot see the scratch directory /var/tmp/fleece-" in r.stderr, r.stderr
        assert "PrivateTmp" in r.stderr and "nothing was changed" in r.stderr
        assert vm.block_graph() == graph
        r = in_private_tmp(env, "backup", "--init", "--qmp", vm.qmp_path, "--drive", "vda", "--repo",
                           str(repo), "--scratch-dir", str(parent), "--json")
        assert r.returncode == 0, r.stderr
        point = json.loads(r.stdout)["point"]
        assert identical(restore(fleece, repo, point, tmp_path / "r.raw"), vm.shadow("vda"))
        assert not [p for p in parent.iterdir() if p.name.startswith("fleece-")]
    finally:
        vms.close()
        shutil.rmtree(outside, ignore_errors=True)
        if made:
            shutil.rmtree(parent, ignore_errors=True)
            with contextlib.suppress(OSError):
                parent.parent.rmdir()


def test_the_unit_gives_fleece_time_to_abort_and_cleans_up_after_a_kill() -> None:
    settings = service_settings(UNIT)
    # SIGTERM: fleece aborts and exits within STOP_DEADLINE; systemd waits longer before SIGKILL.
    assert float(settings["TimeoutStopSec"][-1].removesuffix("s")) > STOP_DEADLINE
    assert settings["ExecStopPost"] == [
        "-/usr/local/bin/fleece cleanup --config /etc/fleece/%i.toml --dead-only"]


@pytest.mark.qemu
def test_the_units_stop_post_removes_what_a_killed_backup_left_and_nothing_a_live_one_holds(
        make_vm: Any, fleece: Any, hold_backup: Any, tmp_path: Path, scratch_tmpdir: Path) -> None:
    other = scratch_tmpdir / "other.sock"  # the config's QMP monitor; the held backup uses another
    vm = make_vm([("qcow2", "16M")], extra_args=["-qmp", f"unix:{other},server=on,wait=off"])
    vm.write("vda", 0, MiB, 0x5A)
    repo = tmp_path / "repo"
    config = tmp_path / "web1.toml"
    shipped = CONFIG.read_text().replace("/run/qemu/web1/fleece-qmp.sock", str(other))
    config.write_text(shipped.replace("s3://backups/fleece", str(repo))
                      .replace('"/var/lib/fleece/scratch"', json.dumps(str(scratch_tmpdir))))
    post = [FLEECE if w == "/usr/local/bin/fleece" else str(config) if w == "/etc/fleece/%i.toml" else w
            for w in shlex.split(service_settings(UNIT)["ExecStopPost"][0].removeprefix("-"))]
    assert fleece("backup", "--config", config).rc == 0
    before = vm.block_graph()

    held = hold_backup(vm, repo, "export-live")
    held.wait_held()
    up = vm.block_graph()
    # A backup of this VM that is running (another unit, or one started by hand) is left alone.
    live = subprocess.run(post, capture_output=True, text=True, timeout=60)
    assert live.returncode == 0, live.stderr
    assert live.stdout.startswith(f"left alone: fleece pid {held.proc.pid} on "), live.stdout
    assert vm.block_graph() == up
    held.kill()
    done = subprocess.run(post, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("removed exports fleece-export-vda"), done.stdout
    assert vm.block_graph() == before
    again = subprocess.run(post, capture_output=True, text=True, timeout=60)
    assert (again.returncode, again.stdout.strip()) == (0, "nothing to clean up")
    assert fleece("backup", "--config", config).rc == 0
