"""`fleece cleanup` removes what a killed agent left, as an abort, and says what it removed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("scratch_tmpdir")

MiB = 1 << 20


def checkpoints(vm: Any, drive: Any="vda") -> list[str]:
    return sorted(n for n in vm.bitmaps(drive) if n.startswith("fleece-2"))


def start(fleece: Any, vm: Any, *args: Any) -> Any:
    res = fleece("export", "start", "--bounded-requests", "--qmp", vm.qmp_path, *args, "--json")
    assert res.rc == 0, res.err
    return res.json()


def test_agent_killed_while_the_export_is_up(make_vm: Any, fleece: Any, tmp_path: Any) -> None:
    vm = make_vm([("qcow2", "16M"), ("raw", "16M")], running=True)
    first = start(fleece, vm, "--drive", "vda", "--drive", "vdb")
    assert fleece("export", "stop", "--qmp", vm.qmp_path).rc == 0
    vm.write("vda", 0, 64 * 1024, 0x42)
    before = vm.block_graph()

    # A Python API user, SIGKILLed inside the `async with`: nothing of the tear-down runs.
    script = tmp_path / "agent.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, os, signal
        from fleece.fleecing import point_in_time_export
        from fleece.qmp import QmpSession

        async def main():
            async with QmpSession.open({vm.qmp_path!r}) as qmp:
                async with point_in_time_export(qmp, ["vda", "vdb"], bounded_requests=True) as export:
                    print(export.disks[0].since, flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)

        asyncio.run(main())
    """))
    agent = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert agent.returncode == -9, agent.stderr
    assert agent.stdout.strip() == first["checkpoint"]  # it was an incremental
    assert vm.attached_node("vda") == "fleece-cbw-vda"

    status = fleece("status", "--qmp", vm.qmp_path, "--json").json()["leftovers"]
    assert status["exports"] == ["fleece-export-vda", "fleece-export-vdb"]
    assert status["attached"] and status["nbd_server"]
    refused = fleece("export", "start", "--bounded-requests", "--qmp", vm.qmp_path, "--drive", "vda")
    # The agent's pid is gone: the refusal says so and points to cleanup.
    assert refused.rc == 1 and "which has exited" in refused.err and "fleece cleanup" in refused.err

    res = fleece("cleanup", "--qmp", vm.qmp_path)
    assert res.rc == 0, res.err
    line = res.out.strip()
    assert line.startswith("removed exports fleece-export-vda, fleece-export-vdb; NBD server on ")
    for what in ("fleece-cbw-vda", "fleece-delta-vdb", "fleece-snap-vda", "fmt-vda/fleece-tmp-vda",
                 "devices on filters /machine/peripheral/vda/virtio-backend"):
        assert what in line
    # As an abort: the old checkpoint still records the write, QEMU is as found.
    assert vm.block_graph() == before
    assert vm.bitmaps("vda")["fleece-" + first["checkpoint"]]["count"] == 64 * 1024
    assert fleece("cleanup", "--qmp", vm.qmp_path).out.strip() == "nothing to clean up"
    again = start(fleece, vm, "--drive", "vda")
    assert again["disks"][0]["since"] == first["checkpoint"]
    assert fleece("export", "stop", "--qmp", vm.qmp_path).rc == 0


def test_cut_short_commit_keeps_the_older_checkpoint(vm: Any, fleece: Any) -> None:
    old = "fleece-20260101T000000.000000Z-aaaaaa"
    new = "fleece-20260102T000000.000000Z-bbbbbb"
    for name in (old, new):
        vm.qmp("block-dirty-bitmap-add", node="fmt-vda", name=name, persistent=True)
    vm.qmp("block-dirty-bitmap-add", node="fmt-vda", name="fleece-tmp-vda", disabled=True)
    vm.qmp("block-dirty-bitmap-add", node="fmt-vda", name="theirs", persistent=True)

    res = fleece("export", "start", "--bounded-requests", "--qmp", vm.qmp_path, "--drive", "vda")
    assert res.rc == 1 and f"fmt-vda/{new}" in res.err and "fleece cleanup" in res.err

    res = fleece("cleanup", "--qmp", vm.qmp_path, "--json")
    assert res.rc == 0, res.err
    assert res.json()["removed"]["bitmaps"] == ["fmt-vda/fleece-tmp-vda", f"fmt-vda/{new}"]
    # The older one has recorded everything since its point; someone else's bitmap is not ours.
    assert sorted(vm.bitmaps("vda")) == [old, "theirs"]


