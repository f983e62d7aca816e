"""What a person sees: progress, problem messages, the dry-run diff and the summary.

rich on a terminal; on a pipe or in a cron log, plain lines (tqdm's meter) now and then.
The CLI imports this module lazily, so library use never loads rich.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from segreplay.jsonutil import dumps
from segreplay.reporting import SKIPPED_BY_OPTIONS, Change, Summary, skipped_label

MAX_PROBLEM_MESSAGES = 20
PLAIN_PROGRESS_EVERY_S = 30.0

# Summary rows: (key, label). Counts that are zero and marked optional are left out.
_ROWS = [
    ("lines", "lines read", False),
    ("lines_elsewhere", "lines read for other shards (--shard)", True),
    ("lines_already_done", "lines already delivered (earlier runs)", True),
    ("files_already_done", "files already done", True),
    ("skipped_anonymous", skipped_label("skipped_anonymous"), True),
    ("skipped_alias", skipped_label("skipped_alias"), True),
    ("skipped_pages", skipped_label("skipped_pages"), True),
    ("skipped_screens", skipped_label("skipped_screens"), True),
    ("outside_window", skipped_label("outside_window"), True),
    ("filtered", skipped_label("filtered"), True),
    ("skipped_deleted", "skipped: deleted users", True),
    ("skipped_suppressed", "skipped: suppressed users (--suppress)", True),
    ("anonymous_resolved", "anonymous lines sent as their userId", True),
    ("identity_conflicts", "identity conflicts (anonymousId on two users)", True),
    ("duplicates", "duplicates (messageId already sent)", False),
    ("invalid", "invalid lines", False),
    ("rejected", "rejected lines and objects", False),
    ("fields_dropped", "fields dropped", False),
    ("files_skipped", "files skipped (not archives)", True),
    ("files_truncated", "files truncated", True),
    ("users", "users", False),
    ("requests", "requests", False),
    ("attributes_sent", "attributes sent", False),
    ("attributes_unchanged", "attributes unchanged (not sent)", False),
    ("attributes_outdated", "attributes older than known (not sent)", True),
    ("events_sent", "events sent", False),
    ("purchases_sent", "purchases sent", False),
    ("data_points", "data points", False),
    ("aliases_created", "alias-only profiles created", True),
    ("merges_sent", "profiles merged (identify and merge)", True),
    ("retries", "retries", True),
    ("rate_limited", "429 answers (waited out)", True),
    ("budget_waits", "waits for the --rate budget", True),
    ("elapsed_s", "elapsed (s)", False),
]


def settled_bytes(summary: Summary, bytes_read: int) -> int:
    """How far the run is, in bytes of the archive: what was read, less the share whose
    requests Braze has not answered yet, so that the ETA follows acknowledgements."""
    if not summary.requests:
        return bytes_read
    return bytes_read * summary.requests_acknowledged // summary.requests


def _work(summary: Summary) -> str:
    waits = summary.rate_limited + summary.budget_waits
    return (
        f"{summary.lines:,} lines, {summary.requests_acknowledged:,} of {summary.requests:,} "
        f"requests acknowledged, {waits:,} rate-limit waits"
    )


def display_user(user: str) -> str:
    return user[2:] if user.startswith("e:") else f"alias {user[2:]}"


class _UserDiff:
    """One user's changes in a run: each attribute key once, as (old, known, final)."""

    __slots__ = ("attributes", "added")

    def __init__(self) -> None:
        self.attributes: dict[str, list] = {}  # key -> [old, known, final]
        self.added: list[str] = []  # events and purchases, as lines, in decision order


