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
