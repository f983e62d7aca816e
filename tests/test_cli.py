"""The command line: exit statuses, exact messages, and the documented surface."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import orjson
import pytest
from click.testing import CliRunner
from conftest import identify, track

from segreplay.cli import cli
from segreplay.fake import FakeBraze
from segreplay.state import StateLock

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = str(ROOT / "samples" / "segment-logs")
SUMMARY_KEYS = {
    "lines", "skipped_anonymous", "duplicates", "invalid", "users", "requests",
    "attributes_sent", "attributes_unchanged", "events_sent", "purchases_sent", "rejected",
    "retries", "rate_limited", "elapsed_s", "dry_run",
}  # fmt: skip


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("BRAZE_API_KEY", "BRAZE_REST_ENDPOINT", "SEGREPLAY_STATE"):
        monkeypatch.delenv(name, raising=False)

    def invoke(*args, input=None):
        return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)

    return invoke


def test_dry_run_of_the_sample_reports_rejections_with_status_3(run):
    result = run("import", SAMPLE, "--dry-run", "--json")
    assert result.exit_code == 3
    summary = orjson.loads(result.stdout)
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["dry_run"] is True and summary["lines"] == 400
    assert "segreplay dry run (nothing sent)" in result.stderr
    assert "unknown type 'flush'" in result.stderr


def test_a_clean_archive_exits_0(run, archive):
    path = archive([identify("u1", email="a@x.com"), track("Signed Up")])
    result = run("import", str(path), "--dry-run", "--json")
    assert result.exit_code == 0
    assert orjson.loads(result.stdout)["events_sent"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["import", "no/such/dir", "--dry-run"], "no/such/dir: no such file or directory"),
        (["import", "nothing-*.gz", "--dry-run"], "nothing-*.gz: the pattern matches no file"),
        (["import", "empty", "--dry-run"], "Error: empty: the folder holds no file\n"),
        (["inspect", "empty"], "Error: empty: the folder holds no file\n"),
        (["import", "/dev/null", "--dry-run"], "Error: /dev/null: not a file, a folder or a pipe"),
        (["import", SAMPLE], "no Braze endpoint"),
        (["import", SAMPLE, "--endpoint", "US-03"], "no Braze REST API key"),
        (
            ["import", SAMPLE, "--endpoint", "US-09", "--api-key", "k"],
            "unknown Braze instance 'US-09'",
        ),
        (
            ["import", SAMPLE, "--endpoint", "sdk.iad-03.braze.com", "--api-key", "k"],
            "sdk.iad-03.braze.com is an SDK endpoint, not the REST API",
        ),
        (
            [
                "import",
                SAMPLE,
                "--endpoint",
                "https://https://rest.iad-03.braze.com",
                "--api-key",
                "k",
            ],
            "has its scheme twice",
        ),
        (
            ["import", SAMPLE, "--endpoint", "http://rest.iad-03.braze.com", "--api-key", "k"],
            "plain http:// is only for a local fake Braze",
        ),
        (["import", SAMPLE, "--diff"], "--diff goes with --dry-run"),
        (["import", SAMPLE, "--dry-run", "--rate", "fast"], "--rate must look like N/SECONDS"),
        (
            ["import", SAMPLE, "--dry-run", "--since", "last tuesday"],
            "--since must be an ISO 8601 time",
        ),
        (["status", "--state", "absent.sqlite"], "absent.sqlite: no state file here"),
        (
            ["import", SAMPLE, "--dry-run", "--output", "no/dir/out.jsonl"],
            "--output no/dir/out.jsonl: the folder",
        ),
        (
            ["import", SAMPLE, "--dry-run", "--dead-letter", "no/dir/dl.jsonl"],
            "--dead-letter no/dir/dl.jsonl: the folder",
        ),
        (
            [
                "import",
                SAMPLE,
                "--endpoint",
                "US-03",
                "--api-key",
                "k",
                "--state",
                "no/dir/s.sqlite",
            ],
            "--state no/dir/s.sqlite: the folder",
        ),
    ],
)
def test_usage_errors_exit_2_with_a_message(run, args, message, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_a_locked_state_stops_a_second_run_with_status_1(run, archive, tmp_path):
    path = archive([track("A")])
    with StateLock(str(tmp_path / "segreplay-state.sqlite")):
        result = run("import", str(path), "--endpoint", "http://127.0.0.1:9", "--api-key", "k")
    assert result.exit_code == 1
    assert re.search(
        r"error: .*segreplay-state.sqlite is in use by another segreplay run \(pid \d+\)",
        result.stderr,
    )
    assert "hint: wait for that run to finish" in result.stderr


def test_status_and_reset(run, archive, tmp_path):
    path = archive([track("A")])
    # A dry run never writes state: seed it through the library with an accepting sink.
    from test_pipeline import replay

    replay(tmp_path, [path])
    result = run("status", "--state", "state.sqlite")
    assert result.exit_code == 0
    assert "1 users, 1 delivered messageIds, 1 of 1 files done" in result.stdout
    assert re.search(r"run 1: finished, started \S+ - 1 lines, 1 requests, 1 events", result.stdout)
    result = run("reset", "--state", "state.sqlite", input="n\n")
    assert result.exit_code == 1  # declined: click aborts
    result = run("reset", "--state", "state.sqlite", "--yes")
    assert result.exit_code == 0
    assert "0 users, 0 delivered messageIds" in run("status", "--state", "state.sqlite").stdout


def test_reset_resets_every_shard_and_keeps_their_deletions(run, tmp_path):
    from segreplay.state import State

    for index in range(2):
        state = State(str(tmp_path / f"state.shard-{index}-of-2.sqlite"))
        run_id = state.start_run("2026-11-30T00:00:00.000Z")
        state.commit(run_id, {f"e:user-{index}": {}}, [(index + 1, 7)], [])
        state.record_deletions(["e:gone"], "2026-11-30T00:00:00.000Z")
        state.close()
    result = run("reset", "--state", "state.sqlite", "--yes")
    assert result.exit_code == 0, result.output
    assert (
        result.stdout == "state.sqlite (all 2 shards): reset; the next import starts from scratch\n"
    )
    status = run("status", "--state", "state.sqlite").stdout
    kept = "0 users, 0 delivered messageIds, 0 of 0 files done, 1 deleted ids"
    assert status.count(kept) == 2


def test_every_command_has_an_example_and_is_documented():
    docs = (ROOT / "docs" / "cli.md").read_text() + (ROOT / "README.md").read_text()
    for name, command in cli.commands.items():
        assert "Example" in (command.help or ""), name
        assert f"segreplay {name}" in docs, f"docs do not mention `segreplay {name}`"


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "segreplay", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "import" in result.stdout and "fake-braze" in result.stdout


def test_inspect_prices_the_replay(run):
    result = run("inspect", SAMPLE, "--json")
    assert result.exit_code == 0
    report = orjson.loads(result.stdout)
    assert report["lines"] == 400 and report["duplicate_message_ids"] == 8
    assert report["data_points_with_dedupe"] < report["data_points_without_dedupe"]
    assert report["by_type"]["track"] == 206


def test_status_says_which_options_files_were_read_with(tmp_path):
    from conftest import write_archive

    logs = tmp_path / "logs"
    write_archive(logs / "a.gz", [track("A", "u1")])
    write_archive(logs / "b.gz", [track("B", "u1")])
    state = tmp_path / "state.sqlite"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRAZE_", "SEGREPLAY_"))}
    with FakeBraze(api_key="k") as fake:
        for sources in ([logs / "a.gz"], [logs / "b.gz"]):
            screens = "all" if sources[0].name == "b.gz" else "none"
            result = subprocess.run(
                [sys.executable, "-m", "segreplay", "import", *map(str, sources), "--endpoint",
                 fake.url, "--api-key", "k", "--state", str(state), "--screens", screens],
                capture_output=True, env=env, cwd=tmp_path, timeout=60,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "segreplay", "status", "--state", str(state)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert "  1 files read with: pages=all screens=none anonymous=skip\n" in result.stdout
    assert "  1 files read with: pages=all screens=all anonymous=skip\n" in result.stdout


def test_a_stray_file_is_named_with_a_warning_and_exits_0(run, archive):
    path = archive([track("A")])
    (path.parent / "manifest.txt").write_text("files: 1\n")
    result = run("import", str(path.parent), "--dry-run")
    assert result.exit_code == 0
    assert f"{path.parent / 'manifest.txt'}: skipped file: neither gzip nor JSON lines\n" in (
        result.stderr
    )


def test_a_gzip_corrupt_from_its_start_is_named_without_a_line(run, archive):
    path = archive([track("A")])
    (path.parent / "fakegzip0000.gz").write_bytes(b"\x1f\x8b" + bytes(range(100)))
    result = run("import", str(path.parent), "--dry-run")
    assert result.exit_code == 3
    assert (
        f"{path.parent / 'fakegzip0000.gz'}: truncated file: gzip data is corrupt or truncated "
        "before its first line (" in result.stderr
    )


def _logins_over_three_requests(archive):
    """u1's logins change three times, each in a different request (75 objects apart)."""
    lines = []
    for day, logins in ((1, 2), (2, 1), (3, 3)):
        time = f"2024-03-0{day}T00:00:00.000Z"
        lines.append(identify("u1", time, logins=logins))
        lines += [track("Filler", f"other-{day}-{n}", time) for n in range(80)]
    return archive(lines)


