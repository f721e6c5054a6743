"""`fleece status` against real VMs, and the QMP connection errors every command shares."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from fleece.errors import QmpConnectError
from fleece.qmp import QmpSession


def test_status_lists_disks_bitmaps_human_and_json(make_vm: Any, fleece: Any) -> None:
    vm = make_vm([("qcow2", "64M"), ("raw", "32M")], bitmaps={"vda": ["mybm"]}, name="guest1")
    vm.write("vda", 0, 128 * 1024, 0x55)  # two 64 KiB granules dirty in mybm

    res = fleece("status", "--qmp", vm.qmp_path, "--json")
    assert res.rc == 0, res.err
    status = res.json()
    assert status["vm"] == "guest1"
    assert status["status"] == "prelaunch"
    vda, vdb = status["disks"]
    assert (vda["drive"], vda["node"], vda["format"], vda["size"]) == (
        "vda", "fmt-vda", "qcow2", 64 << 20)
    assert vda["file"].endswith("vda.qcow2")
    assert vda["bitmaps"] == [{
        "name": "mybm", "granularity": 65536, "count": 128 * 1024, "recording": True,
        "persistent": True, "inconsistent": False, "checkpoint": None,
    }]
    assert (vdb["drive"], vdb["format"], vdb["size"], vdb["bitmaps"]) == ("vdb", "raw", 32 << 20, [])
    assert not any(status["leftovers"].values())

    human = fleece("status", "--qmp", vm.qmp_path)
    assert human.rc == 0
    assert "vda: node fmt-vda, qcow2, 64.0 MiB" in human.out
    assert "bitmap mybm: granularity 64.0 KiB, 131072 dirty bytes, recording, persistent" in human.out
    assert "vdb: node fmt-vdb, raw, 32.0 MiB" in human.out
    assert "no fleece leftovers" in human.out


def test_status_skips_unnamed_bitmaps_and_reports_leftovers(vm: Any, fleece: Any) -> None:
    vm.qmp("blockdev-add", driver="null-co", **{"node-name": "fleece-delta-vda"}, size=1 << 20)
    vm.qmp("block-dirty-bitmap-add", node="fmt-vda", name="fleece-tmp-vda", disabled=True)

    status = fleece("status", "--qmp", vm.qmp_path, "--json").json()
    assert status["leftovers"]["nodes"] == ["fleece-delta-vda"]
    assert status["leftovers"]["bitmaps"] == ["fmt-vda/fleece-tmp-vda"]
    human = fleece("status", "--qmp", vm.qmp_path)
    assert "leftovers of an interrupted fleece run" in human.out
    assert "fleece cleanup" in human.out


def test_status_accepts_device_ids_of_every_bus(make_vm: Any, fleece: Any) -> None:
    vm = make_vm([("qcow2", "16M")] * 4, models=["virtio", "scsi", "ide", "nvme"])
    drives = [d["drive"] for d in fleece("status", "--qmp", vm.qmp_path, "--json").json()["disks"]]
    assert sorted(drives) == ["vda", "vdb", "vdc", "vdd"]


def _error_line(res: Any) -> str:
    assert res.out == ""
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, res.err
    assert "Traceback" not in res.err
    return str(lines[0])


def test_missing_socket(fleece: Any, tmp_path: Any) -> None:
    res = fleece("status", "--qmp", tmp_path / "nope.sock")
    assert res.rc == 1
    assert "does not exist" in _error_line(res)


def test_connection_refused(fleece: Any, tmp_path: Any) -> None:
    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # the socket file exists, nobody listens
    res = fleece("status", "--qmp", path)
    assert res.rc == 1
    assert "refused" in _error_line(res).lower()


def test_not_a_socket(fleece: Any, tmp_path: Any) -> None:
    (tmp_path / "file").write_text("x")
    res = fleece("status", "--qmp", tmp_path / "file")
    assert res.rc == 1
    assert "not a socket" in _error_line(res)


def _serve_once(path: Path, greeting: bytes | None) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        if greeting is not None:
            conn.sendall(greeting)
        conn.recv(4096)
        conn.close()
        srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_not_a_qmp_server(fleece: Any, tmp_path: Any) -> None:
    path = tmp_path / "http.sock"
    _serve_once(path, b"HTTP/1.1 400 Bad Request\r\n\r\n")
    res = fleece("status", "--qmp", path)
    assert res.rc == 1
    assert "cannot connect to QMP" in _error_line(res)


def test_handshake_timeout(tmp_path: Any) -> None:
    path = tmp_path / "silent.sock"
    _serve_once(path, None)

    async def connect() -> None:
        async with QmpSession.open(str(path), timeout=0.5):
            pass

    with pytest.raises(QmpConnectError, match="timed out"):
        asyncio.run(connect())


def test_usage_errors_exit_2(fleece: Any) -> None:
    res = fleece("status")
    assert res.rc == 2
    assert "--qmp" in _error_line(res)
    assert fleece("no-such-command").rc == 2
