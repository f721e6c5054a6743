"""pytest hooks: a guarantee whose test did not prove it fails the run, and a partial run says so.

``docs/guarantees.md`` names, for each claim, the tests that prove it (the
README only sums it up). A test that skipped, vanished or stopped half-way
proves nothing, so a run fails (exit 1, the tests listed) when a named test

* skipped (in any phase);
* returns early: its body has a ``return`` (found in its source at
  collection; nested functions aside). A test whose second half does not
  apply somewhere says so with :func:`proved_in_part` instead, which the run
  prints, or is split in two;
* did not run although the run took in its file and nothing deselected it
  (renamed, or its file was skipped at module level or did not collect).

A *partial run* — some files only (``pytest tests/test_lock.py``), or tests
left out by ``-k``, ``-m``, ``--deselect``, ``--ignore``, ``--lf`` — is held
to the rules above for what it ran, and prints ``partial run: guarantees not
checked`` with the count of named tests it left out and why, instead of
passing as if it had checked them. The hooks are imported by
``tests/conftest.py``.
"""

from __future__ import annotations

import ast
import fnmatch
import inspect
import re
import textwrap
from pathlib import Path

import pytest

REFERENCE = re.compile(r"`(tests/test_\w+\.py)::(test_\w+)`")
GUARANTEES = "docs/guarantees.md"
"""The one list of guarantees; the README's section of the same name sums it up and names no test."""
SECTION = "# What fleece guarantees"
PART = "guarantee_part"
"""The user property under which :func:`proved_in_part` records what a test left out."""

_named = pytest.StashKey[set[tuple[str, str]]]()
_outcomes = pytest.StashKey[dict[str, str]]()
_problems = pytest.StashKey[dict[tuple[str, str], str]]()
_left_out = pytest.StashKey[dict[tuple[str, str], str]]()
_parts = pytest.StashKey[dict[str, str]]()


def section(text: str, heading: str = SECTION) -> str | None:
    """The part of ``text`` from ``heading`` to the next ``## `` heading, if it has one."""
    start = text.find(heading)
    if start < 0:
        return None
    end = text.find("\n## ", start + len(heading))
    return text[start: end if end >= 0 else None]


def guarantees(root: Path) -> str | None:
    """The list of guarantees under ``root`` (``docs/guarantees.md``), if there is one."""
    doc = root / GUARANTEES
    return section(doc.read_text()) if doc.exists() else None


def named_tests(root: Path) -> set[tuple[str, str]]:
    """Every (``tests/test_x.py``, ``test_name``) the guarantees name."""
    return set(REFERENCE.findall(guarantees(root) or ""))


def proved_in_part(request: pytest.FixtureRequest, what: str) -> None:
    """Say, in the run's output, which part of its guarantee this test did not prove here and why
    (e.g. a half that only a newer QEMU can run); the test must still prove the rest."""
    request.node.user_properties.append((PART, what))


def _ref(nodeid: str) -> tuple[str, str]:
    """``tests/test_x.py::test_y[param]`` → (``tests/test_x.py``, ``test_y``)."""
    path, _, rest = nodeid.partition("::")
    return path, rest.split("[")[0]


def early_return(function: object) -> int | None:
    """The line of the first ``return`` in a test function's own body (not in nested functions)."""
    try:
        source = textwrap.dedent(inspect.getsource(function))  # type: ignore[arg-type]
        first_line = inspect.getsourcelines(function)[1]  # type: ignore[arg-type]
    except (OSError, TypeError):
        return None
    tree = ast.parse(source)
    if not tree.body or not isinstance(tree.body[0], ast.FunctionDef | ast.AsyncFunctionDef):
        return None
    todo: list[ast.AST] = list(tree.body[0].body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Return):
            return first_line + node.lineno - 1
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            todo.extend(ast.iter_child_nodes(node))
    return None


def _selected_files(config: pytest.Config, named: set[tuple[str, str]]) -> set[str]:
    """The named files this run's arguments take in (a file, or a directory above it)."""
    root = config.rootpath
    wanted = [(config.invocation_params.dir / arg.split("::")[0]).resolve() for arg in config.args]
    return {path for path, _ in named
            if any(w == (root / path).resolve() or w in (root / path).resolve().parents for w in wanted)}


