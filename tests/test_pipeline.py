"""The pipeline end to end in-process: dedupe, commit protocol, resume, incremental runs.

Delivery here is a sink that acknowledges every request at once (the dry run's); the
tests over real sockets against the fake Braze are in test_delivery.py."""

from __future__ import annotations

import os

import orjson
import pytest
from conftest import ScheduledSink, final_attributes, identify, segment, track, write_archive
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segreplay.config import DeliveryOptions, MappingOptions, RunConfig
from segreplay.errors import DeliveryError
from segreplay.mapping import SkipReason
from segreplay.pipeline import CHUNK_LINES, run_import
from segreplay.reporting import Change, SilentReporter
from segreplay.state import SCHEMA_VERSION, State

T1, T2, T3 = "2024-03-01T00:00:00.000Z", "2024-03-02T00:00:00.000Z", "2024-03-03T00:00:00.000Z"


class Recorder(SilentReporter):
    def __init__(self):
        self.problems, self.diff = [], []

    def problem(self, record):
        self.problems.append(record)

    def changes(self, changes: list[Change]):
        self.diff.extend(changes)


def replay(tmp_path, sources, dry_run=False, fail_after=None, reporter=None, sink=None,
           chunk_lines=CHUNK_LINES, **options):  # fmt: skip
    output = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}.jsonl"
    config = RunConfig(
        sources=tuple(str(s) for s in sources),
        state_path=str(tmp_path / "state.sqlite"),
        dry_run=dry_run,
        diff=options.pop("diff", False),
        output_path=str(output),
        dead_letter_path=str(tmp_path / "dead-letter.jsonl"),
        batch_limit=options.pop("batch_limit", "combined"),
        mapping=MappingOptions(**options),
        delivery=None if dry_run else DeliveryOptions("http://127.0.0.1:9", "test-key"),
    )
    if sink is None and not dry_run:
        sink = ScheduledSink(window=1, fail_after=fail_after)  # each answer settled alone
    summary = run_import(config, reporter or SilentReporter(), sink, chunk_lines=chunk_lines)
    return summary, [orjson.loads(line) for line in output.read_bytes().splitlines()]


def objects(bodies, array):
    return [obj for body in bodies for obj in body.get(array, [])]


def test_maps_and_packs_one_request(tmp_path, archive):
    path = archive([
        identify("u1", T1, email="a@x.com", plan="pro"),
        track("Signed Up", "u1", T2, source="ad"),
        segment("page", "u1", T2, name="Home"),
        segment("group", "u1", T2, groupId="acme"),
    ])  # fmt: skip
    summary, bodies = replay(tmp_path, [path])
    assert bodies == [
        {
            "attributes": [
                {"external_id": "u1", "email": "a@x.com", "plan": "pro", "ab_segment_group_acme": True}
            ],
            "events": [
                {"external_id": "u1", "name": "Signed Up", "time": T2, "properties": {"source": "ad"}},
                {"external_id": "u1", "name": "Viewed Home Page", "time": T2, "properties": {"name": "Home"}},
            ],
        }
    ]  # fmt: skip
    assert (summary.requests, summary.attributes_sent, summary.events_sent) == (1, 3, 2)
    assert summary.users == 1 and not summary.had_problems


def test_only_changed_attributes_are_sent(tmp_path, archive):
    path = archive([
        identify("u1", T1, email="a@x.com", plan="free", logins=1),
        identify("u1", T2, email="a@x.com", plan="free", logins=1),
        identify("u1", T3, email="a@x.com", plan="pro", logins=1),
    ])  # fmt: skip
    summary, bodies = replay(tmp_path, [path], batch_limit="combined")
    attributes = objects(bodies, "attributes")
    # Within one request the user's updates collapse into one object, latest value winning.
    assert attributes == [{"external_id": "u1", "email": "a@x.com", "plan": "pro", "logins": 1}]
    assert summary.attributes_unchanged == 5


