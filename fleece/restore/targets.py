"""Restoring through NBD: to a new qcow2 image (via qemu-nbd) or onto an existing export.

qcow2 is written by QEMU's own code rather than ours: a fresh image made by
``qemu-img create`` is served by ``qemu-nbd`` on a private socket and the
chunks go in through libnbd from the same fetch-and-decode pool as a raw
restore (:func:`fleece.restore.copy_chunks`). Zero chunks are never
written, so they stay unallocated clusters; damage is found and named by
fleece, not reported by qemu-img as a bare I/O error. The image is built
under a temporary name beside the output and renamed into place only when
complete, so a failure leaves no partial output (and ``--force`` keeps the
old file until the new one is whole).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nbd

from fleece.errors import BadInput, FleeceError
from fleece.fleecing.transport import ClientTls, ServerTransport, configure_client
from fleece.repo.backends.file import fsync_dir
from fleece.repo.format.point import RestorePoint
from fleece.repo.repository import Repository
from fleece.restore.image import DEFAULT_WORKERS, DiskImage, RestoreResult, copy_chunks
from fleece.restore.output import OUTPUT_MODE, Buffer, data_runs

log = logging.getLogger(__name__)

NBD_SCHEMES = ("nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://", "nbds+vsock://")


def is_nbd_uri(text: str) -> bool:
    """Whether ``--output`` names an NBD export rather than a file."""
    return text.lower().startswith(NBD_SCHEMES)


class NbdTarget:
    """One libnbd connection that chunks are written through (libnbd handles are thread-safe)."""

    def __init__(self, uri: str, fresh: bool, connect_timeout: float = 0,
                 tls: ClientTls | None = None) -> None:
        self.fresh = fresh
        self.uri = uri
        deadline = time.monotonic() + connect_timeout
        while True:
            self.h = nbd.NBD()
            configure_client(self.h, uri, tls)
            try:
                self.h.connect_uri(uri)
                break
            except nbd.Error as exc:
                # A server that just created its socket may not listen yet.
                if time.monotonic() >= deadline:
                    raise BadInput(f"cannot connect to NBD export {uri}: {exc}; "
                                   "nothing was written") from None
                time.sleep(0.02)
        if self.h.is_read_only():
            self.close()
            raise BadInput(f"NBD export {uri} is read-only; nothing was written")
        self.size = int(self.h.get_size())
        self._can_zero = bool(self.h.can_zero())

    def write(self, offset: int, data: Buffer) -> None:
        """NBD writes (chunks are at most 16 MiB, below every server's limit).

        A fresh image gets no write for an aligned all-zero block: its
        clusters stay unallocated, as the disk's holes were.
        """
        if not self.fresh:
            self.h.pwrite(data, offset)
            return
        for off, run in data_runs(data, offset):
            self.h.pwrite(run, off)

    def zero(self, offset: int, length: int) -> None:
        """NBD_CMD_WRITE_ZEROES, or plain writes of zeroes where the server lacks it."""
        if self._can_zero:
            self.h.zero(length, offset)
            return
        zeros = bytes(min(length, 4 << 20))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self.h.pwrite(zeros[:n], offset)
            offset += n

    def finish(self) -> None:
        """Flush (the server's data reaches stable storage) and disconnect."""
        if self.h.can_flush():
            self.h.flush()
        self.h.shutdown()

    def close(self) -> None:
        """Drop the connection without flushing (after a failure)."""
        with contextlib.suppress(Exception):
            self.h.shutdown()


def _nbd_failure(exc: Exception, target: str, left: str) -> FleeceError:
    return FleeceError(f"writing to {target} failed: {exc}; {left}")


def restore_nbd(
    repo: Repository,
    point: RestorePoint,
    drive: str | None,
    uri: str,
    *,
    workers: int = DEFAULT_WORKERS,
    allow_damage: bool = False,
    tls: ClientTls | None = None,
) -> RestoreResult:
    """Write the disk onto an existing, writable NBD export at least as large as the disk.

    ``tls``: client credentials for an ``nbds://`` export on another host.
    """
    image = DiskImage(repo, point, drive)
    target = NbdTarget(uri, fresh=False, tls=tls)
    if target.size < image.size:
        target.close()
        raise BadInput(f"NBD export {uri} holds {target.size} bytes, the disk needs {image.size}; "
                       "nothing was written")
    left = f"the export {uri} holds a partial restore"
    try:
        result = copy_chunks(image, target, workers=workers, allow_damage=allow_damage)
        target.finish()
    except FleeceError as exc:
        target.close()
        exc.args = (f"{exc}; restore aborted and {left}",)
        raise
    except nbd.Error as exc:
        target.close()
        raise _nbd_failure(exc, uri, left) from None
    return result


def restore_qcow2(
    repo: Repository,
    point: RestorePoint,
    drive: str | None,
    output: Path,
    *,
    force: bool = False,
    workers: int = DEFAULT_WORKERS,
    allow_damage: bool = False,
    mode: int = OUTPUT_MODE,
) -> RestoreResult:
    """Write the disk as a new qcow2 image at ``output`` (replacing it only with ``force``), made
    with ``mode`` (0600 unless the config says ``group_access``)."""
    image = DiskImage(repo, point, drive)
    check_image_output(output, force)
    tmp = output.with_name(f".{output.name}.fleece-{secrets.token_hex(4)}")
    _qemu_img_create(tmp, image.size, output)
    os.chmod(tmp, mode)  # before a byte of the disk is in it
    try:
        with _qemu_nbd(tmp) as uri:
            target = NbdTarget(uri, fresh=True, connect_timeout=10)
            try:
                result = copy_chunks(image, target, workers=workers, allow_damage=allow_damage)
                target.finish()
            except BaseException:
                target.close()
                raise
        os.replace(tmp, output)
        fsync_dir(output.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        left = "no output was written" if not output.exists() else f"{output} was left unchanged"
        if isinstance(exc, FleeceError):
            exc.args = (f"{exc}; restore aborted and {left}",)
            raise
        if isinstance(exc, OSError):
            raise FleeceError(f"writing {output} failed: {exc.strerror or exc}; {left}") from None
        if isinstance(exc, nbd.Error):
            raise _nbd_failure(exc, str(output), left) from None
        raise
    log.info("restored %s disk %s to %s (qcow2)", point.id, image.disk.name, output)
    return result


def check_image_output(output: Path, force: bool, *, resuming: bool = False,
                       outcome: str = "nothing was written") -> None:
    """Refuse an output path an image file cannot be made at (``BadInput`` ending in ``outcome``).

    Its directory must exist; an existing path must be a regular file, and
    ``force`` is needed to replace it. ``resuming`` (``restore --live
    --resume``) needs the file to exist and takes it as it is.
    """
    try:
        st = os.stat(output)
    except FileNotFoundError:
        if resuming:
            raise BadInput(f"{output} does not exist: nothing to resume; {outcome}") from None
        if not output.parent.is_dir():
            raise BadInput(f"cannot create output {output}: its directory does not exist; "
                           f"{outcome}") from None
        return
    except OSError as exc:
        raise BadInput(f"cannot use output {output}: {exc.strerror}; {outcome}") from None
    if resuming:
        return
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(f"output {output} exists and is not a regular file (a qcow2 image is "
                       f"written there); {outcome}")
    if not force:
        raise BadInput(f"output {output} exists; use --force to overwrite it; {outcome}")


def _qemu_img_create(path: Path, size: int, output: Path) -> None:
    try:
        proc = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise FleeceError("qemu-img is not installed (Debian: qemu-utils); nothing was written") from None
    if proc.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        message = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise BadInput(f"cannot create output {output}: {message}; nothing was written")


@contextmanager
def _qemu_nbd(image: Path, timeout: float = 30) -> Iterator[str]:
    """Serve ``image`` (qcow2) writable on a private socket; yield its NBD URI.

    qemu-nbd without ``--persistent`` exits when its one client disconnects,
    after closing the image cleanly; the context waits for that.
    """
    private = Path(tempfile.mkdtemp(prefix="fleece-restore-"))
    sock = private / "nbd.sock"
    proc: subprocess.Popen[Any] | None = None
    try:
        try:
            proc = subprocess.Popen(
                ["qemu-nbd", "--format=qcow2", f"--socket={sock}", "--cache=writeback",
                 "--aio=threads", str(image)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise FleeceError("qemu-nbd is not installed (Debian: qemu-utils)") from None
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                raise FleeceError(f"qemu-nbd exited with status {proc.returncode}: {err}")
            if time.monotonic() > deadline:
                raise FleeceError(f"qemu-nbd did not create its socket within {timeout:.0f} s")
            time.sleep(0.01)
        yield ServerTransport(socket=str(sock)).uri()
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise FleeceError("qemu-nbd did not exit after the restore") from None
        if rc != 0:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            raise FleeceError(f"qemu-nbd exited with status {rc} closing the image: {err}")
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(private, ignore_errors=True)
