"""pytest hooks: a guarantee whose test was skipped, or did not run, fails the run.

``docs/guarantees.md`` names, for each claim, the tests that prove it (the
README only sums it up). A skipped test proves nothing, so:

* any named test that this run collected and that skipped fails the run;
* a run that collected every file the guarantees name and deselected
  nothing (``scripts/test``, plain ``pytest``) must also run every named
  test: one that is missing fails the run too.

A run of a few files (``pytest tests/test_lock.py``) or with ``-k``/``-m``
is held only to the first rule. The hooks are imported by ``tests/conftest.py``; the run's exit
status becomes 1 and the terminal lists the tests that proved nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REFERENCE = re.compile(r"`(tests/test_\w+\.py)::(test_\w+)`")
GUARANTEES = "docs/guarantees.md"
"""The one list of guarantees; the README's section of the same name sums it up and names no test."""
SECTION = "# What fleece guarantees"

_named = pytest.StashKey[set[tuple[str, str]]]()
_strict = pytest.StashKey[bool]()
_outcomes = pytest.StashKey[dict[str, str]]()


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


def _ref(nodeid: str) -> tuple[str, str]:
    """``tests/test_x.py::test_y[param]`` → (``tests/test_x.py``, ``test_y``)."""
    path, _, rest = nodeid.partition("::")
    return path, rest.split("[")[0]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """Before any -k/-m deselection: which named tests this run holds, whether it holds every file."""
    named = named_tests(config.rootpath)
    files = {_ref(item.nodeid)[0] for item in items}
    config.stash[_named] = named
    config.stash[_strict] = bool(named) and {path for path, _ in named} <= files
    config.stash[_outcomes] = {}


def pytest_deselected(items: list[pytest.Item]) -> None:
    """A run that deselects tests chose a subset: it is held only to "nothing named skipped"."""
    if items:
        items[0].config.stash[_strict] = False


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


def unproved(config: pytest.Config) -> list[str]:
    """The named tests this run leaves unproved, each with why."""
    if _named not in config.stash:
        return []
    named, strict, outcomes = config.stash[_named], config.stash[_strict], config.stash[_outcomes]
    by_test: dict[tuple[str, str], list[str]] = {}
    for nodeid, outcome in outcomes.items():
        by_test.setdefault(_ref(nodeid), []).append(outcome)
    problems = []
    for ref in sorted(named):
        got = by_test.get(ref)
        where = f"{ref[0]}::{ref[1]}"
        if got and "skipped" in got:
            problems.append(f"{where}: skipped")
        elif strict and not got:
            problems.append(f"{where}: did not run")
    return problems


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run (exit 1) if a guarantee's test was skipped or, in a whole run, did not run."""
    problems = unproved(session.config)
    if not problems:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"guarantee tests that proved nothing in this run ({GUARANTEES}):",
             *(f"  {p}" for p in problems)]
    if reporter is not None:
        reporter.write_sep("=", "unproved guarantees", red=True)
        for line in lines:
            reporter.write_line(line)
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
