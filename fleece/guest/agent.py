"""A minimal QEMU guest agent client for a throwaway machine: ping, OS info, and commands.

The agent's virtio-serial port is a unix socket QEMU listens on. Until the
agent runs in the guest, what is written there waits in QEMU's buffer (or is
dropped), so every exchange starts with ``guest-sync`` and a fresh id: a
stale answer can never be taken for this one.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from pathlib import Path
from typing import Any

MAX_OUTPUT = 64 * 1024
"""Bytes of a command's stdout and stderr kept in the report."""


class AgentUnavailable(Exception):
    """The agent did not answer (yet)."""


class AgentCommandError(Exception):
    """The agent answered a command with an error."""


class GuestAgent:
    """One connection to the agent socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._buf = b""

    def close(self) -> None:
        """Drop the connection (idempotent)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buf = b""

    def _send(self, doc: dict[str, Any]) -> None:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX)
            try:
                self._sock.connect(str(self.path))
            except OSError as exc:
                self.close()
                raise AgentUnavailable(str(exc)) from None
        self._sock.sendall(json.dumps(doc).encode() + b"\n")

    def _reply(self, timeout: float) -> dict[str, Any]:
        assert self._sock is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentUnavailable("no answer")
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise AgentUnavailable("no answer") from None
            if not data:
                self.close()
                raise AgentUnavailable("the agent socket closed")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        line = line.lstrip(b"\xff")  # guest-sync-delimited's marker, should one arrive
        try:
            reply: dict[str, Any] = json.loads(line)
        except ValueError:
            return self._reply(max(0.1, deadline - time.monotonic()))
        return reply

    def sync(self, timeout: float = 2.0) -> None:
        """Resynchronise: send ``guest-sync`` with a fresh id and skip answers until it comes back."""
        token = random.randrange(1, 2**31)
        self._send({"execute": "guest-sync", "arguments": {"id": token}})
        deadline = time.monotonic() + timeout
        while True:
            reply = self._reply(max(0.0, deadline - time.monotonic()))
            if reply.get("return") == token:
                return

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float = 10.0) -> Any:
        """Run one agent command after a sync; its ``return``."""
        self.sync()
        doc: dict[str, Any] = {"execute": command}
        if arguments:
            doc["arguments"] = arguments
        self._send(doc)
        reply = self._reply(timeout)
        if "error" in reply:
            raise AgentCommandError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def run(self, shell_command: str, timeout: float) -> dict[str, Any]:
        """Run ``sh -c COMMAND`` through ``guest-exec``; exit code, stdout, stderr (decoded, cut)."""
        started = self.execute("guest-exec", {"path": "/bin/sh", "arg": ["-c", shell_command],
                                              "capture-output": True})
        pid = started["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.execute("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                break
            if time.monotonic() > deadline:
                return {"command": shell_command, "exitcode": None, "stdout": "", "stderr": "",
                        "error": f"still running after {timeout:.0f} s"}
            time.sleep(0.2)

        def text(key: str) -> str:
            raw = base64.b64decode(status.get(key, ""))[:MAX_OUTPUT]
            return raw.decode("utf-8", errors="replace")

        return {"command": shell_command, "exitcode": status.get("exitcode"),
                "signal": status.get("signal"), "stdout": text("out-data"), "stderr": text("err-data")}
