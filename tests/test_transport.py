"""The NBD transport module alone: URIs, QEMU's and nbdkit's arguments, refusals (no server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleece.errors import BadInput
from fleece.fleecing.state import ExportState
from fleece.fleecing.transport import ServerTransport, client_tls, server_transport


def test_a_unix_socket_is_the_default_and_keeps_its_uri() -> None:
    t = server_transport(socket_path="/run/fleece x/nbd.sock")
    assert not t.is_tcp and not t.insecure
    assert t.uri("vda") == "nbd+unix:///vda?socket=/run/fleece%20x/nbd.sock"
    assert t.uri() == "nbd+unix:///?socket=/run/fleece%20x/nbd.sock"
    assert t.nbd_server_start() == {"addr": {"type": "unix", "data": {"path": "/run/fleece x/nbd.sock"}}}
    assert t.qemu_objects() == []
    assert t.nbdkit_args() == ["--unix", "/run/fleece x/nbd.sock"]


def test_tcp_with_x509_builds_qemus_objects_and_server_arguments(tls_creds: Any) -> None:
    t = server_transport(listen="tcp:127.0.0.1:10809", tls_creds=str(tls_creds.server),
                         tls_authz="C=GB,O=Fleece Tests,CN=backup1")
    assert t.uri("vda") == "nbds://127.0.0.1:10809/vda"
    assert t.qemu_objects() == [
        {"qom-type": "tls-creds-x509", "id": "fleece-tls-creds", "dir": str(tls_creds.server),
         "endpoint": "server", "verify-peer": True},
        {"qom-type": "authz-simple", "id": "fleece-tls-authz", "identity": "C=GB,O=Fleece Tests,CN=backup1"},
    ]
    assert t.nbd_server_start() == {
        "addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "10809"}},
        "tls-creds": "fleece-tls-creds", "tls-authz": "fleece-tls-authz"}
    assert t.nbdkit_args() == ["--ipaddr", "127.0.0.1", "--port", "10809", "--tls=require",
                               f"--tls-certificates={tls_creds.server}", "--tls-verify-peer"]
    v6 = server_transport(listen="tcp:[::1]:10809", tls_creds=str(tls_creds.server))
    assert v6.uri("vda") == "nbds://[::1]:10809/vda" and v6.address == "[::1]:10809"


def test_psk_and_insecure_tcp(tls_creds: Any) -> None:
    t = server_transport(listen="tcp:127.0.0.1:10809", tls_psk=str(tls_creds.psk))
    assert t.qemu_objects("/scratch/tls-psk") == [
        {"qom-type": "tls-creds-psk", "id": "fleece-tls-creds", "dir": "/scratch/tls-psk",
         "endpoint": "server"}]
    creds = t.client_credentials()
    assert creds["username"] == "backup1" and creds["psk_file"] == str(tls_creds.psk)
    assert tls_creds.psk.read_text().split(":")[1].strip() not in str(creds)
    plain = server_transport(listen="tcp:127.0.0.1:10809", insecure_tcp=True)
    assert plain.insecure and plain.uri("vda") == "nbd://127.0.0.1:10809/vda"
    assert "tls-creds" not in plain.nbd_server_start() and plain.qemu_objects() == []


def test_the_state_file_records_the_transport(tmp_path: Any, tls_creds: Any) -> None:
    t = server_transport(listen="tcp:127.0.0.1:10809", tls_creds=str(tls_creds.server))
    ExportState(checkpoint="x", scratch=str(tmp_path), socket="", transport=t.as_dict()).save()
    loaded = ExportState.load(tmp_path)
    assert loaded is not None and loaded.server == t
    ExportState(checkpoint="x", scratch=str(tmp_path), socket="/s.sock").save()
    old = ExportState.load(tmp_path)
    assert old is not None and old.server == ServerTransport(socket="/s.sock")


@pytest.mark.parametrize("listen", ["tcp:host", "tcp::10809", "udp:1.2.3.4:5", "tcp:h:0", "tcp:h:70000",
                                    "tcp:[::1:5", "127.0.0.1:10809"])
def test_a_malformed_listen_is_bad_input(listen: Any, tls_creds: Any) -> None:
    with pytest.raises(BadInput, match="--listen wants tcp:HOST:PORT"):
        server_transport(listen=listen, tls_creds=str(tls_creds.server))


def test_client_credentials_are_checked(tls_creds: Any, tmp_path: Path) -> None:
    assert client_tls(None, None) is None
    tls = client_tls(str(tls_creds.client), None)
    assert tls is not None and tls.certificates == str(tls_creds.client)
    assert client_tls(str(tls_creds.no_cert), None) is not None  # a CA only: no client certificate
    half = tmp_path / "half"
    half.mkdir()
    (half / "ca-cert.pem").write_text("x")
    (half / "client-cert.pem").write_text("x")
    with pytest.raises(BadInput, match="needs both"):
        client_tls(str(half), None)
    (half / "client-key.pem").write_text("x")
    (half / "client-key.pem").chmod(0o604)
    with pytest.raises(BadInput, match="mode 0604"):
        client_tls(str(half), None)
    with pytest.raises(BadInput, match="exclude each other"):
        client_tls(str(tls_creds.client), str(tls_creds.psk))
