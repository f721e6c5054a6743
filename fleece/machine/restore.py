"""Bringing a whole machine back: disks, UEFI variables and TPM state into a directory,
and (libvirt) a domain defined on them (docs/machines.md)."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import tarfile
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleece.errors import BadInput, FleeceError
from fleece.libvirt.domain import LibvirtError, bindings, message
from fleece.machine.capture import tpm_state_dir
from fleece.machine.qemu import rewrite_argv
from fleece.machine.record import MachineRecord, load_file
from fleece.repo.format.point import RestorePoint
from fleece.repo.repository import Repository
from fleece.restore.image import restore_raw
from fleece.restore.targets import restore_qcow2

NVRAM_FILE = "nvram.fd"
TPM_DIR = "tpm"
RECORDED_XML = "recorded-domain.xml"
RECORDED_QEMU = "recorded-qemu.json"
QEMU_SCRIPT = "run-qemu.sh"


@dataclass
class RestoredMachine:
    """What ``restore --machine`` wrote and did."""

    dir: Path
    files: list[str] = field(default_factory=list)
    disks: dict[str, str] = field(default_factory=dict)
    """Disk name → restored image."""
    domain: str | None = None
    uuid: str | None = None
    started: bool = False
    definition: str | None = None
    """The rewritten definition file (domain XML)."""
    omitted: list[str] = field(default_factory=list)
    """Disks of the definition the point does not hold, left out of the restored domain."""

    def as_dict(self) -> dict[str, Any]:
        return {"dir": str(self.dir), "files": self.files, "disks": self.disks, "domain": self.domain,
                "uuid": self.uuid, "started": self.started, "definition": self.definition,
                "omitted": self.omitted}


def prepare_dir(path: Path) -> None:
    """``DIR`` must be absent or empty: a restore never mixes with other files."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise BadInput(f"{path} exists and is not an empty directory; nothing was written")


def restore_files(repo: Repository, point: RestorePoint, record: MachineRecord, to: Path,
                  workers: int) -> RestoredMachine:
    """Every disk, the variable store and the TPM state of ``point`` into ``to``.

    Disks are qcow2, but for a QMP-direct VM a disk that was raw there (a pflash
    variable store) is raw again, so the recorded command line fits it.
    """
    made = not to.exists()
    to.mkdir(parents=True, exist_ok=True)
    done = RestoredMachine(to.resolve())
    drives = record.summary.get("drives") or {}
    try:
        for disk in point.disks:
            recorded = drives.get(disk.name) or {}
            if record.kind == "qemu" and recorded.get("format") == "raw":
                image = done.dir / f"{disk.name}.raw"
                restore_raw(repo, point, disk.name, image, force=False, workers=workers, allow_damage=False)
            else:
                image = done.dir / f"{disk.name}.qcow2"
                restore_qcow2(repo, point, disk.name, image, force=False, workers=workers,
                              allow_damage=False)
            done.disks[disk.name] = str(image)
            done.files.append(str(image))
        definition = load_file(repo, record.files["definition"], "definition")
        recorded_name = RECORDED_XML if record.kind == "libvirt" else RECORDED_QEMU
        (done.dir / recorded_name).write_bytes(definition)
        done.files.append(str(done.dir / recorded_name))
        if "nvram" in record.files:
            (done.dir / NVRAM_FILE).write_bytes(load_file(repo, record.files["nvram"], "UEFI variable store"))
            done.files.append(str(done.dir / NVRAM_FILE))
        if "tpm" in record.files:
            _untar(load_file(repo, record.files["tpm"], "TPM state"), done.dir / TPM_DIR)
            done.files.append(str(done.dir / TPM_DIR))
    except BaseException:
        # An incomplete machine is no use: DIR is left as it was (absent, or empty).
        if made:
            shutil.rmtree(done.dir, ignore_errors=True)
        else:
            for child in done.dir.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    return done


def _untar(blob: bytes, dest: Path) -> None:
    """The recorded TPM state files into ``dest`` (regular files with plain names only)."""
    dest.mkdir(mode=0o700)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        for member in tar.getmembers():
            if not member.isfile() or "/" in member.name or member.name in ("", ".", ".."):
                raise FleeceError(f"the recorded TPM state holds an unexpected entry {member.name!r}")
            src = tar.extractfile(member)
            assert src is not None
            target = dest / member.name
            target.write_bytes(src.read())
            os.chmod(target, member.mode & 0o600 or 0o600)


