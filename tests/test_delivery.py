"""Delivery over real sockets into the fake Braze: nothing lost under every fault, duplicates
bounded by what was in flight, 429s waited out, the request budget kept, a bad key stops
cleanly, and the API key never written anywhere."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from conftest import final_attributes, wait_for_requests

from samples.generate import generate
from segreplay.config import MAX_OBJECTS_PER_REQUEST, DeliveryOptions, MappingOptions, RunConfig
from segreplay.delivery import BrazeSink
from segreplay.errors import AuthError
from segreplay.fake import FakeBraze
from segreplay.pipeline import run_import
from segreplay.reporting import SilentReporter
from segreplay.state import State

SEGREPLAY = [sys.executable, "-m", "segreplay"]
KEY = "fake-delivery-key"
SECRET = "sk-live-SECRET-9f8e7d"


def _canonical(obj: dict) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


class Expected:
    """What a dry run would send, read back from its --output file."""

    def __init__(self, output: Path) -> None:
        self.output = output.read_bytes()
        self.bodies = [orjson.loads(line) for line in self.output.splitlines()]
        self.objects = {
            kind: collections.Counter(
                _canonical(obj) for body in self.bodies for obj in body.get(array, ())
            )
            for kind, array in (
                ("attribute", "attributes"),
                ("event", "events"),
                ("purchase", "purchases"),
            )
        }
        self.attributes = final_attributes(self.bodies)

    def count(self, kind: str) -> int:
        return sum(self.objects[kind].values())


def _dry_run(logs: Path, work: Path) -> Expected:
    output = work / "dry-run.jsonl"
    config = RunConfig(
        sources=(str(logs),),
        state_path=str(work / "dry-state.sqlite"),
        dry_run=True,
        output_path=str(output),
        dead_letter_path=str(work / "dry-dead-letter.jsonl"),
        mapping=MappingOptions(anonymous="skip"),
    )
    run_import(config, SilentReporter())
    return Expected(output)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A few thousand generated lines (no bad ones) and what a dry run would send."""
    root = tmp_path_factory.mktemp("archive")
    logs = root / "segment-logs"
    generate(logs, lines=4000, users=300, bad=False, seed=11)
    expected = _dry_run(logs, root)
    assert len(expected.bodies) >= 35
    assert expected.count("event") > 1000 and expected.count("purchase") > 100
    return logs, expected


def _sorted_lines(path: Path) -> list[bytes]:
    """--output's bodies, in an order that does not depend on when answers came."""
    return sorted(path.read_bytes().splitlines())


def _live_run(fake: FakeBraze, logs: Path, work: Path, key: str | None = None, **delivery):
    """run_import into the fake, with the fake's key unless `key` is given."""
    options = DeliveryOptions(endpoint=fake.url, api_key=key or fake.config.api_key, **delivery)
    config = RunConfig(
        sources=(str(logs),),
        state_path=str(work / "state.sqlite"),
        output_path=str(work / "sent.jsonl"),
        dead_letter_path=str(work / "dead-letter.jsonl"),
        mapping=MappingOptions(anonymous="skip"),
        delivery=options,
    )
    return run_import(config, SilentReporter(), BrazeSink(options))


def _accepted(fake: FakeBraze) -> dict[str, collections.Counter]:
    return {
        kind: collections.Counter(_canonical(obj) for obj in fake.accepted(kind))
        for kind in ("attribute", "event", "purchase")
    }


def _assert_nothing_lost(fake: FakeBraze, expected: Expected) -> int:
    """Every object the dry run would send was accepted at least once, nothing else was,
    and every user ends with the dry run's attributes. Returns the extra objects."""
    accepted = _accepted(fake)
    extra = 0
    for kind, wanted in expected.objects.items():
        missing = wanted - accepted[kind]
        assert not missing, f"{sum(missing.values())} {kind} objects never accepted"
        assert set(accepted[kind]) == set(wanted), f"{kind} objects the dry run never sent"
        extra += sum(accepted[kind].values()) - sum(wanted.values())
    profiles = {profile["external_id"]: profile["attributes"] for profile in fake.profiles()}
    assert profiles == expected.attributes
    statuses = fake.stats()["by_status"]
    assert "400" not in statuses and "413" not in statuses, statuses
    return extra


