"""A run imports what its command needs: the fixed cost every small incremental pays."""

from __future__ import annotations

import subprocess
import sys

from fleece.cli import command_module


def test_the_command_word_picks_one_module_and_anything_else_gets_them_all() -> None:
    assert command_module(["backup", "--qmp", "x"]) == "fleece.commands.backup"
    assert command_module(["-vv", "--verbose", "restore"]) == "fleece.commands.restore"
    assert command_module(["unprotect", "--repo", "r", "p"]) == "fleece.commands.protect"
    for argv in ([], ["--help"], ["--version"], ["bogus"], ["-q", "backup"]):
        assert command_module(argv) is None, argv


def test_a_non_interactive_backup_imports_neither_rich_nor_other_commands() -> None:
    code = (
        "import sys\n"
        "from fleece.cli import build_parser, command_module\n"
        "from fleece.commands.progress import progress_display\n"
        "build_parser(command_module(['backup'])).parse_args(['backup', '--help'][:1])\n"
        "with progress_display() as start:\n"
        "    start('vda', 1)(1)\n"
        "print(sorted(m for m in sys.modules if m == 'rich' or m.startswith(\n"
        "    ('fleece.commands.restore', 'fleece.commands.serve', 'fleece.serve', 'boto3'))))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, check=True)
    assert res.stdout.strip() == "[]", res.stdout


def test_help_still_lists_every_command() -> None:
    res = subprocess.run([sys.executable, "-m", "fleece", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for name in ("backup", "restore", "serve", "verify", "gc", "prune", "unprotect", "unlock"):
        assert name in res.stdout
