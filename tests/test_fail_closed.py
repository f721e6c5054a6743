"""Fail closed: a passphrase means an encrypted repository, a repository is made only when asked
for, and a store with write access can neither turn a repository to plaintext nor roll it back
unnoticed (docs/guarantees.md "It keeps what it touches private", docs/format.md "Threat model").

The attacker here is whoever can write to the store: they replace ``config`` (it is in clear) or
hide the newest point objects. This host's local state (``$XDG_STATE_HOME/fleece``) remembers what
it saw, so even without a passphrase the change is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
from backups import repo_files
from conftest import TEST_PASSPHRASE

from fleece.fleecing.names import new_point_id
from fleece.repo.backends.file import FileBackend
from fleece.repo.repository import Repository

MiB = 1 << 20
PASS = {"FLEECE_PASSPHRASE": TEST_PASSPHRASE}


def one_line(res: Any) -> str:
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleece: error: "), res.err
    assert "Traceback" not in res.err
    return str(lines[0])


def without_passphrase(fleece: Any, *args: Any) -> Any:
    """``fleece`` with no passphrase variable at all."""
    saved = os.environ.pop("FLEECE_PASSPHRASE", None)
    try:
        return fleece(*args)
    finally:
        if saved is not None:
            os.environ["FLEECE_PASSPHRASE"] = saved


def plain_config_like(repo: Path, *, same_id: bool = True) -> bytes:
    """What an attacker writes over an encrypted repository's config: the same settings, in clear."""
    doc = json.loads((repo / "config").read_bytes())
    doc["encryption"] = "none"
    doc.pop("auth", None)
    if not same_id:
        doc["id"] = "0" * 32
    return json.dumps(doc).encode()


@pytest.mark.parametrize("same_id", [True, False], ids=["same-id", "new-id"])
def test_a_replaced_config_saying_none_is_refused_with_a_passphrase_and_without_one_by_local_state(
        make_vm: Any, fleece: Any, tmp_path: Path, same_id: bool, monkeypatch: Any) -> None:
    repo = tmp_path / "repo"
    assert fleece("init", "--repo", repo, "--encryption", "aes-256-gcm", env=PASS).rc == 0
    vm = make_vm([("qcow2", "8M")], name="web1")
    vm.write("vda", 0, MiB, 0x61)
    first = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, "--json", env=PASS)
    assert first.rc == 0, first.err
    point = first.json()["point"]

    # Whoever can write to the store swaps config for a plaintext one.
    (repo / "config").write_bytes(plain_config_like(repo, same_id=same_id))
    before, graph = repo_files(repo), vm.block_graph()
    vm.write("vda", 2 * MiB, MiB, 0x62)

    # With the passphrase: refused for what the config says (no local state needed).
    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, env=PASS)
    assert res.rc == 2
    assert "is not encrypted (its config says encryption none), but a passphrase was given" in one_line(res)
    for args in (("list", "--repo", repo), ("restore", "--repo", repo, point, "-o", tmp_path / "x.raw")):
        res = fleece(*args, env=PASS)
        assert res.rc == 2 and "but a passphrase was given" in one_line(res)
    # Without one: this host remembers the repository was encrypted (or held another id).
    says = ("held repository" if not same_id
            else "was encrypted (aes-256-gcm) when this host last opened it")
    res = without_passphrase(fleece, "backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo)
    assert res.rc == 2 and says in one_line(res) and "--accept-change" in one_line(res)
    res = without_passphrase(fleece, "list", "--repo", repo)
    assert res.rc == 2 and says in one_line(res)
    assert repo_files(repo) == before and vm.block_graph() == graph  # checkpoint not moved
    assert not (tmp_path / "x.raw").exists()

    # What the local state adds: a host that never saw the repository, given no passphrase, has
    # nothing to compare with and opens it as the config says (the sealed points read as damage).
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "another-host"))
    res = without_passphrase(fleece, "list", "--repo", repo, "--json")
    assert res.rc == 1 and "this host" not in res.err


