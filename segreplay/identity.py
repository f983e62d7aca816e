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
from segreplay.times import parse_time


@dataclass(frozen=True, slots=True)
class Link:
    """`anonymous_id` (or an alias call's previousId) is `external_id`, from `time` on;
    `arrived_ns`: when the first file holding the link arrived (its modification time)."""

    anonymous_id: str
    external_id: str
    time: str
    path: str = ""
    line: int = 0
    arrived_ns: int = 0


@dataclass(frozen=True, slots=True)
class Conflict:
    """A line linking an anonymousId to another user than the one it keeps."""

    link: Link  # the losing line's link
    kept: str  # the external_id the anonymousId keeps


class Links:
    """anonymousId -> external_id: the state's links (`recorded`), then those the scan
    finds, decided by `settle` before the replay reads a line."""

    def __init__(self, recorded: Callable[[str], tuple[str, int | None] | None]) -> None:
        self._recorded = functools.lru_cache(maxsize=100_000)(recorded)
        self._known: dict[str, tuple[str, int | None]] = {}  # decided in this run
        # anonymousId -> (external_id, time as written, path, line, arrived_ns) of its
        # earliest line (and the earliest arrival of any file holding it); a dict of those
        # by external_id once a second one turns up (a conflict).
        self._found: dict[str, tuple | dict[str, tuple]] = {}
        self._ignored: Callable[[str], bool] = lambda anonymous_id: False
        self._deleted: Callable[[str], bool] = lambda external_id: False
        self.passed_over: list[tuple[str, str]] = []  # (anonymous_id, deleted external_id)

    def ignore(self, ignored: Callable[[str], bool], deleted: Callable[[str], bool]) -> None:
        """anonymousIds to pass over (deleted or suppressed themselves), and userIds of
        deleted people, whose links are never recorded: an anonymousId whose link to one
        of them wins is theirs, and `settle` lists it in `passed_over`."""
        self._ignored = ignored
        self._deleted = deleted

    def observe(self, anonymous_id: str, external_id: str, time: str, path: str, line: int,
                arrived_ns: int = 0) -> None:  # fmt: skip
        """One line's link. `time` as the line wrote it: most lines repeat a link already
        seen, so times are compared as written here and parsed once per link in
        `settle`."""
        if anonymous_id == external_id:
            return  # an alias call that renames nobody, or a userId copied to both fields
        found = self._found.get(anonymous_id)
        if found is None:
            self._found[anonymous_id] = (external_id, time, path, line, arrived_ns)
            return
        if type(found) is tuple:
            if found[0] == external_id:
                if time < found[1] or arrived_ns < found[4]:
                    self._found[anonymous_id] = _earlier(found, time, path, line, arrived_ns)
                return
            found = self._found[anonymous_id] = {found[0]: found}
        seen = found.get(external_id)
        if seen is None:
            found[external_id] = (external_id, time, path, line, arrived_ns)
        elif time < seen[1] or arrived_ns < seen[4]:
            found[external_id] = _earlier(seen, time, path, line, arrived_ns)

    def settle(self) -> tuple[list[Link], list[Conflict]]:
        """Decide the new links: (links to record, conflicts to report, one for each other
        user an anonymousId was linked to). A link an earlier run recorded keeps its user;
        one seen again in a file that arrived earlier is recorded again, with that arrival."""
        new: list[Link] = []
        conflicts: list[Conflict] = []
        deleted = self._deleted
        for anonymous_id, found in self._found.items():
            if self._ignored(anonymous_id):
                continue
            candidates = [
                Link(anonymous_id, external_id, parse_time(time) or time, path, line, arrived)
                for external_id, time, path, line, arrived in (
                    (found,) if type(found) is tuple else found.values()
                )
            ]
            kept = self.entry(anonymous_id)
            if kept is None:
                winner = min(candidates, key=lambda link: link.time)  # stable: first read
                if deleted(winner.external_id):  # theirs: deleted with them, never recorded
                    self.passed_over.append((anonymous_id, winner.external_id))
                    continue
                new.append(winner)
                self._known[anonymous_id] = (winner.external_id, winner.arrived_ns)
                kept = self._known[anonymous_id]
            else:
                for link in candidates:
                    if (
                        link.external_id == kept[0]
                        and kept[1] is not None
                        and (link.arrived_ns < kept[1])
                    ):
                        new.append(link)
                        kept = self._known[anonymous_id] = (kept[0], link.arrived_ns)
            # A deleted person is never named again, not even in a conflict's record.
            conflicts += [
                Conflict(link, kept[0])
                for link in candidates
                if link.external_id != kept[0] and not deleted(link.external_id)
            ]
        self._found = {}
        return new, conflicts

    def entry(self, anonymous_id: str) -> tuple[str, int | None] | None:
        """(external_id, arrived_ns) of the link that holds for `anonymous_id`, if any."""
        known = self._known.get(anonymous_id)
        return known if known is not None else self._recorded(anonymous_id)

    def get(self, anonymous_id: str) -> str | None:
        entry = self.entry(anonymous_id)
        return entry[0] if entry is not None else None

    def arrived_by(self, arrived_ns: int | None) -> ArrivedLinks:
        """The links that resolve lines of a file that arrived at `arrived_ns`, when
        shards share the work (docs/scale.md)."""
        return ArrivedLinks(self, arrived_ns)


class ArrivedLinks:
    """Links, as a file that arrived at `arrived_ns` may use them across shards: only
    those first held by a file that arrived no later. Each shard decides a file's lines
    on its own, perhaps runs apart; every shard deciding this file has read every file
    that arrived before it, so all of them resolve its lines alike. A link found later
    leaves the line on its alias profile, merged into the user afterwards."""

    __slots__ = ("_links", "_arrived_ns")

    def __init__(self, links: Links, arrived_ns: int | None) -> None:
        self._links = links
        self._arrived_ns = arrived_ns

    def get(self, anonymous_id: str) -> str | None:
        entry = self._links.entry(anonymous_id)
        if entry is None:
            return None
        external_id, arrived_ns = entry
        if arrived_ns is None or self._arrived_ns is None or arrived_ns <= self._arrived_ns:
            return external_id
        return None


def _earlier(found: tuple, time: str, path: str, line: int, arrived_ns: int) -> tuple:
    """`found` with the earlier of its line and this one, and the earlier arrival."""
    first = (found[0], time, path, line) if time < found[1] else found[:4]
    return (*first, min(arrived_ns, found[4]))


def scan(reader: LineReader, skip: int, links: Links) -> None:
    """Add the links in the file's lines after the first `skip` to `links`. Cheap: a line
    that cannot hold a userId and another id is not parsed, and nothing is mapped."""
    path = reader.archive.path
    arrived_ns = reader.archive.mtime_ns or 0
    observe = links.observe
    for number, raw in reader.lines(skip):
        if b'"userId":null' in raw or b"userId" not in raw:
            continue  # Segment writes compact JSON: an anonymous line links nothing
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
        time = record.get("timestamp")
        if type(time) is not str or not time:
            time = event_time(record)
        if time:
            observe(other, external_id, time, path, number, arrived_ns)
