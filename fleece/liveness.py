"""Is the process that left a lease, an export or a job behind still alive?

A record of who holds something (a lease in the repository, an export's
state file) names its holder with an :class:`Owner`: the host name and pid,
and — since a pid means nothing outside its namespace and boot — the
kernel's boot id (``/proc/sys/kernel/random/boot_id``), the pid namespace
(the inode of ``/proc/self/ns/pid``), the process's start time (field 22
of ``/proc/PID/stat``, clock ticks since boot) and the machine id
(``/etc/machine-id``).

Only certainty of death lets a later run take over what a holder held:
:meth:`Owner.certainly_dead` is True only when

* host name, boot id and pid namespace are ours, and the pid is gone, a
  zombie, or a process with another start time (the pid was reused); or
* host name and machine id are ours and the boot id is not: the holder
  ran before this machine rebooted. (Clones of one machine must each have
  their own ``/etc/machine-id``, as machine-id(5) requires.)

Anything else — another host, another pid namespace (two containers with
one host name), a ``/proc`` that is not of our namespace, a field we cannot
read — is "may be alive": the caller waits for a lease to expire, or
refuses. A record written before these fields existed (host and pid only)
is judged as before, by host name and pid, but only by a reader in the
host's initial pid namespace: a reader in a container cannot tell whose
pid it is.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

INIT_PID_NS = 0xEFFFFFFC
"""The inode of the initial pid namespace (fixed in Linux since 3.8: ``PROC_PID_INIT_INO``)."""

_BOOT_ID = "/proc/sys/kernel/random/boot_id"
_MACHINE_ID = "/etc/machine-id"


@dataclass(frozen=True)
class Owner:
    """A process, named so that another process can tell for certain whether it has exited."""

    host: str
    pid: int
    boot_id: str | None = None
    pid_ns: int | None = None
    """Inode of the owner's pid namespace (``/proc/self/ns/pid``)."""
    start_time: int | None = None
    """Clock ticks from boot to the process's start (``/proc/PID/stat`` field 22)."""
    machine_id: str | None = None

    @classmethod
    def current(cls) -> Owner:
        """This process."""
        pid = os.getpid()
        return cls(host=socket.gethostname(), pid=pid, boot_id=_read_text(_BOOT_ID),
                   pid_ns=_pid_ns(), start_time=_start_time("self"), machine_id=_read_text(_MACHINE_ID))

    @property
    def legacy(self) -> bool:
        """A record from before boot ids and namespaces were recorded (host and pid only)."""
        return self.boot_id is None or self.pid_ns is None

    def certainly_dead(self) -> bool:
        """True only when this process has certainly exited (the rules are in the module docstring)."""
        if self.pid <= 0 or not self.host:
            return False
        me = Owner.current()
        if self.host != me.host:
            return False
        if self.legacy:
            return me.pid_ns == INIT_PID_NS and _pid_gone(self.pid)
        if me.boot_id is None or me.pid_ns is None:
            return False
        if self.boot_id != me.boot_id:
            return self.machine_id is not None and self.machine_id == me.machine_id
        if self.pid_ns != me.pid_ns:
            return False
        if _pid_gone(self.pid):
            return True
        if not _proc_is_ours():
            return False  # /proc shows another namespace's pids: nothing more to learn
        stat = _stat(str(self.pid))
        if stat is None:
            return _pid_gone(self.pid)  # exited between the two looks
        state, start = stat
        if self.start_time is not None and start != self.start_time:
            return True  # the pid now belongs to another process
        return state in ("Z", "X")  # exited, not yet reaped: it holds nothing any more

    def to_json(self) -> dict[str, Any]:
        """The record's fields (``host``, ``pid``, ``boot_id``, ``pid_ns``, ``start_time``,
        ``machine_id``), unknown ones null; stored flat in leases and state files."""
        return {"host": self.host, "pid": self.pid, "boot_id": self.boot_id, "pid_ns": self.pid_ns,
                "start_time": self.start_time, "machine_id": self.machine_id}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Owner:
        """The owner a record names; the newer fields may be missing or null (an older record).

        ``ValueError`` if a field has the wrong type.
        """
        host, pid = doc["host"], doc["pid"]
        if not isinstance(host, str) or not isinstance(pid, int) or isinstance(pid, bool):
            raise ValueError("an owner record needs a host name and a pid")
        return cls(host=host, pid=pid, boot_id=_optional(doc, "boot_id", str),
                   pid_ns=_optional(doc, "pid_ns", int), start_time=_optional(doc, "start_time", int),
                   machine_id=_optional(doc, "machine_id", str))

    def __str__(self) -> str:
        return f"{self.host} pid {self.pid}"


def process_gone(host: str, pid: int) -> bool:
    """``Owner(host, pid).certainly_dead()``: for records that carry only a host and a pid."""
    return Owner(host, pid).certainly_dead()


IDENTITY_FIELDS = ("boot_id", "pid_ns", "start_time", "machine_id")
"""The fields an :class:`Owner` record adds to host and pid (null in older records)."""


def _optional(doc: Mapping[str, Any], key: str, kind: type) -> Any:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"owner field {key} is not a {kind.__name__}")
    return value


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _pid_ns() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _stat(pid: str) -> tuple[str, int] | None:
    """(state, start time) from ``/proc/PID/stat``; None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces and ')'.
    rest = raw[raw.rfind(b")") + 1:].split()
    try:
        return rest[0].decode(), int(rest[19])  # fields 3 and 22
    except (IndexError, ValueError):
        return None


def _start_time(pid: str) -> int | None:
    stat = _stat(pid)
    return None if stat is None else stat[1]


def _proc_is_ours() -> bool:
    """Whether ``/proc`` shows our pid namespace (not a parent's, as after ``unshare --pid``
    without ``--mount-proc``)."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def _pid_gone(pid: int) -> bool:
    """Whether no process ``pid`` exists in our pid namespace (a signal 0 is namespace-correct)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
