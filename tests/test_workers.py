"""Shards over real sockets into the fake Braze: 1, 2 and 3 workers, and three
`--shard auto/3` processes started at once, leave Braze the same; the request budget is
kept by the workers together; a worker killed with -9 stops the run, and the same
command resumes without loss; a state is kept in one number of shards until resharded."""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from conftest import final_attributes, wait_for_requests, worker_pids

from samples.generate import generate
from segreplay.config import MAX_OBJECTS_PER_REQUEST
from segreplay.fake import FakeBraze

SEGREPLAY = [sys.executable, "-m", "segreplay"]
KEY = "workers-test-key"
# Summary counts that do not depend on how lines were batched: attributes_sent and
# requests do (a user's repeated keys merge within one request, not across two).
TOTALS = ("lines", "duplicates", "invalid", "rejected", "fields_dropped", "users",
          "events_sent", "purchases_sent", "attributes_unchanged", "attributes_outdated",
          "skipped_anonymous", "skipped_screens", "files", "files_skipped")  # fmt: skip


def _canonical(obj: dict) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def _environment(**extra: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BRAZE_", "SEGREPLAY_"))}
    clean.pop("JOB_COMPLETION_INDEX", None)
    return {**clean, **extra}


def _cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SEGREPLAY, *args], cwd=cwd, env=_environment(**env), capture_output=True, timeout=120
    )


class Expected:
    """What a plain dry run sends, from its --output, and its dead letter."""

    def __init__(self, root: Path, logs: Path) -> None:
        output, dead_letter = root / "dry.jsonl", root / "dry-dl.jsonl"
        result = _cli(
            "import", str(logs), "--dry-run", "--output", str(output), "--json",
            "--state", str(root / "dry.sqlite"), "--dead-letter", str(dead_letter), cwd=root,
        )  # fmt: skip
        assert result.returncode == 3, result.stderr.decode()  # the archive has bad lines
        self.summary = orjson.loads(result.stdout)
        bodies = [orjson.loads(line) for line in output.read_bytes().splitlines()]
        self.stored = collections.Counter(
            (array, _canonical(obj))
            for body in bodies
            for array in ("events", "purchases")
            for obj in body.get(array, ())
        )
        self.attributes = final_attributes(bodies)
        self.dead_letter = sorted(dead_letter.read_bytes().splitlines())


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    logs = root / "segment-logs"
    generate(logs, lines=4000, users=300, bad=True, seed=31, days=2, files_per_day=2)
    expected = Expected(root, logs)
    assert sum(expected.stored.values()) > 1000 and expected.summary["invalid"] > 0
    return logs, expected


def _import(fake: FakeBraze, logs: Path, work: Path, *options: str) -> list[str]:
    return [
        *SEGREPLAY, "import", str(logs), "--endpoint", fake.url, "--api-key", KEY,
        "--state", str(work / "state.sqlite"), "--dead-letter", str(work / "dead-letter.jsonl"),
        "--json", *options,
    ]  # fmt: skip


def _assert_braze_holds(fake: FakeBraze, expected: Expected) -> None:
    """Every event and purchase once, and every profile as after a plain run."""
    stored = collections.Counter(
        (array, _canonical(obj))
        for kind, array in (("event", "events"), ("purchase", "purchases"))
        for obj in fake.accepted(kind)
    )
    assert stored == expected.stored
    profiles = {profile["external_id"]: profile["attributes"] for profile in fake.profiles()}
    assert profiles == expected.attributes


