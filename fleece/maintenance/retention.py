"""Which restore points a retention policy keeps: pure, clock and time zone injected.

The rules are the ones operators know from restic and Proxmox Backup:

* ``last N`` keeps the N newest points;
* ``hourly/daily/weekly/monthly/yearly N`` walk the points newest first and
  keep the newest point of each hour (day, ISO week, month, year) that has
  one, for the N most recent such periods — periods without points do not
  count, so a VM that was off for a week still keeps N daily points;
* ``within D`` keeps every point younger than D (this is where ``now`` counts);
* a point several rules keep lists every reason.

Whatever the policy, the newest point of a VM is kept (its checkpoint
bitmap is the base of the next incremental), and so are protected points
and points a running backup reads. Calendar periods are taken in ``tz``
(the host's local time when None: "daily" means the operator's days).
A point's time is the UTC instant its id encodes (docs/format.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta, tzinfo

from fleece.errors import BadInput
from fleece.repo.format.keys import check_point_id

CALENDAR_RULES = ("hourly", "daily", "weekly", "monthly", "yearly")

_BUCKETS: dict[str, Callable[[datetime], str]] = {
    "hourly": lambda t: t.strftime("%Y-%m-%dT%H"),
    "daily": lambda t: t.strftime("%Y-%m-%d"),
    "weekly": lambda t: "{:04d}-W{:02d}".format(*t.isocalendar()[:2]),
    "monthly": lambda t: t.strftime("%Y-%m"),
    "yearly": lambda t: t.strftime("%Y"),
}

_DURATION_RE = re.compile(r"^(\d+)([smhdwy]?)$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def parse_duration(text: str) -> timedelta:
    """``90``, ``30m``, ``24h``, ``7d``, ``2w``, ``1y`` → a timedelta; ``BadInput`` otherwise."""
    m = _DURATION_RE.match(text.strip().lower())
    if not m:
        raise BadInput(f"not a duration: {text!r} (examples: 0, 30m, 24h, 7d, 2w)")
    return timedelta(seconds=int(m.group(1)) * _DURATION_UNITS[m.group(2)])


def format_duration(d: timedelta) -> str:
    """The shortest exact form of ``d`` in the units :func:`parse_duration` reads."""
    seconds = int(d.total_seconds())
    for unit in ("y", "w", "d", "h", "m"):
        if seconds and seconds % _DURATION_UNITS[unit] == 0:
            return f"{seconds // _DURATION_UNITS[unit]}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True)
class Policy:
    """How many points each rule keeps (0: the rule is off)."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: timedelta | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and value < 0:
                raise BadInput(f"--keep-{f.name} must be 0 or more, not {value}")
        if self.within is not None and self.within < timedelta(0):
            raise BadInput("--keep-within must not be negative")

    @property
    def empty(self) -> bool:
        """True when no rule would keep anything (prune refuses such a policy)."""
        counts = (self.last, *(getattr(self, r) for r in CALENDAR_RULES))
        return not any(counts) and not self.within

    def as_dict(self) -> dict[str, int | str | None]:
        """The ``--json`` form: rule → count (``within`` as a duration)."""
        out: dict[str, int | str | None] = {r: getattr(self, r) for r in ("last", *CALENDAR_RULES)}
        out["within"] = format_duration(self.within) if self.within is not None else None
        return out


@dataclass(frozen=True)
class Decision:
    """Whether one point stays, and every reason it does."""

    point_id: str
    keep: bool
    reasons: tuple[str, ...]


def point_time(point_id: str) -> datetime:
    """The UTC creation instant encoded in a point id."""
    check_point_id(point_id)
    return datetime.strptime(point_id.partition("-")[0], "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)


def select(
    point_ids: Iterable[str],
    policy: Policy,
    *,
    now: datetime | None = None,
    tz: tzinfo | None = None,
    protected: Collection[str] = (),
    in_use: Collection[str] = (),
) -> list[Decision]:
    """Decide every point of one VM; returned oldest first, like ``fleece list``.

    ``now`` only matters for ``within`` (default: the current time); ``tz``
    is where calendar periods begin (default: the host's local time).
    """
    ids = sorted(set(point_ids), reverse=True)  # newest first: ids sort by time
    reasons: dict[str, list[str]] = {pid: [] for pid in ids}
    local = {pid: point_time(pid).astimezone(tz) for pid in ids}

    for pid in ids[: policy.last]:
        reasons[pid].append(f"last {ids.index(pid) + 1}")
    for rule in CALENDAR_RULES:
        budget = getattr(policy, rule)
        seen: str | None = None
        for pid in ids:
            if budget <= 0:
                break
            bucket = _BUCKETS[rule](local[pid])
            if bucket != seen:  # the newest point of a period not seen yet
                reasons[pid].append(f"{rule} {bucket}")
                seen = bucket
                budget -= 1
    if policy.within is not None:
        now = now or datetime.now(UTC)
        for pid in ids:
            if now - point_time(pid) < policy.within:
                reasons[pid].append(f"within {format_duration(policy.within)}")
    if ids:
        reasons[ids[0]].append("newest")
    for pid in ids:
        if pid in protected:
            reasons[pid].append("protected")
        if pid in in_use:
            reasons[pid].append("used by a running backup")
    return [Decision(pid, bool(reasons[pid]), tuple(reasons[pid])) for pid in reversed(ids)]