def test_a_typo_in_the_location_with_a_passphrase_creates_nothing_plaintext(
        make_vm: Any, fleece: Any, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert fleece("init", "--repo", repo, "--encryption", "aes-256-gcm", env=PASS).rc == 0
    vm = make_vm([("qcow2", "8M")], name="web1")
    vm.write("vda", 0, MiB, 0x61)
    backup = ("backup", "--qmp", vm.qmp_path, "--drive", "vda")
    assert fleece(*backup, "--repo", repo, env=PASS).rc == 0
    graph = vm.block_graph()

    typo = tmp_path / "rpeo"
    res = fleece(*backup, "--repo", typo, env=PASS, init=False)
    assert res.rc == 2
    assert f"create one with 'fleece init --repo {typo} --encryption aes-256-gcm'" in one_line(res)
    assert not typo.exists() and vm.block_graph() == graph  # nothing written, checkpoint kept
    # Creating a plaintext repository with a passphrase given is refused however it is asked for.
    config = tmp_path / "vm1.toml"
    config.write_text('[init]\nencryption = "none"\n')
    for args in ((*backup, "--repo", typo, "--config", config),
                 ("init", "--repo", typo, "--encryption", "none")):
        res = fleece(*args, env=PASS, init=False)
        assert res.rc == 2 and "refusing to create a plaintext repository" in one_line(res), args
        assert not typo.exists() and vm.block_graph() == graph
    for url in ("s3:/vault/fleece", "s3:vault", "gcs:vault/fleece"):
        res = fleece(*backup, "--repo", url, env=PASS, init=False)
        assert res.rc == 2 and "looks like a mistyped URL" in one_line(res)
    assert not Path("s3:").exists() and vm.block_graph() == graph
    # The checkpoint stayed with the real repository: its next backup is an incremental.
    vm.write("vda", 4 * MiB, MiB, 0x62)
    nxt = fleece(*backup, "--repo", repo, "--json", env=PASS)
    assert nxt.rc == 0 and nxt.json()["disks"][0]["level"] == "incremental", nxt.err
    # Told to create it (--init), with a passphrase: encrypted, never plain.
    assert fleece(*backup, "--repo", typo, "--init", env=PASS, init=False).rc == 0
    assert json.loads((typo / "config").read_bytes())["encryption"] == "aes-256-gcm"


def test_a_store_hiding_the_newest_points_is_refused_until_accepted(
        fleece: Any, store_point: Any, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert fleece("init", "--repo", repo, "--encryption", "none").rc == 0
    opened = Repository.open(FileBackend(repo))
    ids = sorted(new_point_id() for _ in range(3))
    for n, pid in enumerate(ids):
        store_point(opened, pid, {"vda": bytes([n + 1]) * MiB}, parent=ids[n - 1] if n else None,
                    vm="web1")
    listed = fleece("list", "--repo", repo, "--json")  # this host sees the newest: ids[2]
    assert [p["id"] for p in listed.json()["points"]] == ids

    # The store hides the newest point: 'latest' would silently be an old one.
    hidden = tmp_path / "hidden"
    shutil.move(repo / "points" / "web1", hidden)
    (repo / "points" / "web1").mkdir()
    for name in sorted(hidden.iterdir())[:2]:
        shutil.copy(name, repo / "points" / "web1" / name.name)
    before = repo_files(repo)
    for args in (("list", "--repo", repo), ("restore", "--repo", repo, "latest", "-o", tmp_path / "x.raw"),
                 ("verify", "--repo", repo), ("serve", "--repo", repo, "latest", "--socket",
                                                tmp_path / "s.sock")):
        res = fleece(*args)
        assert res.rc == 2, (args, res.err)
        line = one_line(res)
        assert f"lists {ids[1]} as the newest point of VM web1, but this host saw {ids[2]}" in line
        assert "--accept-change" in line
    assert repo_files(repo) == before and not (tmp_path / "x.raw").exists()

    # After a deliberate change (a repository restored from an older copy): accepted, remembered.
    assert fleece("list", "--repo", repo, "--accept-change").rc == 0
    assert fleece("list", "--repo", repo).rc == 0
    state = json.loads(next((Path(os.environ["XDG_STATE_HOME"]) / "fleece" / "repositories")
                            .glob("*.json")).read_bytes())
    assert state["points"] == {"web1": ids[1]}


def test_modes_of_every_new_file_and_directory(
        make_vm: Any, fleece: Any, tmp_path: Path, local_state_dir: Path) -> None:
    os.umask(0o022)  # the usual umask: fleece, not the umask, keeps these private
    vm = make_vm([("qcow2", "8M")], name="web1")
    vm.write("vda", 0, MiB, 0x61)
    repo = tmp_path / "repo"
    made = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, "--json", env=PASS)
    assert made.rc == 0, made.err
    point = made.json()["point"]
    raw, qcow2 = tmp_path / "out.raw", tmp_path / "out.qcow2"
    assert fleece("restore", "--repo", repo, point, "-o", raw, env=PASS).rc == 0
    assert fleece("restore", "--repo", repo, point, "-o", qcow2, "--format", "qcow2", env=PASS).rc == 0

    def modes(root: Path) -> set[tuple[str, int]]:
        return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode))
                for p in [root, *root.rglob("*")]}

    assert modes(repo) == {("dir", 0o700), ("file", 0o600)}
    assert modes(local_state_dir) == {("dir", 0o700), ("file", 0o600)}
    assert stat.S_IMODE(raw.stat().st_mode) == stat.S_IMODE(qcow2.stat().st_mode) == 0o600

    # Group access only when the config asks for it.
    shared = tmp_path / "shared"
    config = tmp_path / "vm1.toml"
    config.write_text("group_access = true\n")
    assert fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", shared, "--config", config,
                  env=PASS).rc == 0
    assert modes(shared) == {("dir", 0o750), ("file", 0o640)}
    out = tmp_path / "group.raw"
    assert fleece("restore", "--repo", shared, "latest", "-o", out, "--config", config, env=PASS).rc == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o640

    # A passphrase file others may read is refused, as a TLS key file is.
    secret = tmp_path / "pass"
    secret.write_text(TEST_PASSPHRASE)
    secret.chmod(0o644)
    res = without_passphrase(fleece, "list", "--repo", repo, "--passphrase-file", secret)
    assert res.rc == 2 and "is open to its group or others (mode 0644)" in one_line(res)
    secret.chmod(0o600)
    assert without_passphrase(fleece, "list", "--repo", repo, "--passphrase-file", secret).rc == 0


