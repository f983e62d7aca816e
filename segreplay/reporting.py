"""What a run reports: the summary counts, the dry-run diff, the Reporter a person sees
them through (the CLI's lives in progress.py), and the dead-letter file."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Protocol

from segreplay.jsonutil import dumps
from segreplay.mapping import SkipReason

# Lines the mapping options skip, by their Summary counter: what they are, and how to
# keep them (None where the user's own filter skipped them: nothing to say).
SKIPPED_BY_OPTIONS: dict[str, tuple[str, str | None]] = {
    "skipped_anonymous": ("anonymous", "--anonymous alias sends them"),
    "skipped_alias": ("alias calls", "--anonymous alias uses them"),
    "skipped_pages": ("pages", "--pages all keeps them"),
    "skipped_screens": ("screens", "--screens all keeps them"),
    "outside_window": ("outside --since/--until", None),
    "filtered": ("filtered by --events-allow/--events-deny", None),
}


def skipped_label(counter: str) -> str:
    """`skipped: screens (--screens all keeps them)`: what was skipped and how to keep it."""
    what, keep = SKIPPED_BY_OPTIONS[counter]
    return f"skipped: {what} ({keep})" if keep else f"skipped: {what}"


@dataclass
class Summary:
    """The run's counts; `to_dict` gives the --json object (cli.md names the keys)."""

    lines: int = 0
    lines_elsewhere: int = 0  # read, but another shard's (--workers, --shard)
    skips: Counter = field(default_factory=Counter)  # SkipReason -> lines
    duplicates: int = 0
    invalid: int = 0
    rejected: int = 0
    fields_dropped: int = 0
    users: int = 0
    requests: int = 0  # sent (a dry run: sealed)
    requests_acknowledged: int = 0
    attributes_sent: int = 0
    attributes_unchanged: int = 0
    attributes_outdated: int = 0
    events_sent: int = 0
    purchases_sent: int = 0
    retries: int = 0
    rate_limited: int = 0  # 429s
    budget_waits: int = 0  # waits for the --rate budget before a request could go
    files: int = 0
    files_skipped: int = 0
    files_truncated: int = 0
    files_already_done: int = 0
    lines_already_done: int = 0
    bytes_read: int = 0
    aliases_created: int = 0  # alias-only profiles created for anonymous visitors
    anonymous_resolved: int = 0  # anonymous lines sent as the userId they turned out to be
    merges_sent: int = 0  # /users/identify and /users/merge items Braze acknowledged
    identity_conflicts: int = 0  # lines linking an anonymousId to a second userId
    requests_abandoned: int = 0  # still unanswered when a stop's grace period ended
    elapsed_s: float = 0.0
    dry_run: bool = False
    interrupted: bool = False  # stopped by SIGINT or SIGTERM before the end

    def skip(self, reason: SkipReason) -> None:
        self.skips[reason] += 1

    @property
    def data_points(self) -> int:
        return self.attributes_sent + self.events_sent + self.purchases_sent

    @property
    def had_problems(self) -> bool:
        """Exit status 3. A skipped file (plainly not an archive: .DS_Store, a manifest)
        is only a warning: it would otherwise fail the first run and pass the next."""
        return bool(self.invalid or self.rejected or self.files_truncated)

    def to_dict(self) -> dict:
        summary = asdict(self)
        del summary["skips"]
        for reason in SkipReason:
            summary[reason.value] = self.skips[reason]
        summary["elapsed_s"] = round(self.elapsed_s, 3)
        summary["data_points"] = self.data_points
        return summary


@dataclass(frozen=True, slots=True)
class Change:
    """One line of a dry-run diff: `old` is None for a value never sent."""

    user: str
    what: str  # "attribute", "event", "purchase"
    key: str
    old: object = None
    new: object = None
    known: bool = False  # whether an old value exists (None can be a value)


class Reporter(Protocol):
    """How the pipeline talks to a person. The CLI supplies one; tests may use Silent."""

    def problem(self, record: dict) -> None: ...
    def notice(self, message: str) -> None: ...
    def progress(self, summary: Summary, bytes_done: int, bytes_total: int) -> None: ...
    def changes(self, changes: list[Change]) -> None: ...


class SilentReporter:
    def problem(self, record: dict) -> None:
        pass

    def notice(self, message: str) -> None:
        pass

    def progress(self, summary: Summary, bytes_done: int, bytes_total: int) -> None:
        pass

    def changes(self, changes: list[Change]) -> None:
        pass


class DeadLetter:
    """Rejected lines and dropped fields, as JSON lines; the file is made on first use."""

    def __init__(self, path: str | None, reporter: Reporter) -> None:
        self.path = path
        self.count = 0
        self._reporter = reporter
        self._file = None

    def write(self, source: str, line: int, kind: str, reason: str, record, key=None) -> None:
        """One record: where (source file, line), what kind of problem, why, and the
        Segment line (or Braze object) itself; `key` names a dropped field."""
        entry = {"source": source, "line": line, "kind": kind}
        if key is not None:
            entry["key"] = key
        entry["reason"] = reason
        entry["record"] = record
        self.count += 1
        self._reporter.problem(entry)
        if self.path is None:
            return
        if self._file is None:
            self._file = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        self._file.write(dumps(entry) + b"\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
