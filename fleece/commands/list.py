"""``fleece list``: the restore points in a repository, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fleece.commands.common import add_json_option, add_repo_option, human_size, open_repository
from fleece.errors import RepositoryCorrupt
from fleece.repo.backends.base import ObjectMissing
from fleece.repo.format.point import RestorePoint
from fleece.repo.verification import Verification, newest


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``list`` command."""
    p = subparsers.add_parser("list", help="list the restore points in a repository")
    add_repo_option(p)
    p.add_argument("--vm", metavar="NAME", help="only this VM's points")
    add_json_option(p)
    p.set_defaults(func=run)


def point_summary(point: RestorePoint, verdict: Verification | None = None) -> dict[str, Any]:
    """The ``--json`` form of one point; ``verification`` is its newest verdict (or null)."""
    return {
        "id": point.id,
        "vm": point.vm,
        "created": point.created,
        "parent": point.parent,
        "disks": [
            {"name": d.name, "level": d.level, "size": d.virtual_size} for d in point.disks
        ],
        "stats": point.stats,
        "labels": point.labels,
        "verification": None if verdict is None else verdict.as_dict(),
    }


def run(args: argparse.Namespace) -> int:
    """List points; exit 2 when the repository does not exist."""
    repo = open_repository(args)
    # One damaged point must not hide the good ones: list those, name the
    # damaged ones on stderr, and exit 1 so that scripts notice.
    points: list[RestorePoint] = []
    damaged: list[str] = []
    for vm, point_id in repo.point_refs(args.vm):
        try:
            points.append(repo.load_point(vm, point_id))
        except (RepositoryCorrupt, ObjectMissing) as exc:
            if isinstance(exc, ObjectMissing):
                continue  # pruned while we listed
            damaged.append(point_id)
            sys.stderr.write(f"fleece: error: {exc} (see 'fleece verify')\n")
    rc = 1 if damaged else 0
    verdicts: dict[tuple[str, str], Verification] = {}
    for vm in sorted({p.vm for p in points}):  # one listing per VM, one read per verified point
        verdicts.update({(vm, pid): v for pid, v in newest(repo.backend, vm).items()})
    if args.json:
        json.dump({"points": [point_summary(p, verdicts.get((p.vm, p.id))) for p in points],
                   "damaged": damaged}, sys.stdout)
        sys.stdout.write("\n")
        return rc
    if not points:
        where = f" for VM {args.vm}" if args.vm else ""
        print(f"no restore points in {repo.url}{where}")
        return rc
    rows = [("ID", "VM", "CREATED", "PARENT", "VERIFIED", "DISKS")]
    for p in points:
        disks = ", ".join(f"{d.name} {d.level} {human_size(d.virtual_size)}" for d in p.disks)
        verdict = verdicts.get((p.vm, p.id))
        rows.append((p.id, p.vm, p.created, p.parent or "-",
                     "-" if verdict is None else _short(verdict.summary), disks))
    widths = [max(len(row[c]) for row in rows) for c in range(5)]
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row[:5], widths, strict=True)]
        print("  ".join([*cells, row[5]]))
    return rc


def _short(text: str, width: int = 60) -> str:
    """A verdict cut to fit a table cell (``verify --json`` and ``list --json`` have it whole)."""
    return text if len(text) <= width else text[: width - 1] + "…"
