"""progress.py: what a person reads, as exact text."""

from __future__ import annotations

import io

from segreplay.progress import ConsoleReporter, print_status, settled_bytes
from segreplay.reporting import Change, Summary


def _reporter() -> tuple[ConsoleReporter, io.StringIO]:
    diff = io.StringIO()
    return ConsoleReporter(err=io.StringIO(), diff_out=diff), diff


def test_the_diff_shows_each_key_once_per_user_from_old_to_final() -> None:
    reporter, out = _reporter()
    event = {"name": "Login", "time": "2024-03-05T14:03:22.083Z"}
    reporter.changes([
        Change("e:u1", "attribute", "logins", None, 2),
        Change("e:u1", "attribute", "plan", "free", "pro", True),
        Change("e:u2", "attribute", "plan", "free", "team", True),
    ])  # fmt: skip
    reporter.changes([
        Change("e:u1", "attribute", "logins", 2, 1, True),
        Change("e:u1", "event", "Login", new=event),
    ])  # fmt: skip
    reporter.changes([
        Change("e:u1", "attribute", "logins", 1, 3, True),
        Change("e:u1", "attribute", "plan", "pro", "free", True),  # back where it started
        Change("a:anon-9", "attribute", "plan", None, "free"),
    ])  # fmt: skip
    assert out.getvalue() == ""  # gathered over the run, written once at its end
    reporter.finish()
    assert out.getvalue() == (
        "u1  + logins: 3\n"
        "u1  + event 'Login' at 2024-03-05T14:03:22.083Z\n"
        'u2  ~ plan: "free" -> "team"\n'
        'alias anon-9  + plan: "free"\n'
    )
    reporter.finish()
    assert out.getvalue().count("u1  + logins") == 1


def test_status_says_when_no_line_of_a_started_file_is_acknowledged() -> None:
    out = io.StringIO()
    report = {
        "state": "s.sqlite", "schema_version": 3, "users": 0, "delivered_messages": 0,
        "files_done": 0, "files": 3, "deleted_users": 0, "runs": [],
        "files_in_progress": [
            {"path": "a.gz", "lines_acked": 0},
            {"path": "b.gz", "lines_acked": 1},
            {"path": "c.gz", "lines_acked": 1200},
        ],
    }  # fmt: skip
    print_status(report, out)
    assert out.getvalue().splitlines()[2:] == [
        "  partly done: a.gz (no line acknowledged yet)",
        "  partly done: b.gz (line 1 acknowledged)",
        "  partly done: c.gz (lines 1-1,200 acknowledged)",
    ]


def test_inspect_of_an_archive_with_nothing_to_send_says_so_for_the_time_range() -> None:
    from segreplay.progress import print_survey
    from segreplay.survey import Survey

    out = io.StringIO()
    print_survey(Survey(files=1, lines=2, invalid=2), out)
    [row] = [line for line in out.getvalue().splitlines() if "event time range" in line]
    assert row.split("│")[2].strip() == "none: no line would be sent"


def test_the_run_summary_says_how_to_keep_what_the_options_skipped() -> None:
    from segreplay.mapping import SkipReason
    from segreplay.reporting import Summary

    err = io.StringIO()
    reporter = ConsoleReporter(err=err, diff_out=io.StringIO())
    summary = Summary(lines=200)
    summary.skips[SkipReason.ANONYMOUS] = 41
    summary.skips[SkipReason.SCREEN] = 134
    reporter.summary(summary, None, 0)
    rows = {
        cells[1].strip(): cells[2].strip()
        for line in err.getvalue().splitlines()
        if len(cells := line.split("│")) == 4
    }
    assert rows["skipped: screens (--screens all keeps them)"] == "134"
    assert rows["skipped: anonymous (--anonymous alias sends them)"] == "41"
    assert "skipped: pages (--pages all keeps them)" not in rows  # none skipped


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_without_a_terminal_a_plain_line_every_30_s_follows_acknowledgements() -> None:
    err = io.StringIO()
    clock = _Clock()
    reporter = ConsoleReporter(err=err, clock=clock)
    summary = Summary(lines=4000, requests=8, requests_acknowledged=2, rate_limited=1,
                      budget_waits=3)  # fmt: skip
    reporter.progress(summary, 800_000, 1_000_000)
    assert err.getvalue() == ""  # not yet 30 s
    clock.now += 30
    reporter.progress(summary, 800_000, 1_000_000)
    [line] = err.getvalue().splitlines()
    # 2 of 8 requests answered: a quarter of what was read counts as done
    assert line.startswith("progress:  20%|")
    assert line.endswith("| 4,000 lines, 2 of 8 requests acknowledged, 4 rate-limit waits")
    clock.now += 10
    reporter.progress(summary, 900_000, 1_000_000)
    assert len(err.getvalue().splitlines()) == 1


def test_settled_bytes_are_what_was_read_until_a_request_is_sent() -> None:
    assert settled_bytes(Summary(), 500) == 500
    assert settled_bytes(Summary(requests=4, requests_acknowledged=4), 500) == 500
    assert settled_bytes(Summary(requests=4, requests_acknowledged=1), 500) == 125


def test_the_diff_lists_merges_after_every_users_changes() -> None:
    reporter, diff = _reporter()
    reporter.changes([
        Change("e:usr_42", "merge", "a:anon-123", new="identify"),
        Change("e:usr_42", "merge", "a:anon-456", new="merge"),
        Change("e:usr_42", "attribute", "plan", None, "pro", False),
    ])  # fmt: skip
    reporter.finish()
    assert diff.getvalue() == (
        'usr_42  + plan: "pro"\nanon-123 -> usr_42 (identify)\nanon-456 -> usr_42 (merge)\n'
    )