def test_attribute_comparison_is_type_strict(tmp_path, archive):
    first = archive([identify("u1", T1, level=1)], name="a.gz")
    replay(tmp_path, [first])
    second = archive([identify("u1", T2, level="1"), identify("u1", T3, level="1")], name="b.gz")
    _, bodies = replay(tmp_path, [second])
    assert objects(bodies, "attributes") == [{"external_id": "u1", "level": "1"}]


def test_an_older_value_never_replaces_a_newer_one(tmp_path, archive):
    path = archive([identify("u1", T3, plan="pro"), identify("u1", T1, plan="free")])
    summary, bodies = replay(tmp_path, [path])
    assert objects(bodies, "attributes") == [{"external_id": "u1", "plan": "pro"}]
    assert summary.attributes_outdated == 1
    # ... across runs too, even from a file read later.
    late = archive([identify("u1", T2, plan="basic")], name="late.gz")
    summary, bodies = replay(tmp_path, [late])
    assert bodies == [] and summary.attributes_outdated == 1


@pytest.mark.parametrize(
    ("dry_run", "window"), [(True, None), (False, 1), (False, 2), (False, None)]
)
def test_an_older_value_never_wins_when_a_request_seals_on_the_users_line(
    tmp_path, archive, dry_run, window
):
    """74 events for others and one for u fill a request; u's newer identify seals it on
    u's own line, and answers may then arrive before u's older identify is decided."""
    lines = [track("E", f"other{i}", T1) for i in range(74)]
    lines += [track("E", "u", T1), identify("u", T3, plan="pro"), identify("u", T2, plan="free")]
    path = archive(lines)
    sink = None if dry_run else ScheduledSink(window=window)
    summary, bodies = replay(tmp_path, [path], dry_run=dry_run, sink=sink, chunk_lines=1)
    assert final_attributes(bodies)["u"] == {"plan": "pro"}
    assert summary.attributes_outdated == 1
    if not dry_run:  # the state agrees with what was sent
        state = State(str(tmp_path / "state.sqlite"))
        assert state.user_attributes("e:u") == {"plan": ["pro", T3]}
        state.close()


def test_a_repeated_value_moves_its_time_forward(tmp_path, archive):
    path = archive([
        identify("u1", T1, plan="pro"),
        identify("u1", T3, plan="pro"),  # confirms "pro" at T3: nothing sent
        identify("u1", T2, plan="free"),  # older than T3: dropped
    ])  # fmt: skip
    summary, bodies = replay(tmp_path, [path])
    assert objects(bodies, "attributes") == [{"external_id": "u1", "plan": "pro"}]
    assert (summary.attributes_unchanged, summary.attributes_outdated) == (1, 1)


def test_null_unsets_only_what_was_sent(tmp_path, archive):
    path = archive([
        identify("u1", T1, coupon=None, plan="pro"),  # coupon never set: not sent
        identify("u1", T2, plan=None),  # plan was sent: unset it
    ])  # fmt: skip
    _, bodies = replay(tmp_path, [path], batch_limit="per-type")
    assert objects(bodies, "attributes") == [{"external_id": "u1", "plan": None}]


def test_bare_identify_creates_the_profile_once(tmp_path, archive):
    path = archive([identify("u1", T1), identify("u1", T2), identify("u2", T1, id="u2")])
    summary, bodies = replay(tmp_path, [path])
    assert objects(bodies, "attributes") == [{"external_id": "u1"}, {"external_id": "u2"}]
    assert summary.attributes_sent == 0


def test_duplicate_message_ids_are_sent_once(tmp_path, archive):
    line = track("Signed Up", "u1", T1, messageId="m-1")
    path = archive([line, line, track("Other", "u1", T1, messageId="m-2")])
    summary, bodies = replay(tmp_path, [path])
    assert [e["name"] for e in objects(bodies, "events")] == ["Signed Up", "Other"]
    assert summary.duplicates == 1
    again = archive([line], name="copy.gz")  # a re-copied file in a later run
    summary, bodies = replay(tmp_path, [again])
    assert bodies == [] and summary.duplicates == 1


