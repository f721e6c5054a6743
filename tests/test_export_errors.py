"""Bad input and refusals of `fleece export`/`cleanup`: one clear line, the right exit, QEMU untouched."""

from __future__ import annotations

import shlex
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("scratch_tmpdir")


def error_line(res: Any) -> str:
    assert res.out == ""
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, res.err
    assert "Traceback" not in res.err
    return str(lines[0])


def export_start(fleece: Any, vm: Any, *args: Any) -> Any:
    return fleece("export", "start", "--bounded-requests", "--qmp", vm.qmp_path, *args)


@pytest.mark.parametrize(
    ("args", "rc", "says"),
    [
        (["--drive", "nope"], 2, "no disk named 'nope'"),
        (["--drive", "vda", "--drive", "fmt-vda"], 2, "are the same disk"),
        (["--drive", "vda", "--level", "incremental"], 1, "incremental export impossible"),
        (["--drive", "vda", "--checkpoint", "yesterday"], 2, "is not of the form"),
        (["--drive", "vda", "--scratch-dir", "/nonexistent/dir"], 2, "cannot make a scratch directory"),
        (["--drive", "vda", "--qga", "/nonexistent/qga.sock"], 1, "cannot reach the guest agent"),
    ],
)
def test_bad_input_changes_nothing(vm: Any, fleece: Any, args: Any, rc: Any, says: Any) -> None:
    before = vm.block_graph()
    res = export_start(fleece, vm, *args)
    assert res.rc == rc, res.err
    assert says in error_line(res)
    assert "nothing was changed" in res.err or rc == 2
    assert vm.block_graph() == before


def test_scratch_path_too_long_for_a_socket(vm: Any, fleece: Any, tmp_path: Any) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    before = vm.block_graph()
    res = export_start(fleece, vm, "--drive", "vda", "--scratch-dir", deep)
    assert res.rc == 2
    assert "too deep for a unix socket path" in error_line(res)
    assert vm.block_graph() == before
    assert list(deep.iterdir()) == []


def test_usage_errors(fleece: Any) -> None:
    assert fleece("export", "start", "--bounded-requests", "--qmp", "/x").rc == 2  # no --drive
    assert fleece("export").rc == 2
    assert fleece("export", "stop").rc == 2


def test_wrong_socket(fleece: Any, tmp_path: Any) -> None:
    res = fleece("export", "start", "--bounded-requests", "--qmp", tmp_path / "nope.sock", "--drive", "vda")
    assert res.rc == 1
    assert "does not exist" in error_line(res)
    res = fleece("cleanup", "--qmp", tmp_path / "nope.sock")
    assert res.rc == 1


def test_second_start_while_one_is_up(vm: Any, fleece: Any) -> None:
    assert export_start(fleece, vm, "--drive", "vda").rc == 0
    up = vm.block_graph()
    res = export_start(fleece, vm, "--drive", "vda")
    assert res.rc == 1
    line = error_line(res)
    assert "already up" in line
    assert f"end it with: fleece export stop --qmp {shlex.quote(vm.qmp_path)};" in line
    assert vm.block_graph() == up
    assert fleece("export", "stop", "--qmp", vm.qmp_path).rc == 0


def test_leftovers_refused_and_pointed_to_cleanup(vm: Any, fleece: Any) -> None:
    vm.qmp("block-dirty-bitmap-add", node="fmt-vda", name="fleece-tmp-vda", disabled=True)
    before = vm.block_graph()
    res = export_start(fleece, vm, "--drive", "vda")
    assert res.rc == 1
    assert f"remove them with: fleece cleanup --qmp {shlex.quote(vm.qmp_path)};" in error_line(res)
    assert "fmt-vda/fleece-tmp-vda" in res.err
    assert vm.block_graph() == before


def test_nbd_server_fleece_did_not_start(vm: Any, fleece: Any, short_tmp: Any) -> None:
    sock = str(short_tmp / "theirs.sock")
    vm.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    before = vm.block_graph()
    res = export_start(fleece, vm, "--drive", "vda")
    assert res.rc == 1
    assert "NBD server that fleece did not start" in error_line(res)
    assert vm.block_graph() == before
    # Their server is still there, untouched.
    with pytest.raises(RuntimeError, match="already running"):
        vm.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": sock + "2"}})
    assert list(short_tmp.iterdir()) == [short_tmp / "theirs.sock"]


def test_stop_without_export(vm: Any, fleece: Any) -> None:
    before = vm.block_graph()
    # Idempotent: a vendor's retry loop may stop twice.
    for extra in ((), ("--abort",), ("--commit",)):
        res = fleece("export", "stop", "--qmp", vm.qmp_path, *extra)
        assert (res.rc, res.out.strip(), res.err) == (
            0, "nothing to stop: no fleece export is up in this QEMU", "")
    assert vm.block_graph() == before
    res = fleece("cleanup", "--qmp", vm.qmp_path)
    assert (res.rc, res.out.strip()) == (0, "nothing to clean up")
