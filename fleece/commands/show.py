"""``fleece show``: what one restore point holds — disks, and the machine when one was recorded."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fleece.commands.common import add_json_option, add_repo_option, human_size, open_repository
from fleece.errors import BadInput
from fleece.machine.record import load_file, machine_of
from fleece.repo.format.point import RestorePoint


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``show`` command."""
    p = subparsers.add_parser("show", help="what a restore point holds: disks and the recorded machine")
    add_repo_option(p)
    p.add_argument("point", metavar="POINT", help="point id, a unique prefix of one, or 'latest'")
    p.add_argument("--vm", metavar="NAME", help="the VM, where 'latest' or a prefix needs it")
    p.add_argument("--definition", action="store_true",
                   help="print the recorded definition (domain XML or QEMU command line) as recorded")
    add_json_option(p)
    p.set_defaults(func=run)


def describe(point: RestorePoint) -> dict[str, Any]:
    """The ``--json`` form."""
    record = machine_of(point)
    machine = None if record is None else {
        "kind": record.kind, **record.summary, "moments": record.moments,
        "files": {k: {"size": f.size, "sha256": f.sha256, "chunks": len(f.chunks)}
                  for k, f in record.files.items()}}
    return {"id": point.id, "vm": point.vm, "created": point.created, "parent": point.parent,
            "disks": [{"name": d.name, "level": d.level, "size": d.virtual_size} for d in point.disks],
            "machine": machine}


def run(args: argparse.Namespace) -> int:
    """Show; exit 2 for an unknown point, 1 for a damaged one."""
    repo = open_repository(args)
    point = repo.find_point(args.point, args.vm)
    record = machine_of(point)
    if args.definition:
        if record is None:
            raise BadInput(f"restore point {point.id} has no machine recorded (it holds disks only)")
        sys.stdout.write(load_file(repo, record.files["definition"], "definition").decode())
        return 0
    doc = describe(point)
    if args.json:
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(f"point {point.id} of {point.vm}, created {point.created}")
    m = doc["machine"] or {}
    disks = {d.get("target"): d for d in m.get("disks", [])}
    for d in point.disks:
        extra = disks.get(d.name, {})
        bus = f", bus {extra['bus']}" if extra.get("bus") else ""
        serial = f", serial {extra['serial']}" if extra.get("serial") else ""
        print(f"  disk {d.name}: {human_size(d.virtual_size)} ({d.level}{bus}{serial})")
    if record is None:
        print("  no machine recorded")
        return 0
    memory = human_size(m["memory_bytes"]) if m.get("memory_bytes") else "?"
    print(f"  machine ({record.kind}): {m.get('machine_type')}, {m.get('cpus')} CPUs, {memory} memory, "
          f"firmware {m.get('firmware')}")
    for nic in m.get("nics", []):
        print(f"  nic {nic.get('model')} {nic.get('mac')} ({nic.get('type')})")
    for role, f in record.files.items():
        print(f"  {role}: {f.size} bytes")
    if m.get("not_recorded"):
        print(f"  not recorded: {m['not_recorded']}")
    if m.get("tpm"):
        print(f"  tpm: {m['tpm'].get('model')} {m['tpm'].get('backend')} {m['tpm'].get('version') or ''}")
    return 0
