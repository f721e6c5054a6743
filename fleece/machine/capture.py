"""Reading a libvirt domain's machine at backup time: definition, UEFI variables, TPM state.

Read right after the disks' point in time is set up, while the guest runs.
A file the guest may be writing (the variable store through QEMU's pflash,
swtpm's state) is read until two reads in a row agree, so the record is
never a torn mix of two writes (docs/machines.md, "Which moment").
"""

from __future__ import annotations

import io
import os
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fleece.errors import FleeceError
from fleece.libvirt.domain import bindings

SWTPM_ROOT = "/var/lib/libvirt/swtpm"
SWTPM_ROOT_ENV = "FLEECE_SWTPM_DIR"
"""Where libvirt keeps swtpm's state, ``<root>/<uuid>/tpm2`` (override for hosts that moved it)."""
STABLE_TRIES = 5


def swtpm_root() -> Path:
    return Path(os.environ.get(SWTPM_ROOT_ENV) or SWTPM_ROOT)


def tpm_state_dir(uuid: str, version: str) -> Path:
    """swtpm's state directory of domain ``uuid`` as libvirt lays it out."""
    return swtpm_root() / uuid / ("tpm1.2" if version == "1.2" else "tpm2")


def inactive_xml(dom: Any) -> tuple[str, bool]:
    """The inactive definition, with secure information where the connection allows it."""
    libvirt = bindings()
    try:
        return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)), True
    except libvirt.libvirtError:  # a read-only connection may not ask for secrets
        return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)), False


def _stable(read: Any, what: str) -> bytes:
    last = read()
    for _ in range(STABLE_TRIES):
        again = read()
        if again == last:
            return bytes(again)
        last = again
        time.sleep(0.01)
    raise FleeceError(f"{what} kept changing while it was read ({STABLE_TRIES} tries); "
                      "no restore point was written")


def tar_dir(path: Path) -> bytes:
    """The regular files of ``path`` as a tar with fixed owners and times (so unchanged state dedups)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in sorted(path.iterdir()):
            if not f.is_file() or f.is_symlink() or f.name.startswith(".lock"):
                continue
            data = f.read_bytes()
            info = tarfile.TarInfo(f.name)
            info.size, info.mode, info.mtime = len(data), f.stat().st_mode & 0o777, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def summary_of(xml: ET.Element) -> dict[str, Any]:
    """Machine type, CPUs, memory, firmware, TPM, NICs and disks, as the definition says."""
    os_el = xml.find("os")
    type_el = os_el.find("type") if os_el is not None else None
    loader = os_el.find("loader") if os_el is not None else None
    nvram = os_el.find("nvram") if os_el is not None else None
    firmware = (os_el.get("firmware") if os_el is not None else None) or (
        "efi" if loader is not None and loader.get("type") == "pflash" else "bios")
    memory = xml.find("memory")
    unit = {"KiB": 1024, "k": 1024, "MiB": 1 << 20, "M": 1 << 20, "GiB": 1 << 30, "G": 1 << 30, "b": 1,
            "bytes": 1}.get(memory.get("unit", "KiB") if memory is not None else "KiB", 1024)
    tpm = xml.find("./devices/tpm")
    tpm_backend = tpm.find("backend") if tpm is not None else None
    disks = []
    for el in xml.findall("./devices/disk"):
        target = el.find("target")
        serial = el.find("serial")
        disks.append({"target": target.get("dev") if target is not None else None,
                      "device": el.get("device", "disk"),
                      "bus": target.get("bus") if target is not None else None,
                      "serial": serial.text if serial is not None else None})
    nics = []
    for el in xml.findall("./devices/interface"):
        mac, model, source = el.find("mac"), el.find("model"), el.find("source")
        nics.append({"type": el.get("type"), "mac": mac.get("address") if mac is not None else None,
                     "model": model.get("type") if model is not None else None,
                     "source": dict(source.attrib) if source is not None else {}})
    return {
        "name": xml.findtext("name"),
        "uuid": xml.findtext("uuid"),
        "machine_type": type_el.get("machine") if type_el is not None else None,
        "arch": type_el.get("arch") if type_el is not None else None,
        "cpus": int(xml.findtext("vcpu") or 1),
        "memory_bytes": int(memory.text or 0) * unit if memory is not None else None,
        "firmware": "uefi" if firmware == "efi" else firmware,
        "loader": loader.text if loader is not None else None,
        "nvram": nvram.text if nvram is not None else None,
        "nvram_template": nvram.get("template") if nvram is not None else None,
        "tpm": None if tpm is None else {
            "model": tpm.get("model"),
            "backend": tpm_backend.get("type") if tpm_backend is not None else None,
            "version": tpm_backend.get("version") if tpm_backend is not None else None},
        "disks": disks,
        "nics": nics,
    }


def capture_libvirt(dom: Any) -> tuple[dict[str, Any], dict[str, bytes], dict[str, str]]:
    """``(summary, files by role, moments)`` of a running domain (blocking libvirt calls)."""
    started = time.monotonic()
    text, secure = inactive_xml(dom)
    xml = ET.fromstring(text)
    summary = summary_of(xml)
    summary["secure_info"] = secure
    files = {"definition": text.encode()}
    moments = {"definition": "the inactive definition when the backup ran"}
    host = urlsplit(str(dom.connect().getURI())).hostname
    if host not in (None, "", "localhost") and (summary["nvram"] or summary["tpm"]):
        # The files are on libvirt's host, not here: the record says what it lacks.
        summary["not_recorded"] = (f"the UEFI variable store and TPM state are on {host}, "
                                   "which libvirt does not read out for us")
        summary["capture_ms"] = round((time.monotonic() - started) * 1000, 1)
        return summary, files, moments
    if summary["nvram"]:
        path = Path(summary["nvram"])
        try:
            files["nvram"] = _stable(path.read_bytes, f"the UEFI variable store {path}")
        except OSError as exc:
            raise FleeceError(f"cannot read the UEFI variable store {path} of domain {dom.name()}: "
                              f"{exc.strerror}; no restore point was written") from None
        moments["nvram"] = "read right after the disks' point in time, two equal reads"
    tpm = summary["tpm"]
    if tpm is not None and tpm["backend"] == "emulator":
        state = tpm_state_dir(str(summary["uuid"]), tpm["version"] or "2.0")
        if not state.is_dir():
            raise FleeceError(f"domain {dom.name()} has an emulated TPM but its state directory {state} "
                              f"is not there (set {SWTPM_ROOT_ENV} if libvirt keeps swtpm state "
                              "elsewhere); no restore point was written")
        summary["tpm"]["state_dir"] = str(state)
        files["tpm"] = _stable(lambda: tar_dir(state), f"the TPM state {state}")
        moments["tpm"] = "read right after the disks' point in time, two equal reads"
    summary["capture_ms"] = round((time.monotonic() - started) * 1000, 1)
    return summary, files, moments
