"""What other users of the host cannot reach, and what fleece never prints.

* The export's scratch directory (reverse deltas, state file, QEMU's NBD
  socket) is 0700: another user can neither connect to the export nor read
  the reverse delta, even where the directory above is open to all.
* ``fleece serve``'s socket is 0600.
* Credentials never appear in ``--json`` output, in ``-vvv`` logs or in the
  repository's objects.

By default QEMU's NBD server listens on a unix socket only; TCP needs TLS or
an explicit ``--insecure-tcp`` (``tests/test_tls.py``).
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from backups import MiB, identical
from conftest import FLEECE

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` as user and group nobody (65534)."""
    # Debian's interpreter, not the venv's: the probe needs only the standard
    # library, and the checkout (so the venv) may sit where nobody cannot enter.
    return subprocess.run(["/usr/bin/python3", "-c", code], user=NOBODY, group=NOBODY,
                          extra_groups=[], capture_output=True, text=True, timeout=30)


def nobody_connects(sock: Path) -> str:
    res = as_nobody(f"import socket; socket.socket(socket.AF_UNIX).connect({str(sock)!r}); "
                    "print('connected')")
    return res.stdout.strip() or res.stderr.strip().splitlines()[-1]


def nobody_reads(path: Path) -> str:
    res = as_nobody(f"open({str(path)!r}, 'rb').read(1); print('read')")
    return res.stdout.strip() or res.stderr.strip().splitlines()[-1]


@pytest.fixture
def open_dir(short_tmp: Path) -> Path:
    """A directory every user may enter: only fleece's own modes can keep them out."""
    d = short_tmp / "open"
    d.mkdir()
    for p in (short_tmp, d):
        p.chmod(0o755)
    return d


@pytest.mark.qemu
def test_the_export_scratch_directory_and_nbd_socket_are_private(
        make_vm: Any, fleece: Any, open_dir: Any) -> None:
    vm = make_vm([("qcow2", "16M")])
    vm.write("vda", 0, MiB, 0x42)
    res = fleece("export", "start", "--bounded-requests",
                 "--qmp", vm.qmp_path, "--drive", "vda", "--scratch-dir", open_dir,
                 "--discard", "--json")
    assert res.rc == 0, res.err
    sock = Path(res.json()["socket"])
    scratch = sock.parent
    try:
        assert scratch.parent == open_dir
        st = scratch.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
        assert stat.S_ISSOCK(sock.stat().st_mode)
        delta = scratch / "delta-vda.raw"
        assert stat.S_IMODE(delta.stat().st_mode) == 0o600
        # The owner connects; another user is turned away before the socket.
        import socket

        socket.socket(socket.AF_UNIX).connect(str(sock))
        assert "PermissionError" in nobody_connects(sock)
        assert "PermissionError" in nobody_reads(delta)
        assert "PermissionError" in nobody_reads(scratch / "fleece-export.json")
        # Control: in the open directory itself, another user does get in.
        (open_dir / "probe").write_bytes(b"x")
        (open_dir / "probe").chmod(0o644)
        assert nobody_reads(open_dir / "probe") == "read"
    finally:
        assert fleece("export", "stop", "--qmp", vm.qmp_path, "--abort").rc == 0
    assert sorted(open_dir.iterdir()) == [open_dir / "probe"]


def test_the_served_socket_is_0600(tmp_path: Any, open_dir: Any, store_point: Any) -> None:
    from fleece.repo.backends.file import FileBackend
    from fleece.repo.repository import Repository

    repo = Repository.init(FileBackend(tmp_path / "repo"), chunk_size=64 * 1024, hash="sha256")
    store_point(repo, "20260101T000000.000001Z-aaaaaa", {"vda": b"\x07" * 65536})
    sock = open_dir / "serve.sock"
    proc = subprocess.Popen(
        [FLEECE, "serve", "--repo", str(tmp_path / "repo"), "latest", "--socket", str(sock)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()  # printed once nbdkit accepts connections
        err = (proc.stderr.read() if proc.stderr else "") if proc.poll() is not None else uri
        assert uri == f"nbd+unix:///?socket={sock}", err
        st = sock.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()
        assert "PermissionError" in nobody_connects(sock)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert not sock.exists()


@pytest.mark.qemu
@pytest.mark.s3
def test_no_credential_in_json_output_debug_logs_or_the_repository(
        make_vm: Any, fleece: Any, s3_env: Any, s3_bucket: Any,
        tmp_path: Any, monkeypatch: Any) -> None:
    secret, token = "fleece-unique-secret-7d41c2", "fleece-unique-session-token-93be0a"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    vm = make_vm([("qcow2", "16M")], name="web1")
    vm.write("vda", 0, MiB, 0x42)
    url = f"s3://{s3_bucket}/vms"
    outputs: list[Any] = []
    res = fleece("-vvv", "backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", url, "--json")
    assert res.rc == 0, res.err
    outputs.append(res)
    point = res.json()["point"]
    assert "qmp query-block" in res.err  # the debug logs really are on
    for args in (["list", "--repo", url, "--json"], ["verify", "--repo", url, "--deep", "--json"],
                 ["restore", "--repo", url, point, "-o", tmp_path / "r.raw"]):
        outputs.append(fleece("-vvv", *args))
        assert outputs[-1].rc == 0, outputs[-1].err
    assert identical(tmp_path / "r.raw", vm.shadow("vda"))
    # A failing command prints its error with the logs on, too.
    outputs.append(fleece("-vvv", "list", "--repo", f"s3://{s3_bucket}-missing/x"))
    assert outputs[-1].rc == 1

    for res in outputs:
        for text in (res.out, res.err):
            assert secret not in text and token not in text
    client = s3_env.client()
    for obj in client.list_objects_v2(Bucket=s3_bucket).get("Contents", []):
        body = client.get_object(Bucket=s3_bucket, Key=obj["Key"])["Body"].read()
        assert secret.encode() not in body and token.encode() not in body
