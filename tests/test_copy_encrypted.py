"""``fleece copy`` between encrypted repositories, through the CLI, on file and S3 (moto) repositories.

A destination made by the copy shares the source's key: the sealed objects
land byte for byte as the source stores them. A destination with its own
key (or a plain one, either way) gets every chunk renamed and sealed with
its key, and indexes and points rewritten. Either way the points restore
identical from the destination, and nothing in it shows the guest's data
or names in clear.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from backups import MiB, identical, random_image, repo_files, write_from_file
from conftest import FLEECE, TEST_PASSPHRASE

pytestmark = pytest.mark.qemu

MARKER = b"FLEECE-COPY-MARKER-5e1b7c0d9a2f4e83"
VM_NAME = "ledger-vm-0193"
OTHER_PASSPHRASE = "the offsite site's own passphrase"
SEALED_KINDS = ("chunks", "packs", "indexes", "points")


def ok(res: Any) -> Any:
    assert res.rc == 0, res.err
    return res


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleece: error: ") and "Traceback" not in err, err
    return lines[0]


def stored_objects(location: str | Path, s3_env: Any = None) -> dict[str, bytes]:
    """Every object a repository's store holds, by its key relative to the repository."""
    if isinstance(location, Path):
        return {str(p.relative_to(location)): p.read_bytes() for p in location.rglob("*") if p.is_file()}
    bucket, _, prefix = str(location)[len("s3://"):].partition("/")
    s3 = s3_env.client()
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix) + 1:]] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def sealed(objects: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in objects.items() if k.split("/", 1)[0] in SEALED_KINDS}


def marked_points(make_vm: Any, fleece: Any, tmp_path: Path, repo: Path
                  ) -> tuple[Any, list[tuple[str, Path]]]:
    """A VM whose disk holds a marker, backed up into ``repo`` twice (a full, an incremental with a
    pack of deltas); the points with a raw image of the disk at each."""
    vm = make_vm([("qcow2", "16M")], name=VM_NAME,
                 contents={"vda": random_image(tmp_path / "seed.raw", 16 * MiB, 7)})
    marker = tmp_path / "marker.bin"
    marker.write_bytes(MARKER * 200)
    for offset in (0, 6 * MiB + 4096):
        write_from_file(vm, "vda", offset, marker)
    p1 = ok(fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, "--compress", "none",
                   "--json")).json()["point"]
    first = vm.snapshot_shadow("vda", tmp_path / "p1.raw")
    write_from_file(vm, "vda", 9 * MiB, marker)  # a little of one chunk: a delta
    p2 = ok(fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo, "--compress", "none",
                   "--json")).json()["point"]
    return vm, [(p1, first), (p2, vm.snapshot_shadow("vda", tmp_path / "p2.raw"))]


def assert_nothing_in_clear(objects: dict[str, bytes]) -> None:
    assert sealed(objects), "nothing to look at"
    for key, blob in objects.items():
        assert MARKER not in blob and VM_NAME.encode() not in blob, key
        assert VM_NAME not in key and "vda" not in key.split("/"), key


def restores_identical(fleece: Any, repo: Any, points: list[tuple[str, Path]], tmp_path: Path,
                       env: dict[str, str] | None = None) -> None:
    for point, expected in points:
        out = tmp_path / f"restored-{point}.raw"
        out.unlink(missing_ok=True)
        ok(fleece("restore", "--repo", repo, point, "--drive", "vda", "-o", out, env=env))
        assert identical(out, expected), point