def test_purchases_split_and_dedupe_per_object(tmp_path, archive):
    order = track("Order Completed", "u1", T1, messageId="order-1", order_id="o1",
                  products=[{"product_id": "p1", "price": 5, "quantity": 250}])  # fmt: skip
    path = archive([order, order])
    summary, bodies = replay(tmp_path, [path])
    assert [p["quantity"] for p in objects(bodies, "purchases")] == [100, 100, 50]
    assert summary.purchases_sent == 3 and summary.duplicates == 1


def test_second_identical_run_sends_nothing(tmp_path, archive):
    path = archive([identify("u1", T1, plan="pro"), track("Signed Up", "u1", T1)])
    replay(tmp_path, [path])
    summary, bodies = replay(tmp_path, [path])
    assert bodies == [] and summary.requests == 0 and summary.files_already_done == 1
    # A rewritten file (new size and fingerprint) is read again; dedupe sends nothing.
    write_archive(path, [identify("u1", T1, plan="pro"), identify("u1", T1, plan="pro")])
    summary, bodies = replay(tmp_path, [path])
    assert bodies == [] and summary.lines == 2 and summary.attributes_unchanged == 2


def test_one_changed_trait_sends_one_attribute(tmp_path, archive):
    replay(tmp_path, [archive([identify("u1", T1, plan="pro", email="a@x.com")], name="a.gz")])
    changed = archive([identify("u1", T2, plan="team", email="a@x.com")], name="b.gz")
    summary, bodies = replay(tmp_path, [changed])
    assert bodies == [{"attributes": [{"external_id": "u1", "plan": "team"}]}]
    assert summary.attributes_sent == 1


def test_a_grown_directory_sends_only_new_lines(tmp_path, archive):
    archive([track("A", "u1", T1)], name="s/1/a.gz")
    logs = tmp_path / "logs"
    replay(tmp_path, [logs])
    archive([track("B", "u1", T2)], name="s/2/b.gz")
    summary, bodies = replay(tmp_path, [logs])
    assert [e["name"] for e in objects(bodies, "events")] == ["B"]
    assert summary.files_already_done == 1


def test_dry_run_changes_no_state(tmp_path, archive):
    path = archive([identify("u1", T1, plan="pro")])
    replay(tmp_path, [path], dry_run=True)
    assert not (tmp_path / "state.sqlite").exists()
    replay(tmp_path, [path])
    state_bytes = (tmp_path / "state.sqlite").read_bytes()
    changed = archive([identify("u1", T2, plan="team")], name="b.gz")
    recorder = Recorder()
    summary, bodies = replay(tmp_path, [changed], dry_run=True, diff=True, reporter=recorder)
    assert bodies == [{"attributes": [{"external_id": "u1", "plan": "team"}]}]
    assert recorder.diff == [Change("e:u1", "attribute", "plan", "pro", "team", True)]
    assert (tmp_path / "state.sqlite").read_bytes() == state_bytes


def test_bad_lines_are_counted_and_dead_lettered(tmp_path, archive):
    path = archive([
        b"{not json",
        b"\xff\xfe{}",
        b"[1, 2]",
        orjson.dumps({"type": "identify", "userId": ["a"], "timestamp": T1}),
        orjson.dumps({"userId": "u1", "timestamp": T1}),
        orjson.dumps({"type": "flush", "userId": "u1", "timestamp": T1}),
        orjson.dumps(track("OK", "u1", T1)),
    ])  # fmt: skip
    recorder = Recorder()
    summary, bodies = replay(tmp_path, [path], reporter=recorder)
    assert (summary.invalid, summary.rejected, summary.events_sent) == (3, 3, 1)
    records = [
        orjson.loads(line) for line in (tmp_path / "dead-letter.jsonl").read_bytes().splitlines()
    ]
    assert [(r["line"], r["kind"]) for r in records] == [
        (1, "invalid"), (2, "invalid"), (3, "invalid"), (4, "rejected"), (5, "rejected"), (6, "rejected")
    ]  # fmt: skip
    assert records[1]["reason"] == "invalid UTF-8"
    assert records[3]["reason"] == "userId must be a string or a number, not a list"
    assert all(r["source"] == str(path) for r in records)
    assert summary.had_problems


