"""scripts/install as an operator runs it: fleece from a wheel, man pages, completion, units — and back out.

DESTDIR relocates every path the install writes (and skips apt and
systemctl), so the test installs into a scratch root, uses what it
installed from there, and checks that ``--uninstall`` leaves the root as
it found it, a config the operator changed excepted.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "scripts" / "install"


def _install(destdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DESTDIR": str(destdir)}
    return subprocess.run([str(INSTALL), *args], env=env, capture_output=True, text=True, timeout=600)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_install_gives_the_command_man_pages_completion_and_units_and_uninstall_takes_them_back(
        tmp_path: Path) -> None:
    dest = tmp_path / "root"
    dest.mkdir()
    (dest / "etc").mkdir()
    (dest / "etc" / "hosts").write_text("the operator's own file\n")
    before = _tree(dest)

    done = _install(dest, "--prefix", "/opt/fleece")
    assert done.returncode == 0, done.stderr
    fleece = dest / "usr" / "local" / "bin" / "fleece"
    assert os.readlink(fleece) == "/opt/fleece/bin/fleece"  # a link for the real root
    real = dest / "opt" / "fleece" / "bin" / "fleece"
    version = subprocess.run([str(real), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("fleece ") and "libnbd: 1." in version.stdout
    # From a wheel, not the checkout: the installed package lives in the venv.
    where = subprocess.run([str(dest / "opt" / "fleece" / "bin" / "python"), "-c",
                            "import fleece; print(fleece.__file__)"], capture_output=True, text=True,
                           check=True, cwd=tmp_path)
    assert where.stdout.startswith(str(dest / "opt" / "fleece" / "lib")), where.stdout

    man = subprocess.run(["man", "fleece-backup"], capture_output=True, text=True,
                         env={**os.environ, "MANPATH": str(dest / "usr" / "local" / "share" / "man"),
                              "MANWIDTH": "100"})
    assert man.returncode == 0 and "--repo" in man.stdout and "example:" in man.stdout, man.stderr
    completion = dest / "usr" / "local" / "share" / "bash-completion" / "completions" / "fleece"
    words = subprocess.run(
        ["bash", "-c", f'source "{completion}"; COMP_WORDS=(fleece re); COMP_CWORD=1; _shtab_fleece; '
                       'echo "${COMPREPLY[@]}"'], capture_output=True, text=True, check=True)
    assert words.stdout.split() == ["restore"]
    assert (dest / "usr" / "local" / "share" / "zsh" / "site-functions" / "_fleece").exists()
    unit = dest / "etc" / "systemd" / "system" / "fleece-backup@.service"
    assert "ExecStart=/usr/local/bin/fleece backup" in unit.read_text()
    assert not (dest / "etc" / "systemd" / "system" / "timers.target.wants").exists()  # not enabled
    example = dest / "etc" / "fleece" / "example.toml"
    assert example.stat().st_mode & 0o777 == 0o640

    # Again: nothing changes, nothing breaks; a config the operator edited stays theirs.
    example.write_text(example.read_text() + "# mine\n")
    again = _install(dest, "--prefix", "/opt/fleece")
    assert again.returncode == 0, again.stderr
    assert example.read_text().endswith("# mine\n")

    gone = _install(dest, "--uninstall", "--prefix", "/opt/fleece")
    assert gone.returncode == 0, gone.stderr
    assert _tree(dest) == before | {"etc/fleece", "etc/fleece/example.toml"}
    example.unlink()
    (dest / "etc" / "fleece").rmdir()
    assert _tree(dest) == before
    assert (dest / "etc" / "hosts").read_text() == "the operator's own file\n"


def test_bad_arguments_change_nothing(tmp_path: Path) -> None:
    for args in (["--prefix", "relative/dir"], ["--frobnicate"]):
        done = _install(tmp_path, *args)
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1, done.stderr
    assert _tree(tmp_path) == set()
    nothing = _install(tmp_path, "--uninstall")
    assert nothing.returncode == 0 and "nothing installed" in nothing.stderr