def _assert_totals(summary: dict, expected: Expected) -> None:
    assert {k: summary[k] for k in TOTALS} == {k: expected.summary[k] for k in TOTALS}


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_workers_leave_braze_as_one_process_does(workers, archive, tmp_path):
    logs, expected = archive
    output = tmp_path / "sent.jsonl"
    # Three workers share --rate 21/1: 7 each, about 2 s for the archive's requests.
    rate = "21/1" if workers == 3 else "1500/3"
    with FakeBraze(api_key=KEY) as fake:
        argv = _import(fake, logs, tmp_path, "--workers", str(workers), "--output", str(output),
                       "--rate", rate)  # fmt: skip
        result = subprocess.run(argv, cwd=tmp_path, env=_environment(), capture_output=True,
                                timeout=120)  # fmt: skip
        assert result.returncode == 3, result.stderr.decode()
        _assert_braze_holds(fake, expected)
        arrivals = sorted(request.arrived_at for request in fake.requests())
    summary = orjson.loads(result.stdout)
    _assert_totals(summary, expected)
    assert summary["requests"] == len(arrivals)
    # --output and the dead letter: each body and each record once, in one file
    sent = [orjson.loads(line) for line in output.read_bytes().splitlines()]
    assert len(sent) == summary["requests"]
    assert final_attributes(sent) == expected.attributes
    dead_letter = sorted((tmp_path / "dead-letter.jsonl").read_bytes().splitlines())
    assert dead_letter == expected.dead_letter
    assert sorted(p.name for p in tmp_path.iterdir() if ".part-" in p.name) == []
    states = sorted(p.name for p in tmp_path.glob("state*.sqlite"))
    if workers == 1:
        assert states == ["state.sqlite"]
    else:
        assert states == [f"state.shard-{i}-of-{workers}.sqlite" for i in range(workers)]
    if workers == 3:
        # The budget is the workers' together: never more than 21 in any second (less
        # 50 ms for what the fake's arrival stamps add), so the run spans 2 s or more.
        window_s = 1.0 - 0.05
        busiest = max(sum(1 for t in arrivals if s <= t < s + window_s) for s in arrivals)
        assert busiest <= 21
        assert arrivals[-1] - arrivals[0] >= window_s * (len(arrivals) // 21 - 1)


def test_three_shard_processes_started_at_once(archive, tmp_path):
    logs, expected = archive
    with FakeBraze(api_key=KEY) as fake:
        processes = []
        for index in range(3):
            argv = _import(fake, logs, tmp_path, "--shard", "auto/3", "--rate", "500/3",
                           "--output", str(tmp_path / f"sent-{index}.jsonl"))  # fmt: skip
            argv[argv.index("--dead-letter") + 1] = str(tmp_path / f"dl-{index}.jsonl")
            processes.append(subprocess.Popen(
                argv, cwd=tmp_path, env=_environment(JOB_COMPLETION_INDEX=str(index)),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            ))  # fmt: skip
        results = [(p.wait(timeout=120), *p.communicate()) for p in processes]
        for status, _, stderr in results:
            assert status in (0, 3), stderr.decode()
        _assert_braze_holds(fake, expected)
    summaries = [orjson.loads(stdout) for _, stdout, _ in results]
    summed = {k: sum(s[k] for s in summaries) for k in TOTALS if k not in ("files",)}
    assert summed == {k: expected.summary[k] for k in summed}
    dead_letters = sorted(
        line
        for index in range(3)
        if (tmp_path / f"dl-{index}.jsonl").exists()
        for line in (tmp_path / f"dl-{index}.jsonl").read_bytes().splitlines()
    )
    assert dead_letters == expected.dead_letter  # shard 0 wrote the lines with no user


def test_reshard_two_to_three_then_a_run_sends_nothing_new(archive, tmp_path):
    logs, expected = archive
    with FakeBraze(api_key=KEY) as fake:
        first = _cli(*_import(fake, logs, tmp_path, "--workers", "2")[len(SEGREPLAY) :],
                     cwd=tmp_path)  # fmt: skip
        assert first.returncode == 3, first.stderr.decode()
        sent = fake.stats()["requests"]

        other = _cli(*_import(fake, logs, tmp_path, "--workers", "3")[len(SEGREPLAY) :],
                     cwd=tmp_path)  # fmt: skip
        assert other.returncode == 2
        state = tmp_path / "state.sqlite"
        assert (
            f"the state {state} is kept in 2 shards, not in 3 shards\n"
            f"Hint: run `segreplay reshard --shards 3 --state {state}` first, or run with "
            "--workers 2"
        ) in other.stderr.decode()

        resharded = _cli("reshard", "--shards", "3", "--state", str(state), cwd=tmp_path)
        assert resharded.returncode == 0, resharded.stderr.decode()
        assert resharded.stdout.decode().startswith(f"{state}: 2 shards -> 3: ")
        assert sorted(p.name for p in tmp_path.glob("state*.sqlite")) == [
            f"state.shard-{i}-of-3.sqlite" for i in range(3)
        ]

        again = _cli(*_import(fake, logs, tmp_path, "--workers", "3")[len(SEGREPLAY) :],
                     cwd=tmp_path)  # fmt: skip
        assert again.returncode == 0, again.stderr.decode()  # nothing read, nothing rejected
        summary = orjson.loads(again.stdout)
        assert (summary["requests"], summary["lines"]) == (0, 0)
        # a file that is not an archive (the manifest) is said again, never checkpointed
        assert summary["files_already_done"] == summary["files"] - summary["files_skipped"]
        assert summary["lines_already_done"] == expected.summary["lines"]
        assert fake.stats()["requests"] == sent
        _assert_braze_holds(fake, expected)

        # --shard reads the same files: shard 1 of 3 has nothing left either
        one = _cli(*_import(fake, logs, tmp_path, "--shard", "1/3")[len(SEGREPLAY) :],
                   cwd=tmp_path)  # fmt: skip
        assert one.returncode == 0, one.stderr.decode()
        assert orjson.loads(one.stdout)["requests"] == 0


def test_a_worker_killed_with_9_stops_the_run_and_the_same_command_resumes(archive, tmp_path):
    logs, expected = archive
    # Answers take 40 ms, so the kill lands while the run is still sending.
    with FakeBraze(api_key=KEY, latency_ms=40.0) as fake:
        argv = _import(fake, logs, tmp_path, "--workers", "2", "--concurrency", "2")
        process = subprocess.Popen(argv, cwd=tmp_path, env=_environment(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        wait_for_requests(fake, process, 6)
        workers = worker_pids(process.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 1, stderr.decode()
        assert "ended unexpectedly (killed by SIGKILL); the other shards were stopped" in (
            stderr.decode()
        )
        assert "hint: run the same command to resume" in stderr.decode()

        again = subprocess.run(argv, cwd=tmp_path, env=_environment(), capture_output=True,
                               timeout=120)  # fmt: skip
        assert again.returncode == 3, again.stderr.decode()
        stored = collections.Counter(
            (array, _canonical(obj))
            for kind, array in (("event", "events"), ("purchase", "purchases"))
            for obj in fake.accepted(kind)
        )
        missing = expected.stored - stored
        assert not missing, f"{sum(missing.values())} events or purchases lost"
        assert set(stored) == set(expected.stored)
        # Only the killed worker's requests in flight can be stored twice.
        assert sum(stored.values()) - sum(expected.stored.values()) <= 2 * MAX_OBJECTS_PER_REQUEST
        profiles = {p["external_id"]: p["attributes"] for p in fake.profiles()}
        assert profiles == expected.attributes


def test_sigterm_to_the_parent_stops_every_worker_cleanly(archive, tmp_path):
    """Kubernetes sends SIGTERM to the parent alone: it is forwarded, each worker records
    its answers in flight, and the resumed run sends every object once."""
    logs, expected = archive
    with FakeBraze(api_key=KEY, latency_ms=40.0) as fake:
        argv = _import(fake, logs, tmp_path, "--workers", "2", "--concurrency", "2")
        process = subprocess.Popen(argv, cwd=tmp_path, env=_environment(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        wait_for_requests(fake, process, 6)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 143, stderr.decode()
        assert stderr.decode().endswith(
            "stopped: every answered request is recorded in the state; run the same command "
            "to resume\n"
        )
        assert orjson.loads(stdout)["interrupted"] is True
        again = subprocess.run(argv, cwd=tmp_path, env=_environment(), capture_output=True,
                               timeout=120)  # fmt: skip
        assert again.returncode == 3, again.stderr.decode()
        _assert_braze_holds(fake, expected)  # each object once: nothing was abandoned


def _ignore_sigterm_and_hang() -> None:  # a worker stuck where a stop cannot reach it
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(1)


def _die_at_once() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_workers_that_do_not_stop_are_killed_after_the_grace():
    """A worker killed with -9 while it held the message queue's lock leaves its siblings
    unable to report that they are done (found when a kill test hung once in 883): the
    parent asks them to stop, then kills them once the grace is over, and the run ends."""
    from segreplay.reporting import SilentReporter
    from segreplay.stopping import StopRequest
    from segreplay.workers import _Run

    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_die_at_once),
        context.Process(target=_ignore_sigterm_and_hang),
    ]
    for process in workers:
        process.start()
    run = _Run(workers, context.Queue(), SilentReporter(), StopRequest(), kill_after_s=0.5)
    started = time.monotonic()
    run.wait()
    assert time.monotonic() - started < 10
    assert workers[1].exitcode == -signal.SIGKILL
    assert "ended unexpectedly (killed by SIGKILL)" in run.error.message
