"""Immutable restore points: which objects a repository locks, until when, and when to extend.

A repository made with ``fleece init --object-lock-days N`` (S3 Object Lock;
docs/s3.md "Immutable restore points") promises: every object a restore
point needs stays locked — undeletable, not overwritable — for at least N
days after the newest point that uses it. Requests stay bounded because a
lock is set with *slack*:

* every object a backup writes (chunk, pack, index, point) is locked for
  ``N + S`` days, ``S`` = :attr:`ObjectLock.slack_days`;
* each point records its *horizon*: the earliest lock end of every object it
  needs (``config`` and key objects included);
* a backup that reuses objects named by earlier points (its parent's index,
  the latest point's chunks) needs no request for them while those points'
  horizon is at least ``now + N``; once it is not (every S days or so), the
  backup extends each object its new point names that it did not write
  itself to ``now + N + S`` — one PutObjectRetention per object, then none
  again for S days. A chunk found by a dedup probe (HEAD) carries its lock
  in the HEAD reply and is extended right there if it falls short.

Time comes from :func:`lock_clock`, which tests may shift (``FLEECE_TEST_LOCK_CLOCK_OFFSET``).
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass

from fleece.errors import BadInput, RepositoryCorrupt
from fleece.repo.backends.base import Retention

MODES = ("governance", "compliance")
MAX_DAYS = 36500
DAY = 86400.0
CLOCK_OFFSET_ENV = "FLEECE_TEST_LOCK_CLOCK_OFFSET"
"""Tests only: seconds added to the clock that lock decisions use (inert when unset)."""


def lock_clock() -> float:
    """Unix seconds for lock decisions: the wall clock, plus the test offset if one is set."""
    return time.time() + float(os.environ.get(CLOCK_OFFSET_ENV) or 0)


def check_lock_days(days: int) -> int:
    """``days`` if S3 Object Lock can hold an object that long (1 … 36500), else :class:`BadInput`."""
    if not 1 <= days <= MAX_DAYS:
        raise BadInput(f"--object-lock-days must be between 1 and {MAX_DAYS}, not {days}")
    return days


@dataclass(frozen=True)
class ObjectLock:
    """The ``object_lock`` member of ``config``: how long and how objects are locked."""

    days: int
    mode: str = "governance"

    @property
    def slack_days(self) -> int:
        """Extra days every new or extended lock gets: a quarter of N, at least one.

        Larger slack means fewer extension rounds (one per S days) but
        objects that stay up to N + S days after their last use.
        """
        return max(1, math.ceil(self.days / 4))

    def retention(self, now: float) -> Retention:
        """The lock a new or extended object gets at ``now``: N + S days."""
        return Retention(self.mode, now + (self.days + self.slack_days) * DAY)

    def needed(self, now: float) -> float:
        """The lock end every object a point made at ``now`` needs: ``now`` + N days."""
        return now + self.days * DAY

    def document(self) -> dict[str, object]:
        """The ``config`` member."""
        return {"days": self.days, "mode": self.mode}

    @classmethod
    def from_document(cls, doc: object, url: str) -> ObjectLock:
        """Parse ``config``'s ``object_lock``; :class:`RepositoryCorrupt` when malformed."""
        if (not isinstance(doc, dict) or doc.get("mode") not in MODES
                or not isinstance(doc.get("days"), int) or isinstance(doc.get("days"), bool)
                or not 1 <= doc["days"] <= MAX_DAYS):
            raise RepositoryCorrupt(f"{url}: config has a malformed object_lock {doc!r}")
        return cls(int(doc["days"]), str(doc["mode"]))


class LockLedger:
    """The locks of the objects this process wrote, probed or extended (thread-safe).

    A backup asks it which objects of its new point are covered already and
    what their earliest lock end is.
    """

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()
        self.extended = 0
        """PutObjectRetention requests this process made."""

    def note(self, key: str, until: float, *, extended: bool = False) -> None:
        """Record that ``key`` is locked until ``until``."""
        with self._lock:
            self._until[key] = max(until, self._until.get(key, 0.0))
            self.extended += extended

    def until(self, key: str) -> float | None:
        """The lock end recorded for ``key``, or None when this process did not handle it."""
        with self._lock:
            return self._until.get(key)
