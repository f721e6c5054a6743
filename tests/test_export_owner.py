"""Who holds an export decides what ``export stop`` may do (docs/design.md §3.2).

A program using the Python API holds its export (and its QMP socket) for as
long as it runs; a backup does too. ``export stop`` through another QMP
monitor must not tear such an export down under a live reader, nor commit
the unfinished run of one that was killed: the next incremental would start
after a gap nobody read. ``status`` says who holds it and what ends it, as a
command that can be pasted (the monitor's path here has a space in it).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from backups import identical, restore

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("scratch_tmpdir")]

MiB = 1 << 20


@pytest.fixture
def two_monitor_vm(make_vm: Any, short_tmp: Path) -> Any:
    """A VM with a second QMP monitor for fleece, at a path with a space (``vm.other``)."""
    other = short_tmp / "other qmp.sock"
    vm = make_vm([("qcow2", "16M")], extra_args=["-qmp", f"unix:{other},server=on,wait=off"])
    vm.other = str(other)
    return vm


class Agent:
    """A Python API user holding an export on ``vm.qmp_path``; reads when told, until told to end."""

    def __init__(self, vm: Any, tmp_path: Path) -> None:
        script = tmp_path / "agent.py"
        script.write_text(textwrap.dedent(f"""
            import asyncio, json, sys
            import nbd
            from fleece.fleecing import point_in_time_export
            from fleece.qmp import QmpSession

            async def main():
                async with QmpSession.open({vm.qmp_path!r}) as qmp:
                    async with point_in_time_export(qmp, ["vda"], bounded_requests=True) as export:
                        disk = export.disks[0]
                        print(json.dumps({{"checkpoint": export.checkpoint, "since": disk.since}}),
                              flush=True)
                        for line in sys.stdin:
                            if line.strip() != "read":
                                break
                            h = nbd.NBD()
                            h.connect_uri(disk.uri)
                            print(h.pread(MIB, 0)[:1].hex(), flush=True)
                            h.shutdown()

            MIB = 1 << 20
            asyncio.run(main())
        """))
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read() if self.proc.stderr else ""
        self.export = json.loads(line)

    def read(self) -> str:
        """One 1 MiB read of the export: the first byte, in hex."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("read\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.communicate(timeout=30)


def one_line_error(res: Any) -> str:
    lines: list[str] = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleece: error: "), res.err
    return lines[0]


def test_export_stop_refuses_a_live_holder_and_aborts_the_export_of_one_that_died(
        two_monitor_vm: Any, fleece: Any, tmp_path: Path) -> None:
    vm = two_monitor_vm
    cleanup_cmd = f"fleece cleanup --qmp {shlex.quote(vm.other)}"
    first = fleece("export", "start", "--bounded-requests", "--qmp", vm.other, "--drive", "vda",
                   "--json").json()
    assert fleece("export", "stop", "--qmp", vm.other).rc == 0
    vm.write("vda", 0, MiB, 0x42)
    before = vm.block_graph()

    agent = Agent(vm, tmp_path)
    try:
        assert agent.export["since"] == first["checkpoint"]
        up = vm.block_graph()
        for extra in ((), ("--commit",), ("--abort",)):
            res = fleece("export", "stop", "--qmp", vm.other, *extra)
            assert res.rc == 1, res.out + res.err
            line = one_line_error(res)
            assert f"belongs to fleece pid {agent.proc.pid} on " in line
            assert "may still be running" in line and "nothing was changed" in line
        assert vm.block_graph() == up
        assert agent.read() == "42"  # its reader never noticed

        status = fleece("status", "--qmp", vm.other, "--json").json()["export"]
        assert (status["owner"], status["pid"], status["owner_exited"], status["end_with"]) == (
            "session", agent.proc.pid, False, None)
        human = fleece("status", "--qmp", vm.other).out
        assert f"held by fleece pid {agent.proc.pid} on " in human and "ends the export itself" in human
        # A backup is refused too, with the command for when that process is gone.
        refused = fleece("backup", "--qmp", vm.other, "--drive", "vda", "--repo", tmp_path / "repo")
        assert refused.rc == 1 and cleanup_cmd in one_line_error(refused)
        assert vm.block_graph() == up
    finally:
        agent.kill()

    status = fleece("status", "--qmp", vm.other, "--json").json()["export"]
    assert (status["owner_exited"], status["end_with"]) == (True, cleanup_cmd)
    assert shlex.split(status["end_with"])[-1] == vm.other
    res = fleece("export", "stop", "--qmp", vm.other)
    assert res.rc == 0, res.err
    assert f"fleece pid {agent.proc.pid} on " in res.out and "has exited" in res.out
    assert "aborted" in res.out
    # As an abort: the old checkpoint still records the write; QEMU as found.
    assert vm.block_graph() == before
    assert vm.bitmaps("vda")["fleece-" + first["checkpoint"]]["count"] == MiB
    res = fleece("export", "stop", "--qmp", vm.other)
    assert (res.rc, res.out.strip()) == (0, "nothing to stop: no fleece export is up in this QEMU")


def test_export_stop_commit_ends_a_dead_holders_export_as_a_commit(
        two_monitor_vm: Any, fleece: Any, tmp_path: Path) -> None:
    vm = two_monitor_vm
    agent = Agent(vm, tmp_path)
    agent.kill()
    res = fleece("export", "stop", "--qmp", vm.other, "--commit")
    assert res.rc == 0, res.err
    assert "committed" in res.out
    assert list(vm.bitmaps("vda")) == ["fleece-" + agent.export["checkpoint"]]
    assert vm.block_graph()["nodes"] == ["file-vda", "fmt-vda"]


def test_export_stop_refuses_while_a_backup_owns_the_export(
        two_monitor_vm: Any, fleece: Any, hold_backup: Any, tmp_path: Path) -> None:
    vm = two_monitor_vm
    repo = tmp_path / "repo"
    vm.write("vda", 0, MiB, 0x17)
    held = hold_backup(vm, repo, "export-live")
    held.wait_held()
    up = vm.block_graph()
    res = fleece("export", "stop", "--qmp", vm.other)
    assert res.rc == 1
    assert f"belongs to fleece pid {held.proc.pid} on " in one_line_error(res)
    assert vm.block_graph() == up
    rc, out, err = held.release()
    assert rc == 0, err
    point = json.loads(out)["point"]
    assert identical(restore(fleece, repo, point, tmp_path / "r.raw"), vm.shadow("vda"))
    assert list(vm.bitmaps("vda")) == [f"fleece-{point}"]


def test_status_and_refusals_name_the_command_that_ends_an_export_left_up(
        two_monitor_vm: Any, fleece: Any) -> None:
    vm = two_monitor_vm
    stop_cmd = f"fleece export stop --qmp {shlex.quote(vm.other)}"
    assert fleece("export", "start", "--bounded-requests", "--qmp", vm.other, "--drive", "vda").rc == 0
    status = fleece("status", "--qmp", vm.other, "--json").json()
    assert (status["export"]["owner"], status["export"]["end_with"], status["cleanup"]) == (
        "export", stop_cmd, None)
    assert f"end it with: {stop_cmd}" in fleece("status", "--qmp", vm.other).out
    again = fleece("export", "start", "--bounded-requests", "--qmp", vm.other, "--drive", "vda")
    assert again.rc == 1 and f"end it with: {stop_cmd};" in one_line_error(again)
    res = fleece("export", "stop", "--qmp", vm.other)
    assert res.rc == 0 and "committed" in res.out, res.err
