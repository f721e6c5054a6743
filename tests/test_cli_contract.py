"""The command-line contract as a user meets it: one vocabulary, and man pages that hold it all.

The parser is walked as a whole (every command and subcommand); the man pages
are generated the way ``scripts/install`` generates them (``scripts/build-docs``)
and compared with docs/design.md §4, the written contract.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fleece.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"


def commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by its full name (``export start``), aliases once, groups included."""
    out: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) in seen:
                    continue
                seen.add(id(sub))
                full = f"{prefix}{name}"
                out[full] = sub
                out.update(commands(sub, f"{full} "))
    return out


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings if s.startswith("--")}


def positionals(parser: argparse.ArgumentParser) -> list[str]:
    return [a.dest for a in parser._actions
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]


ALL = commands(build_parser())


def test_every_command_that_opens_a_repository_takes_config_and_the_same_repo_flag() -> None:
    with_repo = {n: p for n, p in ALL.items() if "--repo" in options(p)}
    assert {"backup", "list", "restore", "verify", "serve", "prune", "gc", "protect", "unprotect",
            "init", "unlock"} <= set(with_repo)
    for name, parser in with_repo.items():
        if name == "status":  # reports on a repository beside the VM; opens nothing to change
            continue
        opts = options(parser)
        assert "--config" in opts, f"{name} takes --repo but not --config"
        assert "--passphrase-file" in opts, f"{name} takes --repo but not --passphrase-file"
        assert opts["--repo"].metavar == "URL", name


def test_every_command_that_takes_a_point_takes_vm() -> None:
    with_point = {n: p for n, p in ALL.items() if {"point", "points"} & set(positionals(p))}
    assert {"restore", "serve", "verify", "protect", "unprotect", "copy"} <= set(with_point)
    for name, parser in with_point.items():
        assert "--vm" in options(parser), f"{name} takes POINT but not --vm"


def test_a_flag_means_one_thing_everywhere() -> None:
    """The same long option has the same metavar (value kind) in every command."""
    seen: dict[str, tuple[str, object]] = {}
    # Flags whose value legitimately differs by command, each said in design.md §4.2.
    per_command: set[str] = {"--to", "--machine", "--output"}  # design.md §4.2 says how each differs
    for name, parser in ALL.items():
        for flag, action in options(parser).items():
            if flag in per_command or flag == "--help":
                continue
            kind = (action.metavar, action.nargs) if action.nargs != 0 else ("switch", 0)
            if flag in seen:
                first, first_kind = seen[flag]
                assert kind == first_kind, f"{flag}: {first} takes {first_kind}, {name} takes {kind}"
            else:
                seen[flag] = (name, kind)


def test_repository_from_config_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """restore, verify, list… read repo (and vm) from --config, else $FLEECE_REPOSITORY; --repo wins."""
    monkeypatch.delenv("FLEECE_REPOSITORY", raising=False)
    missing = tmp_path / "nowhere"
    config = tmp_path / "vm1.toml"
    # A per-VM file holds the backup's settings too: they are not list's business, and not an error.
    config.write_text(f'repo = "{missing}"\nvm = "vm1"\nqmp = "/run/q.sock"\ndrives = ["vda"]\n')
    assert main(["list", "--config", str(config)]) != 0
    assert str(missing) in capsys.readouterr().err
    monkeypatch.setenv("FLEECE_REPOSITORY", str(tmp_path / "from-env"))
    assert main(["list"]) != 0
    assert "from-env" in capsys.readouterr().err
    assert main(["list", "--config", str(config)]) != 0  # the file beats the environment
    assert str(missing) in capsys.readouterr().err
    assert main(["list", "--repo", str(tmp_path / "flag"), "--config", str(config)]) != 0
    assert "flag" in capsys.readouterr().err
    monkeypatch.delenv("FLEECE_REPOSITORY")
    assert main(["restore", "latest", "-o", str(tmp_path / "x.raw")]) == 2
    err = capsys.readouterr().err
    assert "--repo URL" in err and "FLEECE_REPOSITORY" in err and err.count("\n") == 1


