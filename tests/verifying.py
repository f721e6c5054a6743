"""What the guest-level verification tests share: backing up an image, and finding leftovers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def back_up_images(make_vm: Any, fleece: Any, repo: Any, images: list[Path], *extra: str) -> str:
    """Back up raw ``images`` as disks vda, vdb, … of one (paused) VM; the point's id."""
    names = ["vd" + chr(ord("a") + i) for i in range(len(images))]
    vm = make_vm([("qcow2", img.stat().st_size) for img in images],
                 contents=dict(zip(names, images, strict=True)))
    res = fleece("backup", "--qmp", vm.qmp_path, *[a for n in names for a in ("--drive", n)],
                 "--repo", repo, "--vm", "vm1", "--json", *extra)
    assert res.rc == 0, res.err
    return str(res.json()["point"])


def leftovers(scratch_parent: Path) -> list[str]:
    """Guest-level scratch directories under ``scratch_parent`` and processes that use them."""
    found = [str(p) for p in scratch_parent.glob("fleece-guest-*")]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if "fleece-guest-" in cmdline and str(scratch_parent) in cmdline:
            found.append(f"process {pid}: {cmdline[:200]}")
    return found

