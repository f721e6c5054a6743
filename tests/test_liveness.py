"""Who holds a lease or an export: only certainty of death lets another run take over.

A holder is named by host, boot id, pid namespace, pid and start time
(fleece.liveness). Two pid namespaces under one host name (containers) see
different processes under the same pids: a pid that does not exist here may
be a live backup there. The integration test runs gc in its own pid namespace
(``unshare --pid --fork --mount-proc``, as root) while a backup holds its VM
lease in the host's: gc must wait for it, not take the backup for dead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from backups import backup, identical, point_ids, restore
from conftest import FLEECE

from fleece.errors import LockHeld
from fleece.liveness import INIT_PID_NS, Owner
from fleece.repo.backends.file import FileBackend
from fleece.repo.lock import LeaseInfo, read_lease, vm_lock

ROOT = Path(__file__).resolve().parent.parent
in_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="pid namespaces need root and unshare")


def exited_child() -> int:
    """The pid of a child that has exited and been reaped (nothing has that pid now)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def in_own_pid_namespace(code: str, *, mount_proc: bool = True) -> Any:
    """Run Python ``code`` in a new pid namespace under this host name; its JSON output."""
    cmd = ["unshare", "--pid", "--fork", *(["--mount-proc"] if mount_proc else []),
           sys.executable, "-c", textwrap.dedent(code)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_this_process_is_alive_and_fully_named() -> None:
    me = Owner.current()
    assert me.pid == os.getpid() and me.boot_id and me.pid_ns and me.start_time is not None
    assert not me.legacy and not me.certainly_dead()
    assert Owner.from_json(json.loads(json.dumps(me.to_json()))) == me


def test_a_pid_that_is_gone_in_our_namespace_and_boot_is_dead() -> None:
    me = Owner.current()
    assert dataclasses.replace(me, pid=exited_child()).certainly_dead()


def test_a_reused_pid_is_dead_and_a_zombie_is_dead() -> None:
    me = Owner.current()
    # Our pid with another start time: the process that had it has exited.
    assert dataclasses.replace(me, start_time=(me.start_time or 0) + 1).certainly_dead()
    zombie = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stat = Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()
    assert dataclasses.replace(me, pid=zombie.pid, start_time=int(stat[19])).certainly_dead()
    zombie.wait()


def test_another_host_or_namespace_may_be_alive() -> None:
    me = Owner.current()
    gone = exited_child()
    assert not dataclasses.replace(me, pid=gone, host=me.host + "-other").certainly_dead()
    # Another pid namespace under our host name: its pids are not ours to look up.
    assert not dataclasses.replace(me, pid=gone, pid_ns=(me.pid_ns or 0) + 1).certainly_dead()
    assert not Owner(me.host, 0).certainly_dead()


def test_another_boot_of_this_machine_is_dead_a_clone_with_its_own_machine_id_is_not() -> None:
    me = Owner.current()
    if me.machine_id is None:
        pytest.skip("no /etc/machine-id here")
    before_reboot = dataclasses.replace(me, boot_id="0" * 8 + me.boot_id[8:])  # type: ignore[index]
    assert before_reboot.certainly_dead()
    assert not dataclasses.replace(before_reboot, machine_id="f" * 32).certainly_dead()
    assert not dataclasses.replace(before_reboot, machine_id=None).certainly_dead()


def test_an_old_record_is_judged_by_host_and_pid_only_in_the_initial_namespace() -> None:
    me = Owner.current()
    old = Owner.from_json({"host": me.host, "pid": exited_child()})
    assert old.legacy
    assert old.certainly_dead() == (me.pid_ns == INIT_PID_NS)
    assert not Owner.from_json({"host": me.host, "pid": os.getpid()}).certainly_dead()
    with pytest.raises(ValueError):
        Owner.from_json({"host": me.host, "pid": 1, "pid_ns": "4026531836"})


@in_namespaces
def test_in_another_pid_namespace_under_one_host_name_nothing_of_ours_is_certainly_dead() -> None:
    me = Owner.current()
    # A pid that exists in the host's namespace but not in the new one.
    seen = in_own_pid_namespace(f"""
        import json
        from fleece.liveness import Owner
        new = Owner(**{me.to_json()!r})
        old = Owner({me.host!r}, {os.getpid()})
        me = Owner.current()
        print(json.dumps({{"new": new.certainly_dead(), "old": old.certainly_dead(),
                           "ns": me.pid_ns, "host": me.host}}))
    """)
    assert seen["host"] == me.host and seen["ns"] != me.pid_ns
    assert seen == {**seen, "new": False, "old": False}


@in_namespaces
def test_a_proc_of_another_namespace_proves_nothing() -> None:
    # unshare --pid without --mount-proc: /proc still shows the parent's pids.
    seen = in_own_pid_namespace("""
        import dataclasses, json, os
        from fleece.liveness import Owner
        me = Owner.current()
        # pid 1 is alive in our namespace; /proc/1 is the host's init, with another start time
        one = dataclasses.replace(me, pid=1)
        print(json.dumps({"pid": os.getpid(), "dead": one.certainly_dead()}))
    """, mount_proc=False)
    assert seen == {"pid": 1, "dead": False}


def lease_of(owner: Owner, expires_in: float = 600) -> bytes:
    doc = {"format": 1, "key": "locks/vms/web1", "token": "cafe",
           "created": "2026-01-01T00:00:00.000000Z",
           "expires": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(time.time() + expires_in)),
           **owner.to_json()}
    return json.dumps(doc).encode()


