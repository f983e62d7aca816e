"""kill -9 at random moments of a live replay, then the same command again: nothing lost,
duplicates bounded by what was in flight, a dead run's lock never in the way, and the
resumed run skipping what the killed one had settled.

Every run is a real `segreplay import` process talking to the fake Braze over a socket.
The fake answers after a delay, so kills land while requests are in flight; a kill is
timed by the requests the fake has seen (seeded), not by the clock, so it lands at the
same point of the run on a fast machine and a slow one.
"""

from __future__ import annotations

import collections
import gzip
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from conftest import final_attributes

from samples.generate import generate
from segreplay.config import MAX_OBJECTS_PER_REQUEST
from segreplay.fake import FakeBraze
from segreplay.state import State

SEGREPLAY = [sys.executable, "-m", "segreplay"]
KEY = "resume-test-key"
CONCURRENCY = 4
# What a kill can cost: the requests in flight, each Braze processed but never answered.
DUPLICATE_BOUND = CONCURRENCY * MAX_OBJECTS_PER_REQUEST
LATENCY_MS = 10.0


def _canonical(obj: dict) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def _event_key(obj: dict) -> tuple:
    """An event's identity: who, what, when, and its properties."""
    return (obj["external_id"], obj["name"], obj["time"], _canonical(obj.get("properties", {})))


def _stored_key(kind: str, obj: dict) -> tuple:
    return (kind, *_event_key(obj)) if kind == "event" else (kind, _canonical(obj))


@dataclass
class Archive:
    logs: Path
    files: int
    lines: int  # every line of every file
    requests: int  # requests a clean run sends
    stored: collections.Counter  # events and purchases a clean run stores
    attributes: dict[str, dict]  # each user's final attributes after a clean run


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SEGREPLAY, *args], cwd=cwd, env=_environment(), capture_output=True, timeout=60
    )


def _environment() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("BRAZE_", "SEGREPLAY_"))}


