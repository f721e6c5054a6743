"""``--metrics-file``: a Prometheus text-format file after backup, prune, gc and verify.

Every file is read back with ``prometheus_client``'s own parser, as the
node_exporter textfile collector would.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleece.commands.metrics import parse_samples, recorded, safe_repository
from fleece.errors import FleeceError, LockHeld

MiB = 1 << 20


def scrape(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample in the file, parsed by prometheus_client: (name, sorted labels) → value."""
    out = {}
    for family in text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Any, name: str, **labels: str) -> float:
    matches = [v for (n, ls), v in samples.items() if n == name and dict(ls).items() >= labels.items()]
    assert len(matches) == 1, (name, labels, samples)
    return float(matches[0])


def test_a_failed_run_counts_a_failure_and_keeps_the_last_success(tmp_path: Any) -> None:
    prom = tmp_path / "fleece.prom"
    with recorded(str(prom), "backup", "s3://bucket/vms", "web1") as run:
        run.values = {"fleece_backup_bytes_stored": 123.0}
    first = scrape(prom)
    success = value(first, "fleece_last_success_timestamp_seconds", vm="web1")
    assert abs(success - time.time()) < 5
    assert value(first, "fleece_failures_total", command="backup") == 0

    for _ in range(2):
        with pytest.raises(LockHeld), recorded(str(prom), "backup", "s3://bucket/vms", "web1"):
            raise LockHeld("VM web1 is locked by someone")
    after = scrape(prom)
    assert value(after, "fleece_failures_total", vm="web1") == 2
    assert value(after, "fleece_last_success_timestamp_seconds", vm="web1") == success
    assert value(after, "fleece_backup_bytes_stored", vm="web1") == 123
    assert value(after, "fleece_last_failure_timestamp_seconds", vm="web1") >= success
    # Written by rename from a hidden temporary in the same directory: nothing else left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleece.prom", "fleece.prom.lock"]
    assert oct(prom.stat().st_mode & 0o777) == "0o644"


def test_other_commands_vms_and_repositories_share_the_file(tmp_path: Any) -> None:
    prom = tmp_path / "fleece.prom"
    for vm in ("web1", 'db"1\\x'):  # label values are escaped
        with recorded(str(prom), "backup", "/srv/fleece", vm) as run:
            run.values = {"fleece_backup_bytes_read": 10.0}
    with recorded(str(prom), "gc", "/srv/fleece") as run:
        run.values = {"fleece_gc_bytes_freed": 5.0}
    samples = scrape(prom)
    assert value(samples, "fleece_backup_bytes_read", vm='db"1\\x') == 10
    assert value(samples, "fleece_backup_bytes_read", vm="web1") == 10
    assert value(samples, "fleece_gc_bytes_freed", command="gc", vm="") == 5
    assert parse_samples(prom.read_text()) == {(n, ls): v for (n, ls), v in samples.items()}


def test_no_credentials_reach_a_label() -> None:
    assert safe_repository("https://user:secret@minio:9000/b/p?x=1") == "https://minio:9000/b/p"
    assert safe_repository("/srv/fleece") == "/srv/fleece"


def test_a_metrics_file_that_cannot_be_written_after_success_fails_the_command(tmp_path: Any) -> None:
    prom = tmp_path / "fleece.prom"
    with pytest.raises(FleeceError, match="could not write the metrics file"), \
            recorded(str(prom), "gc", "/srv/fleece"):
        prom.mkdir()  # something else took the name mid-run (root ignores permissions)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary left


# -- through the CLI -------------------------------------------------------------------------
@pytest.mark.qemu
def test_backup_prune_gc_and_verify_write_one_file_and_a_failed_backup_keeps_the_success(
        make_vm: Any, fleece: Any, tmp_path: Any) -> None:
    vm = make_vm([("qcow2", "16M")], name="web1")
    vm.write("vda", 0, MiB, 0x42)
    repo, prom = tmp_path / "repo", tmp_path / "textfile" / "fleece.prom"
    prom.parent.mkdir()
    config = tmp_path / "web1.toml"
    config.write_text(f'repo = "{repo}"\nmetrics_file = "{prom}"\nqmp = "{vm.qmp_path}"\n'
                      'drives = ["vda"]\n')
    assert fleece("backup", "--config", config).rc == 0
    # Most of the chunk rewritten: stored whole, so the first point's only chunk
    # becomes garbage once that point is pruned.
    vm.write("vda", 0, 3 * MiB, 0x43)
    res = fleece("backup", "--config", config, "--json")
    assert res.rc == 0, res.err
    disk = res.json()["disks"][0]
    samples = scrape(prom)
    labels = {"command": "backup", "vm": "web1", "repository": str(repo)}
    assert value(samples, "fleece_backup_bytes_read", **labels) == disk["bytes_read"]
    # what the dirty bitmap marked: the 3 MiB written
    assert value(samples, "fleece_backup_bytes_dirty", **labels) == disk["bytes_dirty"] == 3 * MiB
    # everything the backup wrote (format 3 counts the index and the point too)
    assert value(samples, "fleece_backup_bytes_stored", **labels) == res.json()["bytes_stored"]
    # the disk's chunks, packs and index, and the point
    assert value(samples, "fleece_backup_objects_written", **labels) == disk["objects_written"] + 1
    assert 0 < value(samples, "fleece_last_duration_seconds", **labels) <= res.json()["seconds"] + 5
    success = value(samples, "fleece_last_success_timestamp_seconds", **labels)

    # A drive the VM does not have: the backup fails; its success stays on record.
    res = fleece("backup", "--config", config, "--drive", "nosuchdisk")
    assert res.rc != 0
    samples = scrape(prom)
    assert value(samples, "fleece_failures_total", command="backup") == 1
    assert value(samples, "fleece_last_success_timestamp_seconds", **labels) == success
    assert value(samples, "fleece_backup_bytes_read", **labels) == disk["bytes_read"]

    assert fleece("prune", "--config", config, "--keep-last", "1").rc == 0
    assert fleece("gc", "--config", config, "--grace", "0s").rc == 0
    assert fleece("verify", "--repo", repo, "--deep", "--metrics-file", prom).rc == 0
    samples = scrape(prom)
    assert value(samples, "fleece_prune_points_kept", command="prune") == 1
    assert value(samples, "fleece_prune_points_removed", command="prune") == 1
    assert value(samples, "fleece_gc_objects_deleted", command="gc") == 1
    assert value(samples, "fleece_verify_damaged_points", command="verify") == 0
    assert value(samples, "fleece_failures_total", command="verify") == 0

    # Damage: verify fails (exit 1), counts a failure and says how many points.
    chunk = next(p for p in (repo / "chunks").rglob("*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 1
    chunk.write_bytes(bytes(data))
    assert fleece("verify", "--repo", repo, "--deep", "--metrics-file", prom).rc == 1
    samples = scrape(prom)
    assert value(samples, "fleece_verify_damaged_points", command="verify") == 1
    assert value(samples, "fleece_failures_total", command="verify") == 1


def test_a_metrics_file_in_a_missing_directory_is_bad_input(fleece: Any, tmp_path: Any) -> None:
    res = fleece("gc", "--repo", tmp_path, "--metrics-file", tmp_path / "nope" / "f.prom")
    assert res.rc == 2
    assert res.err.strip() == (f"fleece: error: --metrics-file {tmp_path / 'nope' / 'f.prom'}: "
                               "not a file in an existing directory")
