"""Who an anonymous visitor turned out to be: the links an archive holds (a line with
both a userId and an anonymousId, an `alias` call), found by a cheap pass over the
run's files before the replay, so that anonymous lines go straight to the known user.

A link an earlier run recorded always holds; among new ones, the first by event time
wins, and the others are conflicts (identity.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from segreplay.jsonutil import JSONDecodeError, loads
from segreplay.mapping import Rejected, anonymous_id_of, event_time, external_id_of
from segreplay.source import LineReader


@dataclass(frozen=True, slots=True)
class Link:
    """`anonymous_id` (or an alias call's previousId) is `external_id`, from `time` on."""

    anonymous_id: str
    external_id: str
    time: str
    path: str = ""
    line: int = 0


@dataclass(frozen=True, slots=True)
class Conflict:
    """A line linking an anonymousId to another user than the one it keeps."""

    link: Link  # the losing line's link
    kept: str  # the external_id the anonymousId keeps


class Links:
    """anonymousId -> external_id: the state's links (`recorded`), then those the scan
    finds, decided by `settle` before the replay reads a line."""

    def __init__(self, recorded: Callable[[str], str | None]) -> None:
        self._recorded = functools.lru_cache(maxsize=100_000)(recorded)
        self._known: dict[str, str] = {}  # decided in this run
        self._candidates: dict[str, list[Link]] = {}  # found, in reading order

    def observe(self, link: Link) -> None:
        if link.anonymous_id == link.external_id:
            return  # an alias call that renames nobody, or a userId copied to both fields
        self._candidates.setdefault(link.anonymous_id, []).append(link)

    def settle(self) -> tuple[list[Link], list[Conflict]]:
        """Decide the new links: (links to record, conflicts to report). A conflict with a
        link an earlier run recorded is reported too; the earlier link keeps."""
        new: list[Link] = []
        conflicts: list[Conflict] = []
        for anonymous_id, candidates in self._candidates.items():
            kept = self.get(anonymous_id)
            if kept is None:
                winner = min(candidates, key=lambda link: link.time)  # stable: first read
                kept = winner.external_id
                new.append(winner)
            conflicts += [Conflict(link, kept) for link in candidates if link.external_id != kept]
        self._known.update((link.anonymous_id, link.external_id) for link in new)
        self._candidates = {}
        return new, conflicts

    def get(self, anonymous_id: str) -> str | None:
        known = self._known.get(anonymous_id)
        return known if known is not None else self._recorded(anonymous_id)


def scan(reader: LineReader, skip: int, links: Links) -> None:
    """Add the links in the file's lines after the first `skip` to `links`. Cheap: a line
    that cannot hold two ids is not parsed, and nothing is mapped."""
    path = reader.archive.path
    for number, raw in reader.lines(skip):
        if b"nonymousId" not in raw and b"previousId" not in raw:
            continue
        try:
            record = loads(raw)
        except JSONDecodeError:
            continue  # the replay pass reports it
        if type(record) is not dict:
            continue
        if record.get("type") == "alias":
            other = anonymous_id_of(record, "previousId")
        else:
            other = anonymous_id_of(record)
        if not other:
            continue
        external_id = external_id_of(record)
        if not external_id or type(external_id) is Rejected:
            continue
        time = event_time(record)
        if time is not None:
            links.observe(Link(other, external_id, time, path, number))