def _contract() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """From design.md §4: flags per command (§4.2's table) and --json keys per command (§4.4)."""
    text = DESIGN.read_text()
    section = text[text.index("## 4. Command-line contract"):text.index("## 5. ")]
    flags: dict[str, set[str]] = {}
    keys: dict[str, set[str]] = {}
    table = None
    for line in section.splitlines():
        if line.startswith("### "):
            table = line
        m = re.match(r"\| `([a-z][a-z-]*(?: [a-z][a-z|-]*)?)[^`]*` \| (.*) \|$", line)
        if not m or table is None:
            continue
        command, rest = m.group(1), m.group(2)
        if table.startswith("### 4.2"):
            flags.setdefault(command, set()).update(re.findall(r"`(--[a-z][a-z-]*)", rest))
        elif table.startswith("### 4.4"):
            keys[command] = set(re.findall(r"([a-z_]+)(?=[,:}\]])", _first_object(rest.replace("`", ""))))
    return flags, keys


def _first_object(text: str) -> str:
    """The first balanced ``{…}`` of a §4.4 row: the object itself, not the prose after it."""
    start = text.index("{")
    depth = 0
    for i, c in enumerate(text[start:], start):
        depth += {"{": 1, "}": -1}.get(c, 0)
        if depth == 0:
            return text[start:i + 1]
    return text[start:]


@pytest.fixture(scope="module")
def man_pages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build-docs"), str(out)], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out


def _page(man_pages: Path, command: str) -> str:
    words = command.split(" ")
    name = "fleece-" + words[0]
    if words[0] in ("key",) or "|" in command:
        name = "fleece-" + words[0]
    roff = (man_pages / "man1" / f"{name}.1").read_text()
    return roff.replace("\\-", "-").replace("\\fB", "").replace("\\fR", "").replace("\\fI", "")


def test_every_command_and_flag_of_the_contract_is_in_the_man_pages(man_pages: Path) -> None:
    flags, _ = _contract()
    assert len(flags) > 15
    for command, wanted in flags.items():
        base = command.split(" ")[0]
        assert base in ALL, f"design.md §4.2 names a command fleece does not have: {command}"
        page = _page(man_pages, command)
        parser_flags: set[str] = set()
        for full, parser in ALL.items():
            if full == base or full.startswith(base + " "):
                parser_flags |= set(options(parser))
        for flag in wanted:
            assert flag in parser_flags, f"design.md §4.2: {command} {flag} is not in the parser"
            assert flag in page, f"man fleece-{base} does not mention {flag}"


def test_every_json_key_of_the_contract_is_in_the_man_pages(man_pages: Path) -> None:
    _, keys = _contract()
    assert {"backup", "list", "verify", "gc"} <= set(keys)
    for command, wanted in keys.items():
        page = _page(man_pages, command)
        missing = sorted(k for k in wanted if not re.search(rf"\b{k}\b", page))
        assert not missing, f"man fleece-{command.split()[0]} lacks --json keys {missing}"


def test_man_pages_and_completion_are_generated_for_every_command(man_pages: Path) -> None:
    top = [n for n in ALL if " " not in n]
    for name in top:
        page = man_pages / "man1" / f"fleece-{name}.1"
        assert page.exists(), name
        rendered = subprocess.run(["man", "-l", "-Tutf8", str(page)], capture_output=True, text=True,
                                  check=True, env={**os.environ, "MANWIDTH": "100"})
        assert "warning" not in rendered.stderr, rendered.stderr
        assert "example:" in rendered.stdout, f"fleece {name} --help has no example"
    completion = man_pages / "bash" / "fleece"
    done = subprocess.run(
        ["bash", "-c", f'source "{completion}"; COMP_WORDS=(fleece re); COMP_CWORD=1; _shtab_fleece; '
                       'echo "${COMPREPLY[@]}"'], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["restore"]


def test_version_names_every_component(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("fleece ")
    for component in ("qemu", "libnbd", "nbdkit", "python", "boto3", "botocore"):
        assert re.search(rf"^  {re.escape(component)}: \d", out, re.M), (component, out)
