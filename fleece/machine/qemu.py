"""Recording a QMP-direct VM's machine: what QEMU itself can say, and its command line.

The command line comes from the process behind the QMP socket when it runs on
this host: the unix socket's peer credentials (``SO_PEERCRED``) give its pid,
``/proc/PID/cmdline`` its arguments. Over TCP, or when the process is not
visible here, the record has no command line (``argv`` null) but still the
shape QMP reports: machine type, CPUs, memory, each disk's device model,
bus, serial and size, and the pflash nodes (the UEFI variable store).
"""

from __future__ import annotations

import json
import re
import socket
import struct
from pathlib import Path
from typing import Any

from fleece.qmp import QmpSession


def peer_pid(session: QmpSession) -> int | None:
    """The pid of the process at the other end of the QMP unix socket, if any."""
    writer = getattr(getattr(session, "_client", None), "_writer", None)
    sock = writer.get_extra_info("socket") if writer is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    return pid or None


def command_line(pid: int | None) -> list[str] | None:
    """``/proc/PID/cmdline`` as a list, or None."""
    if pid is None:
        return None
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1]] or None


async def _try(session: QmpSession, command: str, **arguments: Any) -> Any:
    try:
        return await session.execute(command, arguments or None)
    except Exception:  # an older QEMU, or a property the device lacks: the field stays empty
        return None


async def capture_qemu(session: QmpSession) -> tuple[dict[str, Any], dict[str, bytes], dict[str, str]]:
    """``(summary, files by role, moments)`` of the VM behind ``session``."""
    pid = peer_pid(session)
    argv = command_line(pid)
    machine = await _try(session, "qom-get", path="/machine", property="type")
    cpus = await _try(session, "query-cpus-fast") or []
    memory = await _try(session, "query-memory-size-summary") or {}
    disks = []
    pflash = []
    for b in await _try(session, "query-block") or []:
        inserted = b.get("inserted")
        if not isinstance(inserted, dict):
            continue
        image = inserted.get("image", {})
        entry: dict[str, Any] = {
            "device": b.get("device") or None, "qdev": b.get("qdev"), "node": inserted.get("node-name"),
            "file": inserted.get("file"), "format": inserted.get("drv"),
            "size": image.get("virtual-size"), "read_only": inserted.get("ro")}
        qdev = b.get("qdev")
        if qdev:
            entry["model"] = await _try(session, "qom-get", path=qdev, property="type")
            entry["serial"] = await _try(session, "qom-get", path=qdev, property="serial")
            bus = await _try(session, "qom-get", path=qdev, property="parent_bus")
            entry["bus"] = bus
        disks.append(entry)
        if str(qdev or "").startswith("/machine/system.flash"):
            pflash.append({"node": entry["node"], "file": entry["file"], "read_only": entry["read_only"]})
    machine_type = str(machine).removesuffix("-machine") if machine else None
    summary = {
        "machine_type": machine_type,
        "cpus": len(cpus),
        "memory_bytes": memory.get("base-memory"),
        "firmware": "uefi" if any(not p["read_only"] for p in pflash) else "bios",
        "pflash": pflash,
        "disks": disks,
        "pid": pid,
        "nics": [],
        "tpm": None,
    }
    cwd = None
    if argv is not None:
        try:
            cwd = str(Path(f"/proc/{pid}/cwd").readlink())
        except OSError:
            cwd = None
    definition = json.dumps({"argv": argv, "cwd": cwd}, indent=1).encode()
    return summary, {"definition": definition}, {"definition": "when the backup ran"}


def match_drive(disks: list[dict[str, Any]], drive: str) -> dict[str, Any] | None:
    """The recorded disk a point's drive name (device id, node or backend name) refers to."""
    for d in disks:
        qdev = str(d.get("qdev") or "")
        if drive in (d.get("device"), d.get("node")) or f"/{drive}/" in qdev + "/":
            return d
    return None


SOCKET_OPTIONS = ("-qmp", "-qmp-pretty", "-chardev", "-monitor", "-serial", "-vnc")


def rewrite_argv(argv: list[str], files: dict[str, str], into: Path) -> list[str]:
    """``argv`` with each recorded image file (``files``: old → new) and every unix socket
    and pid file moved into ``into`` (so the restored QEMU runs beside the original)."""
    out: list[str] = []
    sockets = 0
    for i, arg in enumerate(argv):
        for old, new in files.items():
            if arg == old:
                arg = new
            arg = re.sub(r"(?<=[=:])" + re.escape(old) + r"(?=,|$)", new.replace("\\", "\\\\"), arg)
        previous = argv[i - 1] if i else ""
        if previous in SOCKET_OPTIONS:
            def move(m: re.Match[str]) -> str:
                nonlocal sockets
                sockets += 1
                return f"{m.group(1)}{into / f'socket{sockets}.sock'}"
            arg = re.sub(r"(unix:|path=)([^,]+)", move, arg)
        if previous == "-pidfile":
            arg = str(into / "qemu.pid")
        out.append(arg)
    return out
