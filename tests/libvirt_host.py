"""A real, private libvirtd for tests: started and stopped by the fixture, by pid.

The daemons run as root the way these hosts run them (monolithic libvirtd,
``user``/``group`` root, ``security_driver = "none"``, virtlogd first, both
with ``-d`` and a pid file, no systemd) but in a private mount namespace:
fresh directories are bind-mounted over ``/etc/libvirt`` (a copy with the
settings above), ``/var/lib/libvirt``, ``/var/log/libvirt``,
``/var/cache/libvirt`` and ``/run`` there, so no system file or directory is
changed or created, and a system libvirtd, if any, is not touched (nor are
other sessions' daemons: each has its own namespace). Clients reach the
daemon through its socket in the private run directory (:attr:`LibvirtHost.uri`).

Test domains are ``type='qemu'`` (TCG), q35, virtio qcow2 (or raw) disks, no
network, no OS, started paused. The "guest" writes with HMP ``qemu-io``
through ``virsh qemu-monitor-command`` (libvirt owns the QMP socket), and
every write is mirrored into a sparse raw shadow image, as in conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

# The namespace's whole /run is a fresh directory (so /run/libvirt need not exist on the host).
BINDS = {"etc": "/etc/libvirt", "lib": "/var/lib/libvirt", "log": "/var/log/libvirt",
         "cache": "/var/cache/libvirt", "run": "/run"}
QEMU_CONF = """
user = "root"
group = "root"
security_driver = "none"
# No cgroup controllers or per-domain mount namespaces in a container.
cgroup_controllers = [ ]
namespaces = [ ]
"""


def _wait_for(what: str, ok: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen in {timeout} s")
        time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


class LibvirtHost:
    """virtlogd + libvirtd in a private mount namespace; see the module docstring."""

    def __init__(self) -> None:
        # Short: unix socket paths (ours, QEMU's monitor) must stay under 108 bytes.
        self.base = Path(tempfile.mkdtemp(prefix="fl-lv-", dir="/tmp"))
        self.virtlogd_pid = 0
        self.libvirtd_pid = 0

    @property
    def uri(self) -> str:
        """The connection URI of this daemon."""
        return f"qemu:///system?socket={self.base}/run/libvirt/libvirt-sock"

    def start(self) -> None:
        """Configure and start virtlogd, then libvirtd, in a new private mount namespace."""
        for sub in BINDS:
            (self.base / sub).mkdir()
        shutil.copytree("/etc/libvirt", self.base / "etc", dirs_exist_ok=True)
        autostart = self.base / "etc/qemu/networks/autostart"
        if autostart.exists():
            shutil.rmtree(autostart)  # no default network: tests need none, and no dnsmasq
        with open(self.base / "etc/qemu.conf", "a") as f:
            f.write(QEMU_CONF)
        mounts = " && ".join(f"mount --bind {self.base / sub} {target}" for sub, target in BINDS.items())
        (self.base / "run" / "libvirt").mkdir()
        script = f"set -e; {mounts}; virtlogd -d -p {self.base}/virtlogd.pid"
        subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], check=True)
        _wait_for("virtlogd's pid file", lambda: (self.base / "virtlogd.pid").exists())
        self.virtlogd_pid = int((self.base / "virtlogd.pid").read_text())
        self.start_libvirtd()

    def _in_namespace(self) -> list[str]:
        # -r/-w: the daemons' root and working directory too. Entering a mount
        # namespace otherwise resets the root to the namespace's, which inside
        # a chroot (a Debian 13 check from a Debian 12 host) is the host's.
        return ["nsenter", "-t", str(self.virtlogd_pid), "-m", "-r", "-w", "--"]

    def start_libvirtd(self) -> None:
        """Start libvirtd in the daemons' namespace and wait until it answers."""
        pidfile = self.base / "libvirtd.pid"
        pidfile.unlink(missing_ok=True)
        subprocess.run([*self._in_namespace(), "libvirtd", "-d", "-p", str(pidfile)], check=True)
        _wait_for("libvirtd's pid file", pidfile.exists)
        self.libvirtd_pid = int(pidfile.read_text())
        _wait_for("libvirtd answering", lambda: self.virsh("version", check=False).returncode == 0)

    def stop_libvirtd(self) -> None:
        """SIGTERM libvirtd by its pid and wait for it to exit (its domains keep running)."""
        if self.libvirtd_pid and _pid_alive(self.libvirtd_pid):
            os.kill(self.libvirtd_pid, signal.SIGTERM)
            _wait_for("libvirtd exiting", lambda: not _pid_alive(self.libvirtd_pid))
        self.libvirtd_pid = 0

    def restart_libvirtd(self) -> None:
        """Stop and start libvirtd; the running domains are reconnected."""
        self.stop_libvirtd()
        self.start_libvirtd()

    def stop(self) -> None:
        """Destroy every domain, stop both daemons by pid, remove the private directories."""
        if self.libvirtd_pid:
            names = self.virsh("list", "--name", check=False).stdout.split()
            for name in names:
                self.virsh("destroy", name, check=False)
            self.stop_libvirtd()
        if self.virtlogd_pid and _pid_alive(self.virtlogd_pid):
            os.kill(self.virtlogd_pid, signal.SIGTERM)
            _wait_for("virtlogd exiting", lambda: not _pid_alive(self.virtlogd_pid))
        shutil.rmtree(self.base, ignore_errors=True)

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``virsh -c URI ARGS``."""
        res = subprocess.run(["virsh", "-q", "-c", self.uri, *args], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=120)
        if check and res.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)}: {res.stderr.strip()}")
        return res


@dataclass
class LibvirtDisk:
    """One disk of a test domain."""

    target: str
    path: Path
    fmt: str
    size: int
    shadow: Path


@dataclass
class LibvirtVM:
    """A test domain and its disks; the test's "guest" writes through libvirt's monitor."""

    host: LibvirtHost
    name: str
    dir: Path
    disks: list[LibvirtDisk]
    _qdev: dict[str, str] = field(default_factory=dict)

    @property
    def backup_target(self) -> list[str]:
        """The ``fleece backup`` arguments that name this domain (``tests/backups.py``)."""
        return ["--libvirt", self.name, "--connect", self.host.uri]

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``virsh`` on this domain's daemon."""
        return self.host.virsh(*args, check=check)

    def qmp(self, command: str, **arguments: Any) -> Any:
        """A QMP command through libvirt (``qemu-monitor-command``)."""
        cmd = {"execute": command, **({"arguments": arguments} if arguments else {})}
        out = self.virsh("qemu-monitor-command", self.name, json.dumps(cmd)).stdout
        return json.loads(out)["return"]

    def qdev(self, target: str) -> str:
        """The QOM path of disk ``target``'s device, as qemu-io -d wants it."""
        if not self._qdev:
            # libvirt names the block backends after the devices: match by image file.
            files = {str(d.path): d.target for d in self.disks}
            for b in self.qmp("query-block"):
                inserted = b.get("inserted") or {}
                image = inserted.get("image") or {}
                while image.get("backing-image"):
                    image = image["backing-image"]
                found = files.get(inserted.get("file", "")) or files.get(image.get("filename", ""))
                if found and b.get("qdev"):
                    self._qdev[found] = b["qdev"]
        return self._qdev[target]

    def qemu_io(self, target: str, command: str) -> str:
        """A qemu-io command on ``target`` through its device's block backend (guest I/O).

        qemu-io's own output goes to QEMU's stdout, not the monitor: only the
        monitor's errors (an unknown device) show here.
        """
        out = self.virsh("qemu-monitor-command", "--hmp", self.name,
                         f'qemu-io -d {self.qdev(target)} "{command}"').stdout
        if "error" in out.lower() or "failed" in out.lower():
            raise RuntimeError(f"qemu-io {command!r} on {target}: {out.strip()}")
        return out

    def qemu_pid(self) -> int:
        """The pid of the domain's QEMU (from libvirt's pid file)."""
        return int((self.host.base / "run" / "libvirt" / "qemu" / f"{self.name}.pid").read_text())

    def flush(self, target: str) -> None:
        """The guest flushes ``target``: its writes survive a kill of QEMU (bitmaps do not)."""
        self.qemu_io(target, "flush")

    def kill_qemu(self) -> None:
        """SIGKILL the domain's QEMU, as the OOM killer or a crash would; wait until libvirt sees it."""
        os.kill(self.qemu_pid(), signal.SIGKILL)
        _wait_for("libvirt seeing QEMU die", lambda: self.state() == "shut off")

    def shut_down(self) -> None:
        """QEMU exits cleanly (SIGTERM: ``destroy --graceful``): persistent bitmaps are stored."""
        self.virsh("destroy", "--graceful", self.name)

    def start(self) -> None:
        """Start the domain again, paused."""
        self.virsh("start", "--paused", self.name)
        self._qdev.clear()

    def state(self) -> str:
        """``virsh domstate``."""
        return self.virsh("domstate", self.name).stdout.strip()

    def disk(self, target: str) -> LibvirtDisk:
        """The disk ``target``."""
        return next(d for d in self.disks if d.target == target)

    def write(self, target: str, offset: int, length: int, pattern: int) -> None:
        """The guest writes ``length`` bytes of ``pattern`` at ``offset`` (mirrored in the shadow)."""
        self.qemu_io(target, f"write -P 0x{pattern:02x} {offset} {length}")
        self._shadow_write(target, offset, bytes([pattern]) * length)

    def write_file(self, target: str, offset: int, src: Path) -> None:
        """The guest writes the bytes of ``src`` at ``offset`` (mirrored in the shadow)."""
        data = src.read_bytes()
        self.qemu_io(target, f"write -s {src} {offset} {len(data)}")
        self._shadow_write(target, offset, data)

    def _shadow_write(self, target: str, offset: int, data: bytes) -> None:
        with open(self.disk(target).shadow, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def snapshot_shadow(self, target: str, dest: Path) -> Path:
        """The disk as it is now, copied (sparse) to ``dest``."""
        subprocess.run(["cp", "--sparse=always", str(self.disk(target).shadow), str(dest)], check=True)
        return dest

    def checkpoints(self) -> list[str]:
        """``virsh checkpoint-list --name``, sorted."""
        return sorted(self.virsh("checkpoint-list", self.name, "--name").stdout.split())

    def job_type(self) -> str:
        """``virsh domjobinfo``'s job type: ``None`` when no job runs."""
        out = self.virsh("domjobinfo", self.name).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Job type":
                return value.strip()
        raise AssertionError(f"domjobinfo without a job type: {out!r}")

    def libvirt_state(self) -> dict[str, Any]:
        """What a test compares to prove libvirt was left as it was: checkpoints (with parents) and job."""
        parents = {}
        for name in self.checkpoints():
            res = self.virsh("checkpoint-parent", self.name, name, check=False)
            parents[name] = res.stdout.strip() if res.returncode == 0 else None
        return {"checkpoints": parents, "job": self.job_type(),
                "state": self.virsh("domstate", self.name).stdout.strip()}

    def qcow2_bitmaps(self, target: str) -> list[str]:
        """The dirty bitmaps on disk ``target``'s format node, as QEMU holds them now."""
        path = str(self.disk(target).path)
        for n in self.qmp("query-named-block-nodes", flat=True):
            if n.get("drv") == "qcow2" and n.get("file") == path:
                return sorted(b["name"] for b in n.get("dirty-bitmaps", []) if b.get("name"))
        raise KeyError(target)


DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{disks}
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""
DISK_XML = """    <disk type='file' device='disk'>
      <driver name='qemu' type='{fmt}'/>
      <source file='{path}'/>
      <target dev='{target}' bus='virtio'/>
    </disk>"""


class LibvirtVMFactory:
    """Makes test domains (defined, so their checkpoints persist) on one :class:`LibvirtHost`."""

    def __init__(self, host: LibvirtHost, base: Path) -> None:
        self.host = host
        self.base = base
        self.vms: list[LibvirtVM] = []

    def __call__(self, disks: list[tuple[str, int]] | None = None, *, start: bool = True,
                 name: str | None = None) -> LibvirtVM:
        """Images (``(format, size)`` per disk, default one 64 MiB qcow2) and a domain on them
        (named ``name``, made unique to this process, else ``fleece-t<pid>-<n>``)."""
        n = len(self.vms)
        name = f"{name} {os.getpid()}-{n}" if name else f"fleece-t{os.getpid()}-{n}"
        d = self.base / f"dom{n}"
        d.mkdir(parents=True)
        specs = []
        for i, (fmt, size) in enumerate(disks or [("qcow2", 64 << 20)]):
            target = "vd" + chr(ord("a") + i)
            path = d / f"{target}.{fmt}"
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)
            shadow = d / f"{target}.shadow.raw"
            with open(shadow, "wb") as f:
                f.truncate(size)
            specs.append(LibvirtDisk(target, path, fmt, size, shadow))
        xml = DOMAIN_XML.format(name=escape(name), disks="\n".join(
            DISK_XML.format(fmt=s.fmt, path=s.path, target=s.target) for s in specs))
        (d / "domain.xml").write_text(xml)
        self.host.virsh("define", str(d / "domain.xml"))
        vm = LibvirtVM(self.host, name, d, specs)
        self.vms.append(vm)
        if start:
            # Paused: no OS to run, and the shared CPUs are better spent elsewhere.
            self.host.virsh("start", "--paused", name)
        return vm

    def close(self) -> None:
        """Destroy and undefine every domain made here (checkpoint metadata too)."""
        for vm in self.vms:
            self.host.virsh("destroy", vm.name, check=False)
            self.host.virsh("undefine", vm.name, "--checkpoints-metadata", check=False)
