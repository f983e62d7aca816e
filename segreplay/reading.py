"""Files -> lines -> mapped calls: the one reader `import` and `inspect` share, so both
see the same lines and name the same problems the same way."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from segreplay.config import MappingOptions
from segreplay.jsonutil import JSONDecodeError, loads
from segreplay.mapping import Mapped, map_call
from segreplay.sharding import Shard
from segreplay.source import LineReader

INVALID_RECORD_CHARS = 10_000  # of an unparseable line, kept in its dead-letter record


@dataclass(slots=True)
class Invalid:
    """A line that is not a JSON object: `reason` says what is wrong with it."""

    reason: str


class Elsewhere:
    """A line another shard owns: this one settles it without deciding or counting it."""


ELSEWHERE = Elsewhere()


def mapped_lines(
    reader: LineReader,
    options: MappingOptions,
    skip: int = 0,
    links=None,
    shard: Shard | None = None,
) -> Iterator[tuple[int, bytes, dict | None, Mapped | Invalid | Elsewhere]]:
    """(line number, raw line, parsed record or None, what it maps to) for each line
    after the first `skip`; `links` resolves anonymousIds (identity.Links). Problems with
    the file itself go to the reader's callback. With a `shard`, lines it does not own
    are only parsed far enough to find their user, and come as ELSEWHERE."""
    owns = shard.line_filter(options, links) if shard is not None else None
    for number, raw in reader.lines(skip):
        try:
            record = loads(raw)
        except JSONDecodeError as error:
            if shard is not None and not shard.owns_unparsed():
                yield number, raw, None, ELSEWHERE
            else:
                yield number, raw, None, Invalid(_json_problem(error))
            continue
        if type(record) is not dict:
            if shard is not None and not shard.owns_unparsed():
                yield number, raw, None, ELSEWHERE
            else:
                yield number, raw, None, Invalid("not a JSON object")
            continue
        if owns is not None and not owns(record):
            yield number, raw, record, ELSEWHERE
            continue
        yield number, raw, record, map_call(record, options, len(raw), links)


def invalid_record(raw: bytes) -> str:
    """What the dead letter keeps of a line that does not parse."""
    return raw[:INVALID_RECORD_CHARS].decode("utf-8", "backslashreplace")


def _json_problem(error: JSONDecodeError) -> str:
    message = str(error)
    if "utf-8" in message.lower() or "surrogate" in message.lower():
        return "invalid UTF-8"
    return f"invalid JSON: {message}"
