"""Retention policies on points at chosen times: no clock but the one the test passes in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from fleece.errors import BadInput
from fleece.maintenance.retention import Decision, Policy, parse_duration, point_time, select


def pid(when: str, tail: str = "000000") -> str:
    """``"2026-11-23 07:36"`` (UTC) → a point id taken at that minute."""
    t = datetime.strptime(when, "%Y-%m-%d %H:%M").replace(tzinfo=UTC)
    return t.strftime("%Y%m%dT%H%M%S.%fZ") + "-" + tail


def kept(decisions: list[Decision]) -> dict[str, tuple[str, ...]]:
    return {d.point_id: d.reasons for d in decisions if d.keep}


def run(points: list[str], policy: Policy, **kw: object) -> list[Decision]:
    return select(points, policy, tz=UTC, **kw)  # type: ignore[arg-type]


def test_keep_last_two_of_four_keeps_the_two_newest() -> None:
    points = [pid(f"2026-11-2{d} 01:00") for d in range(1, 5)]
    decisions = run(points, Policy(last=2))
    assert [d.point_id for d in decisions] == points  # oldest first, like fleece list
    assert kept(decisions) == {points[3]: ("last 1", "newest"), points[2]: ("last 2",)}


def test_daily_keeps_the_newest_point_of_each_day_and_days_without_points_do_not_count() -> None:
    points = [
        pid("2026-11-18 10:00"),                            # outside the three days kept
        pid("2026-11-19 09:00"), pid("2026-11-19 21:00"),  # 21:00 is that day's newest
        # 2026-11-20 and -21: the VM was off, no points; those days are not counted
        pid("2026-11-22 01:00"),
        pid("2026-11-23 02:00"), pid("2026-11-23 03:00"), pid("2026-11-23 23:59"),
    ]
    assert kept(run(points, Policy(daily=3))) == {
        pid("2026-11-23 23:59"): ("daily 2026-11-23", "newest"),
        pid("2026-11-22 01:00"): ("daily 2026-11-22",),
        pid("2026-11-19 21:00"): ("daily 2026-11-19",),
    }


def test_hourly() -> None:
    points = [pid("2026-11-23 07:05"), pid("2026-11-23 07:55"), pid("2026-11-23 08:10"),
              pid("2026-11-23 10:00")]
    assert set(kept(run(points, Policy(hourly=2)))) == {pid("2026-11-23 10:00"), pid("2026-11-23 08:10")}
    assert set(kept(run(points, Policy(hourly=5)))) == {pid("2026-11-23 10:00"), pid("2026-11-23 08:10"),
                                                        pid("2026-11-23 07:55")}


def test_weekly_uses_iso_weeks_monday_to_sunday_across_the_new_year() -> None:
    points = [
        pid("2026-12-20 12:00"),  # Sunday, 2026-W51
        pid("2026-12-21 12:00"),  # Monday, 2026-W52
        pid("2026-12-27 12:00"),  # Sunday, 2026-W52: that week's newest
        pid("2026-12-29 12:00"),  # Tuesday, 2026-W53
        pid("2027-01-03 12:00"),  # Sunday, still 2026-W53
        pid("2027-01-04 12:00"),  # Monday, 2027-W01
    ]
    assert kept(run(points, Policy(weekly=3))) == {
        pid("2027-01-04 12:00"): ("weekly 2027-W01", "newest"),
        pid("2027-01-03 12:00"): ("weekly 2026-W53",),
        pid("2026-12-27 12:00"): ("weekly 2026-W52",),
    }


def test_monthly_and_yearly() -> None:
    points = [pid("2024-06-01 00:00"), pid("2025-01-31 00:00"), pid("2025-12-01 00:00"),
              pid("2025-12-31 23:00"), pid("2026-01-01 00:00"), pid("2026-02-14 00:00")]
    assert set(kept(run(points, Policy(monthly=3)))) == {
        pid("2026-02-14 00:00"), pid("2026-01-01 00:00"), pid("2025-12-31 23:00")}
    assert kept(run(points, Policy(yearly=5))) == {
        pid("2026-02-14 00:00"): ("yearly 2026", "newest"),
        pid("2025-12-31 23:00"): ("yearly 2025",),
        pid("2024-06-01 00:00"): ("yearly 2024",),
    }


def test_combined_rules_keep_the_union_and_name_every_reason() -> None:
    # A nightly backup for 70 days, plus an extra one on the last day.
    start = datetime(2026, 9, 1, 1, 0, tzinfo=UTC)
    points = [(start + timedelta(days=n)).strftime("%Y%m%dT%H%M%S.%fZ-aaaaaa") for n in range(70)]
    extra = pid("2026-11-09 13:00")
    points.append(extra)
    decisions = run(points, Policy(last=2, daily=7, weekly=4, monthly=3))
    keep = kept(decisions)
    assert keep[extra] == ("last 1", "daily 2026-11-09", "weekly 2026-W46", "monthly 2026-11", "newest")
    assert keep[pid("2026-11-09 01:00", "aaaaaa")] == ("last 2",)  # same day as extra: not daily
    daily = {p for p, r in keep.items() if any(x.startswith("daily") for x in r)}
    assert len(daily) == 7
    assert min(daily) == pid("2026-11-03 01:00", "aaaaaa")
    # 2026-11-09 is a Monday and Sundays end ISO weeks: the weekly points
    # are today's newest and the last three Sundays.
    weekly = sorted(p for p, r in keep.items() if any(x.startswith("weekly") for x in r))
    assert weekly == [pid("2026-10-25 01:00", "aaaaaa"), pid("2026-11-01 01:00", "aaaaaa"),
                      pid("2026-11-08 01:00", "aaaaaa"), extra]
    monthly = sorted(p for p, r in keep.items() if any(x.startswith("monthly") for x in r))
    assert monthly == [pid("2026-09-30 01:00", "aaaaaa"), pid("2026-10-31 01:00", "aaaaaa"), extra]
    assert len(keep) == len({*daily, *weekly, *monthly, *[p for p, r in keep.items() if "last 2" in r]})
    assert len(decisions) - len(keep) == 71 - len(keep) > 55


def test_calendar_periods_follow_the_injected_time_zone() -> None:
    late = pid("2026-11-22 23:30")   # 01:30 on the 23rd in UTC+2
    early = pid("2026-11-23 00:30")  # 02:30 on the 23rd in UTC+2
    points = [late, early]
    assert set(kept(select(points, Policy(daily=2), tz=UTC))) == {late, early}
    plus_two = timezone(timedelta(hours=2))
    assert set(kept(select(points, Policy(daily=2), tz=plus_two))) == {early}


def test_keep_within_uses_the_injected_clock() -> None:
    points = [pid("2026-11-20 00:00"), pid("2026-11-22 12:00"), pid("2026-11-23 00:00")]
    now = datetime(2026, 11, 23, 13, 0, tzinfo=UTC)  # 13 h, 25 h and 85 h after them
    assert kept(run(points, Policy(within=timedelta(days=1)), now=now)) == {
        points[2]: ("within 1d", "newest")}
    assert set(kept(run(points, Policy(within=timedelta(hours=42)), now=now))) == set(points[1:])
    # A week later nothing is within a day, yet the newest point stays.
    later = now + timedelta(days=7)
    assert kept(run(points, Policy(within=timedelta(days=1)), now=later)) == {points[2]: ("newest",)}


def test_the_newest_point_is_kept_whatever_the_policy() -> None:
    points = [pid("2026-01-01 00:00"), pid("2026-06-01 00:00")]
    # keep-yearly 1 picks 2026's newest, which is the newest anyway; hourly 1 likewise.
    assert set(kept(run(points, Policy(hourly=1)))) == {points[1]}
    assert kept(run(points, Policy(within=timedelta(seconds=1)), now=datetime(2030, 1, 1, tzinfo=UTC))) \
        == {points[1]: ("newest",)}


def test_protected_and_in_use_points_are_kept_with_their_reason() -> None:
    points = [pid(f"2026-11-2{d} 01:00") for d in range(0, 6)]
    decisions = run(points, Policy(last=1), protected={points[0]}, in_use={points[2], "other"})
    assert kept(decisions) == {
        points[5]: ("last 1", "newest"),
        points[0]: ("protected",),
        points[2]: ("used by a running backup",),
    }
    assert [d.point_id for d in decisions if not d.keep] == [points[1], points[3], points[4]]


def test_more_budget_than_points_keeps_them_all_and_no_points_decides_nothing() -> None:
    points = [pid("2026-11-22 01:00"), pid("2026-11-23 01:00")]
    assert set(kept(run(points, Policy(last=10, daily=10)))) == set(points)
    assert run([], Policy(last=1)) == []


def test_ids_taken_in_the_same_microsecond_by_two_hosts_are_two_points() -> None:
    a, b = pid("2026-11-23 01:00", "0000aa"), pid("2026-11-23 01:00", "0000bb")
    assert len(kept(run([a, b], Policy(last=2)))) == 2
    assert point_time(a) == point_time(b) == datetime(2026, 11, 23, 1, 0, tzinfo=UTC)


def test_policy_validation() -> None:
    with pytest.raises(BadInput, match="--keep-daily must be 0 or more"):
        Policy(daily=-1)
    with pytest.raises(BadInput, match="--keep-within"):
        Policy(within=timedelta(seconds=-1))
    assert Policy().empty and Policy(last=0, daily=0).empty
    assert not Policy(yearly=1).empty and not Policy(within=timedelta(hours=1)).empty
    assert Policy(last=2, within=timedelta(days=7)).as_dict() == {
        "last": 2, "hourly": 0, "daily": 0, "weekly": 0, "monthly": 0, "yearly": 0, "within": "1w"}


@pytest.mark.parametrize(("text", "seconds"), [("0", 0), ("90", 90), ("30m", 1800), ("24h", 86400),
                                               ("7d", 604800), ("2w", 1209600), ("1Y", 31536000)])
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "-1h", "1.5h", "7 days", "h"])
def test_parse_duration_refuses_nonsense(text: str) -> None:
    with pytest.raises(BadInput):
        parse_duration(text)
