"""``fleece restore --live``: boot a VM from a restore point at once and stream the point home.

Reached through ``fleece restore`` (:mod:`fleece.commands.restore`); the work
is in :mod:`fleece.restore.live`. ``--drive``, ``--output`` and ``--device``
pair up in the order given. With ``--json``, stdout carries one JSON object
per line: ``running`` once the VM runs on the new images, ``progress`` about
once a second per disk, ``finished`` per disk and ``done`` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleece.commands.backup import parse_size
from fleece.commands.common import human_size, open_repository, passphrase_source, run_async
from fleece.commands.progress import progress_display
from fleece.errors import BadInput
from fleece.restore.image import DiskImage
from fleece.restore.live import LiveRequest, live_restore, resume
from fleece.restore.live.state import LiveDisk
from fleece.restore.targets import check_image_output

LIVE_ONLY = ("qmp", "device", "no_start", "resume", "speed", "json")


def add_live_options(p: argparse.ArgumentParser) -> None:
    """The options of ``restore --live`` (the rest are ``restore``'s own)."""
    p.add_argument("--live", action="store_true",
                   help="instant recovery: run the VM (--qmp) on new qcow2 images at once and "
                        "stream the point into them while it runs")
    p.add_argument("--qmp", metavar="SOCKET", help="with --live: the VM's QMP socket")
    p.add_argument("--device", action="append", metavar="ID",
                   help="with --live: the VM device of each --drive, in order (default: the "
                        "drive's name)")
    p.add_argument("--no-start", action="store_true",
                   help="with --live: leave the VM paused (stream anyway; 'cont' it yourself)")
    p.add_argument("--resume", action="store_true",
                   help="with --live: carry on a live restore that stopped (fleece or its "
                        "server died, a read failed)")
    p.add_argument("--speed", metavar="RATE",
                   help="with --live: limit the stream to RATE bytes/s (e.g. 200M), "
                        "leaving the guest's I/O more room")
    p.add_argument("--json", action="store_true",
                   help="with --live: JSON progress events on stdout, one object per line")


def refuse_live_options(args: argparse.Namespace) -> None:
    """Options that mean something only with ``--live`` are bad input without it."""
    given = [o for o in LIVE_ONLY if getattr(args, o)]
    if given:
        raise BadInput(f"--{given[0].replace('_', '-')} needs --live")


def run_live(args: argparse.Namespace) -> int:
    """Check the request, then start (or resume) the live restore and stream until done."""
    started = time.monotonic()
    req = _request(args)
    emit = _Events(args.json, started)
    with progress_display(enabled=not args.json) as progress:
        emit.progress = progress
        disks = run_async((resume if args.resume else live_restore)(req, emit))
    seconds = time.monotonic() - started
    if args.json:
        emit.line({"event": "done", "point": req.point.id, "seconds": round(seconds, 3),
                   "disks": [_disk_json(d) for d in disks]})
    else:
        for d in disks:
            print(f"live-restored disk {d.drive} of {d.point} ({d.size} bytes) to {d.output} "
                  f"in {seconds:.1f} s; the VM runs on it, with no backing")
    return 0


def _request(args: argparse.Namespace) -> LiveRequest:
    if not args.qmp:
        raise BadInput("--live needs --qmp SOCKET (the VM to restore into)")
    if args.format not in (None, "qcow2"):
        raise BadInput("--live writes qcow2 images; drop --format raw")
    if args.allow_damage:
        raise BadInput("--allow-damage does not apply to --live: verify the point first")
    drives: list[str | None] = list(args.drive or [None])
    outputs = [Path(os.path.abspath(o)) for o in args.output]
    devices = args.device or []
    if len(outputs) != len(drives) or (devices and len(devices) != len(drives)):
        raise BadInput("give one --output (and, if any, one --device) per --drive, in the same order")
    if len(set(outputs)) != len(outputs):
        raise BadInput("two --outputs name the same file")
    speed = parse_size(args.speed) if args.speed else 0
    if speed < 0:
        raise BadInput("--speed must be positive")
    for out in outputs:
        check_image_output(out, args.force, resuming=args.resume,
                           outcome="nothing was changed")
    source = passphrase_source(args)
    passphrase = source() if source is not None else None
    repo = open_repository(args, passphrase=passphrase)
    point = repo.find_point(args.point, args.vm)
    images = [DiskImage(repo, point, d) for d in drives]
    names = [i.disk.name for i in images]
    if len(set(names)) != len(names):
        raise BadInput("a disk is named by two --drives")
    return LiveRequest(
        repo_url=args.repo, point=point, qmp=args.qmp, start=not args.no_start,
        passphrase=passphrase if repo.master is not None else None,
        speed=speed,
        disks=[(img, devices[i] if devices else img.disk.name, outputs[i])
               for i, img in enumerate(images)])


def _disk_json(d: LiveDisk) -> dict[str, Any]:
    return {"drive": d.drive, "device": d.qdev, "output": d.output, "size": d.size, "node": d.node}


class _Events:
    """Turns the live restore's events into JSON lines or progress bars and log lines."""

    def __init__(self, as_json: bool, started: float) -> None:
        self.as_json = as_json
        self.started = started
        self.progress: Callable[[str, int], Callable[[int], None]] | None = None
        self._bars: dict[str, tuple[Callable[[int], None], int]] = {}
        self._last: dict[str, float] = {}

    def line(self, obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def __call__(self, event: str, **fields: Any) -> None:
        now = time.monotonic()
        if event == "running":
            disks: list[LiveDisk] = fields["disks"]
            if self.as_json:
                self.line({"event": "running", "status": fields["status"],
                           "seconds": round(now - self.started, 3),
                           "disks": [_disk_json(d) for d in disks]})
            else:
                sys.stderr.write(
                    f"fleece: the VM is {fields['status']} on "
                    f"{', '.join(d.output for d in disks)} after {now - self.started:.2f} s; "
                    f"streaming {human_size(sum(d.size for d in disks))} from the point\n")
        elif event == "progress":
            drive, done, total = fields["drive"], fields["done"], fields["total"]
            if self.as_json:
                if now - self._last.get(drive, 0.0) >= 1.0:
                    self._last[drive] = now
                    self.line({"event": "progress", "drive": drive, "done": done, "total": total})
            elif self.progress is not None:
                advance, seen = self._bars.get(drive) or (self.progress(f"stream {drive}", total), 0)
                advance(done - seen)
                self._bars[drive] = (advance, done)
        elif event == "finished" and self.as_json:
            self.line({"event": "finished", "drive": fields["drive"], "output": fields["output"],
                       "size": fields["size"], "seconds": round(now - self.started, 3)})

