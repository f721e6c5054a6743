"""A QMP session to one QEMU: connect, run commands, wait for events.

Thin on purpose: it turns ``qemu.qmp``'s errors into fleece's and nothing
more. What a command does to QEMU is the caller's business.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from qemu.qmp import ConnectError, EventListener, ExecInterruptedError, ExecuteError, QMPClient
from qemu.qmp.protocol import StateError

from fleece.errors import BadInput, QmpCommandError, QmpConnectError
from fleece.qmp.answers import query_version

log = logging.getLogger(__name__)

Address = str | tuple[str, int]


def parse_qmp_address(spec: str) -> Address:
    """Turn ``--qmp`` into a socket path or a ``(host, port)`` pair.

    A string naming an existing path, or holding a ``/``, is a unix socket;
    ``HOST:PORT`` with a numeric port is TCP.
    """
    if not spec:
        raise BadInput("--qmp needs a unix socket path or HOST:PORT")
    if "/" in spec or os.path.exists(spec):
        return spec
    host, sep, port = spec.rpartition(":")
    if sep and port.isdigit() and host:
        return (host.strip("[]"), int(port))
    return spec


def _check_socket_path(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise QmpConnectError(f"QMP socket {path} does not exist") from None
    except PermissionError:
        raise QmpConnectError(f"QMP socket {path}: permission denied") from None
    if not stat.S_ISSOCK(mode):
        raise QmpConnectError(f"{path} is not a socket (expected QEMU's QMP socket)")


class QmpSession:
    """One negotiated QMP connection.

    Use :func:`QmpSession.open` as an async context manager; ``execute`` runs
    one command and raises :class:`QmpCommandError` when QEMU refuses it.
    """

    def __init__(self, client: QMPClient, address: Address) -> None:
        self._client = client
        self.address = address
        self._version: tuple[int, int, int] | None = None

    @classmethod
    @asynccontextmanager
    async def open(cls, spec: str, timeout: float = 10.0) -> AsyncIterator[QmpSession]:
        """Connect to the QMP server at ``spec`` and negotiate capabilities."""
        address = parse_qmp_address(spec)
        if isinstance(address, str):
            _check_socket_path(address)
        client = QMPClient("fleece")
        try:
            await asyncio.wait_for(client.connect(address), timeout)
        except TimeoutError:
            await client.disconnect()
            raise QmpConnectError(
                f"QMP handshake with {spec} timed out after {timeout:g}s "
                "(is it a QMP socket, and is another client holding it?)"
            ) from None
        except ConnectError as exc:
            await client.disconnect()
            raise QmpConnectError(f"cannot connect to QMP at {spec}: {_root_cause(exc)}") from None
        except OSError as exc:
            await client.disconnect()
            raise QmpConnectError(f"cannot connect to QMP at {spec}: {exc.strerror or exc}") from None
        try:
            yield cls(client, address)
        finally:
            await client.disconnect()

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        """Run one QMP command and return its ``return`` value.

        ``object``, as ``qemu.qmp`` returns it: callers that read an answer
        take it through ``fleece.qmp.answers``, which checks and types it.
        """
        log.debug("qmp %s %s", command, dict(arguments or {}))
        try:
            return await self._client.execute(command, dict(arguments) if arguments else None)
        except ExecuteError as exc:
            raise QmpCommandError(command, exc.error_class, str(exc)) from None
        except (StateError, ExecInterruptedError, ConnectionError, EOFError) as exc:
            raise QmpConnectError(f"QMP connection lost during {command}: {exc}") from None

    @asynccontextmanager
    async def listen(self, *names: str) -> AsyncIterator[EventListener]:
        """Listen for the named events while the block runs."""
        listener = EventListener(list(names))
        with self._client.listen(listener):
            yield listener

    async def qemu_version(self) -> tuple[int, int, int]:
        """QEMU's (major, minor, micro) version (asked once per session: it cannot change)."""
        if self._version is None:
            v = (await query_version(self))["qemu"]
            self._version = (int(v["major"]), int(v["minor"]), int(v["micro"]))
        return self._version


def _root_cause(exc: BaseException) -> str:
    while True:
        inner = getattr(exc, "exc", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
