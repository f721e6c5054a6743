"""Test hooks: hold a fleece process at a named phase, so a test can kill it exactly there.

Inert in production: :func:`pause_point` returns at once unless the
environment variable ``FLEECE_TEST_PAUSE_AT`` names the phase it is called
with. When it does, the process writes its pid to the marker file named by
``FLEECE_TEST_PAUSE_FILE`` and waits until that file is deleted (the test
lets it go on; later calls then return at once) or the process is killed
(the test's SIGKILL). A test thus never sleeps and hopes: it waits for the
marker, then acts. Phases are members of :class:`Phase`: a call with
anything else, or a ``FLEECE_TEST_PAUSE_AT`` that names no phase, raises at
once (a typo would otherwise never pause, and a test would wait forever).

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
``point-written``
    the restore point is written, the lease not yet checked again (a lease
    broken here makes the writer withdraw the point; not in :data:`PHASES`,
    whose every phase a killed backup must survive with nothing committed);
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
    the point's chunks, packs and indexes are in the destination, the point is not;
``point-written``
    the point is in the destination, the lease not yet checked again.

The phase of one ``fleece restore --live`` (:data:`LIVE_PHASES`):

``live-streamed``
    a disk's stream job has completed and been dismissed (its image needs the
    point no more); its NBD node, placeholder nodes and server are still there.
"""

from __future__ import annotations

import os
import threading
import time
from enum import StrEnum


class Phase(StrEnum):
    """Where a fleece process can be held (see the module docstring); the value is what
    ``FLEECE_TEST_PAUSE_AT`` names."""

    GUEST_FROZEN = "guest-frozen"
    EXPORT_LIVE = "export-live"
    CHUNK_STORED = "chunk-stored"
    PACK_STORED = "pack-stored"
    BEFORE_POINT = "before-point"
    POINT_WRITTEN = "point-written"
    BEFORE_COMMIT = "before-commit"
    DELTAS_UNLINKED = "deltas-unlinked"
    LIVE_STREAMED = "live-streamed"


PHASES = (Phase.EXPORT_LIVE, Phase.CHUNK_STORED, Phase.PACK_STORED, Phase.BEFORE_POINT,
          Phase.BEFORE_COMMIT, Phase.DELTAS_UNLINKED)
COPY_PHASES = (Phase.CHUNK_STORED, Phase.BEFORE_POINT)
LIVE_PHASES = (Phase.LIVE_STREAMED,)
PAUSE_AT = "FLEECE_TEST_PAUSE_AT"
PAUSE_FILE = "FLEECE_TEST_PAUSE_FILE"

_lock = threading.Lock()
_reached: set[Phase] = set()


def pause_point(phase: Phase) -> None:
    """Test hook: hold here while ``$FLEECE_TEST_PAUSE_AT`` is ``phase`` (see the module docstring)."""
    if not isinstance(phase, Phase):
        raise TypeError(f"pause_point({phase!r}): phases are fleece.testing.Phase members")
    wanted = os.environ.get(PAUSE_AT)
    if not wanted:
        return
    if wanted not in Phase.__members__.values():
        raise RuntimeError(f"{PAUSE_AT}={wanted!r} names no phase (phases: "
                           f"{', '.join(p.value for p in Phase)})")
    if wanted != phase:
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
