"""The partition: stable, one owner per line, spelled as the docs say; the summed summary
of a run's shards; a 429 shared between processes."""

from __future__ import annotations

import multiprocessing

import orjson
import pytest
from conftest import identify, segment, track
from hypothesis import given
from hypothesis import strategies as st

from segreplay.config import MappingOptions
from segreplay.errors import UsageError
from segreplay.reporting import Summary
from segreplay.retry import RequestBudget
from segreplay.sharding import (
    Shard,
    check_shard_count,
    existing_counts,
    parse_shard,
    parse_workers,
    shard_of,
    shard_state_path,
    stable_hash,
)
from segreplay.workers import merge_summaries


def test_the_hash_is_the_same_everywhere():
    # Fixed values: a change here moves users between shards of every existing state.
    assert stable_hash("e:u1") == 0x0EA624EB20EDF202
    assert [shard_of(f"e:user-{i}", 4) for i in range(8)] == [
        shard_of(f"e:user-{i}", 4) for i in range(8)
    ]
    counts = [0] * 4
    for i in range(4000):
        counts[shard_of(f"e:user-{i}", 4)] += 1
    assert min(counts) > 900  # spread evenly


@given(
    st.one_of(st.none(), st.text(max_size=5), st.integers(), st.booleans()),
    st.one_of(st.none(), st.text(max_size=5)),
    st.sampled_from(["skip", "alias"]),
    st.integers(1, 5),
)
def test_every_line_has_exactly_one_owner(user_id, anonymous_id, anonymous, count):
    record = segment("track", user_id, event="e", anonymousId=anonymous_id)
    options = MappingOptions(anonymous=anonymous)
    owners = [i for i in range(count) if Shard(i, count).owns(record, options)]
    assert len(owners) == 1


def test_a_user_is_owned_by_its_hash_and_lines_without_one_by_shard_0():
    options = MappingOptions()
    for user in ("u1", "u2", "u3", " u4 "):
        owner = shard_of(f"e:{user.strip()}", 3)
        for record in (identify(user), track("Played", user)):
            assert [i for i in range(3) if Shard(i, 3).owns(record, options)] == [owner]
    no_user = segment("track", None, event="e")  # anonymous, skipped: shard 0 counts it
    assert [i for i in range(3) if Shard(i, 3).owns(no_user, options)] == [0]


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        ("0/4", {}, Shard(0, 4)),
        ("3/4", {}, Shard(3, 4)),
        ("auto/3", {"JOB_COMPLETION_INDEX": "2"}, Shard(2, 3)),
        ("auto/3", {"AWS_BATCH_JOB_ARRAY_INDEX": "1"}, Shard(1, 3)),
        ("auto/3", {"CLOUD_RUN_TASK_INDEX": "0"}, Shard(0, 3)),
    ],
)
def test_shard_specs(text, environ, expected):
    assert parse_shard(text, environ) == expected


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        ("4/4", {}, "shard 4 of 4 does not exist"),
        ("1", {}, "--shard must look like I/N or auto/N, e.g. 0/4, not '1'"),
        ("auto/3", {}, "--shard auto/N: no job index in the environment"),
        (
            "auto/3",
            {"JOB_COMPLETION_INDEX": "x"},
            "--shard auto/N: JOB_COMPLETION_INDEX='x' is not a shard number",
        ),
        ("0/0", {}, "the number of shards must be 1 to 1024, not 0"),
    ],
)
def test_bad_shard_specs(text, environ, message):
    with pytest.raises(UsageError) as raised:
        parse_shard(text, environ)
    assert raised.value.message == message


def test_workers():
    assert parse_workers("3") == 3
    assert parse_workers("auto", cpu_count=8) == 8
    with pytest.raises(UsageError):
        parse_workers("0")


