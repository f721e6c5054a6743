"""A libvirt domain as fleece sees it: the connection, the lookup, its disks, errors in fleece's voice.

Every libvirt call here blocks (the bindings are synchronous C); callers in
async code run them in a worker thread. libvirt's own habit of printing each
error to stderr is switched off: fleece reports the one line itself.
"""

from __future__ import annotations

import os
import shlex
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fleece.errors import BadInput, ExportError, FleeceError

DEFAULT_URI = "qemu:///system"
MIN_LIBVIRT = (7, 6, 0)
"""Pull-mode backups with per-disk ``backupmode``/``incremental`` and checkpoint redefinition
with validation; earlier releases lack some of it or hide the backup API behind a capability."""

JOB_OPERATION_BACKUP = 9
"""``VIR_DOMAIN_JOB_OPERATION_BACKUP`` (the bindings have it since 6.0 only)."""


class LibvirtError(FleeceError):
    """libvirt refused a call; the message carries libvirt's reason and what was left."""


class ConnectionLost(LibvirtError):
    """The connection to libvirtd broke (libvirtd restarted or stopped) in the middle of a call."""


def command(*words: str) -> str:
    """A command line the user can paste: every word shell-quoted (``--libvirt 'db server 2'``)."""
    return shlex.join(words)


def connection_lost(exc: Any) -> bool:
    """Whether libvirt error ``exc`` means the connection to libvirtd broke, not a refusal."""
    libvirt = bindings()
    return (exc.get_error_domain() in (libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE)
            or exc.get_error_code() in (libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT))


def bindings() -> Any:
    """The ``libvirt`` module, quietened; a clear error when the bindings are missing."""
    try:
        import libvirt
    except ImportError:
        raise FleeceError("--libvirt needs libvirt's Python bindings (Debian: apt install "
                          "python3-libvirt; scripts/bootstrap links them into .venv)") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def version_tuple(number: int) -> tuple[int, int, int]:
    """libvirt's ``major * 1000000 + minor * 1000 + micro`` as a tuple."""
    return number // 1_000_000, number // 1000 % 1000, number % 1000


def dotted(version: tuple[int, ...]) -> str:
    """``(9, 0, 0)`` → ``9.0.0``."""
    return ".".join(map(str, version))


def check_version(library: tuple[int, int, int], daemon: tuple[int, int, int]) -> None:
    """Refuse a libvirt (client library or daemon) older than :data:`MIN_LIBVIRT`."""
    for what, version in (("the libvirt library", library), ("libvirtd", daemon)):
        if version < MIN_LIBVIRT:
            raise LibvirtError(f"{what} is {dotted(version)}; fleece --libvirt needs {dotted(MIN_LIBVIRT)} "
                               "or later (pull-mode backups with checkpoints); nothing was changed")


@dataclass(frozen=True)
class DomainDisk:
    """One ``<disk device='disk'>`` of the domain."""

    target: str
    """``vda``: the name fleece's ``--drive`` and the restore point use."""
    format: str
    """The image format (``<driver type=…>``): checkpoints need ``qcow2``."""
    source: str
    """The image file or block device."""


def open_connection(uri: str | None) -> Any:
    """A read-write connection to libvirt at ``uri``.

    Default: ``$LIBVIRT_DEFAULT_URI`` as for virsh, else ``qemu:///system``
    (never libvirt's own guess, which picks the session daemon for non-root).
    """
    libvirt = bindings()
    uri = uri or os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"cannot connect to libvirt at {uri}: {message(exc)}; "
                           "nothing was changed") from None
    check_version(version_tuple(libvirt.getVersion()), version_tuple(conn.getLibVersion()))
    return conn


def lookup(conn: Any, name: str) -> Any:
    """The domain named ``name`` (or with that UUID); :class:`BadInput` when there is none."""
    libvirt = bindings()
    for find in (conn.lookupByName, conn.lookupByUUIDString):
        try:
            return find(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_INVALID_ARG):
                raise LibvirtError(f"libvirt cannot look up domain {name!r}: {message(exc)}") from None
    raise BadInput(f"libvirt has no domain {name!r} (see 'virsh list --all'); nothing was changed")