class ConsoleReporter:
    """Problems and progress on standard error; the diff, gathered over the run so that
    each attribute shows once per user (old -> final), on `diff_out` at `finish`."""

    def __init__(self, err: TextIO | None = None, diff_out: TextIO | None = None,
                 clock=time.monotonic) -> None:  # fmt: skip
        self._err = err or sys.stderr
        self._diff_out = diff_out or sys.stdout
        self._tty = self._err.isatty()
        self._problems = 0
        self._clock = clock
        self._started = clock()
        self._last_plain = self._started
        self._bar = None
        self._diff: dict[str, _UserDiff] = {}  # in the order users first changed
        self._merges: list[str] = []  # profiles joined, after every user's changes

    # Reporter --------------------------------------------------------------------------

    def problem(self, record: dict) -> None:
        self._problems += 1
        if self._problems <= MAX_PROBLEM_MESSAGES:
            line = record.get("line")  # 0: the whole file
            where = f"{record.get('source')}:{line}" if line else str(record.get("source"))
            key = f" [{record['key']}]" if record.get("key") else ""
            self._write(f"{where}: {record.get('kind')}{key}: {record.get('reason')}")
        elif self._problems == MAX_PROBLEM_MESSAGES + 1:
            self._write("... more problems are in the dead-letter file only")

    def notice(self, message: str) -> None:
        self._write(message)

    def progress(self, summary: Summary, bytes_done: int, bytes_total: int) -> None:
        done = settled_bytes(summary, bytes_done)
        if self._tty:
            self._rich_progress(summary, done, bytes_total)
            return
        now = self._clock()
        if now - self._last_plain < PLAIN_PROGRESS_EVERY_S:
            return
        self._last_plain = now
        from tqdm import tqdm

        meter = tqdm.format_meter(
            done, bytes_total or None, now - self._started, unit="B", unit_scale=True
        )
        self._write(f"progress: {meter} | {_work(summary)}")

    def changes(self, changes: list[Change]) -> None:
        for change in changes:
            if change.what == "merge":  # `key`'s profile joins `user`'s: anon-1 -> usr_42
                self._merges.append(f"{change.key[2:]} -> {change.user[2:]} ({change.new})")
                continue
            user = self._diff.get(change.user)
            if user is None:
                user = self._diff[change.user] = _UserDiff()
            if change.what == "attribute":
                seen = user.attributes.get(change.key)
                if seen is None:  # the value before the run: the first change's old one
                    user.attributes[change.key] = [change.old, change.known, change.new]
                else:
                    seen[2] = change.new
            elif change.what == "event":
                user.added.append(f"+ event {change.key!r} at {change.new['time']}")

            else:
                obj = change.new
                user.added.append(
                    f"+ purchase {change.key!r} {obj['price']} {obj['currency']}"
                    f" x{obj.get('quantity', 1)} at {obj['time']}"
                )

    def _write_diff(self) -> None:
        """Each user's attribute changes (a key that ends where it started is left out),
        then the events and purchases it would get."""
        diff, self._diff = self._diff, {}
        out = self._diff_out
        for user_key, user in diff.items():
            name = display_user(user_key)
            for key, (old, known, final) in user.attributes.items():
                new = dumps(final).decode()
                if not known:
                    out.write(f"{name}  + {key}: {new}\n")
                elif (old_text := dumps(old).decode()) != new:
                    out.write(f"{name}  ~ {key}: {old_text} -> {new}\n")
            for line in user.added:
                out.write(f"{name}  {line}\n")
        for line in self._merges:
            out.write(f"{line}\n")
        self._merges = []
        out.flush()

    # the rest --------------------------------------------------------------------------

    def finish(self) -> None:
        """Stop the progress bar and write the diff gathered so far."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._diff:
            self._write_diff()

    def summary(self, summary: Summary, dead_letter: str | None, dead_letters: int) -> None:
        self.finish()
        from rich.console import Console
        from rich.table import Table

        values = summary.to_dict()
        title = "segreplay dry run (nothing sent)" if summary.dry_run else "segreplay import"
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column("what")
        table.add_column("count", justify="right")
        for key, label, optional in _ROWS:
            value = values[key]
            if optional and not value:
                continue
            table.add_row(label, f"{value:,}" if isinstance(value, int) else f"{value:,.1f}")
        console = Console(file=self._err, width=None if self._tty else 80)
        console.print(table)
        if dead_letters and dead_letter:
            console.print(f"{dead_letters:,} dead-letter records in {dead_letter}")

    def _write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=self._err, flush=True)

    def _rich_progress(self, summary: Summary, bytes_done: int, bytes_total: int) -> None:
        if self._bar is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]replaying"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[detail]}"),
                console=Console(file=self._err),
                transient=True,
                refresh_per_second=4,
            )
            self._bar.start()
            self._task = self._bar.add_task("replay", total=bytes_total or None, detail="")
        elapsed = max(self._clock() - self._started, 1e-9)
        detail = f"{_work(summary)} | {summary.events_sent / elapsed:,.0f} events/s"
        self._bar.update(self._task, completed=bytes_done, detail=detail)


def print_survey(survey, out: TextIO | None = None) -> None:
    """`segreplay inspect`'s report, as tables."""
    from rich.console import Console
    from rich.table import Table

    report = survey.to_dict()
    console = Console(file=out or sys.stdout)
    first, last = report["time_range"]
    overview = Table(title="archive", show_header=False, title_justify="left")
    overview.add_column("what")
    overview.add_column("value", justify="right")
    for label, value in (
        ("files", f"{report['files']:,}"),
        ("files skipped / truncated", f"{report['files_skipped']} / {report['files_truncated']}"),
        ("lines", f"{report['lines']:,}"),
        ("invalid lines", f"{report['invalid']:,}"),
        ("rejected lines", f"{report['rejected']:,}"),
        ("users", f"{report['users']:,}"),
        ("anonymous lines", f"{report['anonymous']:,} ({report['anonymous_share']:.1%})"),
        (
            "  of visitors the archive links to a user",
            f"{report['anonymous_resolvable']:,} lines of {report['visitors_linked']:,} visitors",
        ),
        ("  visitors who stay anonymous", f"{report['visitors_anonymous']:,}"),
        ("duplicate messageIds", f"{report['duplicate_message_ids']:,}"),
        ("event time range", f"{first} .. {last}" if first else "none: no line would be sent"),
        ("data points without dedupe", f"{report['data_points_without_dedupe']:,}"),
        ("data points with dedupe", f"{report['data_points_with_dedupe']:,}"),
    ):
        overview.add_row(label, value)
    console.print(overview)
    for title, columns, rows in (
        ("lines by type", ("type", "lines"), report["by_type"].items()),
        ("skipped with these options", ("skipped", "lines", "to keep them"),
         ((SKIPPED_BY_OPTIONS[k][0], v, SKIPPED_BY_OPTIONS[k][1] or "")
          for k, v in report["skipped"].items())),
        ("custom events and purchases", ("name", "lines"), report["event_names"].items()),
        ("attributes", ("key", "lines", "changes"),
         ((k, v["lines"], v["changes"]) for k, v in report["traits"].items())),
        ("fields not sent", ("field", "lines"), report["unmapped_fields"].items()),
        ("fields dropped", ("field: reason", "count"), report["dropped_fields"].items()),
        ("problems", ("reason", "count"), report["problems"].items()),
    ):  # fmt: skip
        rows = list(rows)
        if not rows:
            continue
        table = Table(title=title, title_justify="left")
        for index, column in enumerate(columns):
            counts = index and column != "to keep them"
            table.add_column(column, justify="right" if counts else "left")
        for row in rows:
            table.add_row(*(f"{cell:,}" if isinstance(cell, int) else str(cell) for cell in row))
        console.print(table)