def test_crash_then_resume_loses_nothing_and_resends_nothing(tmp_path, archive):
    lines = [track(f"E{i}", f"u{i % 7}", T1) for i in range(400)]
    lines += [identify(f"u{i}", T2, n=i) for i in range(7)]
    path = archive(lines)
    with pytest.raises(DeliveryError):
        replay(tmp_path, [path], fail_after=3)
    first = sorted((tmp_path).glob("out-*.jsonl"))[0]
    sent_before = [orjson.loads(b) for b in first.read_bytes().splitlines()]
    summary, bodies = replay(tmp_path, [path])
    # The crashed request never reached Braze here, so nothing at all is resent.
    events = objects(sent_before[:3], "events") + objects(bodies, "events")
    assert sorted(e["name"] for e in events) == sorted(f"E{i}" for i in range(400))
    assert summary.lines_already_done > 0
    assert {a["external_id"]: a["n"] for a in objects(bodies, "attributes")} == {
        f"u{i}": i for i in range(7)
    }


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    crash_at=st.integers(min_value=0, max_value=12),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_a_crash_at_any_request_then_resume_equals_one_clean_run(tmp_path_factory, crash_at, seed):
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(300):
        user = f"u{rng.randrange(12)}"
        time = f"2024-03-{rng.randrange(1, 28):02d}T00:00:00.000Z"
        if rng.random() < 0.4:
            lines.append(
                identify(user, time, plan=rng.choice(["a", "b", "c", None]), n=rng.randrange(3))
            )
        else:
            lines.append(track("E", user, time, messageId=f"m{rng.randrange(250)}"))
    clean_dir, crash_dir = tmp_path_factory.mktemp("clean"), tmp_path_factory.mktemp("crash")
    clean_path = write_archive(clean_dir / "a.gz", lines)
    crash_path = write_archive(crash_dir / "a.gz", lines)
    _, clean = replay(clean_dir, [clean_path])
    try:
        replay(crash_dir, [crash_path], fail_after=crash_at)
    except DeliveryError:
        pass
    _, resumed = replay(crash_dir, [crash_path])
    # --output holds only what Braze answered: the first `crash_at` requests.
    first_run = (crash_dir / "out-0.jsonl").read_bytes().splitlines()
    assert len(first_run) == min(crash_at, len(clean))
    crashed = [orjson.loads(body) for body in first_run] + resumed
    key = lambda e: (e["external_id"], e["time"], e["name"])  # noqa: E731
    assert sorted(map(key, objects(clean, "events"))) == sorted(
        map(key, objects(crashed, "events"))
    )
    assert final_attributes(clean) == final_attributes(crashed)


def test_state_file_is_private_and_versioned(tmp_path, archive):
    replay(tmp_path, [archive([track("A", "u1", T1)])])
    path = tmp_path / "state.sqlite"
    assert os.stat(path).st_mode & 0o777 == 0o600
    state = State(str(path))
    assert state.schema_version == SCHEMA_VERSION and state.counts()["delivered_messages"] == 1
    state.close()


def test_a_run_that_was_killed_is_marked_interrupted_by_the_next(tmp_path, archive):
    path = archive([track("A", "u1", T1)])
    state = State(str(tmp_path / "state.sqlite"))
    state.start_run("2024-01-01T00:00:00.000Z")  # as a kill -9 leaves it: never finished
    state.close()
    replay(tmp_path, [path])
    state = State(str(tmp_path / "state.sqlite"))
    assert [(run.id, run.status) for run in state.runs()] == [(2, "finished"), (1, "interrupted")]
    state.close()


