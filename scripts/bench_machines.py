"""What recording the machine costs an incremental (``scripts/bench --machines``).

A UEFI + TPM libvirt domain (Debian's OVMF, swtpm, two disks, a NIC; TCG,
paused) on a private libvirtd (``tests/libvirt_host.py``), the same one
``tests/test_machines.py`` uses: a full backup, then N incrementals with
1 MiB written before each. For each incremental, the point's own figures:
``machine_seconds`` (reading the definition, the variable store and the TPM
state, and storing them) and ``machine_objects_written``, beside the
backup's whole time.

Usage: scripts/bench --machines [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLEECE = str(ROOT / ".venv" / "bin" / "fleece")
sys.path.insert(0, str(ROOT / "tests"))
from libvirt_host import LibvirtHost  # noqa: E402
from test_machines import UefiTpmDomain  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    host = LibvirtHost()
    base = Path(tempfile.mkdtemp(prefix="fl-bm-", dir="/var/tmp"))
    host.start()
    dom = None
    try:
        dom = UefiTpmDomain(host, base, "fleece-bench-machine")
        env = {**os.environ, "FLEECE_SWTPM_DIR": str(host.base / "lib" / "swtpm")}
        repo = base / "repo"

        def backup() -> dict[str, float]:
            p = subprocess.run([FLEECE, "backup", "--init", "--repo", str(repo), *dom.target, "--json"],
                               capture_output=True, text=True, env=env)
            if p.returncode:
                raise SystemExit(p.stderr)
            listed = subprocess.run([FLEECE, "list", "--repo", str(repo), "--json"], capture_output=True,
                                    text=True, check=True)
            stats: dict[str, float] = json.loads(listed.stdout)["points"][-1]["stats"]
            shown = subprocess.run([FLEECE, "show", "--repo", str(repo), "latest", "--json"],
                                   capture_output=True, text=True, check=True)
            stats["capture_ms"] = json.loads(shown.stdout)["machine"]["capture_ms"]
            return stats
        backup()
        rows = []
        for i in range(args.runs):
            dom.write("vda", (i % 16) * (1 << 20), 1 << 20, 0x60 + i)
            rows.append(backup())
        secs = [r["machine_seconds"] for r in rows]
        objs = [r["machine_objects_written"] for r in rows]
        whole = [r["seconds"] for r in rows]
        capture = [r["capture_ms"] / 1000 for r in rows]
        print(f"{args.runs} incrementals of a UEFI + TPM domain:")
        print(f"  machine recording: median {statistics.median(secs):.4f} s (max {max(secs):.4f} s), "
              f"objects written: max {max(objs):.0f}")
        print(f"  of which reading from libvirt and the files: median {statistics.median(capture):.4f} s")
        print(f"  whole backup: median {statistics.median(whole):.2f} s")
    finally:
        if dom is not None:
            dom.close()
        host.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)


if __name__ == "__main__":
    main()