def test_no_child_process_gets_a_passphrase_in_its_environment(
        store_point: Any, tmp_path: Path, short_tmp: Path) -> None:
    """nbdkit gets the passphrase on a pipe; qemu-img, qemu-nbd, nbdkit and the passphrase command
    get no ``FLEECE_*PASSPHRASE*`` variable. Each tool is wrapped by a script that saves the
    environment it was started with (``/proc/$$/environ``) and then becomes the real tool."""
    import select
    import signal
    import subprocess
    import sys

    import nbd

    fleece_bin = str(Path(sys.executable).parent / "fleece")
    repo = tmp_path / "repo"
    Repository.init(FileBackend(repo), 64 * 1024, 3, encryption="aes-256-gcm",
                    passphrase=TEST_PASSPHRASE.encode())
    opened = Repository.open(FileBackend(repo), lambda: TEST_PASSPHRASE.encode())
    data = bytes(range(256)) * 4096  # 1 MiB
    point = store_point(opened, new_point_id(), {"vda": data}, vm="web1").id

    dumps, bin_dir = tmp_path / "environ", tmp_path / "bin"
    dumps.mkdir()
    bin_dir.mkdir()
    for tool in ("nbdkit", "qemu-img", "qemu-nbd", "qemu-io"):
        real = shutil.which(tool)
        assert real is not None, tool
        wrapper = bin_dir / tool
        wrapper.write_text(f'#!/bin/sh\ncat /proc/$$/environ > "{dumps}/{tool}.$$"\nexec {real} "$@"\n')
        wrapper.chmod(0o755)
    command = bin_dir / "passphrase-command"
    command.write_text(f'#!/bin/sh\ncat /proc/$$/environ > "{dumps}/command.$$"\n'
                       f'printf "%s" "{TEST_PASSPHRASE}"\n')
    command.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FLEECE_PASSPHRASE": TEST_PASSPHRASE,
           "FLEECE_TO_PASSPHRASE": TEST_PASSPHRASE, "FLEECE_NEW_PASSPHRASE": TEST_PASSPHRASE}

    # serve: nbdkit's plugin opens the repository with the passphrase from the pipe.
    sock = short_tmp / "s.sock"
    proc = subprocess.Popen([fleece_bin, "serve", "--repo", str(repo), point, "--socket", str(sock)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=env)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        uri = proc.stdout.readline().strip() if ready else ""
        assert uri.startswith("nbd+unix://"), proc.stderr.read() if proc.stderr else ""
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert children, "nbdkit runs as a child of fleece serve"
        for pid in children:  # the running nbdkit itself
            (dumps / f"running-child.{pid}").write_bytes(Path(f"/proc/{pid}/environ").read_bytes())
            assert TEST_PASSPHRASE.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        h = nbd.NBD()
        h.connect_uri(uri)
        assert h.pread(len(data), 0) == data  # the plugin did open the encrypted repository
        h.shutdown()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)

    # restore to qcow2 (qemu-img, qemu-nbd), the passphrase from a command.
    command_env = {k: v for k, v in env.items() if k != "FLEECE_PASSPHRASE"}
    command_env["FLEECE_PASSPHRASE_COMMAND"] = str(command)
    done = subprocess.run([fleece_bin, "restore", "--repo", str(repo), point, "-o", str(tmp_path / "x.qcow2"),
                           "--format", "qcow2"], capture_output=True, text=True, env=command_env,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr

    seen = sorted(p.name.split(".")[0] for p in dumps.iterdir())
    assert {"nbdkit", "qemu-img", "qemu-nbd", "command", "running-child"} <= set(seen), seen
    for dump in dumps.iterdir():
        environ = dump.read_bytes()
        assert b"FLEECE_" not in environ.replace(b"FLEECE_SYS_PATH", b"").replace(
            b"FLEECE_TEST", b""), (dump.name, [v for v in environ.split(b"\0") if b"FLEECE" in v])
        assert TEST_PASSPHRASE.encode() not in environ, dump.name


def test_a_typo_in_an_s3_prefix_with_a_passphrase_file_in_the_config_writes_nothing(
        make_vm: Any, fleece: Any, tmp_path: Path, s3_env: Any, s3_bucket: str) -> None:
    """The issue's reproduction: ``backup --config vm1.toml --repo s3://vault/flece`` with
    ``passphrase_file`` set used to make a new plaintext repository there and move the checkpoint."""
    secret = tmp_path / "vm1.pass"
    secret.write_text(TEST_PASSPHRASE)
    secret.chmod(0o600)
    config = tmp_path / "vm1.toml"
    config.write_text(f'passphrase_file = "{secret}"\n')
    vm = make_vm([("qcow2", "8M")], name="web1")
    vm.write("vda", 0, MiB, 0x61)
    graph = vm.block_graph()
    res = fleece("backup", "--config", config, "--qmp", vm.qmp_path, "--drive", "vda",
                 "--repo", f"s3://{s3_bucket}/flece", init=False)
    assert res.rc == 2
    assert "is not a fleece repository (no config): create one with 'fleece init" in one_line(res)
    listed = s3_env.client().list_objects_v2(Bucket=s3_bucket)
    assert listed.get("KeyCount", 0) == 0, listed.get("Contents")
    assert vm.block_graph() == graph


def test_a_repository_id_from_the_store_never_names_a_path(tmp_path: Path) -> None:
    """``config``'s id is whatever the store says: the state file is named by its hash."""
    from fleece.repo.local_state import LocalState

    state = LocalState(tmp_path / "a" / "state")
    memory = state.open_repository(str(tmp_path / "repo"), "../../../escape", "none", None)
    memory.note_point("web1", new_point_id())
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.is_relative_to(tmp_path / "a" / "state") for p in written), written