def is_running(dom: Any) -> bool:
    """Whether the domain's QEMU runs (running or paused)."""
    libvirt = bindings()
    return bool(dom.state()[0] in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED))


def require_running(dom: Any) -> None:
    """Backups need the domain's QEMU: refuse a domain that is not running."""
    libvirt = bindings()
    state = dom.state()[0]
    if state not in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED):
        names = {libvirt.VIR_DOMAIN_SHUTOFF: "shut off", libvirt.VIR_DOMAIN_CRASHED: "crashed",
                 libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended", libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down"}
        raise LibvirtError(f"domain {dom.name()} is not running ({names.get(state, 'state ' + str(state))}); "
                           "fleece backs up running domains; nothing was changed")


def live_xml(dom: Any) -> ET.Element:
    """The running domain's definition."""
    return ET.fromstring(dom.XMLDesc(0))


def bitmap_capable(disk: DomainDisk) -> bool:
    """Whether libvirt can keep a checkpoint's bitmap in the disk's image (qcow2 only)."""
    return disk.format == "qcow2"


def disks_of(xml: ET.Element) -> list[DomainDisk]:
    """The domain's disks (not CD-ROMs or floppies), in definition order."""
    disks = []
    for el in xml.findall("./devices/disk"):
        if el.get("device", "disk") != "disk":
            continue
        target = el.find("target")
        if target is None or not target.get("dev"):
            continue
        driver = el.find("driver")
        source = el.find("source")
        src = ""
        if source is not None:
            src = source.get("file") or source.get("dev") or source.get("name") or ""
        disks.append(DomainDisk(str(target.get("dev")), (driver.get("type") if driver is not None else None)
                                or "raw", src))
    return disks


def select_disks(dom_name: str, disks: list[DomainDisk], drives: list[str]) -> list[DomainDisk]:
    """The disks ``drives`` name (all disks when none is named); bad input for unknown ones.

    A disk in another format than qcow2 (raw) is chosen too: it cannot hold
    a checkpoint's bitmap, so it is backed up full every time.
    """
    by_target = {d.target: d for d in disks}
    chosen = []
    for drive in drives or list(by_target):
        disk = by_target.get(drive)
        if disk is None:
            raise BadInput(f"domain {dom_name} has no disk {drive!r} (its disks: "
                           f"{', '.join(by_target) or 'none'}); nothing was changed")
        chosen.append(disk)
    if not chosen:
        raise BadInput(f"domain {dom_name} has no disks to back up; nothing was changed")
    return chosen


def qemu_user(xml: ET.Element) -> tuple[int, int] | None:
    """The uid and gid the domain's QEMU runs as (its DAC label), or None when libvirt does not say."""
    for label in xml.findall("./seclabel[@model='dac']/label"):
        user, _, group = (label.text or "").partition(":")
        try:
            return int(user.lstrip("+")), int(group.lstrip("+"))
        except ValueError:
            return None
    return None


def message(exc: Any) -> str:
    """libvirt's own one-line reason."""
    text = str(exc.get_error_message() or exc).strip()
    return " ".join(text.split())


@contextmanager
def libvirt_errors(domain: str) -> Iterator[None]:
    """Turn any libvirt error the block did not handle into one line in fleece's voice."""
    libvirt = bindings()
    try:
        yield
    except libvirt.libvirtError as exc:
        kind = ConnectionLost if connection_lost(exc) else LibvirtError
        raise kind(f"libvirt failed on domain {domain}: {message(exc)}; see what is left with: "
                   + command("fleece", "status", "--libvirt", domain)) from None


def refused(what: str, exc: Any, left: str = "nothing was changed") -> ExportError:
    """An :class:`ExportError` saying libvirt refused ``what``, why, and what state was left."""
    return ExportError(f"libvirt refused to {what}: {message(exc)}; {left}")
