"""``--config FILE``: the same settings as the command line, from TOML.

Keys are the long option names with ``-`` or ``_``; ``drive`` may be a list.
The command line wins over the file. Unknown keys are an error, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path
from typing import Any

from fleece.errors import BadInput

# What every command that opens a repository reads from --config (others' keys are theirs).
REPOSITORY_SETTINGS: dict[str, type] = {"repo": str, "passphrase_file": str, "vm": str}


def apply_repository_settings(args: argparse.Namespace) -> None:
    """Resolve the repository of a command that takes ``--repo``, before it runs.

    ``--repo`` wins, then ``repo`` in ``--config``, then ``$FLEECE_REPOSITORY``;
    ``passphrase_file`` and ``vm`` come from the file where the command has them
    and the command line left them unset. Other keys in the file (a per-VM file
    also holds the backup's settings) are left to the commands that read them.
    """
    if not hasattr(args, "repo"):
        return
    path = getattr(args, "config", None)
    if path:
        doc = _load(path)
        for attr, want in REPOSITORY_SETTINGS.items():
            value = doc.get(attr, doc.get(attr.replace("_", "-")))
            if value is None or not hasattr(args, attr) or getattr(args, attr) is not None:
                continue
            if not isinstance(value, want):
                raise BadInput(f"config file {path}: {attr} must be a {want.__name__}")
            setattr(args, attr, value)
    if args.repo is None:
        args.repo = os.environ.get("FLEECE_REPOSITORY") or None
    if args.repo is None and getattr(args, "repo_required", False):
        raise BadInput(f"{args.command} needs a repository: --repo URL, repo = … in --config, "
                       "or $FLEECE_REPOSITORY")


def apply_config(args: argparse.Namespace, allowed: dict[str, type], section: str) -> None:
    """Fill unset (None) attributes of ``args`` from the TOML file in ``args.config``.

    ``allowed`` maps attribute names to the type the file must hold. Settings
    may sit at the top level or under a ``[section]`` table.
    """
    path = getattr(args, "config", None)
    if not path:
        return
    doc = _load(path)
    # A top-level table is another command's section ([prune], [gc]) unless it
    # is a setting whose value is a table (labels).
    settings: dict[str, Any] = {
        k: v for k, v in doc.items()
        if not isinstance(v, dict) or allowed.get(k.replace("-", "_")) is dict
    }
    settings.update(doc.get(section, {}))
    for attr, value in _checked(path, settings, allowed).items():
        if getattr(args, attr, None) in (None, []):
            setattr(args, attr, value)


def read_table(args: argparse.Namespace, table: str, allowed: dict[str, type]) -> dict[str, Any] | None:
    """The ``[table]`` of ``--config`` as checked settings, or None when there is no such table.

    For a table that is not a command's own section: ``[init]``, which tells
    ``backup`` and ``copy`` to create a repository, and how.
    """
    path = getattr(args, "config", None)
    if not path:
        return None
    found = _load(path).get(table)
    if found is None:
        return None
    if not isinstance(found, dict):
        raise BadInput(f"config file {path}: {table} must be a table ([{table}])")
    return _checked(path, found, allowed, f"[{table}] ")


def _load(path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInput(f"config file {path} does not exist") from None
    except OSError as exc:
        raise BadInput(f"cannot read config file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"config file {path} is not valid TOML: {exc}") from None


def _checked(path: str, settings: dict[str, Any], allowed: dict[str, type],
             where: str = "") -> dict[str, Any]:
    """``settings`` with attribute names, each of the type ``allowed`` says; exit 2 otherwise."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        attr = key.replace("-", "_")
        if attr == "drives":
            attr = "drive"
        if attr not in allowed:
            raise BadInput(f"config file {path}: unknown setting {where}{key!r}")
        want = allowed[attr]
        if want is list:
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise BadInput(f"config file {path}: {where}{key} must be a string or a list of strings")
        elif want is dict:
            if not isinstance(value, dict):
                raise BadInput(f"config file {path}: {where}{key} must be a table")
        elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise BadInput(f"config file {path}: {where}{key} must be a {want.__name__}")
        out[attr] = value
    return out