def test_a_version_1_state_is_migrated_and_keeps_its_checkpoints(tmp_path, archive):
    import sqlite3

    from segreplay.state import _MIGRATIONS

    path = archive([track("A", "u1", T1)])
    replay(tmp_path, [path])
    db_path = tmp_path / "state.sqlite"
    old = tmp_path / "v1.sqlite"
    db = sqlite3.connect(old)
    for statement in _MIGRATIONS[1].split(";"):
        db.execute(statement)
    db.execute("PRAGMA user_version=1")
    source = sqlite3.connect(db_path)
    row = source.execute(
        "SELECT path, size, fingerprint, lines_acked, done, run_id FROM files"
    ).fetchone()
    db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)", row)
    db.executemany("INSERT INTO delivered VALUES (?)", source.execute("SELECT hash FROM delivered"))
    db.commit()
    db.close()
    source.close()
    db_path.unlink()
    old.rename(db_path)
    summary, bodies = replay(tmp_path, [path])
    assert bodies == [] and summary.files_already_done == 1
    state = State(str(db_path))
    assert state.schema_version == SCHEMA_VERSION
    state.close()


def test_an_untouched_file_is_not_read_again_to_fingerprint_it(tmp_path, archive, monkeypatch):
    from segreplay import pipeline

    path = archive([track("A", "u1", T1)])
    replay(tmp_path, [path])
    reads = []
    real = pipeline.fingerprint
    monkeypatch.setattr(pipeline, "fingerprint", lambda a: reads.append(a.path) or real(a))
    summary, _ = replay(tmp_path, [path])
    assert reads == [] and summary.files_already_done == 1
    os.utime(path, ns=(1, 1))  # touched: size alone is not trusted, the content is checked
    summary, _ = replay(tmp_path, [path])
    assert reads == [str(path)] and summary.files_already_done == 1


# ------------------------------------------------------- when answers arrive changes nothing

SCHEDULES = {
    "after every request": lambda rng: lambda waiting: waiting,
    "every 3 requests": lambda rng: lambda waiting: waiting if waiting >= 3 else 0,
    "only at the end": lambda rng: lambda waiting: 0,
    "at random": lambda rng: lambda waiting: rng.randint(0, waiting),
}


def _reference(lines: list[dict]) -> tuple[list, dict]:
    """What Braze must end with, from the lines alone: each messageId's event once, and
    each attribute at its newest value by event time (ties: the larger value)."""
    from segreplay.jsonutil import dumps_canonical

    events, seen = [], set()
    newest: dict[str, dict] = {}
    for line in lines:
        user = line["userId"]
        if line["type"] == "track":
            if line["messageId"] not in seen:
                seen.add(line["messageId"])
                events.append((user, line["event"], line["timestamp"]))
            continue
        for key, value in line["traits"].items():
            rank = (line["timestamp"], dumps_canonical(value))
            if key not in newest.setdefault(user, {}) or rank > newest[user][key][0]:
                newest[user][key] = (rank, value)
    attributes = {
        user: {key: value for key, (_, value) in keys.items() if value is not None}
        for user, keys in newest.items()
    }
    return sorted(events), {user: values for user, values in attributes.items() if values}


def _random_lines(rng, count: int) -> list[dict]:
    """Identifies and tracks of a few users over a few days, so that values tie, go
    back in time and repeat; repeated messageIds are the same line sent again."""
    lines, by_message = [], {}
    for _ in range(count):
        user, time = f"u{rng.randrange(4)}", f"2024-03-0{rng.randrange(1, 5)}T00:00:00.000Z"
        if rng.random() < 0.4:
            lines.append(identify(user, time, plan=rng.choice(["a", "b", None]),
                                  n=rng.randrange(3)))  # fmt: skip
        else:
            message_id = f"m{rng.randrange(count // 2 + 1)}"
            lines.append(
                by_message.setdefault(message_id, track("E", user, time, messageId=message_id))
            )
    return lines


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    count=st.integers(1, 600),
    schedule=st.sampled_from(list(SCHEDULES)),
    window=st.sampled_from([None, 1, 3]),
    chunk_lines=st.sampled_from([1, 7, 2000]),
    seed=st.integers(0, 1000),
)
def test_when_answers_arrive_never_changes_what_braze_ends_with(
    tmp_path_factory, count, schedule, window, chunk_lines, seed
):
    import random

    lines = _random_lines(random.Random(seed), count)
    work = tmp_path_factory.mktemp("schedule")
    path = write_archive(work / "logs" / "a.gz", lines)
    sink = ScheduledSink(SCHEDULES[schedule](random.Random(seed)), window=window)
    _, bodies = replay(work, [path], sink=sink, chunk_lines=chunk_lines)
    events, attributes = _reference(lines)
    sent = sorted((e["external_id"], e["name"], e["time"]) for e in objects(bodies, "events"))
    assert sent == events
    assert {u: a for u, a in final_attributes(bodies).items() if a} == attributes
    # and a second run, on the state the first left, sends nothing
    _, again = replay(work, [path], sink=ScheduledSink(), chunk_lines=chunk_lines)
    assert again == []