def _ignored(config: pytest.Config, path: str) -> bool:
    full = (config.rootpath / path).resolve()
    for ignored in config.getoption("ignore", None) or []:
        target = (config.invocation_params.dir / ignored).resolve()
        if target == full or target in full.parents:
            return True
    return any(fnmatch.fnmatch(str(full), str(config.invocation_params.dir / glob))
               for glob in config.getoption("ignore_glob", None) or [])


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """Before any deselection: which named tests this run holds, which it leaves out and why,
    and which return early."""
    named = named_tests(config.rootpath)
    config.stash[_named] = named
    config.stash[_outcomes] = {}
    config.stash[_parts] = {}
    problems: dict[tuple[str, str], str] = {}
    left_out: dict[tuple[str, str], str] = {}
    collected = {_ref(item.nodeid) for item in items}
    files = {path for path, _ in collected}
    selected = _selected_files(config, named)
    for ref in named:
        path = ref[0]
        if ref in collected:
            continue
        if path in files:
            problems[ref] = "did not run (not in its file: renamed or removed?)"
        elif path not in selected:
            left_out[ref] = "its file is not in this run"
        elif _ignored(config, path):
            left_out[ref] = "its file was left out (--ignore)"
        else:
            problems[ref] = "did not run (its file was skipped at module level or did not collect)"
    for item in items:
        ref = _ref(item.nodeid)
        if ref in named and ref not in problems and isinstance(item, pytest.Function):
            line = early_return(item.function)
            if line is not None:
                problems[ref] = (f"returns early (line {line}): a guarantee's test runs to its end "
                                 "(split it, or say what it left out with proved_in_part)")
    config.stash[_problems] = problems
    config.stash[_left_out] = left_out


def pytest_deselected(items: list[pytest.Item]) -> None:
    """Named tests deselected (``-k``, ``-m``, ``--deselect``, ``--lf``): left out, and said so."""
    if not items or _named not in items[0].config.stash:
        return
    config = items[0].config
    reasons = [f"{flag} {value!r}" for flag, value in (
        ("-k", config.getoption("keyword", "")), ("-m", config.getoption("markexpr", "")),
        ("--deselect", " ".join(config.getoption("deselect", None) or []))) if value]
    why = "deselected" + (f" ({', '.join(reasons)})" if reasons else "")
    for item in items:
        ref = _ref(item.nodeid)
        if ref in config.stash[_named]:
            config.stash[_left_out].setdefault(ref, why)


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config) -> None:
    """Record each test's outcome (skipped in any phase, failed, passed); decide nothing."""
    if _outcomes not in config.stash or not hasattr(report, "nodeid") or report.when is None:
        return
    outcomes = config.stash[_outcomes]
    if report.skipped:
        outcomes[report.nodeid] = "skipped"
    elif report.failed:
        outcomes[report.nodeid] = "failed"
    elif report.when == "call":
        outcomes.setdefault(report.nodeid, "passed")
    for name, value in getattr(report, "user_properties", ()):
        if name == PART:
            config.stash[_parts][report.nodeid] = str(value)


def unproved(config: pytest.Config) -> list[str]:
    """The named tests this run leaves unproved, each with why."""
    if _named not in config.stash:
        return []
    named, outcomes = config.stash[_named], config.stash[_outcomes]
    problems = config.stash[_problems].copy()
    left_out = config.stash[_left_out]
    ran: dict[tuple[str, str], list[str]] = {}
    for nodeid, outcome in outcomes.items():
        ran.setdefault(_ref(nodeid), []).append(outcome)
    for ref in named:
        got = ran.get(ref)
        if got and "skipped" in got:
            problems.setdefault(ref, "skipped")
        elif not got and ref not in problems and ref not in left_out:
            problems[ref] = "did not run"
    return [f"{path}::{name}: {why}" for (path, name), why in sorted(problems.items())]


def partial(config: pytest.Config) -> list[str]:
    """Why this run is partial: the named tests it left out, counted by reason."""
    if _named not in config.stash:
        return []
    counts: dict[str, int] = {}
    for why in config.stash[_left_out].values():
        counts[why] = counts.get(why, 0) + 1
    return [f"{n} named test{'s' if n > 1 else ''}: {why}" for why, n in sorted(counts.items())]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run (exit 1) if a guarantee's test proved nothing; say so when the run is partial."""
    config = session.config
    problems, left_out = unproved(config), partial(config)
    parts = sorted(config.stash.get(_parts, {}).items())
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and parts:
        reporter.write_sep("-", "guarantees proved in part")
        for nodeid, what in parts:
            reporter.write_line(f"  {nodeid}: {what}")
    if reporter is not None and left_out:
        total = len(config.stash[_named])
        reporter.write_sep("-", f"partial run: guarantees not checked ({len(config.stash[_left_out])} "
                                f"of {total} named tests left out)", yellow=True)
        for line in left_out:
            reporter.write_line(f"  {line}")
    if not problems:
        return
    lines = [f"guarantee tests that proved nothing in this run ({GUARANTEES}):",
             *(f"  {p}" for p in problems)]
    if reporter is not None:
        reporter.write_sep("=", "unproved guarantees", red=True)
        for line in lines:
            reporter.write_line(line)
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