# ---------------------------------------------------------------------- faults, one by one


FAULTS = {
    "rate_429": {"rate_429": 0.08},
    "rate_5xx": {"rate_5xx": 0.2},
    "rate_processed_5xx": {"rate_processed_5xx": 0.2},
    "rate_drop": {"rate_drop": 0.2},
    "rate_processed_drop": {"rate_processed_drop": 0.2},
    "latency": {"latency_ms": 40.0},
    "mixed": {
        "rate_429": 0.04,
        "rate_5xx": 0.08,
        "rate_processed_5xx": 0.08,
        "rate_drop": 0.08,
        "rate_processed_drop": 0.08,
        "latency_ms": 5.0,
    },
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_nothing_lost_and_duplicates_bounded(fault, archive, tmp_path):
    logs, expected = archive
    with FakeBraze(api_key=KEY, rate_window_s=1.0, seed=3, **FAULTS[fault]) as fake:
        # Backoff starts at 20 ms instead of 0.5 s: the schedule itself is tested in
        # test_retry; here only what gets delivered matters.
        summary = _live_run(fake, logs, tmp_path, backoff_base_s=0.02)
        stats = fake.stats()
        injected = stats["injected"]
        # Acknowledgements arriving late or early change nothing that is decided: the
        # bodies are the dry run's, in the order Braze answered them.
        assert _sorted_lines(tmp_path / "sent.jsonl") == sorted(expected.output.splitlines())
        extra = _assert_nothing_lost(fake, expected)
        if fault != "latency":
            assert sum(injected.values()) >= 3, f"too few faults to mean anything: {injected}"
        processed = injected["processed_5xx"] + injected["processed_drop"]
        # Only a request Braze processed but whose answer was lost is sent twice.
        assert extra <= processed * MAX_OBJECTS_PER_REQUEST
        if not processed:
            assert extra == 0
        # Every fault the fake injected is one retry (or one 429) the client counted.
        failed = injected["5xx"] + injected["drop"] + processed
        assert summary.retries == failed
        assert summary.rate_limited == injected["429"] + stats["rate_limited"]
        assert summary.requests == len(expected.bodies)
        assert stats["requests"] == summary.requests + failed + summary.rate_limited
        assert (summary.events_sent, summary.purchases_sent) == (
            expected.count("event"),
            expected.count("purchase"),
        )
        assert summary.rejected == 0
        assert fake.early_requests(grace_s=0.05) == []

        # The state recorded every acknowledged request: running again sends nothing.
        again = _live_run(fake, logs, tmp_path)
        assert (again.requests, again.files_already_done) == (0, again.files)
        assert fake.stats()["requests"] == stats["requests"]


# ------------------------------------------------------------------------------ 429 storm


@pytest.mark.parametrize("reset_style", ["epoch", "seconds"])
def test_429_storm_is_waited_out_not_hammered(reset_style, archive, tmp_path):
    logs, expected = archive
    with FakeBraze(
        api_key=KEY, rate_limit=20, rate_window_s=1.0, reset_style=reset_style,
        rate_429=0.1, seed=5,
    ) as fake:  # fmt: skip
        summary = _live_run(fake, logs, tmp_path, concurrency=8)
        stats = fake.stats()
        resets = fake.rate_limit_resets
        assert len(resets) >= 3, stats
        assert summary.rate_limited == len(resets)
        # Remaining near zero slowed the client down before the window ran out.
        assert stats["rate_limited"] == 0
        # Requests already on the wire when a 429 left the fake may arrive just after it
        # (a loaded 2-core machine has delayed one by over 50 ms); resets are 1 s apart.
        assert fake.early_requests(grace_s=0.25) == []
        assert _assert_nothing_lost(fake, expected) == 0


def test_client_slows_down_before_the_window_runs_out(archive, tmp_path):
    """Remaining near zero pauses the client until the reset: Braze never has to say no."""
    logs, _ = archive
    one_source = sorted(path for path in logs.iterdir() if path.is_dir())[0]
    with FakeBraze(api_key=KEY, rate_limit=10, rate_window_s=1.0) as fake:
        summary = _live_run(fake, one_source, tmp_path, concurrency=1)
        stats = fake.stats()
    assert summary.requests >= 15  # more than a window's worth
    assert stats["by_status"] == {"201": summary.requests}
    assert (stats["rate_limited"], summary.rate_limited) == (0, 0)


# ---------------------------------------------------------------------- the request budget


def test_rate_budget_is_respected_at_the_server(tmp_path):
    """--rate 50/1 over ~150 requests: never more than 50 arrive in any one second (less
    a little grace), so the run spans at least two seconds."""
    logs = tmp_path / "segment-logs"
    generate(logs, lines=15_000, users=2000, bad=False, seed=12, days=1, files_per_day=2)
    with FakeBraze(api_key=KEY) as fake:
        result = _cli(
            "import", str(logs), "--endpoint", fake.url, "--api-key", KEY,
            "--state", str(tmp_path / "state.sqlite"), "--rate", "50/1",
            "--dead-letter", str(tmp_path / "dead-letter.jsonl"), "--anonymous", "skip", "--json",
            cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        arrivals = sorted(request.arrived_at for request in fake.requests())
    assert len(arrivals) >= 140
    # The budget counts requests as they leave; the fake stamps them as they arrive, a few
    # milliseconds later and not always by the same few: 50 ms of grace for that.
    window_s = 1.0 - 0.05
    busiest = max(sum(1 for t in arrivals if start <= t < start + window_s) for start in arrivals)
    assert busiest <= 50
    # 50 at once, 50 a second later, the rest a second after that
    assert arrivals[-1] - arrivals[0] >= 2 * window_s


# ------------------------------------------------------------------------------ a bad key


def test_wrong_key_stops_with_auth_error_and_keeps_nothing(archive, tmp_path):
    logs, expected = archive
    with FakeBraze(api_key=KEY) as fake:
        with pytest.raises(AuthError) as raised:
            _live_run(fake, logs, tmp_path, key="wrong-key-0000")
        assert raised.value.message == "Braze refused the API key (401: Invalid API key)"
        assert "users.track" in raised.value.hint
        assert fake.stats()["accepted"]["event"] == 0
        _assert_state_empty(tmp_path / "state.sqlite")

        # The same command with the right key resumes and delivers everything once.
        _live_run(fake, logs, tmp_path)
        assert _assert_nothing_lost(fake, expected) == 0


def _assert_state_empty(path: Path) -> None:
    state = State(str(path))
    try:
        counts = state.counts()
        checkpoints = state.checkpoints()
        [run] = state.runs(10)
    finally:
        state.close()
    assert (counts["users"], counts["delivered_messages"], counts["files_done"]) == (0, 0, 0)
    # Lines that needed nothing from Braze (an anonymous line, say) may be settled before
    # the first request was refused; no line that needed Braze is.
    assert all(c.lines_acked < 20 for c in checkpoints), checkpoints
    assert run.status == "failed"


# ---------------------------------------------------------------------- the CLI, end to end


def _cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("BRAZE_", "SEGREPLAY_"))
    }
    environment.update(env or {})
    return subprocess.run(
        [*SEGREPLAY, *args], cwd=cwd, env=environment, capture_output=True, timeout=60
    )


