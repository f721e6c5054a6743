"""Every line of ``docs/guarantees.md`` names tests, every test it names exists, the README
only sums the list up and points to it, and a guarantee whose test skipped or did not run
fails the run (``tests/guarantee_check.py``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from guarantee_check import GUARANTEES, REFERENCE, guarantees, section

pytest_plugins = ["pytester"]

ROOT = Path(__file__).parent.parent
TESTS = Path(__file__).parent


def test_each_guarantee_names_a_test_that_exists() -> None:
    listed = guarantees(ROOT)
    assert listed, f"no {GUARANTEES}"
    bullets = re.split(r"\n- ", listed)[1:]
    assert len(bullets) >= 10
    for bullet in bullets:
        refs = REFERENCE.findall(bullet)
        assert refs, f"a guarantee without a test: {bullet[:80]!r}"
        for path, name in refs:
            source = ROOT / path
            assert source.exists(), f"{GUARANTEES} names {path}, which does not exist"
            assert re.search(rf"^def {name}\(", source.read_text(), re.M), (
                f"{GUARANTEES} names {path}::{name}, which does not exist")


def test_the_readme_sums_the_guarantees_up_and_points_to_the_one_list() -> None:
    """One source of truth: the README names no test (a second list would drift), links the
    list, and has a paragraph for each of its groups."""
    summary = section((ROOT / "README.md").read_text(), "## What fleece guarantees")
    assert summary, "the README has no 'What fleece guarantees' section"
    assert f"({GUARANTEES})" in summary
    assert not REFERENCE.findall(summary), "the README lists tests: they belong in " + GUARANTEES
    groups = re.findall(r"^\*\*(It [^*.]+)\*\*$", guarantees(ROOT) or "", re.M)
    assert len(groups) == 4, groups
    for group in groups:
        assert f"**{group}.**" in summary, f"the README does not sum up {group!r}"


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A small project: two guarantees, one proved by a test that skips as this user would."""
    pytester.syspathinsert(TESTS)
    pytester.mkdir("docs")
    pytester.path.joinpath(GUARANTEES).write_text(
        "# What fleece guarantees\n\n- one\n  `tests/test_a.py::test_proves`\n"
        "- two\n  `tests/test_b.py::test_skips`, `tests/test_b.py::test_param`\n")
    pytester.mkdir("tests")
    pytester.path.joinpath("tests/conftest.py").write_text(
        "from guarantee_check import (pytest_collection_modifyitems, pytest_deselected,\n"
        "    pytest_report_teststatus, pytest_sessionfinish)\n")
    pytester.path.joinpath("tests/test_a.py").write_text(
        "def test_proves():\n    assert 1 + 1 == 2\n\ndef test_other():\n    assert True\n")
    pytester.path.joinpath("tests/test_b.py").write_text(
        "import os, pytest\n\n"
        "def test_skips():\n    if not os.environ.get('PROVE'):\n        pytest.skip('needs PROVE')\n\n"
        "@pytest.mark.parametrize('x', [1, 2])\ndef test_param(x):\n    assert x\n")
    return pytester


def test_a_skipped_guarantee_test_fails_the_run_and_is_named(project: pytest.Pytester,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROVE", raising=False)
    res = project.runpytest("tests")
    assert res.ret == pytest.ExitCode.TESTS_FAILED
    res.assert_outcomes(passed=4, skipped=1)
    res.stdout.fnmatch_lines(["*unproved guarantees*", "  tests/test_b.py::test_skips: skipped"])
    # Run alone, its file is held to the same rule.
    assert project.runpytest("tests/test_b.py").ret == pytest.ExitCode.TESTS_FAILED
    monkeypatch.setenv("PROVE", "1")
    res = project.runpytest("tests")
    assert res.ret == pytest.ExitCode.OK
    assert "unproved" not in res.stdout.str()


def test_a_whole_run_must_run_every_guarantee_test_and_a_chosen_subset_says_it_is_partial(
        project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVE", "1")
    # A subset of files, or of tests (-k, --deselect, --ignore), is not held to the guarantees it
    # leaves out, but it says so instead of passing as if it had checked them.
    for args, why in ((["tests/test_a.py"], "its file is not in this run"),
                      (["tests", "-k", "other"], "deselected (-k 'other')"),
                      (["tests", "--deselect", "tests/test_b.py::test_skips"], "deselected (--deselect"),
                      (["tests", "--ignore", "tests/test_b.py"], "its file was left out (--ignore)")):
        res = project.runpytest(*args)
        assert res.ret == pytest.ExitCode.OK, args
        res.stdout.fnmatch_lines(["*partial run: guarantees not checked*", f"*{why}*"])
    res = project.runpytest("tests")
    assert res.ret == pytest.ExitCode.OK and "partial run" not in res.stdout.str()
    # A whole run in which a named test never ran (here: it vanished at collection) fails.
    project.path.joinpath("tests/test_b.py").write_text(
        "def test_skips():\n    pass\n\ndef test_param_renamed():\n    pass\n")
    res = project.runpytest("tests")
    assert res.ret == pytest.ExitCode.TESTS_FAILED
    res.stdout.fnmatch_lines(["*unproved guarantees*", "  tests/test_b.py::test_param: did not run*"])
    # So does a run of that file alone: it took the file in.
    assert project.runpytest("tests/test_b.py").ret == pytest.ExitCode.TESTS_FAILED


def test_a_guarantee_file_skipped_at_module_level_fails_the_run(project: pytest.Pytester,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVE", "1")
    source = project.path.joinpath("tests/test_b.py")
    source.write_text("import pytest\npytest.skip('no QEMU', allow_module_level=True)\n" + source.read_text())
    for args in (["tests"], ["tests/test_b.py"]):
        res = project.runpytest(*args)
        assert res.ret == pytest.ExitCode.TESTS_FAILED, args
        res.stdout.fnmatch_lines(["*unproved guarantees*",
                                  "  tests/test_b.py::test_skips: did not run (its file was skipped*"])


def test_a_guarantee_test_that_returns_early_fails_the_run_and_one_that_says_what_it_left_out_passes(
        project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVE", "1")
    project.path.joinpath("tests/test_a.py").write_text(
        "import sys\n\ndef test_proves():\n    def helper():\n        return 1\n"
        "    if sys.version_info > (3,):\n        return\n    assert helper() == 2\n\n"
        "def test_other():\n    assert True\n")
    res = project.runpytest("tests")
    assert res.ret == pytest.ExitCode.TESTS_FAILED
    res.stdout.fnmatch_lines(["*unproved guarantees*",
                              "  tests/test_a.py::test_proves: returns early (line 7)*"])
    project.path.joinpath("tests/test_a.py").write_text(
        "from guarantee_check import proved_in_part\n\n"
        "def test_proves(request):\n    def helper():\n        return 1\n"
        "    assert helper() == 1\n    proved_in_part(request, 'only the first half: QEMU 7.2')\n\n"
        "def test_other():\n    assert True\n")
    res = project.runpytest("tests")
    assert res.ret == pytest.ExitCode.OK
    res.stdout.fnmatch_lines(["*guarantees proved in part*",
                              "  tests/test_a.py::test_proves: only the first half: QEMU 7.2"])
