"""The point-in-time export of a libvirt domain's disks: set up, end (commit or abort), clean up.

Set-up: refuse a domain that is busy (a backup job, or what a killed run
left), choose each disk's level from the checkpoints (``checkpoints``), make
the private scratch directory and the state file, freeze the guest if asked,
``virDomainBackupBegin`` (job and new checkpoint in one transaction), thaw.

End: record the outcome in the state file, ``virDomainAbortJob``, then
commit (delete every older fleece checkpoint: the new one records from now
on) or abort (delete the new one: the parent never stopped recording), and
remove the scratch directory. A run killed anywhere in between is finished
by :func:`cleanup` — as an abort, unless the state file says the commit had
been decided.

Everything here blocks; async callers run it in a worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fleece.errors import BadInput, ExportError, LeftoversPresent
from fleece.fleecing.checkpoints import LEVELS
from fleece.fleecing.names import (
    SOCKET_FILE,
    checkpoint_bitmap,
    checkpoint_of,
    dirty_bitmap_context,
    new_point_id,
)
from fleece.fleecing.setup import default_scratch_parent
from fleece.libvirt import checkpoints
from fleece.libvirt.domain import (
    ConnectionLost,
    bindings,
    bitmap_capable,
    command,
    connection_lost,
    disks_of,
    is_running,
    live_xml,
    message,
    qemu_user,
    refused,
    require_running,
    select_disks,
)
from fleece.libvirt.job import (
    SCRATCH_PREFIX,
    JobDisk,
    JobState,
    RunningJob,
    backup_xml,
    end_job,
    make_scratch,
    remove_scratch,
    running_job,
)
from fleece.testing import Phase, pause_point

_log = logging.getLogger(__name__)
TRIM_ALIGNMENT = 65536
Log = Callable[[str], None]


@dataclass
class LibvirtDiskExport:
    """One disk of a live libvirt export (the fields of ``fleece.fleecing.DiskExport`` a reader needs)."""

    drive: str
    uri: str
    export_name: str
    size: int
    dirty_bitmap: str | None
    """``qemu:dirty-bitmap:backup-vda`` for an incremental; None for a full."""
    checkpoint: str
    since: str | None
    level: str
    reason: str | None
    discard: bool = False
    """libvirt's pull-mode exports are read-only: no trims."""
    bitmap_granularity: int | None = None
    """Not reported by libvirt's backup API."""

    def as_dict(self) -> dict[str, Any]:
        """The JSON form ``fleece export start --libvirt --json`` prints."""
        return {"drive": self.drive, "uri": self.uri, "size": self.size, "dirty_bitmap": self.dirty_bitmap,
                "checkpoint": self.checkpoint, "since": self.since, "level": self.level,
                "reason": self.reason, "discard": self.discard, "export": self.export_name}


@dataclass
class LibvirtExport:
    """A live pull-mode backup job of one domain, all disks at one point in time."""

    domain: str
    checkpoint: str
    disks: list[LibvirtDiskExport]
    socket_path: str
    scratch_dir: str
    pause_ms: float | None = None
    """libvirt does not report the guest's pause."""
    trim_alignment: int = TRIM_ALIGNMENT
    libvirt_checkpoint: str = field(default="")

    def as_dict(self) -> dict[str, Any]:
        """The JSON form ``fleece export start --libvirt --json`` prints."""
        return {"checkpoint": self.checkpoint, "disks": [d.as_dict() for d in self.disks],
                "pause_ms": self.pause_ms, "socket": self.socket_path, "domain": self.domain,
                "libvirt_checkpoint": self.libvirt_checkpoint, "trim_alignment": self.trim_alignment}


