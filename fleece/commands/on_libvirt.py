"""``--libvirt DOMAIN`` for ``export start|stop``, ``cleanup`` and ``status``: the same commands on
a libvirt domain, through libvirt's pull-mode backup API (``fleece.libvirt``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, TypeVar

from fleece.commands.common import human_size, print_json, say
from fleece.errors import BadInput
from fleece.fleecing.names import checkpoint_of
from fleece.libvirt import export as lv_export
from fleece.libvirt import offline
from fleece.libvirt.checkpoints import Checkpoint, list_checkpoints
from fleece.libvirt.domain import (
    bindings,
    command,
    disks_of,
    dotted,
    libvirt_errors,
    live_xml,
    lookup,
    open_connection,
    version_tuple,
)
from fleece.libvirt.job import JobState, running_job

T = TypeVar("T")


def check_connect(args: argparse.Namespace) -> None:
    """``--connect`` belongs to ``--libvirt``."""
    if getattr(args, "connect", None) and not getattr(args, "libvirt", None):
        raise BadInput("--connect URI goes with --libvirt DOMAIN")


def with_domain(args: argparse.Namespace, work: Callable[[Any], T]) -> T:
    """Run ``work(domain)`` on a connection to ``args.connect``, closed afterwards."""
    conn = open_connection(args.connect)
    try:
        with libvirt_errors(args.libvirt):
            return work(lookup(conn, args.libvirt))
    finally:
        conn.close()


def qga_flag(args: argparse.Namespace) -> bool:
    """``--qga`` with ``--libvirt``: freeze through libvirt's agent channel; a socket makes no sense."""
    if args.qga not in (None, "", "libvirt"):
        raise BadInput("with --libvirt, --qga takes no socket: libvirt talks to the guest agent")
    return args.qga is not None


def export_start(args: argparse.Namespace) -> int:
    """``fleece export start --libvirt DOMAIN``."""
    qga = qga_flag(args)
    if args.discard:
        raise BadInput("--discard: libvirt's pull-mode exports are read-only")
    export = with_domain(args, lambda dom: lv_export.start(
        dom, args.drive or [], checkpoint=args.checkpoint, level=args.level,
        scratch_dir=args.scratch_dir, qga=qga, log=say, owner="export"))
    if args.json:
        print_json(export.as_dict())
        return 0
    print(f"export up at checkpoint {export.checkpoint} (libvirt checkpoint {export.libvirt_checkpoint})")
    for d in export.disks:
        what = f"incremental since {d.since}, dirty bitmap {d.dirty_bitmap}" if d.since else "full"
        print(f"  {d.drive}: {d.uri}  {human_size(d.size)} ({d.size} bytes), {what}")
    print("end it with: " + command("fleece", "export", "stop", "--libvirt", args.libvirt) + " [--abort]")
    return 0


def export_stop(args: argparse.Namespace) -> int:
    """``fleece export stop --libvirt DOMAIN``."""
    print(with_domain(args, lambda dom: lv_export.stop(dom, abort=args.abort)))
    return 0


def cleanup(args: argparse.Namespace) -> int:
    """``fleece cleanup --libvirt DOMAIN``."""
    removed = with_domain(args, lambda dom: lv_export.cleanup(dom, log=say))
    if args.json:
        print_json({"removed": removed})
    elif removed:
        print(f"removed {', '.join(removed)}")
    else:
        print("nothing to clean up")
    return 0


def collect_status(dom: Any) -> dict[str, Any]:
    """Everything ``status --libvirt`` reports, as a JSON-ready dict."""
    libvirt = bindings()
    conn = dom.connect()
    states = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
              libvirt.VIR_DOMAIN_SHUTOFF: "shut off"}
    state = dom.state()[0]
    running = state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED)
    xml = live_xml(dom)
    disks = []
    for d in disks_of(xml):
        size = int(dom.blockInfo(d.target, 0)[0]) if running else None
        disks.append({"drive": d.target, "format": d.format, "file": d.source, "size": size})
    job = running_job(dom) if running else None
    job_state = JobState.load(job.scratch) if job is not None and job.scratch else None
    cps = list_checkpoints(dom)
    leftovers: list[str] = []
    if job is not None and job_state is not None and job_state.owner_gone():
        leftovers.append(f"backup job of killed fleece pid {job_state.pid}")
    for run in lv_export.ended_runs(dom, job):
        what = "being set up or ended by" if not run.process_exited() else "left by"
        leftovers.append(f"unfinished run of restore point {run.checkpoint} ({what} fleece pid "
                         f"{run.pid}, scratch directory {run.scratch})")
    return {
        "bitmaps": image_bitmaps(xml, cps, running),
        "vm": dom.name(),
        "uuid": dom.UUIDString(),
        "libvirt": dotted(version_tuple(conn.getLibVersion())),
        "qemu": dotted(version_tuple(conn.getVersion())),
        "status": states.get(state, f"state {state}"),
        "disks": disks,
        "checkpoints": [{"name": c.name, "point": checkpoint_of(c.name), "parent": c.parent,
                         "disks": list(c.disks), "fleece": c.point is not None} for c in cps],
        "backup_job": None if job is None else {
            "socket": job.socket, "fleece": job_state is not None,
            "checkpoint": job_state.checkpoint if job_state else None,
            "owner": job_state.owner if job_state else None,
            "drives": [d.drive for d in job_state.disks] if job_state else [],
        },
        "leftovers": leftovers,
    }