_DELETE_ROWS = [
    ("ids_read", "ids read", False),
    ("duplicates", "duplicates in input", False),
    ("already_deleted", "already deleted", False),
    ("deleted", "deleted now", False),
    ("braze_deleted", "profiles Braze found", True),
    ("requests", "requests", False),
    ("rejected", "refused by Braze", True),
    ("erased_messages", "messageIds erased from the state", True),
    ("retries", "retries", True),
    ("rate_limited", "rate-limit waits", True),
]


def print_delete_summary(summary, dead_letter: str | None, err: TextIO | None = None) -> None:
    """`segreplay delete`'s summary table, on standard error."""
    from rich.console import Console
    from rich.table import Table

    err = err or sys.stderr
    values = summary.to_dict()
    title = "segreplay delete, dry run (nothing sent)" if summary.dry_run else "segreplay delete"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("count", justify="right")
    for key, label, optional in _DELETE_ROWS:
        if optional and not values[key]:
            continue
        if key == "deleted" and summary.dry_run:
            label = "would be deleted"
        table.add_row(label, f"{values[key]:,}")
    console = Console(file=err, width=None if err.isatty() else 80)
    console.print(table)
    if dead_letter:
        console.print(f"{summary.rejected:,} refused ids in {dead_letter}")


def print_status(report: dict, out: TextIO | None = None) -> None:
    """`segreplay status`, as plain lines (they end up in cron mails and logs)."""
    out = out or sys.stdout
    out.write(f"state {report['state']} (schema {report['schema_version']})\n")
    out.write(
        f"{report['users']:,} users, {report['delivered_messages']:,} delivered messageIds, "
        f"{report['files_done']:,} of {report['files']:,} files done, "
        f"{report['deleted_users']:,} deleted ids (userIds and anonymousIds)\n"
    )
    if report.get("links") or report.get("merges_pending"):
        out.write(
            f"{report['links']:,} anonymousIds linked to users, "
            f"{report['merges_pending']:,} merges pending\n"
        )
    for options, count in report.get("files_by_options", {}).items():
        out.write(f"  {count:,} files read with: {options}\n")
    for item in report["files_in_progress"]:
        acked = item["lines_acked"]
        if acked > 1:
            done = f"lines 1-{acked:,} acknowledged"
        else:
            done = "line 1 acknowledged" if acked else "no line acknowledged yet"
        out.write(f"  partly done: {item['path']} ({done})\n")
    for run in report["runs"]:
        summary = run["summary"] or {}
        if "resharded_to" in summary:
            out.write(
                f"run {run['id']}: {run['status']}, started {run['started_at']} - resharded "
                f"from {summary['resharded_from']} to {summary['resharded_to']} shards\n"
            )
            continue
        if summary.get("command") == "delete":
            out.write(
                f"run {run['id']}: {run['status']}, started {run['started_at']} - delete: "
                f"{summary.get('deleted', 0):,} ids deleted, {summary.get('requests', 0):,} "
                "requests\n"
            )
            continue
        out.write(
            f"run {run['id']}: {run['status']}, started {run['started_at']}"
            f" - {summary.get('lines', 0):,} lines, {summary.get('requests', 0):,} requests,"
            f" {summary.get('events_sent', 0):,} events, "
            f"{summary.get('attributes_sent', 0):,} attributes"
            + (f", {summary['merges_sent']:,} merges" if summary.get("merges_sent") else "")
            + "\n"
        )
