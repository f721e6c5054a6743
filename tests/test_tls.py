"""Exports and served points on TCP with TLS, on loopback: who gets in, who does not, what is left.

A backup server on another host reads ``nbds://HOST:PORT/EXPORT`` with a client
certificate; QEMU (``fleece export``) and nbdkit (``fleece serve``) verify it.
The clients here are plain libnbd handles configured by the test itself, so
that the refusals are QEMU's and nbdkit's, not fleece's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nbd
import pytest
from backups import MiB
from conftest import FLEECE, TestVM, TlsCredentials

pytestmark = pytest.mark.usefixtures("scratch_tmpdir")
LOOPBACK = "127.0.0.1"


def objects(vm: TestVM) -> list[str]:
    """Every QOM object under /objects (TLS credentials, authz, …)."""
    return sorted(o["name"] for o in vm.qmp("qom-list", path="/objects"))


def as_found(vm: TestVM) -> dict[str, Any]:
    return {**vm.block_graph(), "objects": objects(vm)}


def client(uri: str, certs: Path | None = None, psk: Path | None = None) -> Any:
    """A libnbd handle on ``uri`` with these credentials (TLS required when any is given)."""
    h = nbd.NBD()
    if certs or psk:
        h.set_tls(nbd.TLS_REQUIRE)
    if certs:
        h.set_tls_certificates(str(certs))
    if psk:
        h.set_tls_psk_file(str(psk))
        h.set_tls_username("backup1")
    h.connect_uri(uri)
    return h


def refused(uri: str, certs: Path | None = None, psk: Path | None = None) -> bool:
    """Whether the server (or the client's own check of the server) refuses the connection."""
    try:
        h = client(uri, certs, psk)
    except nbd.Error:
        return True
    try:
        h.pread(4096, 0)
    except nbd.Error:
        return True
    h.shutdown()
    return False


def read_all(uri: str, certs: Path | None = None, psk: Path | None = None) -> bytes:
    h = client(uri, certs, psk)
    size = h.get_size()
    data = b"".join(bytes(h.pread(min(4 * MiB, size - o), o)) for o in range(0, size, 4 * MiB))
    h.shutdown()
    return data


def start(fleece: Any, vm: TestVM, *args: str | Path) -> Any:
    res = fleece("export", "start", "--bounded-requests",
                 "--qmp", vm.qmp_path, "--drive", "vda", *args, "--json")
    assert res.rc == 0, res.err
    return res.json()


def plain(uri: str) -> str:
    """The same export asked for without TLS."""
    return uri.replace("nbds://", "nbd://", 1)


@pytest.mark.qemu
def test_export_over_tls_reads_the_point_and_refuses_every_other_client(
        make_vm: Any, fleece: Any, tls_creds: TlsCredentials, free_port: Any, tmp_path: Any) -> None:
    vm = make_vm([("qcow2", "16M")])
    vm.write("vda", 0, 1 * MiB, 0x11)
    vm.write("vda", 9 * MiB, 512 * 1024, 0x22)
    point = vm.snapshot_shadow("vda", tmp_path / "point.raw").read_bytes()
    before = as_found(vm)
    port = free_port()

    out = start(fleece, vm, "--listen", f"tcp:{LOOPBACK}:{port}", "--tls-creds", tls_creds.server,
                "--tls-authz", tls_creds.client_dn)
    (disk,) = out["disks"]
    uri = disk["uri"]
    assert uri == f"nbds://{LOOPBACK}:{port}/vda"
    assert out["socket"] is None
    t = out["transport"]
    assert (t["type"], t["address"], t["tls"], t["authz"]) == ("tcp", f"{LOOPBACK}:{port}", "x509",
                                                                tls_creds.client_dn)
    assert t["ca_cert"] == str(tls_creds.server / "ca-cert.pem")
    assert "client-cert.pem" in t["client"]
    # QEMU holds the TLS and authz objects, named so that stop and cleanup find them.
    assert set(objects(vm)) - set(before["objects"]) == {"fleece-tls-creds", "fleece-tls-authz"}
    status = fleece("status", "--qmp", vm.qmp_path, "--json").json()
    assert status["export"]["listen"] == f"{LOOPBACK}:{port}" and status["export"]["insecure"] is False
    assert status["leftovers"]["objects"] == ["fleece-tls-authz", "fleece-tls-creds"]

    # The guest goes on writing; the good client still reads the point.
    vm.write("vda", 0, 2 * MiB, 0x33)
    assert read_all(uri, tls_creds.client) == point

    assert refused(uri, tls_creds.no_cert), "a client without a certificate got in"
    assert refused(uri, tls_creds.other_ca), "a client certificate of another CA got in"
    assert refused(uri, tls_creds.wrong_ca), "the client accepted a server its CA did not sign"
    assert refused(uri, tls_creds.other_dn), "--tls-authz let another DN in"
    assert refused(plain(uri)), "plain NBD reached a TLS-only export"
    assert read_all(uri, tls_creds.client) == point  # the refusals broke nothing

    res = fleece("export", "stop", "--qmp", vm.qmp_path)
    assert res.rc == 0, res.err
    after = as_found(vm)
    assert after["objects"] == before["objects"]
    assert after["nodes"] == before["nodes"] and after["exports"] == before["exports"]
    assert after["attached"] == before["attached"]
    assert refused(uri, tls_creds.client)  # nothing listens any more


@pytest.mark.qemu
def test_export_with_a_pre_shared_key(
        make_vm: Any, fleece: Any, tls_creds: TlsCredentials, free_port: Any, tmp_path: Any) -> None:
    vm = make_vm([("qcow2", "16M")])
    vm.write("vda", 3 * MiB, 1 * MiB, 0x44)
    point = vm.snapshot_shadow("vda", tmp_path / "point.raw").read_bytes()
    before = objects(vm)
    port = free_port()
    res = fleece("-vvv", "export", "start", "--bounded-requests",
                 "--qmp", vm.qmp_path, "--drive", "vda", "--listen",
                 f"tcp:{LOOPBACK}:{port}", "--tls-psk", tls_creds.psk, "--json")
    assert res.rc == 0, res.err
    assert "object-add" in res.err  # -vvv shows the QMP traffic …
    for secret in tls_creds.key_material():  # … and no key
        assert secret not in res.out and secret not in res.err
    out = res.json()
    uri = out["disks"][0]["uri"]
    assert out["transport"]["psk_file"] == str(tls_creds.psk)
    assert out["transport"]["username"] == "backup1"
    assert read_all(uri, psk=tls_creds.psk) == point
    assert refused(uri, psk=tls_creds.wrong_psk)
    assert refused(plain(uri))
    # fleece's own reader with the PSK: the backup restores to the point.
    exported = tmp_path / "export.json"
    exported.write_text(res.out)
    repo = tmp_path / "repo"
    backup = fleece("backup", "--from-export", exported, "--vm", "vm1", "--repo", repo,
                    "--tls-psk", tls_creds.psk, "--json")
    assert backup.rc == 0, backup.err
    restored = tmp_path / "restored.raw"
    assert fleece("restore", "--repo", repo, backup.json()["point"], "-o", restored).rc == 0
    assert restored.read_bytes() == point
    assert fleece("export", "stop", "--qmp", vm.qmp_path).rc == 0
    assert objects(vm) == before
    scratch_parent = Path(os.environ["TMPDIR"])
    assert not list(scratch_parent.glob("fleece-*")), "the scratch directory (and its PSK link) stayed"
    assert tls_creds.psk.exists()  # the link went, the user's key file did not


@pytest.mark.qemu
def test_insecure_tcp_only_when_asked_and_status_warns(make_vm: Any, fleece: Any, free_port: Any) -> None:
    vm = make_vm([("qcow2", "16M")])
    port = free_port()
    out = start(fleece, vm, "--listen", f"tcp:{LOOPBACK}:{port}", "--insecure-tcp")
    uri = out["disks"][0]["uri"]
    assert uri == f"nbd://{LOOPBACK}:{port}/vda"
    assert len(read_all(uri)) == 16 * MiB
    res = fleece("status", "--qmp", vm.qmp_path)
    assert res.rc == 0
    assert "WARNING" in res.out and "WITHOUT TLS" in res.out
    assert fleece("status", "--qmp", vm.qmp_path, "--json").json()["export"]["insecure"] is True
    assert fleece("export", "stop", "--qmp", vm.qmp_path).rc == 0


def _bad_inputs(creds: TlsCredentials, tmp: Path, port: int) -> list[tuple[list[str | Path], str]]:
    loose = tmp / "loose"
    loose.mkdir()
    for f in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        (loose / f).write_bytes((creds.server / f).read_bytes())
    (loose / "server-key.pem").chmod(0o644)
    missing = tmp / "missing"
    missing.mkdir()
    (missing / "ca-cert.pem").write_bytes((creds.server / "ca-cert.pem").read_bytes())
    loose_psk = tmp / "loose.psk"
    loose_psk.write_bytes(creds.psk.read_bytes())
    loose_psk.chmod(0o640)
    listen = f"tcp:{LOOPBACK}:{port}"
    return [
        (["--listen", listen], "needs --tls-creds"),
        (["--listen", "tcp:127.0.0.1", "--tls-creds", creds.server], "--listen wants tcp:HOST:PORT"),
        (["--listen", "unix:/x", "--tls-creds", creds.server], "--listen wants tcp:HOST:PORT"),
        (["--listen", "tcp:127.0.0.1:99999", "--insecure-tcp"], "--listen wants tcp:HOST:PORT"),
        (["--listen", listen, "--tls-creds", missing], "server-cert.pem is missing"),
        (["--listen", listen, "--tls-creds", tmp / "nowhere"], "is not a directory"),
        (["--listen", listen, "--tls-creds", loose], "has mode 0644"),
        (["--listen", listen, "--tls-psk", loose_psk], "has mode 0640"),
        (["--listen", listen, "--tls-creds", creds.server, "--insecure-tcp"], "exclude each other"),
        (["--tls-creds", creds.server], "needs --listen"),
        (["--listen", listen, "--insecure-tcp", "--tls-authz", "CN=x"], "--tls-authz"),
    ]


@pytest.mark.qemu
def test_bad_tls_input_gets_one_line_exit_2_and_changes_nothing(
        vm: Any, fleece: Any, tls_creds: Any, free_port: Any,
                                                               tmp_path: Any) -> None:
    before = as_found(vm)
    for args, says in _bad_inputs(tls_creds, tmp_path, free_port()):
        res = fleece("export", "start", "--bounded-requests", "--qmp", vm.qmp_path, "--drive", "vda", *args)
        assert res.rc == 2, (args, res.err)
        lines = res.err.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], (args, res.err)
        assert "Traceback" not in res.err
        assert as_found(vm) == before, args
    assert not list(Path(os.environ["TMPDIR"]).glob("fleece-*"))


