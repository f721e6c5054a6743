"""Client-side encryption: an offsite repository that reveals nothing and detects every change.

Real QEMU, real file and S3 (moto over HTTP) repositories, the real CLI. The
passphrase reaches fleece the ways an operator's job would give it: the
environment, a file, a command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from backups import MiB, identical, repo_files, write_from_file
from conftest import FLEECE, TEST_PASSPHRASE

from fleece.repo.format import keys

pytestmark = pytest.mark.qemu

MARKER = b"FLEECE-SECRET-MARKER-7d3f1a9c2b8e4d6f0a5c"
VM_NAME = "payroll-database-vm-4217"
PASS = {"FLEECE_PASSPHRASE": TEST_PASSPHRASE}


def all_objects(location: str | Path, s3_env: Any = None) -> dict[str, bytes]:
    """Every object of a file or S3 repository: key → bytes."""
    if isinstance(location, Path):
        return {str(p.relative_to(location)): p.read_bytes() for p in location.rglob("*") if p.is_file()}
    bucket, _, prefix = str(location)[len("s3://"):].partition("/")
    s3 = s3_env.client()  # its own credentials: boto3's default session caches the first ones
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def marked_vm(make_vm: Any, tmp_path: Path) -> Any:
    vm = make_vm([("qcow2", "16M")], name=VM_NAME)
    src = tmp_path / "marker.bin"
    src.write_bytes(MARKER * 100)
    for offset in (0, 5 * MiB, 9 * MiB + 4096):
        write_from_file(vm, "vda", offset, src)
    return vm


def ok(res: Any) -> Any:
    assert res.rc == 0, res.err
    return res


@pytest.mark.parametrize("where", ["file", "s3"])
def test_an_encrypted_repository_holds_no_marker_vm_or_disk_name_and_a_plain_one_does(
        make_vm: Any, fleece: Any, tmp_path: Path, request: pytest.FixtureRequest, where: str) -> None:
    vm = marked_vm(make_vm, tmp_path)
    s3_env = None
    if where == "s3":
        s3_env = request.getfixturevalue("s3_env")
        bucket = request.getfixturevalue("s3_bucket")
        secret_repo: str | Path = f"s3://{bucket}/sealed"
        plain_repo: str | Path = f"s3://{bucket}/plain"
    else:
        secret_repo, plain_repo = tmp_path / "sealed", tmp_path / "plain"
    ok(fleece("init", "--repo", secret_repo, "--encryption", "aes-256-gcm", env=PASS))
    for repo, env in ((secret_repo, PASS), (plain_repo, {})):
        ok(fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, "--compress",
                  "none", "--label", f"owner={VM_NAME}", env=env))
        vm.write("vda", 2 * MiB, 64 * 1024, 0x41)  # an incremental with a delta pack too
        ok(fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, "--compress",
                  "none", env=env))

    plain = all_objects(plain_repo, s3_env)
    assert any(MARKER in blob for blob in plain.values()), "the test must be able to fail"
    assert any(VM_NAME.encode() in blob for blob in plain.values())
    sealed = all_objects(secret_repo, s3_env)
    assert any("/packs/" in f"/{k}" for k in sealed) and len(sealed) >= 8
    for key, blob in sealed.items():
        assert MARKER not in blob and VM_NAME.encode() not in blob, key
        assert VM_NAME not in key and TEST_PASSPHRASE not in key
        assert TEST_PASSPHRASE.encode() not in blob
        assert "vda" not in key.split("/"), key
        if "/points/" in f"/{key}" or "/indexes/" in f"/{key}":  # small objects: no chance match
            assert b"vda" not in blob, key
    # And it all reads back with the passphrase.
    listed = ok(fleece("list", "--repo", secret_repo, "--json", env=PASS)).json()["points"]
    assert {p["vm"] for p in listed} == {VM_NAME} and len(listed) == 2
    out = tmp_path / "r.raw"
    ok(fleece("restore", "--repo", secret_repo, "latest", "-o", out, env=PASS))
    assert identical(out, vm.shadow("vda"))


@pytest.fixture
def sealed_chain(make_vm: Any, fleece: Any, tmp_path: Path) -> tuple[Path, Any, list[str]]:
    """An encrypted file repository with a full and an incremental (one delta pack)."""
    vm = marked_vm(make_vm, tmp_path)
    repo = tmp_path / "repo"
    ok(fleece("init", "--repo", repo, "--encryption", "chacha20-poly1305", env=PASS))
    points = [ok(fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, "--json",
                        env=PASS)).json()["point"]]
    vm.write("vda", 4 * MiB + 8192, 8192, 0x52)
    points.append(ok(fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo,
                            "--json", env=PASS)).json()["point"])
    return repo, vm, points


def damaged_objects(fleece: Any, repo: Path) -> dict[str, set[str]]:
    """verify --deep's damage: point id → problems."""
    res = fleece("verify", "--repo", repo, "--deep", "--json", env=PASS)
    assert res.rc == 1, res.out
    return {p["id"]: {d["problem"] for d in p["damage"]} for p in res.json()["points"]}