def rewrite_xml(text: str, done: RestoredMachine, name: str, keep_identity: bool) -> str:
    """The recorded definition under ``name`` on the restored files; new identity unless kept.

    A new UUID and new MAC addresses by default: the original may still run
    (or come back), and two machines with one MAC on a network, or one UUID
    under one management system, break each other.
    """
    root = ET.fromstring(text)
    root.find("name").text = name  # type: ignore[union-attr]
    uuid_el = root.find("uuid")
    if not keep_identity:
        if uuid_el is None:
            uuid_el = ET.SubElement(root, "uuid")
        uuid_el.text = str(uuidlib.uuid4())
        for mac in root.findall("./devices/interface/mac"):
            mac.set("address", _new_mac())
    done.uuid = uuid_el.text if uuid_el is not None else None
    devices = root.find("devices")
    for el in root.findall("./devices/disk"):
        target = el.find("target")
        dev = target.get("dev") if target is not None else None
        if dev not in done.disks:
            if el.get("device", "disk") == "disk" and devices is not None:
                # Never the original's image under a second domain: left out, and said.
                devices.remove(el)
                done.omitted.append(str(dev))
            continue
        el.set("type", "file")
        source = el.find("source")
        if source is not None:
            el.remove(source)
        source = ET.Element("source", file=done.disks[dev])
        el.insert(1, source)
        driver = el.find("driver")
        if driver is None:
            driver = ET.SubElement(el, "driver", name="qemu")
        driver.set("type", "qcow2")
        for stale in el.findall("backingStore"):
            el.remove(stale)
    nvram = root.find("./os/nvram")
    if nvram is not None and (done.dir / NVRAM_FILE).exists():
        nvram.text = str(done.dir / NVRAM_FILE)
    return ET.tostring(root, encoding="unicode")


def _new_mac() -> str:
    """A random address in the range QEMU/libvirt use (52:54:00)."""
    tail = os.urandom(3)
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


def _precheck(root: ET.Element) -> None:
    """Things libvirt accepts at define but that cannot start here: name the element."""
    loader = root.find("./os/loader")
    if loader is not None and loader.text and not Path(loader.text).exists():
        raise LibvirtError(f"<os><loader> names firmware {loader.text}, which this host lacks")
    nvram = root.find("./os/nvram")
    if nvram is not None and nvram.get("template") and not Path(str(nvram.get("template"))).exists():
        raise LibvirtError(f"<os><nvram template=…> names {nvram.get('template')}, which this host lacks")
    for iface in root.findall("./devices/interface"):
        source = iface.find("source")
        if iface.get("type") == "bridge" and source is not None:
            bridge = source.get("bridge")
            if bridge and not Path("/sys/class/net", bridge).exists():
                raise LibvirtError(f"<interface type='bridge'><source bridge='{bridge}'> names a bridge "
                                   "this host lacks")


