"""times.py: every Segment time becomes Braze's canonical UTC form, or None."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from segreplay.times import format_time, parse_date, parse_time


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param("2024-03-05T14:03:22.083Z", "2024-03-05T14:03:22.083Z", id="canonical"),
        pytest.param("2024-03-05T14:03:22Z", "2024-03-05T14:03:22.000Z", id="no-fraction"),
        pytest.param("2024-03-05T16:03:22.083+02:00", "2024-03-05T14:03:22.083Z", id="plus-2"),
        pytest.param("2024-03-05T09:03:22.083-05:00", "2024-03-05T14:03:22.083Z", id="minus-5"),
        pytest.param("2024-03-06T06:03:22+09:00", "2024-03-05T21:03:22.000Z", id="plus-9"),
        pytest.param("2024-03-05T23:30:00-05:00", "2024-03-06T04:30:00.000Z", id="next-day-utc"),
        pytest.param("2024-03-05T14:03:22.083000+00:00", "2024-03-05T14:03:22.083Z", id="python"),
        pytest.param("2024-03-05T14:03:22.083999Z", "2024-03-05T14:03:22.083Z", id="truncated"),
        pytest.param("2024-03-05T14:03:22.5Z", "2024-03-05T14:03:22.500Z", id="one-digit"),
        pytest.param("2024-03-05T14:03:22.083", "2024-03-05T14:03:22.083Z", id="naive-is-utc"),
        pytest.param(" 2024-03-05T14:03:22Z ", "2024-03-05T14:03:22.000Z", id="padded"),
        pytest.param("2024-03-05", "2024-03-05T00:00:00.000Z", id="date-only"),
        pytest.param("2024-02-29T00:00:00.000Z", "2024-02-29T00:00:00.000Z", id="leap-day"),
        pytest.param("2024-03-31T23:59:59.999Z", "2024-03-31T23:59:59.999Z", id="day-31"),
    ],
)
def test_parse_time_gives_canonical_utc(given: str, expected: str) -> None:
    assert parse_time(given) == expected


@pytest.mark.parametrize(
    "given",
    [
        pytest.param("yesterday", id="word"),
        pytest.param("", id="empty"),
        pytest.param(None, id="null"),
        pytest.param(1709647402083, id="epoch-number"),
        pytest.param(["2024-03-05T14:03:22.083Z"], id="list"),
        # Canonical-looking but not a time: must not slip through the fast path.
        pytest.param("2024-02-30T00:00:00.000Z", id="feb-30"),
        pytest.param("2023-02-29T00:00:00.000Z", id="feb-29-not-leap"),
        pytest.param("2024-13-05T14:03:22.083Z", id="month-13"),
        pytest.param("2024-03-05T24:00:00.000Z", id="hour-24"),
        pytest.param("2024-03-05T23:59:60.000Z", id="second-60"),
        pytest.param("0000-01-01T00:00:00.000Z", id="year-0"),
        # Valid input whose UTC form falls outside datetime's range.
        pytest.param("0001-01-01T00:00:00+05:00", id="before-year-1"),
        pytest.param("9999-12-31T23:59:59-01:00", id="after-year-9999"),
    ],
)
def test_parse_time_refuses(given) -> None:
    assert parse_time(given) is None


def test_format_time_converts_aware_and_takes_naive_as_utc() -> None:
    tokyo = timezone(timedelta(hours=9))
    assert format_time(datetime(2024, 3, 6, 6, 3, 22, 83999, tzinfo=tokyo)) == (
        "2024-03-05T21:03:22.083Z"
    )
    assert format_time(datetime(2024, 3, 5, 14, 3, 22)) == "2024-03-05T14:03:22.000Z"
    assert format_time(datetime(999, 1, 2, tzinfo=UTC)) == "0999-01-02T00:00:00.000Z"


def test_canonical_times_sort_as_strings() -> None:
    given = ["2024-03-05T14:03:22+02:00", "2024-03-05T11:00:00Z", "2024-03-05T12:03:22.5+00:00"]
    parsed = [parse_time(g) for g in given]
    assert sorted(parsed) == [
        "2024-03-05T11:00:00.000Z",
        "2024-03-05T12:03:22.000Z",
        "2024-03-05T12:03:22.500Z",
    ]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param("1990-04-12", "1990-04-12", id="date"),
        pytest.param("1988-07-01T00:00:00.000Z", "1988-07-01", id="datetime-z"),
        pytest.param("1985-11-30T23:30:00-05:00", "1985-12-01", id="utc-date-differs"),
        pytest.param("1979-02-03T10:00:00Z", "1979-02-03", id="datetime-no-fraction"),
        pytest.param("1990-04-12T23:00:00", "1990-04-12", id="naive"),
        pytest.param(" 1990-04-12 ", "1990-04-12", id="padded"),
        pytest.param("sometime in the 90s", None, id="words"),
        pytest.param("1990-02-30", None, id="no-such-day"),
        pytest.param("12/04/1990", None, id="not-iso"),
        pytest.param(19900412, None, id="number"),
        pytest.param(None, None, id="null"),
        pytest.param("0001-01-01T00:00:00+05:00", None, id="out-of-range"),
    ],
)
def test_parse_date(given, expected) -> None:
    assert parse_date(given) == expected