def _make_archive(root: Path, seed: int, lines: int = 8000, **layout) -> Archive:
    """Generated lines and what the dry run's --output says a clean run sends."""
    logs = root / "segment-logs"
    paths = generate(logs, lines=lines, users=lines // 10, bad=False, seed=seed, **layout)
    output = root / "dry-run.jsonl"
    result = _cli(
        "import", str(logs), "--dry-run", "--output", str(output),
        "--state", str(root / "dry-state.sqlite"), "--dead-letter", str(root / "dry-dl.jsonl"),
        cwd=root,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    bodies = [orjson.loads(line) for line in output.read_bytes().splitlines()]
    stored = collections.Counter(
        _stored_key(kind, obj)
        for body in bodies
        for kind, array in (("event", "events"), ("purchase", "purchases"))
        for obj in body.get(array, ())
    )
    lines = sum(gzip.decompress(path.read_bytes()).count(b"\n") for path in paths)
    return Archive(logs, len(paths), lines, len(bodies), stored, final_attributes(bodies))


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Archive:
    """18 files over 2 sources and 3 days, about 75 requests."""
    made = _make_archive(tmp_path_factory.mktemp("archive"), seed=21)
    assert made.files == 18 and made.requests >= 60
    assert sum(made.stored.values()) > 4000
    return made


# ----------------------------------------------------------------------------- the runs


class Replay:
    """The same `segreplay import` command, run again and again on one state."""

    def __init__(self, fake: FakeBraze, logs: Path, work: Path) -> None:
        self.fake = fake
        self.work = work
        self.state = work / "state.sqlite"
        self.argv = [
            *SEGREPLAY, "import", str(logs), "--endpoint", fake.url, "--api-key", KEY,
            "--state", str(self.state), "--concurrency", str(CONCURRENCY),
            "--dead-letter", str(work / "dead-letter.jsonl"), "--json",
        ]  # fmt: skip
        self.starts = 0
        # Fake request numbers of each killed run: (first, last).
        self.killed: list[tuple[int, int]] = []

    def start(self) -> subprocess.Popen:
        self.starts += 1
        name = self.work / f"run-{self.starts}"
        with open(f"{name}.out", "wb") as out, open(f"{name}.err", "wb") as err:
            return subprocess.Popen(
                self.argv, cwd=self.work, env=_environment(), stdout=out, stderr=err
            )

    def requests_seen(self) -> int:
        return self.fake.stats()["requests"]

    def wait_for_requests(self, process: subprocess.Popen, count: int) -> None:
        deadline = time.monotonic() + 30
        while self.requests_seen() < count:
            assert process.poll() is None, f"the run ended before request {count}"
            assert time.monotonic() < deadline, f"request {count} never came"
            time.sleep(0.002)

    def kill_at(self, requests: int, delay_s: float) -> None:
        """Start a run and kill -9 it `delay_s` after the fake saw `requests` requests."""
        first = self.requests_seen() + 1
        process = self.start()
        try:
            if requests:
                self.wait_for_requests(process, first - 1 + requests)
            time.sleep(delay_s)
            assert process.poll() is None, "the run finished before the kill: nothing tested"
        finally:
            process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=10) == -signal.SIGKILL
        # Bytes already on the wire reach the fake after the process died: every one is
        # read once the fake has seen its connections close.
        deadline = time.monotonic() + 10
        while self.fake.open_connections():
            assert time.monotonic() < deadline, "a dead client's connection stayed open"
            time.sleep(0.002)
        self.killed.append((first, self.requests_seen()))

    def complete(self) -> dict:
        """Run to the end; return its --json summary."""
        process = self.start()
        assert process.wait(timeout=60) == 0, self.stderr()
        return orjson.loads((self.work / f"run-{self.starts}.out").read_bytes())

    def stderr(self) -> str:
        return (self.work / f"run-{self.starts}.err").read_text()

    def checkpoints(self) -> list:
        if not self.state.exists():
            return []  # killed before it made the state
        state = State(str(self.state))
        try:
            return state.checkpoints()
        finally:
            state.close()

    def status(self) -> dict:
        result = _cli("status", "--state", str(self.state), "--json", cwd=self.work)
        assert result.returncode == 0, result.stderr.decode()
        return orjson.loads(result.stdout)


def _accepted(log: Path) -> list[tuple[int, tuple]]:
    """(fake request number, identity) of every event and purchase in the fake's log."""
    accepted = []
    for line in log.read_bytes().splitlines():
        entry = orjson.loads(line)
        if entry["kind"] in ("event", "purchase"):
            accepted.append((entry["request"], _stored_key(entry["kind"], entry["object"])))
    return accepted


def _assert_delivered(replay: Replay, log: Path, archive: Archive) -> int:
    """Nothing lost, nothing the archive does not hold, duplicates only from requests in
    flight at a kill, every user's attributes as after a clean run. Returns duplicates."""
    accepted = _accepted(log)
    stored = collections.Counter(key for _, key in accepted)
    missing = archive.stored - stored
    assert not missing, f"{sum(missing.values())} events or purchases lost"
    assert set(stored) == set(archive.stored), "stored something a clean run never sends"
    duplicates = sum(stored.values()) - sum(archive.stored.values())
    assert duplicates <= len(replay.killed) * DUPLICATE_BOUND
    # Each kill resends only what its in-flight requests carried: at most CONCURRENCY
    # requests of the killed run hold a first copy of a duplicate.
    twice = {key for key, count in stored.items() if archive.stored[key] == 1 and count > 1}
    first_copy: dict = {}
    for request, key in accepted:
        if key in twice:
            first_copy.setdefault(key, request)
    for first, last in replay.killed:
        # A later kill's range also holds the second copies of an earlier kill's
        # duplicates: only where a first copy went counts against this kill.
        holding = {request for request in first_copy.values() if first <= request <= last}
        assert len(holding) <= CONCURRENCY, (first, last, sorted(holding))
    if not replay.killed:
        assert duplicates == 0
    profiles = {p["external_id"]: p["attributes"] for p in replay.fake.profiles()}
    assert profiles == archive.attributes
    assert replay.fake.stats()["accepted"]["event"] == sum(
        count for key, count in stored.items() if key[0] == "event"
    )
    return duplicates


def _assert_all_done(replay: Replay, archive: Archive) -> None:
    status = replay.status()
    assert (status["files"], status["files_done"], status["files_in_progress"]) == (
        archive.files,
        archive.files,
        [],
    )


def _assert_fast_resume(summary: dict, before: list, archive: Archive) -> None:
    """The resumed run skipped, unparsed, exactly what the killed one had settled."""
    done = [c for c in before if c.done]
    assert summary["files_already_done"] == len(done)
    # every line an earlier run settled: in files done and in files partly done
    assert summary["lines_already_done"] == sum(c.lines_acked for c in before)
    assert summary["lines"] + sum(c.lines_acked for c in before) == archive.lines


# ------------------------------------------------------------------------------- the tests


# (requests the fake has seen, as a share of a clean run's, before the kill is armed)
KILL_POINTS = {
    "before-any-request": None,
    "first-request": (0.0, 0.0),
    "mid-run": (0.3, 0.5),
    "late": (0.7, 0.9),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_then_the_same_command_loses_nothing(point, archive, tmp_path):
    rng = random.Random(f"resume-{point}")
    log = tmp_path / "fake-braze.jsonl"
    with FakeBraze(api_key=KEY, latency_ms=LATENCY_MS, log_path=str(log)) as fake:
        replay = Replay(fake, archive.logs, tmp_path)
        share = KILL_POINTS[point]
        if share is None:
            replay.kill_at(0, 0.0)
        else:
            requests = max(1, round(rng.uniform(*share) * archive.requests))
            replay.kill_at(requests, rng.uniform(0, LATENCY_MS / 1000))
        before = replay.checkpoints()
        if point in ("mid-run", "late"):
            assert before and any(c.lines_acked for c in before), "the kill left no checkpoint"

        # The dead run's lock file is still there, naming it; it blocks nobody.
        assert (tmp_path / "state.sqlite.lock").exists() or not before
        summary = replay.complete()
        assert "in use" not in replay.stderr()
        assert summary["files"] == archive.files
        _assert_fast_resume(summary, before, archive)
        _assert_delivered(replay, log, archive)
        _assert_all_done(replay, archive)


def test_several_kills_then_a_second_complete_run_sends_nothing(archive, tmp_path):
    rng = random.Random("resume-several")
    log = tmp_path / "fake-braze.jsonl"
    with FakeBraze(api_key=KEY, latency_ms=LATENCY_MS, log_path=str(log)) as fake:
        replay = Replay(fake, archive.logs, tmp_path)
        for _ in range(3):
            replay.kill_at(rng.randint(3, archive.requests // 4), rng.uniform(0, 0.01))
        before = replay.checkpoints()
        summary = replay.complete()
        _assert_fast_resume(summary, before, archive)
        duplicates = _assert_delivered(replay, log, archive)
        assert duplicates <= 3 * DUPLICATE_BOUND
        _assert_all_done(replay, archive)

        requests = replay.requests_seen()
        again = replay.complete()
        assert replay.requests_seen() == requests
        assert (again["requests"], again["lines"], again["files_already_done"]) == (
            0,
            0,
            archive.files,
        )


def test_a_second_run_on_the_same_state_is_refused(archive, tmp_path):
    # Slow answers keep the first run going while the second starts; it is killed after.
    with FakeBraze(api_key=KEY, latency_ms=50.0) as fake:
        replay = Replay(fake, archive.logs, tmp_path)
        running = replay.start()
        try:
            replay.wait_for_requests(running, 1)
            second = subprocess.run(
                replay.argv, cwd=tmp_path, env=_environment(), capture_output=True, timeout=60
            )
            assert running.poll() is None, "the first run ended: the refusal proves nothing"
        finally:
            running.send_signal(signal.SIGKILL)
            running.wait(timeout=10)
    assert second.returncode == 1
    assert second.stdout == b""
    assert second.stderr.decode() == (
        f"error: {replay.state} is in use by another segreplay run (pid {running.pid})\n"
        "hint: wait for that run to finish, or give this one its own --state\n"
    )


def test_a_resumed_run_skips_acknowledged_lines_unread(tmp_path):
    """One file, killed mid-run: the next run starts after its watermark."""
    archive = _make_archive(tmp_path, seed=22, lines=4000, sources=1, days=1, files_per_day=1)
    assert archive.files == 1
    log = tmp_path / "fake-braze.jsonl"
    with FakeBraze(api_key=KEY, latency_ms=LATENCY_MS, log_path=str(log)) as fake:
        replay = Replay(fake, archive.logs, tmp_path)
        replay.kill_at(archive.requests // 2, 0.005)
        [checkpoint] = replay.status()["files_in_progress"]
        assert checkpoint["lines_acked"] > 0
        summary = replay.complete()
        assert summary["lines_already_done"] == checkpoint["lines_acked"]
        assert summary["lines"] + summary["lines_already_done"] == archive.lines
        _assert_delivered(replay, log, archive)
        _assert_all_done(replay, archive)


# ------------------------------------------------------------------ stopping, as cron does


def _stopped_run(replay: Replay, signals: list[int], after_requests: int) -> tuple[int, str]:
    """Start a run, and signal it once the fake has seen `after_requests` requests; each
    further signal once the run said it is stopping."""
    process = replay.start()
    replay.wait_for_requests(process, after_requests)
    process.send_signal(signals[0])
    for signum in signals[1:]:
        deadline = time.monotonic() + 30
        while "stopping: waiting up to" not in replay.stderr():
            assert process.poll() is None and time.monotonic() < deadline, replay.stderr()
            time.sleep(0.01)
        process.send_signal(signum)
    return process.wait(timeout=30), replay.stderr()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_records_what_was_in_flight_and_the_resume_sends_each_object_once(
    signum, archive, tmp_path
):
    log = tmp_path / "fake-braze.jsonl"
    # Slow answers: at the stop, requests are on the wire, their answers still to come.
    with FakeBraze(api_key=KEY, log_path=str(log), latency_ms=150) as fake:
        replay = Replay(fake, archive.logs, tmp_path)
        code, stderr = _stopped_run(replay, [signum], after_requests=6)
        assert code == 128 + signum
        assert stderr.endswith(
            "stopped: every answered request is recorded in the state; "
            "run the same command to resume\n"
        )
        summary = orjson.loads((tmp_path / "run-1.out").read_bytes())
        assert summary["interrupted"] is True and summary["requests_abandoned"] == 0
        assert 6 <= summary["requests_acknowledged"] == summary["requests"] < archive.requests
        assert summary["requests"] == replay.requests_seen()
        [run] = replay.status()["runs"]
        assert run["status"] == "interrupted"
        assert run["summary"]["requests"] == summary["requests"]
        assert run["summary"]["events_sent"] == summary["events_sent"] > 0

        # The same command resumes; more requests in flight only make the slow fake quicker.
        replay.argv[replay.argv.index("--concurrency") + 1] = "16"
        replay.complete()
        assert _assert_delivered(replay, log, archive) == 0  # no kill: no duplicate allowed
        _assert_all_done(replay, archive)


def test_a_second_signal_stops_at_once(archive, tmp_path):
    with FakeBraze(api_key=KEY, latency_ms=20_000) as fake:  # answers that never come in time
        replay = Replay(fake, archive.logs, tmp_path)
        started = time.monotonic()
        code, stderr = _stopped_run(replay, [signal.SIGTERM, signal.SIGTERM], after_requests=1)
        assert time.monotonic() - started < 15
    assert code == 143
    assert stderr.endswith(
        "stopped at once: every acknowledged request is in the state; requests that were in "
        "flight may be sent again (docs/state.md); run the same command to resume\n"
    )
    [run] = replay.status()["runs"]
    assert run["status"] == "interrupted"


def test_answers_that_outlast_the_grace_period_are_counted_as_abandoned(archive, tmp_path):
    with FakeBraze(api_key=KEY, latency_ms=20_000) as fake:  # answers that never come in time
        replay = Replay(fake, archive.logs, tmp_path)
        replay.argv += ["--stop-grace", "0.5"]
        started = time.monotonic()
        code, stderr = _stopped_run(replay, [signal.SIGINT], after_requests=1)
        assert time.monotonic() - started < 15
    assert code == 130
    summary = orjson.loads((tmp_path / "run-1.out").read_bytes())
    abandoned = summary["requests_abandoned"]
    assert abandoned == summary["requests"] >= 1 and summary["requests_acknowledged"] == 0
    assert stderr.endswith(
        f"stopped: every answered request is recorded in the state; {abandoned} requests "
        "still unanswered after --stop-grace may be sent again; run the same command to resume\n"
    )
