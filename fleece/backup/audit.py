"""Trust the dirty bitmap, but verify it: ``backup --audit-bitmap PERCENT``.

Before an incremental stores anything, a random sample of the chunks the
dirty bitmap calls clean (``PERCENT`` of them, at least one) is read from the
point-in-time export and compared with what the parent's index says they
hold: its digest (hashed here with the repository's hash), or zeroes. Only
positions whose parent entry is a whole chunk or the zero marker are
sampled — a position carrying deltas would need objects from the repository,
and the audit must fetch nothing (an offsite repository is not downloaded).
Any difference means the bitmap missed writes (lost or stale after a crash,
a restart, a disk edited behind QEMU's back): the disk is then backed up
full, with the reason said.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from fleece.backup.reader import ChunkPlan
from fleece.fleecing.transport import NbdHandle
from fleece.repo.format.index import ChunkIndex
from fleece.repo.repository import Repository


@dataclass
class BitmapAudit:
    """What the audit read and found."""

    candidates: int = 0
    """Clean positions that could be checked from the index alone."""
    sampled: int = 0
    mismatched: list[int] = field(default_factory=list)
    """Chunk numbers whose bytes differ from the parent's."""
    bytes_read: int = 0

    def as_dict(self, chunk_size: int) -> dict[str, Any]:
        """The ``audit`` entry of ``backup --json``."""
        return {"candidates": self.candidates, "sampled": self.sampled,
                "mismatched": len(self.mismatched), "bytes_read": self.bytes_read,
                "first_mismatch_offset": (self.mismatched[0] * chunk_size if self.mismatched else None)}


def audit_clean_chunks(h: NbdHandle, plan: ChunkPlan, parent: ChunkIndex, repo: Repository,
                       percent: float, rng: random.Random | None = None) -> BitmapAudit:
    """Read a sample of the clean chunks through ``h`` and compare them with ``parent``."""
    rng = rng or random.Random()
    audit = BitmapAudit()
    clean = [i for i in range(parent.n_chunks) if plan.read[i] == 0 and not parent.deltas_of(i)]
    audit.candidates = len(clean)
    if not clean:
        return audit
    count = min(len(clean), max(1, round(len(clean) * percent / 100)))
    for i in sorted(rng.sample(clean, count)):
        length = parent.chunk_length(i)
        data = h.pread(length, i * parent.chunk_size)
        audit.sampled += 1
        audit.bytes_read += length
        expected = parent.get(i)
        same = (not any(data)) if expected is None else repo.digest(data) == expected
        if not same:
            audit.mismatched.append(i)
    return audit