def test_cli_wrong_key_exits_1_with_a_message(archive, tmp_path):
    logs, _ = archive
    with FakeBraze(api_key=SECRET) as fake:
        result = _cli(
            "import", str(logs), "--endpoint", fake.url,
            "--state", str(tmp_path / "state.sqlite"), "--anonymous", "skip",
            cwd=tmp_path, env={"BRAZE_API_KEY": "sk-live-WRONG-1a2b3c"},
        )  # fmt: skip
        assert fake.stats()["accepted"]["event"] == 0
    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert "error: Braze refused the API key (401: Invalid API key)\n" in stderr
    assert "hint: check the key, that it has the users.track permission" in stderr
    assert result.stdout == b""
    for key in (SECRET, "sk-live-WRONG-1a2b3c"):
        assert key.encode() not in result.stderr + result.stdout
    _assert_state_empty(tmp_path / "state.sqlite")


def test_ctrl_c_stops_at_once_while_requests_back_off(archive, tmp_path):
    import signal

    logs, _ = archive
    with FakeBraze(api_key=SECRET, rate_5xx=1.0) as fake:  # every request backs off
        process = subprocess.Popen(
            [*SEGREPLAY, "import", str(logs), "--endpoint", fake.url,
             "--state", str(tmp_path / "state.sqlite")],
            cwd=tmp_path, env={**os.environ, "BRAZE_API_KEY": SECRET},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        wait_for_requests(fake, process, 3)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 130
    assert stderr.decode().endswith(
        "stopped: every answered request is recorded in the state; run the same command to resume\n"
    )


def test_cli_delivers_under_faults_and_never_writes_the_key(archive, tmp_path):
    logs, expected = archive
    log = tmp_path / "fake-braze.jsonl"
    paths = {
        "state": tmp_path / "state.sqlite",
        "output": tmp_path / "sent.jsonl",
        "dead_letter": tmp_path / "dead-letter.jsonl",
    }
    with FakeBraze(
        api_key=SECRET, log_path=str(log), rate_window_s=1.0, rate_5xx=0.05, rate_drop=0.05,
        rate_429=0.03, seed=9,
    ) as fake:  # fmt: skip
        result = _cli(
            "import", str(logs), "--endpoint", f"http://127.0.0.1:{fake.port}",
            "--api-key", SECRET, "--state", str(paths["state"]),
            "--output", str(paths["output"]), "--dead-letter", str(paths["dead_letter"]),
            "--anonymous", "skip", "--json",
            cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr.decode()
        assert _assert_nothing_lost(fake, expected) == 0
        injected = fake.stats()["injected"]
    assert min(injected["5xx"], injected["drop"], injected["429"]) >= 1, injected
    summary = orjson.loads(result.stdout)
    assert summary["dry_run"] is False
    assert summary["events_sent"] == expected.count("event")
    assert summary["retries"] == injected["5xx"] + injected["drop"]
    # --output holds what was sent: the dry run's bodies, byte for byte
    assert _sorted_lines(paths["output"]) == sorted(expected.output.splitlines())

    written = {"stdout": result.stdout, "stderr": result.stderr, "fake log": log.read_bytes()}
    for path in tmp_path.iterdir():
        if path.is_file():
            written[path.name] = path.read_bytes()
    assert {"state.sqlite", "sent.jsonl", "dead-letter.jsonl", "fake-braze.jsonl"} <= set(written)
    assert len(written["fake log"]) > 100_000 and len(written["dead-letter.jsonl"]) > 0
    leaked = [name for name, data in written.items() if SECRET.encode() in data]
    assert leaked == []


# ---------------------------------------------- an older value never wins, over a socket


@pytest.mark.parametrize("latency_ms", [0.0, 30.0])
def test_an_older_identify_never_wins_when_a_request_seals_on_the_users_line(tmp_path, latency_ms):
    """74 events for others and one for u fill a request; u's newer identify seals it on
    u's own line; the answer may come back before u's older identify is decided."""
    from conftest import identify, track, write_archive

    t1, t2, t3 = (f"2024-03-0{day}T00:00:00.000Z" for day in (1, 2, 3))
    lines = [track("E", f"other{n}", t1) for n in range(74)]
    lines += [track("E", "u", t1), identify("u", t3, plan="pro"), identify("u", t2, plan="free")]
    logs = tmp_path / "logs"
    write_archive(logs / "a.gz", lines)
    with FakeBraze(api_key=KEY, latency_ms=latency_ms) as fake:
        summary = _live_run(fake, logs, tmp_path)
        assert fake.profile(external_id="u")["attributes"] == {"plan": "pro"}
    assert (summary.requests, summary.attributes_outdated) == (2, 1)