def recover(dom: Any, log: Log, *, act: bool = True, exports: bool = False) -> list[str]:
    """Finish what certainly dead fleece runs left on ``dom``; what was removed, one item each.

    Refused (changing nothing): another tool's backup job, a fleece export
    that is up (``export start``), a fleece run whose process may be alive.
    A run whose process has certainly exited (``JobState.process_exited``),
    with its backup job still running or gone with the domain's QEMU, is
    finished as :func:`cleanup` does: as an abort, unless its state file says
    the commit had been decided (its point is stored). Each finished run is
    said in one line. ``act=False`` only checks; ``exports`` takes down an
    export left up by ``export start`` too, as an abort.
    """
    name = dom.name()
    job = running_job(dom) if is_running(dom) else None
    done: list[str] = []
    if job is not None:
        state = JobState.load(job.scratch) if job.scratch else None
        if state is None:
            raise ExportError(f"another backup job is running on domain {name} (not fleece's: NBD socket "
                              f"{job.socket or 'none'}); it was left alone; nothing was changed")
        if state.owner == "export" and exports:
            if act:
                done += _finish(dom, state, "fleece export start", log)
        elif state.owner == "export":
            raise LeftoversPresent(f"a fleece export of domain {name} is up (checkpoint {state.checkpoint}); "
                                   "end it with: " + command("fleece", "export", "stop", "--libvirt", name)
                                   + "; nothing was changed")
        elif not state.owner_gone():
            raise LeftoversPresent(f"another fleece backup of domain {name} is running (pid {state.pid}); "
                                   "nothing was changed")
        elif act:
            done += _finish(dom, state, f"fleece pid {state.pid}, which has exited,", log)
    for state in ended_runs(dom, job):
        if not state.process_exited():
            raise LeftoversPresent(f"another fleece run on domain {name} is under way (pid {state.pid}, "
                                   f"scratch directory {state.scratch}); nothing was changed")
        if act:
            done += _finish(dom, state, f"fleece pid {state.pid}, whose backup job had ended,", log)
    return done


def ended_runs(dom: Any, job: RunningJob | None) -> list[JobState]:
    """The state files of this domain's runs that no running job belongs to: in the scratch
    directories its fleece checkpoints name, and in the default scratch place."""
    places = {s for s in (checkpoints.scratch_of(c) for c in checkpoints.fleece_checkpoints(dom)) if s}
    places |= {str(p) for p in default_scratch_parent().glob(f"{SCRATCH_PREFIX}*")}
    uuid = dom.UUIDString()
    found = []
    for place in sorted(places):
        state = JobState.load(place)
        if state is None or state.uuid != uuid or (job is not None and job.socket == state.socket):
            continue
        found.append(state)
    return found


def _finish(dom: Any, state: JobState, who: str, log: Log) -> list[str]:
    """End a dead run's job and checkpoint as it had decided (abort unless commit), and say so."""
    committed = state.outcome == "commit"
    done = end(dom, state, commit=False, log=log)
    stored = f" (restore point {state.checkpoint} is stored)" if state.owner == "session" else ""
    what = (f"finished the commit it had decided{stored}" if committed
            else f"aborted its export of restore point {state.checkpoint}")
    log(f"{who} left its libvirt backup of domain {state.domain} unfinished: {what}; removed "
        f"{', '.join(done) or 'nothing'}")
    return done


def preflight(dom: Any, drives: list[str]) -> None:
    """Everything :func:`start` checks before it changes anything."""
    require_running(dom)
    select_disks(dom.name(), disks_of(live_xml(dom)), drives)
    recover(dom, _log.warning, act=False)


