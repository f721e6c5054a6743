"""The Python API (`point_in_time_export`) on real VMs: commit, abort, cancellation, undo of a half set-up."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from fleece.errors import ExportError, QmpCommandError
from fleece.fleecing import PointInTimeExport, point_in_time_export
from fleece.qmp import QmpSession

pytestmark = pytest.mark.usefixtures("scratch_tmpdir")

MiB = 1 << 20


class RecordingSession(QmpSession):
    """A real session that records every command, and can fail the n-th call of one."""

    fail: tuple[str, int] | None = None

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.calls: list[str] = []
        self.counts: dict[str, int] = {}

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        self.calls.append(command)
        self.counts[command] = self.counts.get(command, 0) + 1
        if self.fail == (command, self.counts[command]):
            raise QmpCommandError(command, "GenericError", "injected failure")
        return await super().execute(command, arguments)


def run_export(
        vm: Any, drives: Any, body: Any=None, *, session_cls: Any=QmpSession,
        **kwargs: Any) -> tuple[PointInTimeExport, Any]:
    """Open a session, run ``body(export)`` inside the export; return the export and the session."""
    seen: list[Any] = []

    async def main() -> None:
        async with session_cls.open(vm.qmp_path) as session:
            seen.append(session)
            async with point_in_time_export(session, drives, bounded_requests=True, **kwargs) as export:
                seen.append(export)
                if body:
                    await body(export)

    asyncio.run(main())
    return (seen[1] if len(seen) > 1 else None), seen[0]  # type: ignore[return-value]


def checkpoints(vm: Any, drive: Any="vda") -> list[str]:
    return sorted(n for n in vm.bitmaps(drive) if n.startswith("fleece-2"))


def test_normal_exit_commits_exception_aborts(vm: Any, nbd_connect: Any) -> None:
    vm.write("vda", 0, 1 * MiB, 0x10)
    lines: list[str] = []
    first, _ = run_export(vm, ["vda"], log=lines.append)
    d = first.disks[0]
    assert (d.drive, d.level, d.since, d.dirty_bitmap, d.size) == ("vda", "full", None, None, 64 * MiB)
    assert d.disk.node_name == "fmt-vda" and d.disk.qdev == "/machine/peripheral/vda/virtio-backend"
    assert any("full because vda: no fleece checkpoint" in line for line in lines)
    assert first.qemu_version >= (7, 1, 0) and first.trim_alignment == 65536
    assert checkpoints(vm) == ["fleece-" + first.checkpoint]
    before = vm.block_graph()

    vm.write("vda", 2 * MiB, 64 * 1024, 0x20)

    async def read_then_fail(export: PointInTimeExport) -> None:
        disk = export.disks[0]
        assert disk.since == first.checkpoint and disk.level == "incremental"
        conn = await asyncio.to_thread(nbd_connect, disk.uri, disk.dirty_bitmap)
        assert await asyncio.to_thread(conn.dirty_granules) == {2 * MiB}
        conn.close()
        raise RuntimeError("the repository went away")

    with pytest.raises(RuntimeError, match="repository went away"):
        run_export(vm, ["vda"], read_then_fail)
    # Aborted: exactly as before, the first checkpoint still records the write.
    assert vm.block_graph() == before
    assert vm.bitmaps("vda")["fleece-" + first.checkpoint]["count"] == 64 * 1024


def test_parent_ok_false_means_full_with_reason(vm: Any) -> None:
    first, _ = run_export(vm, ["vda"])
    lines: list[str] = []
    asked: list[tuple[str, str]] = []

    def parent_ok(drive: str, parent: str) -> bool:
        asked.append((drive, parent))
        return False

    second, _ = run_export(vm, ["vda"], parent_ok=parent_ok, log=lines.append)
    assert asked == [("vda", first.checkpoint)]
    assert second.disks[0].level == "full"
    assert "does not match a restore point" in (second.disks[0].reason or "")
    assert any("does not match a restore point" in line for line in lines)
    # The commit of a full export replaces the old chain.
    assert checkpoints(vm) == ["fleece-" + second.checkpoint]

    before = vm.block_graph()
    with pytest.raises(ExportError, match=r"incremental export impossible.*nothing was changed"):
        run_export(vm, ["vda"], level="incremental", parent_ok=lambda d, p: False)
    assert vm.block_graph() == before


def test_cancellation_aborts(vm: Any) -> None:
    run_export(vm, ["vda"])
    before = vm.block_graph()

    async def main() -> None:
        async with QmpSession.open(vm.qmp_path) as session:
            entered = asyncio.Event()

            async def backup() -> None:
                async with point_in_time_export(session, ["vda"], bounded_requests=True):
                    entered.set()
                    await asyncio.sleep(3600)

            task = asyncio.create_task(backup())
            await entered.wait()
            assert await asyncio.to_thread(vm.attached_node, "vda") == "fleece-cbw-vda"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    assert vm.block_graph() == before


@pytest.mark.parametrize(
    "fail",
    [
        ("blockdev-add", 1),   # the first reverse delta
        ("blockdev-add", 4),   # the second disk's filter
        ("transaction", 1),    # the new checkpoint bitmaps
        ("qom-set", 2),        # the second device, inside stop…cont
        ("transaction", 2),    # the frozen parent bitmaps
        ("block-export-add", 2),
    ],
)
def test_failing_half_way_undoes_exactly_what_was_done(make_vm: Any, fail: Any, short_tmp: Any) -> None:
    vm = make_vm([("qcow2", "16M"), ("qcow2", "16M")], running=True)
    run_export(vm, ["vda", "vdb"])  # a first checkpoint, so the second export is incremental
    before = vm.block_graph()

    class Failing(RecordingSession):
        pass

    Failing.fail = fail
    with pytest.raises(QmpCommandError, match="injected failure"):
        run_export(vm, ["vda", "vdb"], session_cls=Failing, scratch_dir=short_tmp)
    assert vm.block_graph() == before
    assert list(short_tmp.iterdir()) == []
    assert vm.qmp("query-status")["status"] == "running"


def test_every_qom_set_is_inside_one_stop_cont(make_vm: Any) -> None:
    vm = make_vm([("qcow2", "16M"), ("raw", "16M"), ("qcow2", "16M")], running=True)
    export, session = run_export(vm, ["vda", "vdb", "vdc"], session_cls=RecordingSession)
    calls = [c for c in session.calls if c in ("stop", "cont", "qom-set")]
    # Set-up: stop, three qom-sets, cont; tear-down: three qom-sets back, no pause needed.
    assert calls[:5] == ["stop", "qom-set", "qom-set", "qom-set", "cont"]
    assert "stop" not in calls[5:]
    assert export.pause_ms is not None and export.pause_ms > 0
    # The checkpoints were added before the snapshot point.
    assert session.calls.index("transaction") < session.calls.index("stop")
    assert [vm.attached_node(d) for d in ("vda", "vdb", "vdc")] == ["fmt-vda", "fmt-vdb", "fmt-vdc"]


# -- the guest agent --------------------------------------------------------------------
class FakeAgent:
    """A guest agent on a unix socket that logs what it was asked, with the VM's run state."""

    def __init__(self, path: Path, vm: Any) -> None:
        self.vm = vm
        self.log: list[tuple[str, bool]] = []
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(str(path))
        self.srv.listen(1)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as f:
                for raw in f:
                    req = json.loads(raw.strip(b"\xff"))
                    cmd = req["execute"]
                    self.log.append((cmd, self.vm.attached_node("vda").startswith("fleece-")))
                    if cmd == "guest-sync-delimited":
                        reply = b"\xff" + json.dumps({"return": req["arguments"]["id"]}).encode()
                    else:
                        reply = json.dumps({"return": 2}).encode()
                    conn.sendall(reply + b"\n")

    def close(self) -> None:
        self.srv.close()


def test_guest_agent_freezes_around_the_snapshot_point_and_always_thaws(make_vm: Any, short_tmp: Any) -> None:
    vm = make_vm([("qcow2", "16M")], running=True)
    agent = FakeAgent(short_tmp / "qga.sock", vm)
    lines: list[str] = []
    try:
        run_export(vm, ["vda"], qga=str(short_tmp / "qga.sock"), log=lines.append)
        # (command, device already on the filter?)
        assert agent.log == [("guest-sync-delimited", False), ("guest-fsfreeze-freeze", False),
                             ("guest-fsfreeze-thaw", True)]
        assert "froze 2 guest filesystems" in lines and "thawed 2 guest filesystems" in lines

        agent.log.clear()
        before = vm.block_graph()

        class Failing(RecordingSession):
            fail = ("qom-set", 1)

        with pytest.raises(QmpCommandError):
            run_export(vm, ["vda"], qga=str(short_tmp / "qga.sock"), session_cls=Failing)
        assert [c for c, _ in agent.log] == ["guest-sync-delimited", "guest-fsfreeze-freeze",
                                             "guest-fsfreeze-thaw"]
        assert vm.block_graph() == before
    finally:
        agent.close()
        os.unlink(short_tmp / "qga.sock")
