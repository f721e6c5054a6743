"""Test hooks: hold a fleece process at a named phase, so a test can kill it exactly there.

Inert in production: :func:`pause_point` returns at once unless the
environment variable ``FLEECE_TEST_PAUSE_AT`` names the phase it is called
with. When it does, the process writes its pid to the marker file named by
``FLEECE_TEST_PAUSE_FILE`` and waits until that file is deleted (the test
lets it go on; later calls then return at once) or the process is killed
(the test's SIGKILL). A test thus never sleeps and hopes: it waits for the
marker, then acts.

The phases of one ``fleece backup``, in order:

``export-live``
    the point-in-time export is up, nothing has been read;
``chunk-stored``
    a chunk has been stored, or a delta added to the backup's open pack
    (each storer thread holds after its first; readers go on until the
    pipeline's bounded queue is full);
``pack-stored``
    a pack of deltas (format 2) has been stored; with one pack, every
    chunk and delta of the disk is stored, its index is not;
``before-point``
    every disk's index is written, the restore point is not;
``before-commit``
    in tear-down: the exports, the NBD server and the device's filter are
    gone, the checkpoint bitmaps are not committed yet (the reverse-delta
    nodes go after the commit);
``deltas-unlinked``
    in tear-down: committed, the reverse-delta files unlinked (QEMU still
    holds them open), their nodes and the scratch directory not yet removed.

With ``--qga`` one more phase comes first (not in :data:`PHASES`, which every
backup reaches): ``guest-frozen``, the guest's filesystems are frozen and
the snapshot point is not taken yet.
The phases of one ``fleece copy`` (:data:`COPY_PHASES`), for its first point:

``chunk-stored``
    a chunk has been stored in the destination;
``before-point``
    the point's chunks, packs and indexes are in the destination, the point is not.

The phase of one ``fleece restore --live`` (:data:`LIVE_PHASES`):

``live-streamed``
    a disk's stream job has completed and been dismissed (its image needs the
    point no more); its NBD node, placeholder nodes and server are still there.
"""

from __future__ import annotations

import os
import threading
import time

PHASES = ("export-live", "chunk-stored", "pack-stored", "before-point", "before-commit",
          "deltas-unlinked")
COPY_PHASES = ("chunk-stored", "before-point")
LIVE_PHASES = ("live-streamed",)
PAUSE_AT = "FLEECE_TEST_PAUSE_AT"
PAUSE_FILE = "FLEECE_TEST_PAUSE_FILE"

_lock = threading.Lock()
_reached: set[str] = set()


def pause_point(phase: str) -> None:
    """Test hook: hold here while ``$FLEECE_TEST_PAUSE_AT`` is ``phase`` (see the module docstring)."""
    if os.environ.get(PAUSE_AT) != phase:
        return
    marker = os.environ.get(PAUSE_FILE)
    if not marker:
        raise RuntimeError(f"{PAUSE_AT}={phase} needs {PAUSE_FILE}")
    with _lock:
        if phase not in _reached:  # the first thread here writes the marker; others wait with it
            _reached.add(phase)
            tmp = f"{marker}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(f"{os.getpid()} {phase}\n")
            os.replace(tmp, marker)  # the test sees the whole marker or none
    while os.path.exists(marker):
        time.sleep(0.01)