def refused_restore(fleece: Any, repo: Path, point: str, tmp_path: Path) -> str:
    out = tmp_path / "refused.raw"
    res = fleece("restore", "--repo", repo, point, "-o", out, env=PASS)
    assert res.rc == 1 and len(res.err.strip().splitlines()) == 1 and "Traceback" not in res.err, res.err
    assert not out.exists()
    return str(res.err)


def sealed_files(repo: Path, prefix: str) -> list[Path]:
    return sorted(p for p in (repo / prefix).rglob("*") if p.is_file())


def test_a_flipped_bit_is_named_by_verify_and_refused_by_restore(
        sealed_chain: tuple[Path, Any, list[str]], fleece: Any, tmp_path: Path) -> None:
    repo, _, points = sealed_chain
    chunk = sealed_files(repo, "chunks")[0]
    blob = bytearray(chunk.read_bytes())
    blob[len(blob) // 2] ^= 0x10
    chunk.write_bytes(bytes(blob))
    found = damaged_objects(fleece, repo)
    assert found[points[0]] == found[points[1]] == {"chunk damaged"}
    assert "fails authentication" in refused_restore(fleece, repo, points[1], tmp_path)
    outer = fleece("verify", "--repo", repo, "--outer", "--json")  # no passphrase needed
    assert outer.rc == 1 and outer.json()["damaged"] == [str(chunk.relative_to(repo))]


def test_a_truncated_pack_is_named_and_refused(sealed_chain: tuple[Path, Any, list[str]], fleece: Any,
                                               tmp_path: Path) -> None:
    repo, _, points = sealed_chain
    (pack,) = sealed_files(repo, "packs")
    pack.write_bytes(pack.read_bytes()[:-100])
    found = damaged_objects(fleece, repo)
    assert found[points[1]] == {"delta damaged"} and points[0] not in {
        p for p, problems in found.items() if problems}
    refused_restore(fleece, repo, points[1], tmp_path)


def test_an_object_swapped_for_another_of_its_kind_is_named(
        sealed_chain: tuple[Path, Any, list[str]], fleece: Any, tmp_path: Path) -> None:
    repo, _, points = sealed_chain
    a, b = sealed_files(repo, "chunks")[:2]
    shutil.copyfile(a, b)  # a whole, authentic object under the wrong name
    found = damaged_objects(fleece, repo)
    assert "chunk damaged" in found[points[0]]
    refused_restore(fleece, repo, points[0], tmp_path)


@pytest.mark.parametrize("kind", ["indexes", "points"])
def test_an_index_or_point_from_another_repository_is_named(
        sealed_chain: tuple[Path, Any, list[str]], fleece: Any, make_vm: Any, tmp_path: Path,
        kind: str) -> None:
    repo, vm, points = sealed_chain
    # Another encrypted repository of the same VM, with another key: same names, same layout.
    other = tmp_path / "other"
    ok(fleece("init", "--repo", other, "--encryption", "chacha20-poly1305", env=PASS))
    ok(fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", other, "--level", "full",
              env=PASS))
    (theirs,) = sealed_files(other, kind)
    ours = sealed_files(repo, kind)[-1]
    shutil.copyfile(theirs, ours)
    res = fleece("verify", "--repo", repo, "--json", env=PASS)
    assert res.rc == 1
    problems = {d["problem"] for p in res.json()["points"] for d in p["damage"]}
    assert problems == ({"index damaged"} if kind == "indexes" else {"point damaged"})
    if kind == "indexes":
        refused_restore(fleece, repo, points[1], tmp_path)


