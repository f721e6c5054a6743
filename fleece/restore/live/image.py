"""The output image of a live restore, made offline before QEMU opens it.

A qcow2 image of the disk's size in which the positions that read as
zeroes (:meth:`ChunkIndex.is_zero`: no base and no delta) are
already zero clusters: QEMU's stream skips them (they are allocated in the
image) and the guest reads them locally, so nothing asks the point for them.
Its header names the point's NBD socket as backing file, so that an image
whose stream was cut off never passes for a whole one; QEMU rewrites the
header without it when the stream completes.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

from fleece.errors import FleeceError
from fleece.restore.image import DiskImage
from fleece.restore.live.state import LiveDisk
from fleece.restore.output import OUTPUT_MODE
from fleece.serve.server import nbd_uri


def create_image(d: LiveDisk, image: DiskImage) -> None:
    """The output qcow2: the point's zero chunks as zero clusters, its header naming the point's
    socket as backing file; built under a temporary name and renamed into place whole."""
    output = Path(d.output)
    tmp = output.with_name(f".{output.name}.fleece-{secrets.token_hex(4)}")
    zeroes = "".join(f"write -z {start} {length}\n" for start, length in _zero_runs(image))
    try:
        _run_tool(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp), str(d.size)], output)
        os.chmod(tmp, OUTPUT_MODE)  # the guest's disk: only its owner reads it
        if zeroes:
            # Offline, before QEMU opens it: later these would be guest-visible writes.
            _run_tool(["qemu-io", "-f", "qcow2", str(tmp)], output, stdin=zeroes + "quit\n")
        _run_tool(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", nbd_uri(Path(d.socket)), "-F", "raw",
               str(tmp)], output)
        os.replace(tmp, output)  # --force replaces an old file only now, whole
    finally:
        tmp.unlink(missing_ok=True)


ZERO_RUN_MAX = 1 << 30
"""qemu-io writes at most 2 GiB at once."""


def _zero_runs(image: DiskImage) -> list[tuple[int, int]]:
    """(offset, length) of the runs of positions that read as zeroes (no base and no delta),
    each at most :data:`ZERO_RUN_MAX`."""
    return list(image.index.zero_runs(ZERO_RUN_MAX))


def _run_tool(argv: list[str], output: Path, stdin: str | None = None) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, input=stdin,
                              stdin=None if stdin is not None else subprocess.DEVNULL)
    except FileNotFoundError:
        raise FleeceError(f"{argv[0]} is not installed (Debian: qemu-utils)") from None
    out = proc.stdout.lower()
    failed = proc.returncode != 0 or (argv[0] == "qemu-io" and ("error" in out or "failed" in out))
    if failed:
        message = ((proc.stderr + proc.stdout).strip().splitlines() or ["no message"])[-1]
        raise FleeceError(f"cannot create {output}: {argv[0]}: {message}")