def test_state_files_beside_the_state(tmp_path):
    state = str(tmp_path / "segreplay-state.sqlite")
    assert shard_state_path(state, Shard(0, 4)) == str(
        tmp_path / "segreplay-state.shard-0-of-4.sqlite"
    )
    assert shard_state_path(state, Shard(0, 1)) == state
    assert (
        shard_state_path("s3://b/k/state.sqlite", Shard(1, 2))
        == "s3://b/k/state.shard-1-of-2.sqlite"
    )
    assert existing_counts(state) == {}
    check_shard_count(state, 3)  # a new state: any N
    for i in range(2):
        (tmp_path / f"segreplay-state.shard-{i}-of-2.sqlite").touch()
    check_shard_count(state, 2)
    with pytest.raises(UsageError) as raised:
        check_shard_count(state, 1)
    assert raised.value.message == f"the state {state} is kept in 2 shards, not in one file"
    assert raised.value.hint == (
        f"run `segreplay reshard --shards 1 --state {state}` first, or run with --workers 2"
    )
    with pytest.raises(UsageError) as raised:
        check_shard_count(state, 3, "--shard")
    assert raised.value.hint.endswith("or run with --shard I/2")


def test_a_state_kept_both_in_one_file_and_in_shards_is_never_resharded_over(tmp_path):
    """A plain file beside whole shard files (an older segreplay's delete made one): a run
    of either count, and a reshard to either, would drop what the other set acknowledged."""
    from segreplay.errors import StateError
    from segreplay.resharding import reshard
    from segreplay.state import State

    state = str(tmp_path / "segreplay-state.sqlite")
    for path in (
        state,
        *(str(tmp_path / f"segreplay-state.shard-{i}-of-2.sqlite") for i in (0, 1)),
    ):
        State(path).close()
    for count in (1, 2):
        with pytest.raises(UsageError) as raised:
            check_shard_count(state, count)
        assert raised.value.message.startswith(f"the state {state} is kept both")
        with pytest.raises(StateError) as refused:
            reshard(state, count)
        assert "move the other set of files away" in refused.value.hint


def test_the_summary_of_shards_adds_work_and_keeps_the_archive_once():
    a = Summary(lines=10, lines_elsewhere=30, events_sent=5, files=4, bytes_read=100,
                files_already_done=2, lines_already_done=40, elapsed_s=2.0, invalid=1)  # fmt: skip
    b = Summary(lines=30, lines_elsewhere=10, events_sent=7, files=4, bytes_read=100,
                files_already_done=1, lines_already_done=20, elapsed_s=3.0, interrupted=True)  # fmt: skip
    merged = merge_summaries([a, b])
    assert (merged.lines, merged.lines_elsewhere, merged.events_sent, merged.invalid) == (
        40,
        0,
        12,
        1,
    )
    assert (merged.files, merged.bytes_read, merged.elapsed_s) == (4, 100, 3.0)
    assert (merged.files_already_done, merged.lines_already_done) == (1, 20)
    assert merged.interrupted


def test_a_429_in_one_process_pauses_the_others():
    shared = multiprocessing.get_context("spawn").Value("d", 0.0)
    now = [100.0]
    slept = []
    first = RequestBudget(10, 1.0, clock=lambda: now[0], sleep=slept.append, shared_pause=shared)

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    second = RequestBudget(10, 1.0, clock=lambda: now[0], sleep=sleep, shared_pause=shared)
    first.pause(5.0)
    second.take()
    assert slept == [5.0] and second.waits == 1