def define(conn: Any, xml: str, done: RestoredMachine, *, replace: bool, start: bool) -> None:
    """Define (and start) the domain; on any failure no domain of ours is left defined."""
    libvirt = bindings()
    root = ET.fromstring(xml)
    name = str(root.findtext("name"))
    kept = f"the restored files are kept in {done.dir}: {', '.join(Path(f).name for f in done.files)}"
    try:
        old = conn.lookupByName(name)
    except libvirt.libvirtError:
        old = None
    if old is not None and not replace:
        raise BadInput(f"libvirt already has a domain {name!r}; add --replace to define over it, or "
                       f"choose another name; {kept}")
    if old is not None and old.isActive():
        raise BadInput(f"domain {name!r} is running; stop it before --replace; {kept}")
    try:
        _precheck(root)
    except LibvirtError as exc:
        raise LibvirtError(f"the recorded definition cannot be used on this host: {exc}; no domain was "
                           f"defined; {kept}") from None
    flags = getattr(libvirt, "VIR_DOMAIN_DEFINE_VALIDATE", 0)
    new_state: Path | None = None
    dom = None
    replaced = _undefine_for_replace(old, kept) if old is not None else None
    try:
        dom = conn.defineXMLFlags(xml, flags)
        done.domain, done.uuid = name, str(dom.UUIDString())
        tpm = root.find("./devices/tpm/backend[@type='emulator']")
        if tpm is not None and (done.dir / TPM_DIR).is_dir():
            new_state = tpm_state_dir(done.uuid, tpm.get("version") or "2.0")
            if new_state.exists() and any(new_state.iterdir()):
                if replaced is None or replaced[1] != done.uuid:
                    raise LibvirtError(f"TPM state {new_state} exists already")
                aside = new_state.with_name(f"{new_state.name}.replaced-{int(time.time())}")
                new_state.rename(aside)  # the replaced domain's own state: kept, not overwritten
                done.files.append(str(aside))
            shutil.copytree(done.dir / TPM_DIR, new_state, dirs_exist_ok=True)
            os.chmod(new_state, 0o700)
        if start:
            dom.create()
            done.started = True
    except (libvirt.libvirtError, LibvirtError, OSError) as exc:
        why = message(exc) if isinstance(exc, libvirt.libvirtError) else str(exc)
        undone = "no domain was defined"
        if dom is not None:
            try:
                dom.undefineFlags(getattr(libvirt, "VIR_DOMAIN_UNDEFINE_KEEP_NVRAM", 0)
                                  | getattr(libvirt, "VIR_DOMAIN_UNDEFINE_KEEP_TPM", 0))
                undone = f"domain {name} was undefined again"
            except libvirt.libvirtError as again:
                undone = f"domain {name} could not be undefined again ({message(again)})"
            if new_state is not None:
                shutil.rmtree(new_state.parent, ignore_errors=True)
        if replaced is not None:
            try:
                conn.defineXML(replaced[0])
                undone += f"; the replaced domain {name} was defined again as it was"
            except libvirt.libvirtError as again:
                undone += f"; the replaced domain {name} could not be defined again ({message(again)})"
        what = "start" if dom is not None and start else "define"
        raise LibvirtError(f"libvirt refused to {what} the restored domain {name}: {why}; {undone}; "
                           f"{kept}") from None


def _undefine_for_replace(old: Any, kept: str) -> tuple[str, str]:
    """Undefine the shut-off domain ``--replace`` names, keeping its NVRAM and TPM state files;
    its definition (to define it again if the new one is refused) and UUID."""
    libvirt = bindings()
    name = old.name()
    try:
        xml = str(old.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))
        uuid = str(old.UUIDString())
        old.undefineFlags(getattr(libvirt, "VIR_DOMAIN_UNDEFINE_KEEP_NVRAM", 0)
                          | getattr(libvirt, "VIR_DOMAIN_UNDEFINE_KEEP_TPM", 0)
                          | getattr(libvirt, "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 0)
                          | getattr(libvirt, "VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA", 0))
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"libvirt refused to undefine {name!r} for --replace: {message(exc)}; "
                           f"{kept}") from None
    return xml, uuid


def write_qemu_script(record: MachineRecord, done: RestoredMachine) -> bool:
    """``run-qemu.sh``: the recorded command line on the restored disks; False when none was recorded."""
    doc = json.loads((done.dir / RECORDED_QEMU).read_text())
    argv = doc.get("argv")
    if not isinstance(argv, list) or not argv:
        return False
    files = {}
    for name, image in done.disks.items():
        recorded = (record.summary.get("drives") or {}).get(name) or {}
        if recorded.get("file"):
            files[str(recorded["file"])] = image
    new = rewrite_argv([str(a) for a in argv], files, done.dir)
    cwd = doc.get("cwd")
    script = ["#!/bin/sh", "# Restored by fleece: the recorded QEMU command line on the restored files.",
              "# Image files, unix sockets and the pid file point into this directory."]
    if cwd:
        script.append(f"cd {shlex.quote(str(cwd))} 2>/dev/null || cd \"$(dirname \"$0\")\"")
    script.append("exec " + " ".join(shlex.quote(a) for a in new) + ' "$@"')
    path = done.dir / QEMU_SCRIPT
    path.write_text("\n".join(script) + "\n")
    path.chmod(0o755)
    done.files.append(str(path))
    done.definition = str(path)
    return True