# ------------------------------------------------------ options change what a file means


def test_lines_skipped_by_since_are_sent_when_a_later_run_drops_it(tmp_path, archive):
    early = [track(f"Early {n}", "u1", T1) for n in range(3)]
    late = [track(f"Late {n}", "u1", T3) for n in range(4)] + [identify("u1", T3, plan="pro")]
    path = archive(early + late)
    first, bodies = replay(tmp_path, [path], since=T2)
    assert first.skips[SkipReason.OUTSIDE_WINDOW] == 3
    assert sorted(e["name"] for e in objects(bodies, "events")) == [f"Late {n}" for n in range(4)]
    second, bodies = replay(tmp_path, [path])
    assert second.files_already_done == 0  # read again: its lines mean more now
    assert sorted(e["name"] for e in objects(bodies, "events")) == [f"Early {n}" for n in range(3)]
    assert objects(bodies, "attributes") == []  # "pro" was sent already
    third, bodies = replay(tmp_path, [path])
    assert (third.files_already_done, bodies) == (1, [])


def test_screens_skipped_by_default_are_sent_by_a_run_with_screens_all(tmp_path, archive):
    screens = [segment("screen", "u1", T2, name=f"Screen {n}") for n in range(2)]
    path = archive([track("Opened", "u1", T1), *screens])
    first, bodies = replay(tmp_path, [path])
    assert first.skips[SkipReason.SCREEN] == 2
    assert [e["name"] for e in objects(bodies, "events")] == ["Opened"]
    _, bodies = replay(tmp_path, [path], screens="all")
    assert sorted(e["name"] for e in objects(bodies, "events")) == [
        "Viewed Screen 0 Screen",
        "Viewed Screen 1 Screen",
    ]
    state = State(str(tmp_path / "state.sqlite"))
    assert list(state.report()["files_by_options"]) == ["pages=all screens=all anonymous=skip"]
    state.close()


def test_a_stray_file_is_a_warning_on_every_run_and_never_a_problem(tmp_path, archive):
    good = archive([track("A")], name="src/day/part-1.gz")
    stray = good.parent / ".DS_Store"
    stray.write_bytes(b"\x00\x00\x00\x01Bud1\x00\x00")
    for run in (1, 2):
        recorder = Recorder()
        summary, _bodies = replay(tmp_path, [good.parent], reporter=recorder)
        assert [(p["source"], p["line"], p["kind"], p["reason"]) for p in recorder.problems] == [
            (str(stray), 0, "skipped file", "neither gzip nor JSON lines")
        ], run
        assert (summary.files, summary.files_skipped, summary.had_problems) == (2, 1, False)
    assert summary.files_already_done == 1  # the archive only: the stray is never recorded


def test_lines_already_done_counts_the_lines_of_files_already_done(tmp_path, archive):
    path = archive([track("A"), track("B"), track("C")])
    replay(tmp_path, [path])
    summary, bodies = replay(tmp_path, [path])
    assert bodies == []
    assert (summary.files_already_done, summary.lines_already_done) == (1, 3)