@pytest.mark.qemu
def test_a_killed_fleeces_tls_objects_are_removed_by_cleanup(
        make_vm: Any, fleece: Any, tls_creds: Any, free_port: Any) -> None:
    vm = make_vm([("qcow2", "16M")])
    before = as_found(vm)
    port = free_port()
    # A Python API user (a session export) holding a TLS export, killed while it is up.
    code = f"""
import asyncio, sys
from fleece.fleecing import point_in_time_export
from fleece.fleecing.transport import server_transport
from fleece.qmp import QmpSession
async def main():
    t = server_transport(listen="tcp:{LOOPBACK}:{port}", tls_creds={str(tls_creds.server)!r})
    async with QmpSession.open({vm.qmp_path!r}) as s:
        async with point_in_time_export(s, ["vda"], transport=t, bounded_requests=True) as e:
            print(e.disks[0].uri, flush=True)
            await asyncio.sleep(600)
asyncio.run(main())
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        assert uri == f"nbds://{LOOPBACK}:{port}/vda"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert "fleece-tls-creds" in objects(vm)
    status = fleece("status", "--qmp", vm.qmp_path, "--json").json()
    assert "fleece-tls-creds" in status["leftovers"]["objects"]
    refused_start = fleece("export", "start", "--bounded-requests", "--qmp", vm.qmp_path, "--drive", "vda")
    assert refused_start.rc == 1 and "fleece cleanup" in refused_start.err

    res = fleece("cleanup", "--qmp", vm.qmp_path, "--json")
    assert res.rc == 0, res.err
    assert "fleece-tls-creds" in res.json()["removed"]["objects"]
    after = as_found(vm)
    assert after["objects"] == before["objects"]
    assert {k: v for k, v in after.items() if k != "bitmaps"} == \
        {k: v for k, v in before.items() if k != "bitmaps"}
    assert refused(uri, tls_creds.client)


# -- fleece serve -------------------------------------------------------------------------
def _serve(repo: Path, port: int, *args: str | Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([FLEECE, "serve", "--repo", str(repo), "latest", "--listen",
                             f"tcp:{LOOPBACK}:{port}", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc


@pytest.fixture
def served_point(tmp_path: Any, store_point: Any) -> tuple[Path, bytes]:
    from fleece.repo.backends.file import FileBackend
    from fleece.repo.repository import Repository

    data = bytes(range(256)) * (4 * MiB // 256) + bytes(4 * MiB) + b"\x5a" * (4 * MiB)
    repo_dir = tmp_path / "repo"
    repo = Repository.init(FileBackend(repo_dir), chunk_size=1 * MiB, hash="sha256")
    store_point(repo, "20261123T073600.123456Z-3f9a1c", {"vda": data})
    return repo_dir, data


def test_serve_over_tls_reads_the_point_and_refuses_every_other_client(
        served_point: Any, tls_creds: TlsCredentials, free_port: Any) -> None:
    repo, data = served_point
    port = free_port()
    proc = _serve(repo, port, "--tls-creds", tls_creds.server)
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        assert uri == f"nbds://{LOOPBACK}:{port}/", uri or (proc.stderr.read() if proc.stderr else "")
        assert read_all(uri, tls_creds.client) == data
        assert refused(uri, tls_creds.no_cert), "a client without a certificate got in"
        assert refused(uri, tls_creds.other_ca), "a client certificate of another CA got in"
        assert refused(uri, tls_creds.wrong_ca), "the client accepted a server its CA did not sign"
        assert refused(plain(uri)), "plain NBD reached a TLS-only server"
        assert read_all(uri, tls_creds.client) == data
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_serve_with_tls_authz_lets_only_the_named_client_in(
        served_point: Any, tls_creds: TlsCredentials, free_port: Any) -> None:
    """nbdkit cannot check a client's DN: qemu-nbd fronts it with QEMU's authz-simple, as an
    export's --tls-authz does; a certificate of the same CA with another DN is refused."""
    repo, data = served_point
    port = free_port()
    proc = _serve(repo, port, "--tls-creds", tls_creds.server, "--tls-authz", tls_creds.client_dn)
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        assert uri == f"nbds://{LOOPBACK}:{port}/", uri or (proc.stderr.read() if proc.stderr else "")
        assert read_all(uri, tls_creds.client) == data
        assert refused(uri, tls_creds.other_dn), "--tls-authz let another DN in"
        assert refused(uri, tls_creds.no_cert), "a client without a certificate got in"
        assert refused(plain(uri)), "plain NBD reached a TLS-only server"
        assert read_all(uri, tls_creds.client) == data
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 2  # nbdkit and qemu-nbd in front of it
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_serve_bad_tls_input_gets_one_line_and_exit_2(
        served_point: Any, tls_creds: Any, free_port: Any, fleece: Any,
                                                     tmp_path: Any) -> None:
    repo, _ = served_point
    for args, says in _bad_inputs(tls_creds, tmp_path, free_port()):
        extra = [] if "--listen" in args else ["--socket", tmp_path / "s.sock"]
        res = fleece("serve", "--repo", repo, "latest", *extra, *args)
        assert res.rc == 2, (args, res.err)
        lines = res.err.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], (args, res.err)
    res = fleece("serve", "--repo", repo, "latest")
    assert res.rc == 2 and "--socket PATH and --listen" in res.err