def test_the_diff_shows_each_key_once_per_user(run, archive):
    result = run("import", str(_logins_over_three_requests(archive)), "--dry-run", "--diff")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith("u1 ")] == ["u1  + logins: 3"]


def test_with_json_the_diff_goes_to_stderr_so_stdout_is_one_object(archive, tmp_path):
    path = _logins_over_three_requests(archive)
    result = subprocess.run(
        [sys.executable, "-m", "segreplay", "import", str(path), "--dry-run", "--diff", "--json"],
        capture_output=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0
    assert orjson.loads(result.stdout)["events_sent"] == 240  # what `| jq` reads
    assert b"u1  + logins: 3\n" in result.stderr


def _commands():
    yield "segreplay", cli
    yield from cli.commands.items()


def test_every_option_of_every_command_has_help_text():
    missing = [
        f"{name} {param.opts[0]}"
        for name, command in _commands()
        for param in command.params
        if isinstance(param, click.Option) and not (param.help or "").strip()
    ]
    assert missing == []


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("import", ["--state PATH", "[env var: SEGREPLAY_STATE; default: segreplay-state.sqlite]",
                    "[env var: BRAZE_REST_ENDPOINT]", "[env var: BRAZE_API_KEY]"]),
        ("status", ["--state PATH", "[env var: SEGREPLAY_STATE; default: segreplay-state.sqlite]"]),
        ("reset", ["--state PATH", "[env var: SEGREPLAY_STATE; default: segreplay-state.sqlite]"]),
        ("fake-braze", ["[env var: FAKE_BRAZE_API_KEY; default: fake-key]",
                        "--rate N/SECONDS", "[default: 3000/3]"]),
        ("inspect", ["--screens [all|named|none]", "--since TIME", "--until TIME",
                     "--purchase-event-too", "--log-purchase-when-revenue-present",
                     "--events-allow NAME", "--events-deny NAME", "--anonymous [skip|alias]"]),
    ],
)  # fmt: skip
def test_help_shows_paths_and_environment_variables(command, shown):
    result = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
    text = " ".join(result.stdout.split())  # as one line, whatever the wrapping
    for piece in shown:
        assert piece in text, piece