def image_bitmaps(xml: Any, cps: list[Checkpoint], running: bool) -> list[dict[str, Any]]:
    """fleece bitmaps stored in the disks' qcow2 images that no libvirt checkpoint names.

    Read from the image files (``qemu-img info -U``): a running QEMU stores
    the bitmaps it made only at its clean exit, so those made since the
    domain started do not show. ``usable``: stored at a clean exit (True),
    left by a QEMU that did not exit cleanly (False), or held by the running
    QEMU (None: the next backup checks it, and redefines its checkpoint when
    the repository holds the point).
    """
    named = {c.name for c in cps}
    found = []
    for disk in disks_of(xml):
        path = offline.local_image(disk)
        for b in (offline.image_bitmaps(path) or {}).values() if path is not None else ():
            if checkpoint_of(b.name) is None or b.name in named:
                continue
            usable = None if running and b.in_use else not b.in_use
            found.append({"drive": disk.target, "bitmap": b.name, "point": checkpoint_of(b.name),
                          "usable": usable})
    return found


def status(args: argparse.Namespace) -> int:
    """``fleece status --libvirt DOMAIN``."""
    st = with_domain(args, collect_status)
    if args.json:
        print_json(st)
        return 0
    print(f"domain {st['vm']}: libvirt {st['libvirt']}, QEMU {st['qemu']}, {st['status']}")
    for d in st["disks"]:
        size = f"{human_size(d['size'])} ({d['size']} bytes), " if d["size"] is not None else ""
        print(f"  {d['drive']}: {d['format']}, {size}{d['file']}")
    if not st["checkpoints"]:
        print("  no checkpoints")
    for c in st["checkpoints"]:
        print(f"  checkpoint {c['name']}" + (f" (parent {c['parent']})" if c["parent"] else "")
              + f" on {', '.join(c['disks']) or 'no disk'}" + ("" if c["fleece"] else " (not fleece's)"))
    for b in st["bitmaps"]:
        how = {True: "stored intact", False: "inconsistent: QEMU did not exit cleanly; unusable",
               None: "held by the running QEMU"}[b["usable"]]
        print(f"  bitmap {b['bitmap']} on {b['drive']} has no libvirt checkpoint ({how})"
              + ("; the next backup redefines the checkpoint from it when the newest restore point "
                 f"of the VM in the repository is {b['point']}" if b["usable"] is not False else ""))
    job = st["backup_job"]
    if job is None:
        print("  no backup job")
    elif job["fleece"] and job["owner"] == "session":
        print(f"  a fleece backup holds an export at checkpoint {job['checkpoint']} "
              f"({', '.join(job['drives'])}, socket {job['socket']}); it ends it itself (if its process "
              "is gone, the next backup or " + command("fleece", "cleanup", "--libvirt", st["vm"]) + " does)")
    elif job["fleece"]:
        print(f"  a fleece export is up at checkpoint {job['checkpoint']} ({', '.join(job['drives'])}, "
              f"socket {job['socket']}): end it with "
              + command("fleece", "export", "stop", "--libvirt", st["vm"]))
    else:
        print(f"  a backup job that is not fleece's is running (socket {job['socket']})")
    if st["leftovers"]:
        print(f"  leftovers of an interrupted fleece run: {', '.join(st['leftovers'])} (the next fleece "
              "backup finishes them, or now: " + command("fleece", "cleanup", "--libvirt", st["vm"]) + ")")
    return 0