# -- a backup server: backup --from-export, restore -o nbds:// ----------------------------
def _nbdkit_memory(port: int, creds: Path, size: int) -> subprocess.Popen[bytes]:
    """A writable TLS-only NBD server (nbdkit's memory plugin) to restore onto."""
    proc = subprocess.Popen(["nbdkit", "--foreground", "--exit-with-parent", "--ipaddr", LOOPBACK,
                             "--port", str(port), "--tls=require", f"--tls-certificates={creds}",
                             "--tls-verify-peer", "memory", str(size)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while refused(f"nbds://{LOOPBACK}:{port}/", creds.parent / "client"):
        assert proc.poll() is None and time.monotonic() < deadline, "nbdkit did not start"
        time.sleep(0.05)
    return proc


@pytest.mark.qemu
def test_a_backup_server_backs_up_an_export_over_tls_and_restores_onto_an_nbds_target(
        make_vm: Any, fleece: Any, tls_creds: TlsCredentials, free_port: Any, tmp_path: Any) -> None:
    vm = make_vm([("qcow2", "16M")], running=True)
    vm.write("vda", 0, 2 * MiB, 0x61)
    full_point = vm.snapshot_shadow("vda", tmp_path / "full.raw").read_bytes()
    repo = tmp_path / "repo"
    listen = ["--listen", f"tcp:{LOOPBACK}:{free_port()}", "--tls-creds", tls_creds.server,
              "--tls-authz", tls_creds.client_dn]

    # Hypervisor: export; backup server: read it with its client certificate; hypervisor: stop.
    exported = tmp_path / "export.json"
    res = fleece("export", "start", "--bounded-requests",
                 "--qmp", vm.qmp_path, "--drive", "vda", *listen, "--json")
    assert res.rc == 0, res.err
    exported.write_text(res.out)
    vm.write("vda", 0, 1 * MiB, 0x62)  # after the point: not in this backup
    res = fleece("-vvv", "backup", "--from-export", exported, "--vm", "vm1", "--repo", repo,
                 "--tls-creds", tls_creds.client, "--json")
    assert res.rc == 0, res.err
    full = res.json()
    assert full["disks"][0]["level"] == "full"
    for secret in tls_creds.key_material():
        assert secret not in res.out and secret not in res.err and secret not in exported.read_text()
    assert fleece("export", "stop", "--qmp", vm.qmp_path).rc == 0

    # The next export is incremental and the backup server keeps the chain.
    vm.write("vda", 12 * MiB, 1 * MiB, 0x63)
    incr_point = vm.snapshot_shadow("vda", tmp_path / "incr.raw").read_bytes()
    res = fleece("export", "start", "--bounded-requests",
                 "--qmp", vm.qmp_path, "--drive", "vda", *listen, "--json")
    assert res.rc == 0, res.err
    exported.write_text(res.out)
    # The wrong certificate is refused by QEMU, and the backup fails with one line.
    bad = fleece("backup", "--from-export", exported, "--vm", "vm1", "--repo", repo,
                 "--tls-creds", tls_creds.other_dn)
    assert bad.rc == 1 and len(bad.err.strip().splitlines()) == 1, bad.err
    res = fleece("backup", "--from-export", exported, "--vm", "vm1", "--repo", repo,
                 "--tls-creds", tls_creds.client, "--json")
    assert res.rc == 0, res.err
    incr = res.json()
    assert incr["disks"][0]["level"] == "incremental" and incr["parent"] == full["point"]
    assert incr["disks"][0]["bytes_read"] == 2 * MiB  # only the 2 MiB written since, as deltas
    assert fleece("export", "stop", "--qmp", vm.qmp_path).rc == 0

    # Restore both points onto a TLS-only NBD server with the client certificate.
    port = free_port()
    server = _nbdkit_memory(port, tls_creds.server, 16 * MiB)
    try:
        target = f"nbds://{LOOPBACK}:{port}/"
        for point, expected in ((full["point"], full_point), (incr["point"], incr_point)):
            res = fleece("restore", "--repo", repo, point, "--drive", "vda", "-o", target, "--force",
                         "--tls-creds", tls_creds.client)
            assert res.rc == 0, res.err
            assert read_all(target, tls_creds.client) == expected
        res = fleece("restore", "--repo", repo, incr["point"], "-o", target, "--force",
                     "--tls-creds", tls_creds.wrong_ca)
        assert res.rc == 2 and "cannot connect" in res.err
        res = fleece("restore", "--repo", repo, incr["point"], "-o", plain(target), "--force",
                     "--tls-creds", tls_creds.client)
        assert res.rc == 2 and "need an nbds:// URI" in res.err
    finally:
        server.kill()
        server.wait()


@pytest.mark.qemu
def test_a_port_in_use_fails_with_one_line_and_leaves_qemu_as_found(
        vm: Any, fleece: Any, tls_creds: Any) -> None:
    import socket

    before = as_found(vm)
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = fleece("export", "start", "--bounded-requests",
                     "--qmp", vm.qmp_path, "--drive", "vda", "--listen",
                     f"tcp:{LOOPBACK}:{port}", "--tls-creds", tls_creds.server,
                     "--tls-authz", tls_creds.client_dn)
    assert res.rc == 1, res.err
    assert len(res.err.strip().splitlines()) == 1 and "nbd-server-start" in res.err, res.err
    assert as_found(vm) == before  # the TLS and authz objects made before it went again
    assert not list(Path(os.environ["TMPDIR"]).glob("fleece-*"))


def test_bad_backup_and_restore_tls_input_gets_one_line_and_creates_nothing(
        fleece: Any, tls_creds: Any, tmp_path: Any, served_point: Any) -> None:
    repo = tmp_path / "new-repo"
    exported = tmp_path / "export.json"
    exported.write_text('{"checkpoint": "20261123T073600.123456Z-3f9a1c", "disks": [{"drive": "vda", '
                        '"uri": "nbd://127.0.0.1:1/vda", "size": 1048576, "level": "full"}]}')
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    cases = [
        (["--from-export", garbage, "--vm", "vm1"], "is not JSON from 'fleece export start --json'"),
        (["--from-export", exported], "needs --vm"),
        (["--from-export", exported, "--vm", "vm1", "--qmp", "/x.sock"], "drop --qmp"),
        (["--from-export", exported, "--vm", "vm1", "--tls-creds", tls_creds.client], "need an nbds:// URI"),
        (["--qmp", "/x.sock", "--drive", "vda", "--tls-creds", tls_creds.client], "are for --from-export"),
        (["--from-export", exported, "--vm", "vm1", "--tls-creds", tls_creds.client, "--tls-psk",
          tls_creds.psk], "exclude each other"),
    ]
    for args, says in cases:
        res = fleece("backup", "--repo", repo, *args)
        assert res.rc == 2, (args, res.err)
        lines = res.err.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], (args, res.err)
        assert not repo.exists(), args
    served, _ = served_point
    out = tmp_path / "out.raw"
    res = fleece("restore", "--repo", served, "latest", "-o", out, "--tls-creds", tls_creds.client)
    assert res.rc == 2 and "for an nbds:// output" in res.err and not out.exists()
