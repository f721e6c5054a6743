"""libvirt's pull-mode backup job: its XML, its state file, its private scratch directory.

``virDomainBackupBegin`` with ``<domainbackup mode='pull'>`` makes libvirt
start QEMU's NBD server on a unix socket we name, put a copy-before-write
filter over each disk with a scratch image we name (both in fleece's private
0700 scratch directory), export each disk as ``<target>`` with the dirty
bitmap since the parent checkpoint as ``qemu:dirty-bitmap:<exportbitmap>``
(``backup-vda`` on libvirt 9; read back from the job's XML, never assumed),
and create the new checkpoint in the same transaction. The job runs until
``virDomainAbortJob``.

The state file (``fleece-libvirt-export.json``, version 1) lets
``export stop`` and ``cleanup`` finish from another process::

    {"version": 1, "domain", "uuid", "checkpoint", "scratch", "socket", "owner",
     "pid", "host", "boot_id", "pid_ns", "start_time", "machine_id",
     "outcome": null | "commit" | "abort",
     "disks": [{"drive", "size", "parent", "level", "reason", "export", "dirty_bitmap"}]}
"""

from __future__ import annotations

import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from socket import gethostname
from typing import Any, ClassVar

from fleece.errors import BadInput, ExportError
from fleece.fleecing.names import SOCKET_FILE, checkpoint_bitmap
from fleece.fleecing.setup import default_scratch_parent
from fleece.fleecing.state import ScratchState
from fleece.libvirt.domain import JOB_OPERATION_BACKUP, bindings
from fleece.liveness import IDENTITY_FIELDS, Owner

STATE_FILE = "fleece-libvirt-export.json"
SCRATCH_PREFIX = "fleece-lv-"
MAX_SOCKET_PATH = 107


@dataclass
class JobDisk:
    """One disk of the backup job."""

    drive: str
    size: int
    parent: str | None
    level: str
    reason: str | None
    export: str
    dirty_bitmap: str | None = None
    """The NBD meta context libvirt exports the dirty bitmap under (incrementals)."""


@dataclass
class JobState(ScratchState):
    """What one export set up, for whoever ends it."""

    FILE_NAME: ClassVar[str] = STATE_FILE

    domain: str
    uuid: str
    checkpoint: str
    scratch: str
    socket: str
    owner: str = "export"
    """``export``: left up by ``export start``; ``session``: held by process ``pid`` while it runs."""
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=gethostname)
    boot_id: str | None = field(default_factory=lambda: Owner.current().boot_id)
    pid_ns: int | None = field(default_factory=lambda: Owner.current().pid_ns)
    start_time: int | None = field(default_factory=lambda: Owner.current().start_time)
    machine_id: str | None = field(default_factory=lambda: Owner.current().machine_id)
    outcome: str | None = None
    disks: list[JobDisk] = field(default_factory=list)

    def process_exited(self) -> bool:
        """Whether the process that wrote this state (whatever its owner) has certainly exited
        (:meth:`fleece.liveness.Owner.certainly_dead`)."""
        return self.process.certainly_dead()

    @classmethod
    def load(cls, scratch: str | Path) -> JobState | None:
        """The state in ``scratch``, or None if there is none (or it is unreadable)."""
        try:
            raw = cls.read(Path(scratch) / STATE_FILE, "fleece libvirt export state")
        except ExportError:
            return None
        if raw is None:
            return None
        disks = [JobDisk(**d) for d in raw.pop("disks", [])]
        # An older file does not say: unknown, never this process's identity.
        identity = {f: raw.pop(f, None) for f in IDENTITY_FIELDS}
        try:
            return cls(disks=disks, **identity, **raw)
        except TypeError:
            return None  # not a state this version wrote


def make_scratch(parent: Path | None, owner: tuple[int, int] | None) -> Path:
    """A private (0700) directory for the scratch images, the NBD socket and the state file.

    Owned by the user QEMU runs as (``owner``, from the domain's DAC label),
    because QEMU itself creates the socket and writes the scratch images there.
    """
    parent = parent or default_scratch_parent()
    try:
        scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=parent))
    except OSError as exc:
        raise BadInput(f"cannot make a scratch directory in {parent}: {exc.strerror}; "
                       "nothing was changed") from None
    if len(os.fsencode(scratch / SOCKET_FILE)) > MAX_SOCKET_PATH:
        scratch.rmdir()
        raise BadInput(f"scratch directory {parent} is too deep for a unix socket path; nothing was changed")
    if owner is not None and owner != (os.getuid(), os.getgid()):
        os.chown(scratch, *owner)
    return scratch


def remove_scratch(scratch: str | Path) -> bool:
    """Delete a scratch directory fleece made (only one with fleece's prefix); whether it existed."""
    path = Path(scratch)
    if not path.name.startswith(SCRATCH_PREFIX) or not path.is_dir():
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def backup_xml(state: JobState, all_disks: list[str]) -> str:
    """The ``<domainbackup mode='pull'>`` of ``state``: the asked disks exported, the others not."""
    root = ET.Element("domainbackup", mode="pull")
    ET.SubElement(root, "server", transport="unix", socket=state.socket)
    disks = ET.SubElement(root, "disks")
    asked = {d.drive: d for d in state.disks}
    for target in all_disks:
        d = asked.get(target)
        if d is None:
            ET.SubElement(disks, "disk", name=target, backup="no")
            continue
        attrs = {"name": target, "backup": "yes", "type": "file", "exportname": d.export,
                 "backupmode": "full"}
        if d.parent is not None:
            attrs |= {"backupmode": "incremental", "incremental": checkpoint_bitmap(d.parent)}
        el = ET.SubElement(disks, "disk", attrs)
        ET.SubElement(el, "scratch", file=str(Path(state.scratch) / f"{d.export}.scratch.qcow2"))
    return ET.tostring(root, encoding="unicode")


@dataclass(frozen=True)
class RunningJob:
    """The backup job running on a domain, as libvirt describes it."""

    socket: str | None
    """The NBD server's unix socket (pull mode), else None."""
    export_bitmaps: dict[str, str]
    """Per disk target, the name of the exported dirty bitmap (incrementals only)."""

    @property
    def scratch(self) -> str | None:
        """fleece's scratch directory, if this job is one of fleece's."""
        if self.socket and Path(self.socket).parent.name.startswith(SCRATCH_PREFIX):
            return str(Path(self.socket).parent)
        return None


def running_job(dom: Any) -> RunningJob | None:
    """The domain's backup job, or None; another kind of job is refused as busy."""
    libvirt = bindings()
    stats = dom.jobStats(0)
    if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
        return None
    if stats.get("operation") != JOB_OPERATION_BACKUP:
        raise ExportError(f"domain {dom.name()} is busy with another libvirt job (operation "
                          f"{stats.get('operation')}); nothing was changed")
    try:
        xml = ET.fromstring(dom.backupGetXMLDesc(0))
    except libvirt.libvirtError:
        return None  # it ended between the two calls
    server = xml.find("server")
    socket = server.get("socket") if server is not None and server.get("transport") == "unix" else None
    bitmaps = {str(d.get("name")): str(d.get("exportbitmap")) for d in xml.findall("./disks/disk")
               if d.get("exportbitmap")}
    return RunningJob(socket, bitmaps)


def end_job(dom: Any) -> bool:
    """End the domain's backup job (``virDomainAbortJob``); False if none was running."""
    libvirt = bindings()
    try:
        dom.abortJob()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:  # no job
            return False
        raise
    return True