def start(
    dom: Any,
    drives: list[str],
    *,
    checkpoint: str | None = None,
    level: str = "auto",
    parent_ok: Callable[[str, str], bool] | None = None,
    known_point: str | None = None,
    scratch_dir: Path | None = None,
    qga: bool = False,
    log: Log | None = None,
    owner: str = "export",
) -> LibvirtExport:
    """Begin the pull-mode backup job of ``drives`` (all disks when empty) and leave it running.

    ``level``, ``parent_ok`` and ``scratch_dir`` as for
    ``fleece.fleecing.point_in_time_export``; ``known_point`` is the newest
    restore point the caller holds (redefined as a checkpoint if libvirt
    lost it); ``qga`` freezes the guest's filesystems through libvirt's
    guest agent around the point. What a dead run left is finished first
    (:func:`recover`), stale checkpoints are dropped (``checkpoints.heal``),
    each said. On failure nothing else is left changed (except a checkpoint
    redefined from intact bitmaps) and the error is raised.
    """
    libvirt = bindings()
    log = log or _log.warning
    if level not in LEVELS:
        raise BadInput(f"unknown level {level!r} (expected one of {', '.join(LEVELS)})")
    require_running(dom)
    xml = live_xml(dom)
    all_disks = disks_of(xml)
    chosen = select_disks(dom.name(), all_disks, drives)
    point = checkpoint or new_point_id()
    if checkpoint_of(checkpoint_bitmap(point)) is None:
        raise BadInput(f"--checkpoint {point!r} is not a fleece point id (like {new_point_id()})")
    recover(dom, log)
    healed = checkpoints.heal(dom, all_disks)
    choices, redefined = checkpoints.choose_levels(dom, chosen, level, parent_ok or (lambda _d, _p: True),
                                                   known_point, log, healed)
    full = {d: c.reason for d, c in choices.items() if c.parent is None}
    if level == "incremental" and full:
        for name in redefined:  # leave libvirt as found
            checkpoints.delete(dom, name, metadata_only=True)
        reasons = dict.fromkeys(r for r in full.values() if r)  # one disk's or the same for all
        left = "stale checkpoint metadata was removed" if healed.done else "nothing was changed"
        raise ExportError("--level incremental, but " + "; ".join(reasons) + f"; {left}")
    for reason in dict.fromkeys(full.values()):
        if reason and level == "auto":
            log(f"full because {reason}")

    targets = [d.target for d in chosen]
    with_bitmap = [d.target for d in chosen if bitmap_capable(d)]
    sizes = {target: int(dom.blockInfo(target, 0)[0]) for target in targets}
    scratch = make_scratch(scratch_dir, qemu_user(xml))
    try:
        state = JobState(domain=dom.name(), uuid=dom.UUIDString(), checkpoint=point, scratch=str(scratch),
                         socket=str(scratch / SOCKET_FILE), owner=owner)
        for target in targets:
            c = choices[target]
            state.disks.append(JobDisk(drive=target, size=sizes[target], parent=c.parent,
                                       level="incremental" if c.parent else "full",
                                       reason=c.reason if c.parent is None and level == "auto" else None,
                                       export=target))
        state.save()  # before libvirt is touched: a kill from here on is found by cleanup
        froze = False
        if qga:
            try:
                dom.fsFreeze(None, 0)
                froze = True
            except libvirt.libvirtError as exc:
                raise refused("freeze the guest's filesystems through its agent", exc) from None
        try:
            dom.backupBegin(backup_xml(state, [d.target for d in all_disks]),
                            checkpoints.new_checkpoint_xml(point, with_bitmap, [d.target for d in all_disks],
                                                           str(scratch)), 0)
        except libvirt.libvirtError as exc:
            raise refused("begin the backup job", exc) from None
        finally:
            if froze:
                try:
                    dom.fsThaw(None, 0)
                except libvirt.libvirtError as exc:
                    log(f"could not thaw the guest's filesystems through libvirt: {message(exc)}")
    except BaseException:
        remove_scratch(scratch)
        raise
    job = running_job(dom)
    bitmaps = job.export_bitmaps if job else {}
    for d in state.disks:
        if d.parent is not None:
            if d.drive not in bitmaps:
                # Never read a full disk as an incremental: end it all, as an abort.
                end(dom, state, commit=False, log=log)
                raise ExportError(f"libvirt exported no dirty bitmap for {d.drive}; the backup job was "
                                  "aborted and its checkpoint removed")
            d.dirty_bitmap = dirty_bitmap_context(bitmaps[d.drive])
    state.save()
    return describe(state)


def describe(state: JobState) -> LibvirtExport:
    """The export a state file describes."""
    disks = [LibvirtDiskExport(
        drive=d.drive, uri=f"nbd+unix:///{quote(d.export)}?socket={quote(state.socket)}",
        export_name=d.export, size=d.size, dirty_bitmap=d.dirty_bitmap, checkpoint=state.checkpoint,
        since=d.parent, level=d.level, reason=d.reason) for d in state.disks]
    return LibvirtExport(domain=state.domain, checkpoint=state.checkpoint, disks=disks,
                         socket_path=state.socket, scratch_dir=state.scratch,
                         libvirt_checkpoint=checkpoint_bitmap(state.checkpoint))