def test_each_worker_gets_its_share_of_both_budgets():
    from segreplay.config import DeliveryOptions, RunConfig
    from segreplay.workers import worker_config

    track = DeliveryOptions(endpoint="http://127.0.0.1:1", api_key="k", rate_requests=1500)
    user_ops = DeliveryOptions(endpoint="http://127.0.0.1:1", api_key="k",
                               rate_requests=10000, rate_seconds=60.0, concurrency=1)  # fmt: skip
    config = RunConfig(sources=("x",), state_path="s.sqlite", delivery=track, user_ops=user_ops,
                       mapping=MappingOptions(anonymous="alias"))  # fmt: skip
    shard = worker_config(config, Shard(2, 3))
    assert (shard.delivery.rate_requests, shard.delivery.rate_seconds) == (500, 3.0)
    assert (shard.user_ops.rate_requests, shard.user_ops.rate_seconds) == (3333, 60.0)
    assert (shard.state_path, shard.shard) == ("s.shard-2-of-3.sqlite", (2, 3))


def _import(*args: str):
    from click.testing import CliRunner

    from segreplay.cli import cli

    return CliRunner().invoke(cli, ["import", *args])


def test_shard_and_workers_do_not_go_together(tmp_path):
    result = _import("samples/segment-logs", "--dry-run", "--shard", "0/2", "--workers", "2",
                     "--state", str(tmp_path / "s.sqlite"))  # fmt: skip
    assert result.exit_code == 2
    assert "--shard (or SEGREPLAY_SHARD) and --workers do not go together" in result.output


def test_standard_input_is_not_shared_out(tmp_path):
    result = _import("-", "--dry-run", "--workers", "2", "--state", str(tmp_path / "s.sqlite"))
    assert result.exit_code == 2
    assert "standard input cannot be shared out to --workers" in result.output


def test_shard_from_the_environment(tmp_path):
    from click.testing import CliRunner

    from segreplay.cli import cli

    result = CliRunner().invoke(
        cli, ["import", "samples/segment-logs", "--dry-run", "--json",
              "--state", str(tmp_path / "s.sqlite"), "--dead-letter", str(tmp_path / "dl")],
        env={"SEGREPLAY_SHARD": "auto/2", "AWS_BATCH_JOB_ARRAY_INDEX": "1"},
    )  # fmt: skip
    assert result.exit_code in (0, 3), result.output
    summary = orjson.loads(result.stdout.splitlines()[-1])
    assert summary["lines_elsewhere"] > 0 and summary["lines"] > 0
    assert (tmp_path / "s.shard-1-of-2.sqlite").exists() is False  # a dry run writes none


def test_reshard_moves_users_and_keeps_facts_about_everyone_in_every_shard(tmp_path):
    from segreplay.resharding import reshard
    from segreplay.state import FileCheckpoint, State

    base = str(tmp_path / "state.sqlite")
    users = [f"e:user-{i}" for i in range(40)]
    for index in range(2):
        state = State(str(tmp_path / f"state.shard-{index}-of-2.sqlite"))
        run = state.start_run("2026-11-30T00:00:00.000Z")
        mine = [user for user in users if shard_of(user, 2) == index]
        state.commit(run, {user: {"plan": ["pro", "2024-01-01T00:00:00.000Z"]} for user in mine},
                     [(index * 100 + 1, 0)], [FileCheckpoint("a.gz", 10, "f", 5 + index, index == 1)])  # fmt: skip
        state.record_links([(f"anon-{index}", f"user-{index}", "2024-01-01T00:00:00.000Z", 0)])
        state.close()
    result = reshard(base, 3)
    assert (result.old_count, result.new_count, result.users) == (2, 3, 40)
    for index in range(3):
        state = State(str(tmp_path / f"state.shard-{index}-of-3.sqlite"))
        try:
            held = {u for u in users if state.user_attributes(u) is not None}
            assert held == {u for u in users if shard_of(u, 3) == index}
            assert state.counts()["delivered_messages"] == 2  # every digest, everywhere
            assert (state.link("anon-0"), state.link("anon-1")) == (("user-0", 0), ("user-1", 0))
            [checkpoint] = state.checkpoints()
            assert (checkpoint.lines_acked, checkpoint.done) == (5, False)  # the least
        finally:
            state.close()
    assert not list(tmp_path.glob("state.shard-*-of-2.sqlite*"))  # locks too