def test_fake_braze_refuses_a_malformed_rate(run):
    result = run("fake-braze", "--rate", "3000")
    assert result.exit_code == 2
    assert "--rate must look like N/SECONDS, e.g. 1500/3, not '3000'" in result.stderr


def test_inspect_takes_the_options_that_change_what_a_replay_sends(run, archive):
    path = archive([
        identify("u1", "2024-03-01T00:00:00.000Z", plan="pro"),
        track("Signed Up", "u1", "2024-03-01T00:00:00.000Z"),
        track("Login", "u1", "2024-03-02T00:00:00.000Z"),
        track("Order Completed", "u1", "2024-03-03T00:00:00.000Z",
              products=[{"product_id": "p1", "price": 5}]),
    ])  # fmt: skip

    def with_dedupe(*options):
        result = run("inspect", str(path), "--json", *options)
        assert result.exit_code == 0, result.stderr
        return orjson.loads(result.stdout)["data_points_with_dedupe"]

    assert with_dedupe() == 4
    assert with_dedupe("--since", "2024-03-02") == 2
    assert with_dedupe("--until", "2024-03-02") == 2
    assert with_dedupe("--purchase-event-too") == 5
    assert with_dedupe("--events-deny", "Login") == 3
    assert with_dedupe("--events-allow", "Login") == 2  # the identify's attribute, the Login


def test_inspect_says_what_the_options_skip_and_how_to_keep_it(run):
    report = orjson.loads(run("inspect", SAMPLE, "--json").stdout)
    assert report["skipped"] == {"skipped_anonymous": 41, "skipped_screens": 35, "skipped_alias": 6}
    text = run("inspect", SAMPLE).stdout
    assert "│ screens     │    35 │ --screens all keeps them     │" in text
    report = orjson.loads(run("inspect", SAMPLE, "--json", "--screens", "all").stdout)
    assert "skipped_screens" not in report["skipped"]
    assert report["by_type"]["screen"] == 35


def test_a_host_that_does_not_resolve_is_said_at_each_try_and_fatal_after_the_second(tmp_path):
    from conftest import write_archive

    path = write_archive(tmp_path / "logs" / "a.gz", [track("A", "u1")])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRAZE_", "SEGREPLAY_"))}
    result = subprocess.run(
        [sys.executable, "-m", "segreplay", "import", str(path), "--endpoint",
         "https://rest.no-such-host.invalid", "--api-key", "k", "--state",
         str(tmp_path / "state.sqlite")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    cause = "the host rest.no-such-host.invalid does not resolve (ConnectError: "
    assert lines[0].startswith(f"warning: Braze: attempt 1 of 2 failed ({cause}")
    assert re.fullmatch(r".*\); next in \d\.\d s", lines[0])
    assert lines[1].startswith(f"error: Braze did not take a request after 2 attempts ({cause}")


def test_inspect_says_how_much_anonymous_history_resolves(run):
    sample = Path(__file__).resolve().parent.parent / "samples" / "identity-logs"
    result = run("inspect", str(sample), "--json")
    report = orjson.loads(result.stdout)
    # 9 anonymous lines: 6 from two visitors the archive later links to usr_demo_ada (a
    # laptop and a phone), 3 from one who never signs up.
    assert (report["anonymous"], report["anonymous_resolvable"]) == (9, 6)
    assert (report["visitors_linked"], report["visitors_anonymous"]) == (2, 1)


def test_a_bad_user_ops_rate_is_a_usage_error(run, archive):
    path = archive([track("A")])
    result = run("import", str(path), "--dry-run", "--user-ops-rate", "fast")
    assert result.exit_code == 2
    assert "--user-ops-rate must look like N/SECONDS, e.g. 1500/3, not 'fast'" in result.stderr
