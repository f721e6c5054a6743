"""The shipped nightly verification unit and timer: systemd accepts them, fleece accepts their commands."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fleece.cli import build_parser

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_accepts_the_verify_unit_and_timer(tmp_path: Path) -> None:
    for name in ("fleece-verify@.service", "fleece-verify@.timer"):
        (tmp_path / name.replace("@", "@web1")).write_text((CONFIGS / name).read_text())
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "fleece-verify@web1.service"),
                        str(tmp_path / "fleece-verify@web1.timer")], capture_output=True, text=True)
    problems = [line for line in r.stderr.splitlines() if line.strip()
                and "/usr/local/bin/fleece is not executable" not in line
                and "fleece-backup@web1.service" not in line]  # ordered after it, not shipped here
    assert problems == [], r.stderr


def test_the_units_commands_are_valid_fleece_command_lines() -> None:
    text = (CONFIGS / "fleece-verify@.service").read_text().replace("\\\n", " ")
    commands = re.findall(r"^ExecStart=/usr/local/bin/fleece (.*)$", text, re.M)
    assert len(commands) == 2
    for line in commands:
        words = line.replace("${FLEECE_REPO}", "s3://bucket/vms").replace("%i", "web1").split()
        words = [w for w in words if w != "$FLEECE_VERIFY_ARGS"]
        args = build_parser().parse_args(words)
        assert args.command == "verify" and args.vm == "web1" and (args.boot or args.fsck)