def test_tear_down_decided_as_commit_is_finished_as_commit(vm: Any, fleece: Any) -> None:
    first = start(fleece, vm, "--drive", "vda")
    assert fleece("export", "stop", "--qmp", vm.qmp_path).rc == 0
    second = start(fleece, vm, "--drive", "vda")
    assert second["disks"][0]["since"] == first["checkpoint"]
    # `export stop` was killed right after it recorded its decision to commit.
    state_path = Path(second["socket"]).parent / "fleece-export.json"
    state = json.loads(state_path.read_text())
    state["outcome"] = "commit"
    state_path.write_text(json.dumps(state))

    res = fleece("cleanup", "--qmp", vm.qmp_path)
    assert res.rc == 0, res.err
    assert f"fmt-vda/fleece-{first['checkpoint']}" in res.out
    assert checkpoints(vm) == ["fleece-" + second["checkpoint"]]
    assert vm.block_graph()["nodes"] == ["file-vda", "fmt-vda"]
    assert not state_path.parent.exists()


def test_filter_left_without_state_file(vm: Any, fleece: Any, tmp_path: Any) -> None:
    # Leftovers a killed run made by hand-less means: no state file anywhere.
    delta = tmp_path / "fleece-x" / "delta-vda.raw"
    delta.parent.mkdir()
    delta.write_bytes(b"")
    subprocess.run(["truncate", "-s", "64M", str(delta)], check=True)
    before = vm.block_graph()
    vm.qmp("blockdev-add", driver="file", filename=str(delta), **{"node-name": "fleece-delta-vda"})
    vm.qmp("blockdev-add", driver="copy-before-write", file="fmt-vda", target="fleece-delta-vda",
           **{"node-name": "fleece-cbw-vda"})
    vm.qmp("qom-set", path=vm.qdev("vda"), property="drive", value="fleece-cbw-vda")

    res = fleece("cleanup", "--qmp", vm.qmp_path)
    assert res.rc == 0, res.err
    assert "devices on filters" in res.out
    assert vm.block_graph() == before
    assert not delta.exists()


def test_cleanup_takes_the_vm_from_a_backups_config(vm: Any, fleece: Any, tmp_path: Any) -> None:
    vm.qmp("block-dirty-bitmap-add", node="fmt-vda", name="fleece-tmp-vda", disabled=True)
    config = tmp_path / "vm1.toml"
    config.write_text(f'qmp = "{vm.qmp_path}"\ndrives = ["vda"]\nrepo = "{tmp_path / "repo"}"\n'
                      'scratch_dir = "/var/lib/fleece/scratch"\n[prune]\nkeep_last = 3\n')
    res = fleece("cleanup", "--config", config, "--json")
    assert res.rc == 0, res.err
    assert res.json()["removed"]["bitmaps"] == ["fmt-vda/fleece-tmp-vda"]
    # Leftovers no state file explains are not a dead process's: --dead-only leaves them.
    vm.qmp("block-dirty-bitmap-add", node="fmt-vda", name="fleece-tmp-vda", disabled=True)
    res = fleece("cleanup", "--config", config, "--dead-only", "--json")
    assert res.rc == 0, res.err
    doc = res.json()
    assert doc["removed"]["bitmaps"] == [] and "an earlier fleece run left" in doc["kept"]
    assert "fleece-tmp-vda" in vm.bitmaps("vda")
    bare = tmp_path / "bare.toml"
    bare.write_text('repo = "/srv/fleece"\n')
    res = fleece("cleanup", "--config", bare)
    assert res.rc == 2 and "names no qmp socket" in res.err