def end(dom: Any, state: JobState, *, commit: bool, log: Log | None = None) -> list[str]:
    """End the job of ``state`` and commit or abort its checkpoint; what was done, one item each.

    The outcome is recorded in the state file first: whoever finishes a run
    cut short here (:func:`recover`) does what was decided. A shut-off domain
    has no job; its checkpoints are removed offline (``checkpoints.remove``).
    A broken connection to libvirtd raises :class:`ConnectionLost`.
    """
    libvirt = bindings()
    done: list[str] = []
    if state.outcome is None:
        state.outcome = "commit" if commit else "abort"
        if Path(state.scratch).is_dir():
            state.save()
    commit = state.outcome == "commit"
    new = checkpoint_bitmap(state.checkpoint)
    try:
        if is_running(dom):
            job = running_job(dom)
            if job is not None and job.socket == state.socket and end_job(dom):
                done.append("backup job")
        pause_point(Phase.BEFORE_COMMIT)
        ours = checkpoints.fleece_checkpoints(dom)
        gone = checkpoints.covered(ours, new) if commit else [c for c in ours if c.name == new]
        if gone:
            disks = disks_of(live_xml(dom))
            done += [checkpoints.remove(dom, cp, disks) for cp in gone]
    except libvirt.libvirtError as exc:
        kind = ConnectionLost if connection_lost(exc) else ExportError
        raise kind(f"libvirt failed while ending the backup of domain {state.domain}: {message(exc)}; the "
                   "next fleece backup finishes it (or now: "
                   + command("fleece", "cleanup", "--libvirt", state.domain) + ")") from None
    if remove_scratch(state.scratch):
        done.append(f"scratch directory {state.scratch}")
    return done


def stop(dom: Any, *, abort: bool) -> str:
    """End the export that is up on ``dom`` (started by any process); one line saying what was done.

    An export a running ``fleece backup`` holds is its own: refused. One whose
    backup has exited is finished as :func:`cleanup` does.
    """
    job = running_job(dom) if is_running(dom) else None
    state = JobState.load(job.scratch) if job is not None and job.scratch else None
    name = dom.name()
    if state is None:
        raise ExportError(f"no fleece export is up on domain {name}; nothing was changed")
    drives = ", ".join(d.drive for d in state.disks)
    if state.owner == "session":
        if not state.owner_gone():
            raise LeftoversPresent(f"the export of domain {name} belongs to a fleece backup that is running "
                                   f"(pid {state.pid}); it ends the export itself when it is done; nothing "
                                   "was changed")
        committed = state.outcome == "commit"
        done = end(dom, state, commit=False)
        return (f"the fleece backup that held the export of {drives} (pid {state.pid}) has exited: "
                + ("finished the commit it had decided" if committed else "aborted, as 'fleece cleanup' does")
                + f"; removed {', '.join(done)}")
    end(dom, state, commit=not abort)
    new = checkpoint_bitmap(state.checkpoint)
    if abort:
        return (f"stopped the export of {drives}; aborted: removed "
                f"checkpoint {new}, the previous one (if any) still records every write")
    return f"stopped the export of {drives}; committed: checkpoint {new} records writes from now on"


def cleanup(dom: Any, log: Log | None = None) -> list[str]:
    """Remove what killed fleece runs left on ``dom``; what was removed, one item each.

    As :func:`recover` (a run that had decided to commit is finished as a
    commit, and that is said), then stale checkpoints are dropped
    (``checkpoints.heal``): on a running domain through QEMU, on a shut-off
    one from the images with ``qemu-img``. A backup job that is not
    fleece's or a fleece run still running is left alone (refused); an
    export left up by ``export start`` is taken down as an abort.
    """
    log = log or _log.warning
    done = recover(dom, log, exports=True)
    healed = checkpoints.heal(dom, disks_of(live_xml(dom)))
    for reason in healed.broken.values():
        log(reason)
    return done + healed.done
