"""`segreplay delete` and imports after it, as real processes against the fake Braze over
a socket: requests of 50, duplicates, comments, stdin and CSV; a second run sends nothing;
kill -9 then resume; a replay never brings a deleted or suppressed user back; the state
file holds nothing of theirs; bad input stops with a clear message and status 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from conftest import identify, segment, track, write_archive

from segreplay.fake import FakeBraze
from segreplay.privacy import user_digest
from segreplay.state import State

KEY = "privacy-test-key"
GONE = "person-forgotten-7f3a"  # a userId to delete; searched for in raw bytes
GONE_EMAIL = "forgotten-7f3a@example.com"
GONE_OLD_EMAIL = "earlier-7f3a@example.com"
GONE_ANON = "anon-forgotten-51c2"
T1, T2, T3 = "2024-03-01T00:00:00.000Z", "2024-03-02T00:00:00.000Z", "2024-03-03T00:00:00.000Z"


def _environment() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("BRAZE_", "SEGREPLAY_"))}


def _argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "segreplay", *args]


def segreplay(*args: str, cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        _argv(*args), cwd=cwd, env=_environment(), input=stdin, capture_output=True, timeout=60
    )


@pytest.fixture
def fake(tmp_path):
    with FakeBraze(api_key=KEY, log_path=str(tmp_path / "fake-log.jsonl")) as braze:
        yield braze


def _delete(fake: FakeBraze, work: Path, *args: str, stdin: bytes | None = None):
    return segreplay(
        "delete", *args, "--endpoint", fake.url, "--api-key", KEY,
        "--state", str(work / "state.sqlite"), "--dead-letter", str(work / "dead.jsonl"),
        "--json", cwd=work, stdin=stdin,
    )  # fmt: skip


def _import(fake: FakeBraze, work: Path, logs: Path, *args: str):
    return segreplay(
        "import", str(logs), "--endpoint", fake.url, "--api-key", KEY,
        "--state", str(work / "state.sqlite"), "--dead-letter", str(work / "dead.jsonl"),
        "--output", str(work / "sent.jsonl"), "--anonymous", "alias", "--json", *args,
        cwd=work,
    )  # fmt: skip


def _summary(result: subprocess.CompletedProcess) -> dict:
    assert result.stdout, result.stderr.decode()
    return orjson.loads(result.stdout.splitlines()[-1])


def _deleted_ids(fake: FakeBraze) -> list:
    return [
        entry["identifier"].get("external_id") or entry["identifier"]["user_alias"]["alias_name"]
        for entry in fake.deleted()
    ]


# ---------------------------------------------------------------------- segreplay delete


def test_many_ids_go_in_requests_of_50_and_a_second_run_sends_nothing(tmp_path, fake):
    users = [f"user-{i:03d}" for i in range(120)]
    lines = ["# exported from Segment's deletion requests", ""]
    lines += users + ["user-007", "  user-008  ", "# done"]
    (tmp_path / "users.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "anon.csv").write_text("anonymous_id,reason\nanon-1,gdpr\nanon-2,ccpa\n")
    result = _delete(fake, tmp_path, "--user-ids", "users.txt", "--anonymous-ids", "anon.csv")
    assert result.returncode == 0, result.stderr.decode()
    summary = _summary(result)
    assert {k: summary[k] for k in ("ids_read", "duplicates", "already_deleted", "deleted")} == {
        "ids_read": 124, "duplicates": 2, "already_deleted": 0, "deleted": 122,
    }  # fmt: skip
    assert summary["requests"] == 4  # 50 + 50 + 20 userIds, then the two aliases
    requests = fake.requests()
    assert [r.path for r in requests] == ["/users/delete"] * 4
    assert sorted(_deleted_ids(fake)) == sorted(users + ["anon-1", "anon-2"])
    assert "deleted now" in result.stderr.decode()

    again = _delete(fake, tmp_path, "--user-ids", "users.txt", "--anonymous-ids", "anon.csv")
    assert again.returncode == 0
    assert _summary(again)["already_deleted"] == 122 and _summary(again)["requests"] == 0
    assert len(fake.requests()) == 4
    status = segreplay("status", "--state", "state.sqlite", cwd=tmp_path).stdout.decode()
    assert "122 deleted ids" in status


def test_ids_from_stdin_and_csv_columns(tmp_path, fake):
    (tmp_path / "requests.csv").write_text(
        'requested_at,userId,email\n2024-05-01,csv-1,a@x\n2024-05-02,"csv-2",b@x\n'
    )
    result = _delete(
        fake, tmp_path, "--user-ids", "-", "--user-ids", "requests.csv",
        stdin=b"stdin-1\nstdin-2\n# comment\ncsv-1\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert _summary(result)["duplicates"] == 1
    assert sorted(_deleted_ids(fake)) == ["csv-1", "csv-2", "stdin-1", "stdin-2"]


def test_a_dry_run_prints_what_would_go_and_sends_nothing(tmp_path, fake):
    (tmp_path / "users.txt").write_text("u1\nu2\n")
    result = segreplay(
        "delete", "--user-ids", "users.txt", "--dry-run", "--state", "state.sqlite",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == "would delete userId u1\nwould delete userId u2\n"
    assert fake.requests() == [] and not (tmp_path / "state.sqlite").exists()


def test_a_key_without_the_permission_stops_with_status_1(tmp_path):
    (tmp_path / "users.txt").write_text("u1\n")
    with FakeBraze(api_key="another-key") as braze:
        result = _delete(braze, tmp_path, "--user-ids", "users.txt")
    assert result.returncode == 1
    assert "users.delete permission" in result.stderr.decode()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "users.txt: no ids in it"),
        ("email,name\na@x,A\n", "users.txt: a CSV without a column named userId"),
        ("ok\n" + "é" * 494 + "\n", "users.txt:2: an id longer than 987 bytes"),
        (None, "missing.txt: no such file"),
    ],
)
def test_bad_input_is_a_usage_error(tmp_path, fake, content, message):
    name = "missing.txt" if content is None else "users.txt"
    if content is not None:
        (tmp_path / name).write_text(content)
    result = _delete(fake, tmp_path, "--user-ids", name)
    assert result.returncode == 2
    assert message in result.stderr.decode()
    assert fake.requests() == [] and not (tmp_path / "state.sqlite").exists()


def test_kill_9_mid_delete_then_resume_misses_none_and_resends_no_acknowledged_id(tmp_path):
    users = [f"kill-{i:03d}" for i in range(400)]  # 8 requests
    (tmp_path / "users.txt").write_text("\n".join(users) + "\n")
    log = tmp_path / "fake-log.jsonl"
    with FakeBraze(api_key=KEY, log_path=str(log), latency_ms=40) as braze:
        argv = _argv(
            "delete", "--user-ids", "users.txt", "--endpoint", braze.url, "--api-key", KEY,
            "--state", "state.sqlite",
        )  # fmt: skip
        process = subprocess.Popen(
            argv, cwd=tmp_path, env=_environment(), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while braze.stats()["requests"] < 3:  # the kill lands by requests seen, not the clock
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=10) == -signal.SIGKILL
        state = State(str(tmp_path / "state.sqlite"))
        recorded = set(state.deleted_digests())
        state.close()
        first_run_last = braze.stats()["requests"]
        assert 0 < len(recorded) < len(users)
        resumed = segreplay(*argv[3:], cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr.decode()
        entries = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    resent = [e["object"]["external_id"] for e in entries if e["request"] > first_run_last]
    assert not {user for user in resent if user_digest(f"e:{user}") in recorded}
    sent = [e["object"]["external_id"] for e in entries]
    assert set(sent) == set(users)  # none missed
    assert len(sent) - len(set(sent)) <= 50  # at most the request in flight, sent again


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_delete_records_the_request_in_flight_and_exits_128_plus_it(tmp_path, signum):
    users = [f"stop-{i:03d}" for i in range(400)]  # 8 requests
    (tmp_path / "users.txt").write_text("\n".join(users) + "\n")
    log = tmp_path / "fake-log.jsonl"
    with FakeBraze(api_key=KEY, log_path=str(log), latency_ms=40) as braze:
        argv = _argv(
            "delete", "--user-ids", "users.txt", "--endpoint", braze.url, "--api-key", KEY,
            "--state", "state.sqlite", "--json",
        )  # fmt: skip
        process = subprocess.Popen(
            argv, cwd=tmp_path, env=_environment(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while braze.stats()["requests"] < 2:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.002)
        process.send_signal(signum)
        out, err = process.communicate(timeout=30)
        assert process.returncode == 128 + signum, err.decode()
        assert b"run the same command to resume" in err
        stopped = orjson.loads(out.splitlines()[-1])
        assert stopped["interrupted"] and 0 < stopped["deleted"] < len(users)
        assert stopped["deleted"] == 50 * braze.stats()["requests"]  # the one in flight too
        resumed = segreplay(*argv[3:], cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr.decode()
        entries = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    sent = [e["object"]["external_id"] for e in entries]
    assert sorted(sent) == sorted(users)  # none missed, none sent twice
    status = segreplay("status", "--state", "state.sqlite", cwd=tmp_path).stdout.decode()
    assert "400 deleted ids" in status and "interrupted" in status


def test_reset_keeps_the_deletions(tmp_path, fake):
    (tmp_path / "users.txt").write_text("u1\nu2\n")
    assert _delete(fake, tmp_path, "--user-ids", "users.txt").returncode == 0
    result = segreplay("reset", "--state", "state.sqlite", "--yes", cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    again = _delete(fake, tmp_path, "--user-ids", "users.txt")
    assert _summary(again)["already_deleted"] == 2 and _summary(again)["requests"] == 0
    help_text = segreplay("reset", "--help", cwd=tmp_path).stdout.decode()
    assert "deleted users are kept" in help_text


# ------------------------------------------------------------------- imports afterwards


def _archive_lines(users: list[str]) -> list[dict]:
    lines = []
    for user in users:
        lines.append(identify(user, T1, email=f"earlier-{user}@example.com"))
        lines.append(track("Signed Up", user, T1, plan="pro"))
    lines.append(identify(GONE, T1, email=GONE_OLD_EMAIL, nickname="the-gone-one"))
    lines.append(identify(GONE, T2, email=GONE_EMAIL))
    lines.append(track("Bought", GONE, T2, messageId="msg-gone-1", sku="sku-gone"))
    return lines


def test_a_replay_never_brings_a_deleted_user_back(tmp_path, fake):
    others = [f"other-{i:04d}" for i in range(3000)]  # enough for B-trees several pages deep
    logs = tmp_path / "logs"
    write_archive(logs / "day-1.gz", _archive_lines(others))
    assert _import(fake, tmp_path, logs).returncode == 0
    assert fake.profile(GONE) is not None
    (tmp_path / "gone.txt").write_text(f"{GONE}\n")
    (tmp_path / "gone-anon.txt").write_text(f"{GONE_ANON}\n")
    deleted = _delete(fake, tmp_path, "--user-ids", "gone.txt", "--anonymous-ids", "gone-anon.txt")
    assert deleted.returncode == 0, deleted.stderr.decode()
    assert _summary(deleted)["erased_messages"] == 1
    assert fake.profile(GONE) is None

    # The state file holds nothing of theirs: no id, no value, in any byte (WAL included).
    state_bytes = b"".join(p.read_bytes() for p in tmp_path.glob("state.sqlite*"))
    assert b"other-0001" in state_bytes  # the search itself works
    for secret in (GONE, GONE_EMAIL, GONE_OLD_EMAIL, "the-gone-one"):
        assert secret.encode() not in state_bytes, secret

    # The old archive again (a new file), plus new lines for them: nothing of theirs goes.
    write_archive(logs / "day-2.gz", _archive_lines(others[:3]) + [
        identify(GONE, T3, email="new-7f3a@example.com"),
        track("Came Back", GONE, T3, messageId="msg-gone-2"),
        track("Bad Time", GONE, "not a time"),  # rejected: not dead-lettered, theirs
        segment("track", None, T3, event="Aliased", anonymousId=GONE_ANON),
    ])  # fmt: skip
    requests_before = len(fake.requests())
    (tmp_path / "dead.jsonl").unlink(missing_ok=True)
    result = _import(fake, tmp_path, logs)
    assert result.returncode == 0, result.stderr.decode()
    summary = _summary(result)
    assert summary["skipped_deleted"] == 7  # 3 old lines, 3 new, and the anonymous one
    assert len(fake.requests()) > requests_before  # the others' new day still went
    outputs = [
        (tmp_path / "sent.jsonl").read_bytes(),
        result.stdout + result.stderr,
        (tmp_path / "dead.jsonl").read_bytes() if (tmp_path / "dead.jsonl").exists() else b"",
    ]
    for output in outputs:
        assert GONE.encode() not in output and GONE_ANON.encode() not in output
    assert fake.profile(GONE) is None
    assert fake.profile(user_alias={"alias_name": GONE_ANON,
                                    "alias_label": "segment_anonymous_id"}) is None  # fmt: skip

    write_archive(logs / "day-3.gz", [identify(GONE, T3, email="again@example.com")])
    diff = segreplay(
        "import", str(logs), "--dry-run", "--diff", "--state", "state.sqlite",
        "--dead-letter", "dry-dead.jsonl", cwd=tmp_path,
    )  # fmt: skip
    assert diff.returncode == 0, diff.stderr.decode()
    assert GONE.encode() not in diff.stdout + diff.stderr
    assert b"skipped: deleted users" in diff.stderr


def test_suppressed_users_are_skipped_and_not_deleted(tmp_path, fake):
    logs = tmp_path / "logs"
    write_archive(logs / "day-1.gz", [
        identify("keep", T1, plan="a"),
        identify("quiet", T1, plan="b"),
        track("Opened", "quiet", T1),
        segment("track", None, T1, event="Anon", anonymousId="quiet-anon"),
    ])  # fmt: skip
    (tmp_path / "suppress.csv").write_text("userId,anonymousId\nquiet,\n,quiet-anon\n")
    result = _import(fake, tmp_path, logs, "--suppress", "suppress.csv")
    assert result.returncode == 0, result.stderr.decode()
    summary = _summary(result)
    assert summary["skipped_suppressed"] == 3
    assert fake.profile("keep") is not None and fake.profile("quiet") is None
    assert b"quiet" not in (tmp_path / "sent.jsonl").read_bytes()
    state = State(str(tmp_path / "state.sqlite"))
    assert state.deleted_digests() == []  # suppression is not deletion: nothing recorded
    assert b"quiet" not in b"".join(p.read_bytes() for p in tmp_path.glob("state.sqlite*"))
    state.close()
    # Suppression lifted: the file is read again and what it skipped for them goes now.
    lifted = _summary(_import(fake, tmp_path, logs))
    assert (lifted["files_already_done"], lifted["skipped_suppressed"]) == (0, 0)
    assert [e["name"] for e in fake.profile("quiet")["events"]] == ["Opened"]
    missing = _import(fake, tmp_path, logs, "--suppress", "nope.csv")
    assert missing.returncode == 2 and b"nope.csv: no such file" in missing.stderr


def test_no_ids_at_all_is_a_usage_error(tmp_path):
    result = segreplay("delete", "--dry-run", cwd=tmp_path)
    assert result.returncode == 2
    assert "no ids to delete" in result.stderr.decode()
    assert "--user-ids FILE" in result.stderr.decode()