@pytest.mark.parametrize("where", ["file", "s3"])
def test_a_copy_to_a_new_destination_moves_sealed_objects_as_they_are_and_restores_identical(
        make_vm: Any, fleece: Any, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: Any,
        where: str) -> None:
    monkeypatch.setenv("FLEECE_PASSPHRASE", TEST_PASSPHRASE)
    local = tmp_path / "local"
    ok(fleece("init", "--repo", local, "--encryption", "aes-256-gcm"))
    vm, points = marked_points(make_vm, fleece, tmp_path, local)
    s3_env = None
    if where == "s3":
        s3_env = request.getfixturevalue("s3_env")
        dest: str | Path = f"s3://{request.getfixturevalue('s3_bucket')}/offsite"
    else:
        dest = tmp_path / "offsite"

    report = ok(fleece("copy", "--init", "--from", local, "--to", dest, "--json")).json()
    assert report["copied"] == [p for p, _ in points] and report["renamed"] is False
    ours, theirs = stored_objects(local), stored_objects(dest, s3_env)
    # Every sealed object under the same key with the same bytes: nothing was opened and sealed again.
    assert sealed(theirs) == sealed(ours)
    assert any(k.startswith("packs/") for k in theirs)
    assert {k for k in theirs if k.startswith("keys/")} == {k for k in ours if k.startswith("keys/")}
    assert_nothing_in_clear(theirs)
    restores_identical(fleece, dest, points, tmp_path)  # with the source's passphrase
    assert ok(fleece("verify", "--repo", dest, "--deep", "--json")).json()["ok"] is True

    # Again: nothing sent. One more backup: only what it added travels.
    again = ok(fleece("copy", "--from", local, "--to", dest, "--json")).json()
    assert again["copied"] == [] and again["bytes_copied"] == 0
    vm.write("vda", 2 * MiB, 64 * 1024, 0x6B)
    p3 = ok(fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", local, "--json")).json()
    third = ok(fleece("copy", "--from", local, "--to", dest, "latest", "--json")).json()
    assert third["copied"] == [p3["point"]] and third["chunks_copied"] == 1  # its pack
    assert third["chunks_present"] == 5  # the 4 chunks and the pack it shares with the second point
    restores_identical(fleece, dest, [(p3["point"], vm.shadow("vda"))], tmp_path)
    # The destination's passphrase can change on its own; the key (and so the names) stays shared.
    ok(fleece("key", "change-passphrase", "--repo", dest, env={"FLEECE_NEW_PASSPHRASE": OTHER_PASSPHRASE}))
    assert ok(fleece("copy", "--from", local, "--to", dest, "--json")).json()["skipped"] == [
        *(p for p, _ in points), p3["point"]]


def test_copies_between_different_keys_and_plain_rename_every_chunk_and_restore_identical(
        make_vm: Any, fleece: Any, tmp_path: Path, s3_env: Any, s3_bucket: str) -> None:
    plain = tmp_path / "plain"
    _, points = marked_points(make_vm, fleece, tmp_path, plain)
    assert any(MARKER in blob for blob in stored_objects(plain).values()), "the test must be able to fail"
    theirs = {"FLEECE_TO_PASSPHRASE": OTHER_PASSPHRASE}

    # plain → encrypted (its own key, on S3), made beforehand by its operator.
    offsite = f"s3://{s3_bucket}/offsite"
    ok(fleece("init", "--repo", offsite, "--encryption", "chacha20-poly1305", "--hash", "blake3",
              env={"FLEECE_PASSPHRASE": OTHER_PASSPHRASE}))
    report = ok(fleece("copy", "--from", plain, "--to", offsite, "--json", env=theirs)).json()
    assert report["copied"] == [p for p, _ in points] and report["renamed"] is True
    assert_nothing_in_clear(stored_objects(offsite, s3_env))
    restores_identical(fleece, offsite, points, tmp_path, env={"FLEECE_PASSPHRASE": OTHER_PASSPHRASE})

    # encrypted → encrypted with another key: opened with one passphrase, sealed with the other.
    other = tmp_path / "other"
    ok(fleece("init", "--repo", other, "--encryption", "aes-256-gcm",
              env={"FLEECE_PASSPHRASE": TEST_PASSPHRASE}))
    ok(fleece("copy", "--from", offsite, "--to", other, "--vm", VM_NAME, points[0][0], "--json",
              env={"FLEECE_PASSPHRASE": OTHER_PASSPHRASE, "FLEECE_TO_PASSPHRASE": TEST_PASSPHRASE}))
    # The second point: its chunks' new names come from the first point, read side by side in
    # both repositories (no chunk fetched again); its one delta is packed anew.
    second = ok(fleece("copy", "--from", offsite, "--to", other, "--json",
                       env={"FLEECE_PASSPHRASE": OTHER_PASSPHRASE,
                            "FLEECE_TO_PASSPHRASE": TEST_PASSPHRASE})).json()
    assert second["copied"] == [points[1][0]] and second["chunks_copied"] == 1, second
    assert_nothing_in_clear(stored_objects(other))
    pass_env = {"FLEECE_PASSPHRASE": TEST_PASSPHRASE}
    restores_identical(fleece, other, points, tmp_path, env=pass_env)
    assert ok(fleece("verify", "--repo", other, "--deep", "--json", env=pass_env)).json()["ok"] is True
    # The two keys name every chunk differently.
    names = [{k for k in stored_objects(r, e) if k.startswith("chunks/")} for r, e in ((other, None),
                                                                                     (offsite, s3_env))]
    assert len(names[0]) == len(names[1]) == 4 and not names[0] & names[1]

    # encrypted → plain: back in clear, restorable without any passphrase.
    back = tmp_path / "back"
    ok(fleece("init", "--repo", back, "--encryption", "none"))
    # Only when asked for: a plaintext destination of an encrypted source is refused otherwise.
    before = stored_objects(back)
    res = fleece("copy", "--from", other, "--to", back, env=pass_env)
    assert res.rc == 2 and "give --to-plaintext if that is what you want" in one_error_line(res.err)
    assert stored_objects(back) == before
    ok(fleece("copy", "--to-plaintext", "--from", other, "--to", back, env=pass_env))
    restores_identical(fleece, back, points, tmp_path)
    assert ok(fleece("verify", "--repo", back, "--deep", "--json")).json()["ok"] is True


def test_an_interrupted_encrypted_copy_leaves_no_point_and_the_next_one_finishes_it(
        make_vm: Any, fleece: Any, tmp_path: Path, s3_env: Any, s3_bucket: str, monkeypatch: Any) -> None:
    monkeypatch.setenv("FLEECE_PASSPHRASE", TEST_PASSPHRASE)
    local = tmp_path / "local"
    ok(fleece("init", "--repo", local, "--encryption", "aes-256-gcm"))
    _, points = marked_points(make_vm, fleece, tmp_path, local)
    url = f"s3://{s3_bucket}/offsite"
    marker = tmp_path / "held"
    proc = subprocess.Popen([FLEECE, "copy", "--init", "--from", str(local), "--to", url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env={**os.environ, "FLEECE_TEST_PAUSE_AT": "before-point",
                                 "FLEECE_TEST_PAUSE_FILE": str(marker)})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():  # the first point's chunks, pack and index are there; it is not
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = stored_objects(url, s3_env)
    assert any(k.startswith("chunks/") for k in left) and any(k.startswith("indexes/") for k in left)
    assert not any(k.startswith("points/") for k in left), sorted(left)
    assert ok(fleece("list", "--repo", url, "--json")).json()["points"] == []

    # The killed copy's lease is stale (its process is gone): the next copy takes it over.
    report = ok(fleece("copy", "--from", local, "--to", url, "--json")).json()
    assert report["copied"] == [p for p, _ in points] and report["chunks_present"] >= 1
    restores_identical(fleece, url, points, tmp_path)


def test_a_destination_with_another_key_and_no_or_a_wrong_passphrase_gets_nothing(
        make_vm: Any, fleece: Any, tmp_path: Path) -> None:
    local = tmp_path / "local"
    ok(fleece("init", "--repo", local, "--encryption", "aes-256-gcm",
              env={"FLEECE_PASSPHRASE": TEST_PASSPHRASE}))
    vm = make_vm([("qcow2", "8M")], name=VM_NAME)
    vm.write("vda", 0, MiB, 0x5A)
    ok(fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", local,
              env={"FLEECE_PASSPHRASE": TEST_PASSPHRASE}))
    dest = tmp_path / "dest"
    ok(fleece("init", "--repo", dest, "--encryption", "aes-256-gcm",
              env={"FLEECE_PASSPHRASE": OTHER_PASSPHRASE}))
    before = repo_files(dest)
    wrong_file = tmp_path / "wrong.pass"
    wrong_file.write_text("not the destination's\n")
    wrong_file.chmod(0o600)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FLEECE_")}
    cases = [
        ({"FLEECE_PASSPHRASE": TEST_PASSPHRASE}, [], 1, "is encrypted with another key than"),
        ({"FLEECE_PASSPHRASE": TEST_PASSPHRASE, "FLEECE_TO_PASSPHRASE": "not it"}, [], 1,
         "wrong passphrase for repository"),
        ({"FLEECE_PASSPHRASE": TEST_PASSPHRASE}, ["--to-passphrase-file", str(wrong_file)], 1,
         "wrong passphrase for repository"),
        ({"FLEECE_PASSPHRASE": TEST_PASSPHRASE, "FLEECE_TO_PASSPHRASE": ""}, [], 2, "is empty"),
        ({"FLEECE_TO_PASSPHRASE": OTHER_PASSPHRASE}, [], 1, "is encrypted: give its passphrase"),
        ({"FLEECE_PASSPHRASE": "not it", "FLEECE_TO_PASSPHRASE": OTHER_PASSPHRASE}, [], 1,
         "wrong passphrase for repository"),
    ]
    for env, extra, rc, words in cases:
        res = subprocess.run([FLEECE, "copy", "--from", str(local), "--to", str(dest), *extra],
                             capture_output=True, text=True, env={**environment, **env},
                             stdin=subprocess.DEVNULL)
        assert res.returncode == rc, (env, res.stderr)
        assert words in one_error_line(res.stderr), res.stderr
        assert OTHER_PASSPHRASE not in res.stderr and TEST_PASSPHRASE not in res.stderr
        assert repo_files(dest) == before, env
    ok(fleece("copy", "--from", local, "--to", dest,
              env={"FLEECE_PASSPHRASE": TEST_PASSPHRASE, "FLEECE_TO_PASSPHRASE": OTHER_PASSPHRASE}))
    assert repo_files(dest) != before



def test_renaming_fetches_only_the_chunks_no_point_held_by_both_names_yet(
        store_point: Any, tmp_path: Path) -> None:
    """The transfer layer alone: a second point's chunks are named from the first point's indexes,
    read side by side in both repositories, not fetched and hashed again."""
    from fleece.maintenance.replication import copy_points
    from fleece.repo.backends.base import ForwardingBackend
    from fleece.repo.backends.file import FileBackend
    from fleece.repo.repository import Repository

    class CountingChunkReads(ForwardingBackend):
        reads = 0

        def get(self, key: str) -> bytes:
            self.reads += key.startswith("chunks/")
            return self.inner.get(key)

    size = 64 * 1024
    source = Repository.init(FileBackend(tmp_path / "plain"), size, hash="sha256")
    data = random_image(tmp_path / "d.raw", 10 * size, 3).read_bytes()
    p1 = store_point(source, "20260101T000000.000000Z-aaaaaa", {"vda": data})
    changed = data[:size] + bytes([7]) * size + data[2 * size:]
    p2 = store_point(source, "20260102T000000.000000Z-bbbbbb", {"vda": changed})
    dest = Repository.init(FileBackend(tmp_path / "sealed"), size, encryption="aes-256-gcm",
                           passphrase=b"offsite")
    first = copy_points(source, dest, [p1])
    assert first.chunks_copied == 10 and first.renamed

    counting = CountingChunkReads(source.backend)
    source.backend = counting
    second = copy_points(source, dest, [p1, p2])
    assert second.copied == [p2.id] and (second.chunks_copied, second.chunks_present) == (1, 9)
    assert counting.reads == 1  # the changed chunk only
    assert dest.get_chunk(dest.chunk_name(changed[size : 2 * size])) == changed[size : 2 * size]


@pytest.mark.parametrize("way", ["sealed", "renamed"])
def test_a_damaged_sealed_chunk_is_not_copied_and_no_point_appears(
        make_vm: Any, fleece: Any, tmp_path: Path, monkeypatch: Any, way: str) -> None:
    monkeypatch.setenv("FLEECE_PASSPHRASE", TEST_PASSPHRASE)
    local = tmp_path / "local"
    ok(fleece("init", "--repo", local, "--encryption", "aes-256-gcm"))
    vm = make_vm([("qcow2", "8M")], name=VM_NAME)
    vm.write("vda", 0, MiB, 0x5A)
    ok(fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", local))
    (chunk,) = (p for p in (local / "chunks").rglob("*") if p.is_file())
    blob = bytearray(chunk.read_bytes())
    blob[len(blob) // 2] ^= 1
    chunk.write_bytes(bytes(blob))
    dest = tmp_path / "dest"
    if way == "renamed":
        ok(fleece("init", "--repo", dest, "--encryption", "aes-256-gcm",
                  env={"FLEECE_PASSPHRASE": OTHER_PASSPHRASE}))
    res = fleece("copy", "--init", "--from", local, "--to", dest,
                 env={"FLEECE_TO_PASSPHRASE": OTHER_PASSPHRASE})
    assert res.rc == 1
    line = one_error_line(res.err)
    assert "chunks/" in line and "was not copied" in line
    assert ("outer checksum" if way == "sealed" else "fails authentication") in line
    assert not any(k.startswith(("points/", "chunks/")) for k in stored_objects(dest))