def test_wrong_or_missing_passphrase_and_a_removed_key_fail_in_one_line_and_change_nothing(
        sealed_chain: tuple[Path, Any, list[str]], fleece: Any, tmp_path: Path) -> None:
    repo, vm, _ = sealed_chain
    before_repo, before_qemu = repo_files(repo), vm.block_graph()
    wrong = {"FLEECE_PASSPHRASE": "not it"}
    missing = {"FLEECE_PASSPHRASE": ""}
    cases = [
        (["backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo], wrong, "wrong passphrase"),
        (["list", "--repo", repo], wrong, "wrong passphrase"),
        (["restore", "--repo", repo, "latest", "-o", tmp_path / "x.raw"], wrong, "wrong passphrase"),
        (["verify", "--repo", repo, "--deep"], wrong, "wrong passphrase"),
        (["prune", "--repo", repo, "--keep-last", "1"], wrong, "wrong passphrase"),
        (["gc", "--repo", repo], wrong, "wrong passphrase"),
        (["backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo], None, "is encrypted"),
        (["list", "--repo", repo], None, "is encrypted"),
    ]
    for args, env, words in cases:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("FLEECE_PASS")}
        if env:
            environment.update(env)
        res = subprocess.run([FLEECE, *map(str, args)], capture_output=True, text=True, env=environment,
                             stdin=subprocess.DEVNULL)
        assert res.returncode == 1, (args, res.stderr)
        line = res.stderr.strip().splitlines()
        assert len(line) == 1 and words in line[0] and "nothing was changed" in line[0], res.stderr
    empty = fleece("list", "--repo", repo, env=missing)
    assert empty.rc == 2 and "empty" in empty.err
    assert repo_files(repo) == before_repo and vm.block_graph() == before_qemu
    assert not (tmp_path / "x.raw").exists()

    # A second passphrase opens it too; removing the first leaves the second working.
    second = tmp_path / "second.pass"
    second.write_text("second operator's passphrase\n")
    second.chmod(0o600)
    ok(fleece("key", "add", "--repo", repo, "--new-passphrase-file", second, env=PASS))
    listed = ok(fleece("key", "list", "--repo", repo, "--json", "--passphrase-file", second)).json()
    assert len(listed["keys"]) == 2 and sum(k["current"] for k in listed["keys"]) == 1
    first_id = next(k["id"] for k in listed["keys"] if not k["current"])
    ok(fleece("key", "remove", "--repo", repo, first_id, "--passphrase-file", second))
    res = fleece("list", "--repo", repo, env=PASS)
    assert res.rc == 1 and "wrong passphrase" in res.err          # the removed key's passphrase
    ok(fleece("list", "--repo", repo, "--passphrase-file", second))
    last = fleece("key", "remove", "--repo", repo, listed["keys"][0]["id"] if listed["keys"][0]["id"]
                  != first_id else listed["keys"][1]["id"], "--passphrase-file", second)
    assert last.rc == 2 and "only key" in last.err


def test_change_passphrase_leaves_every_point_restorable_and_an_exported_key_comes_back(
        sealed_chain: tuple[Path, Any, list[str]], fleece: Any, tmp_path: Path) -> None:
    repo, vm, points = sealed_chain
    expected = vm.snapshot_shadow("vda", tmp_path / "now.raw")
    exported = tmp_path / "paper.key"
    ok(fleece("key", "export", "--repo", repo, exported, env=PASS))
    assert exported.stat().st_mode & 0o777 == 0o600
    assert TEST_PASSPHRASE.encode() not in exported.read_bytes()
    new = {"FLEECE_PASSPHRASE": TEST_PASSPHRASE, "FLEECE_NEW_PASSPHRASE": "rotated in 2026"}
    ok(fleece("key", "change-passphrase", "--repo", repo, env=new))
    assert fleece("list", "--repo", repo, env=PASS).rc == 1
    rotated = {"FLEECE_PASSPHRASE": "rotated in 2026"}
    for point in points:
        out = tmp_path / f"{point}.raw"
        ok(fleece("restore", "--repo", repo, point, "-o", out, env=rotated))
    assert identical(tmp_path / f"{points[-1]}.raw", expected)
    # The paper copy, with its old passphrase, opens the repository again.
    ok(fleece("key", "import", "--repo", repo, exported, env=PASS))
    ok(fleece("list", "--repo", repo, env=PASS))
    # A key of another repository is refused, even with the right passphrase.
    other = tmp_path / "other"
    ok(fleece("init", "--repo", other, "--encryption", "aes-256-gcm", env=PASS))
    foreign = tmp_path / "foreign.key"
    ok(fleece("key", "export", "--repo", other, foreign, env=PASS))
    res = fleece("key", "import", "--repo", repo, foreign, env=PASS)
    assert res.rc == 1 and "does not belong" in res.err


def test_no_passphrase_in_json_logs_process_titles_or_the_repository(
        make_vm: Any, fleece: Any, tmp_path: Path, short_tmp: Path) -> None:
    vm = make_vm([("qcow2", "16M")])
    vm.write("vda", 0, MiB, 0x61)
    repo = tmp_path / "repo"
    secret_file = tmp_path / "pass"
    secret_file.write_text(TEST_PASSPHRASE)
    secret_file.chmod(0o600)
    outputs = [fleece("-vvv", "init", "--repo", repo, "--encryption", "aes-256-gcm", "--json",
                      "--passphrase-file", secret_file)]
    outputs.append(fleece("-vvv", "backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo,
                          "--json", "--passphrase-file", secret_file))
    command = {"FLEECE_PASSPHRASE_COMMAND": f"cat {secret_file}"}
    outputs += [fleece("-vvv", "list", "--repo", repo, "--json", env=command),
                fleece("-vvv", "verify", "--repo", repo, "--deep", "--json", env=command),
                fleece("-vvv", "key", "list", "--repo", repo, "--json", env=command)]
    for res in outputs:
        assert res.rc == 0, res.err
        assert TEST_PASSPHRASE not in res.out and TEST_PASSPHRASE not in res.err
    for blob in all_objects(repo).values():
        assert TEST_PASSPHRASE.encode() not in blob
    # A served point: neither fleece nor nbdkit shows it on its command line.
    proc = subprocess.Popen([FLEECE, "serve", "--repo", str(repo), "latest", "--socket",
                             str(short_tmp / "s.sock")], env={**os.environ, **command},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"nbd+unix://")
        titles = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    titles.append(Path(f"/proc/{pid}/cmdline").read_bytes())
                except OSError:
                    continue
        assert any(b"nbdkit" in t for t in titles)
        assert not any(TEST_PASSPHRASE.encode() in t for t in titles)
        nbd = subprocess.run(["nbdcopy", f"nbd+unix:///?socket={short_tmp / 's.sock'}", "-"],
                             capture_output=True, check=True).stdout
        assert nbd[:MiB] == bytes([0x61]) * MiB
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.parametrize("s3_server", ["moto", "ceph-http"], indirect=True)
def test_an_encrypted_full_backup_and_restore_through_a_passphrase_command_on_s3(
        make_vm: Any, fleece: Any, s3_env: Any, s3_bucket: str, tmp_path: Path) -> None:
    vm = make_vm([("qcow2", "32M")])
    vm.write("vda", 3 * MiB, 5 * MiB, 0x3C)
    url = f"s3://{s3_bucket}/enc"
    command = {"FLEECE_PASSPHRASE_COMMAND": f"printf {json.dumps(TEST_PASSPHRASE)}"}
    ok(fleece("init", "--repo", url, "--encryption", "aes-256-gcm", "--hash", "blake3", env=command))
    start = time.monotonic()
    point = ok(fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", url, "--json",
                      env=command)).json()["point"]
    assert time.monotonic() - start < 120
    out = tmp_path / "r.raw"
    ok(fleece("restore", "--repo", url, point, "-o", out, env=command))
    assert identical(out, vm.shadow("vda"))
    ok(fleece("verify", "--repo", url, "--deep", env=command))
    assert keys.KEY_OBJECTS_PREFIX.rstrip("/") in {k.split("/")[1] for k in all_objects(url, s3_env)}


@pytest.mark.parametrize("encryption", ["none", "aes-256-gcm"])
def test_init_names_chunks_by_blake3_unless_told_otherwise(fleece: Any, tmp_path: Path,
                                                           encryption: str) -> None:
    """New repositories hash with BLAKE3 (keyed when encrypted), as one a backup creates does."""
    env = PASS if encryption != "none" else None  # a passphrase given means encrypted (fail closed)
    made = ok(fleece("init", "--repo", tmp_path / "default", "--encryption", encryption, "--json",
                     env=env)).json()
    assert made["hash"] == "blake3"
    config = json.loads((tmp_path / "default" / "config").read_bytes())  # the config is never sealed
    assert config["hash"] == "blake3" and config["encryption"] == encryption
    made = ok(fleece("init", "--repo", tmp_path / "old", "--encryption", encryption, "--hash", "sha256",
                     "--json", env=env)).json()
    assert made["hash"] == "sha256"
