"""A restore point's disks served read-only over NBD from the repository, one nbdkit per disk.

The sockets live in the run's scratch directory; the servers stop (and
their sockets go) when the ``with`` block ends, however it ends. nbdkit runs
with ``--exit-with-parent``, so a fleece killed by SIGKILL takes them along.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from fleece.guest.scratch import Scratch
from fleece.repo.format.point import RestorePoint
from fleece.serve.server import NbdkitServer


@dataclass(frozen=True)
class ServedDisk:
    """One disk of the point and where it is served."""

    name: str
    size: int
    socket: Path

    @property
    def uri(self) -> str:
        """The NBD URI of the disk (``nbd+unix:///?socket=…``)."""
        return f"nbd+unix:///?socket={self.socket}"


class ServedPoint:
    """Serve ``drives`` of ``point`` (all its disks by default) while the ``with`` block runs."""

    def __init__(self, repo_url: str, point: RestorePoint, scratch: Scratch, *,
                 drives: list[str] | None = None, passphrase: bytes | None = None,
                 limit_download: float | None = None) -> None:
        self.point = point
        names = drives or [d.name for d in point.disks]
        sizes = {d.name: d.virtual_size for d in point.disks}
        self.disks = [ServedDisk(name, sizes[name], scratch / f"nbd{i}.sock")
                      for i, name in enumerate(names)]
        self._servers = [
            NbdkitServer(repo_url, point, d.name, d.socket, passphrase=passphrase,
                         private_dir=scratch / f"nbdkit{i}", limit_download=limit_download)
            for i, d in enumerate(self.disks)]

    def start(self, timeout: float = 60) -> None:
        """Start every server (their start-ups overlap) and wait until each accepts connections."""
        try:
            for server in self._servers:
                server.launch()
            for server in self._servers:
                server.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every server that runs; remove their sockets."""
        for server in self._servers:
            server.stop()

    def __enter__(self) -> ServedPoint:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
