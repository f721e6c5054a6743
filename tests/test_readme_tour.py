"""The README's five-minute tour, run as written against a real QEMU and an S3 server.

Only the machine-specific values change: the QMP socket, the repository
directory, the restore output and the bucket become the test's own; every
command line is the README's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import S3Server, TestVM

ROOT = Path(__file__).resolve().parent.parent


def tour_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## A five-minute tour")
    end = readme.index("\n## ", start + 1)
    return re.findall(r"```sh\n(.*?)```", readme[start:end], re.S)


def test_the_readme_tour_runs_as_written(vm: TestVM, tmp_path: Path, s3_bucket: str,
                                         s3_env: S3Server) -> None:
    local, offsite = tour_blocks()
    assert "fleece backup" in local and "fleece restore" in local and "fleece copy" in offsite
    repo = tmp_path / "srv-fleece"
    restored = tmp_path / "vda.raw"
    script = local + offsite
    script = re.sub(r"^QMP=.*$", f"QMP={vm.qmp_path}", script, flags=re.M)
    script = re.sub(r"^REPO=.*$", f"REPO={repo}", script, flags=re.M)
    script = re.sub(r"^export AWS_.*$", "", script, flags=re.M)  # the test's S3 server instead
    script = script.replace("/var/tmp/vda.raw", str(restored))
    script = script.replace("s3://acme-backups/fleece", f"s3://{s3_bucket}/fleece")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euxo", "pipefail", "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    listed = subprocess.run(["fleece", "list", "--repo", str(repo), "--json"], env=env,
                            capture_output=True, text=True, check=True)
    points = json.loads(listed.stdout)["points"]
    assert [p["disks"][0]["level"] for p in points] == ["full", "incremental"]
    compare = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", str(restored),
                              str(vm.disks[0].path)], capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    offsite_points = subprocess.run(
        ["fleece", "list", "--repo", f"s3://{s3_bucket}/fleece", "--json"], env=env,
        capture_output=True, text=True, check=True)
    assert len(json.loads(offsite_points.stdout)["points"]) == 3  # the two copied + one made there