def test_a_lease_names_its_holder_fully(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path / "repo")
    with vm_lock(backend, "web1") as lease:
        stored = read_lease(backend, "locks/vms/web1")  # the newest generation
        assert stored is not None
        assert stored.owner == Owner.current() == lease.info.owner


def test_a_lease_of_another_namespace_is_waited_for_one_of_a_dead_process_here_taken_over(
        tmp_path: Path) -> None:
    backend = FileBackend(tmp_path / "repo")
    me = Owner.current()
    elsewhere = dataclasses.replace(me, pid=exited_child(), pid_ns=(me.pid_ns or 0) + 1)
    backend.put("locks/vms/web1", lease_of(elsewhere))
    with pytest.raises(LockHeld, match="is locked by"), vm_lock(backend, "web1"):
        pass
    backend.put("locks/vms/web1", lease_of(dataclasses.replace(elsewhere, pid_ns=me.pid_ns)))
    with vm_lock(backend, "web1") as lease:
        assert LeaseInfo.from_json(backend.get("locks/vms/web1")).token == lease.info.token


@pytest.mark.qemu
@in_namespaces
def test_gc_in_another_pid_namespace_waits_for_the_backups_lease(
        make_vm: Any, fleece: Any, hold_backup: Any, tmp_path: Path, scratch_tmpdir: Any) -> None:
    vm = make_vm([("qcow2", "16M")])
    repo = tmp_path / "repo"
    vm.write("vda", 0, 1 << 20, 0x31)
    backup(fleece, vm, repo)
    vm.write("vda", 4 << 20, 1 << 20, 0x32)
    held = hold_backup(vm, repo, "export-live")
    held.wait_held()
    # The backup's pid does not exist in gc's namespace, under the same host name.
    gc = ["unshare", "--pid", "--fork", "--mount-proc", FLEECE, "gc", "--repo", str(repo), "--json"]
    refused = subprocess.run(gc, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "is locked by" in refused.stderr and "gc deleted nothing" in refused.stderr

    waiting = subprocess.Popen([*gc[:-1], "--wait", "10m", "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    # Let the backup go once gc says it waits; gc may only run after it ended.
    assert waiting.stderr is not None
    line = waiting.stderr.readline()
    assert line.startswith("fleece: waiting up to 10m"), line
    rc, _, err = held.release()
    assert rc == 0, err
    gc_out, gc_err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, gc_err
    assert json.loads(gc_out)["running_backups"] == []
    points = point_ids(fleece, repo)
    assert len(points) == 2
    assert identical(restore(fleece, repo, points[-1], tmp_path / "r.raw"), vm.shadow("vda"))
    res = fleece("verify", "--repo", repo, "--deep")
    assert res.rc == 0, res.out + res.err
