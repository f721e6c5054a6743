"""Freeze and thaw the guest's filesystems through the QEMU guest agent.

The agent speaks JSON lines over the host end of a virtio-serial port (a
unix socket, ``-chardev socket,path=…,server=on``). The socket may hold stale
replies of an earlier client, so every session starts with
``guest-sync-delimited``: QEMU's agent answers it after a 0xFF byte, and
everything before that byte is discarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from types import TracebackType
from typing import Any

from fleece.errors import ExportError

TIMEOUT = 30.0
"""Seconds to wait for one agent reply; a freeze flushes the guest's caches and may take a while."""


class GuestAgent:
    """One connection to a guest agent socket."""

    def __init__(self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.path = path
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, path: str, timeout: float = TIMEOUT) -> GuestAgent:
        """Connect to the agent at ``path`` and synchronise with it."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
        except (OSError, TimeoutError) as exc:
            raise ExportError(f"cannot reach the guest agent at {path}: {exc}; nothing was changed") from None
        agent = cls(path, reader, writer)
        try:
            await agent._sync(timeout)
        except BaseException:
            await agent.close()
            raise
        return agent

    async def __aenter__(self) -> GuestAgent:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection."""
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def _sync(self, timeout: float) -> None:
        token = secrets.randbelow(1 << 31)
        # A leading 0xFF makes the agent drop any partial request of an earlier client.
        self._writer.write(b"\xff" + _encode("guest-sync-delimited", {"id": token}))
        await self._writer.drain()
        try:
            await asyncio.wait_for(self._reader.readuntil(b"\xff"), timeout)
            while True:
                reply = await asyncio.wait_for(self._read_reply(), timeout)
                if reply.get("return") == token:
                    return
        except (TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
            raise ExportError(
                f"the guest agent at {self.path} did not answer guest-sync-delimited ({exc or 'timeout'});"
                " nothing was changed"
            ) from None

    async def _read_reply(self) -> dict[str, Any]:
        line = await self._reader.readline()
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
        text = line.strip(b"\xff \r\n")
        if not text:
            return {}
        reply: dict[str, Any] = json.loads(text)
        return reply

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float = TIMEOUT) -> Any:
        """Run one agent command and return its ``return`` value."""
        self._writer.write(_encode(command, arguments))
        await self._writer.drain()
        try:
            reply = await asyncio.wait_for(self._read_reply(), timeout)
        except (TimeoutError, asyncio.IncompleteReadError, OSError, ValueError) as exc:
            raise ExportError(f"guest agent {command} failed: {exc or 'timeout'}") from None
        if "error" in reply:
            raise ExportError(f"guest agent refused {command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    async def freeze(self) -> int:
        """Freeze the guest's filesystems; the number frozen."""
        return int(await self.execute("guest-fsfreeze-freeze") or 0)

    async def thaw(self) -> int:
        """Thaw the guest's filesystems; the number thawed."""
        return int(await self.execute("guest-fsfreeze-thaw") or 0)


def _encode(command: str, arguments: dict[str, Any] | None = None) -> bytes:
    msg: dict[str, Any] = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    return json.dumps(msg).encode() + b"\n"
