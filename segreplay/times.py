"""Time parsing and formatting: the one place that reads Segment timestamps.

Braze wants ISO 8601 UTC with milliseconds and `Z`. That canonical form is fixed-width,
so two canonical times compare correctly as plain strings, which state relies on.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime

# Most Segment timestamps already are `2024-03-05T14:03:22.083Z`: no datetime needed. Only
# fields that are valid whatever the month pass here; days 29-31 take the checked path.
_is_canonical = re.compile(
    r"[1-9]\d{3}-(?:0[1-9]|1[0-2])-(?:0[1-9]|1\d|2[0-8])"
    r"T(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d\.\d{3}Z"
).fullmatch


def format_time(moment: datetime) -> str:
    """`moment` (aware, or naive meaning UTC) as `YYYY-MM-DDTHH:MM:SS.mmmZ`."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}."
        f"{moment.microsecond // 1000:03d}Z"
    )


def parse_time(value: object) -> str | None:
    """Any ISO 8601 date-time (fraction optional, `Z` or offset) -> canonical UTC string.

    A time without an offset is taken as UTC. Anything else (numbers, garbage) -> None.
    """
    if not isinstance(value, str):
        return None
    if _is_canonical(value):
        return value
    try:
        return format_time(datetime.fromisoformat(value.strip()))
    except (ValueError, OverflowError):  # OverflowError: year 1 or 9999 shifted out of range
        return None


def parse_date(value: object) -> str | None:
    """A date or date-time -> `YYYY-MM-DD` (a date-time becomes its UTC date); else None."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    try:
        if len(text) == 10:
            return date.fromisoformat(text).isoformat()
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is not None:
        try:
            moment = moment.astimezone(UTC)
        except OverflowError:  # year 1 or 9999 shifted out of range
            return None
    return moment.date().isoformat()
