"""Identity over real sockets (identity.md): `import --anonymous alias` into the fake Braze,
for every order of anonymous lines, identifies, alias calls, files and runs the contract
names. Each test reads the fake's final profiles: every event on the right profile exactly
once, no alias-only profile left for a linked anonymousId, nothing dropped for a missing
profile, and a second run sends nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from conftest import alias_call, events_by_profile, segment, visit, write_archive

from segreplay.config import DeliveryOptions, MappingOptions, RunConfig
from segreplay.delivery import BrazeSink
from segreplay.fake import FakeBraze
from segreplay.mapping import ALIAS_LABEL
from segreplay.merging import IDENTIFY_PATH, MERGE_PATH
from segreplay.pipeline import run_import
from segreplay.reporting import SilentReporter, Summary
from segreplay.retry import Delivered
from segreplay.userops import UserOps

KEY = "identity-test-key"
T1, T2, T3, T4, T5 = (f"2024-03-0{day}T10:00:00.000Z" for day in range(1, 6))


def _identify(user: str, anon: str, time: str, **traits) -> dict:
    return segment("identify", user, time, anonymousId=anon, traits=traits)


def _alias(anonymous_id: str) -> dict:
    return {"alias_name": anonymous_id, "alias_label": ALIAS_LABEL}


class Replays:
    """One archive folder, one state, one fake: runs of `import --anonymous alias`."""

    def __init__(self, fake: FakeBraze, work: Path) -> None:
        self.fake = fake
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir()
        self._files = 0

    def add_file(self, lines: list[dict]) -> Path:
        """A new archive file, later than every earlier one (as Segment writes them)."""
        self._files += 1
        return write_archive(self.logs / f"src/1709596800000/part-{self._files}.gz", lines)

    def run(self, user_ops=None, dry_run: bool = False, suppressed=frozenset()) -> Summary:
        options = DeliveryOptions(endpoint=self.fake.url, api_key=KEY)
        config = RunConfig(
            sources=(str(self.logs),),
            state_path=str(self.work / "state.sqlite"),
            dry_run=dry_run,
            output_path=str(self.work / "sent.jsonl"),
            dead_letter_path=str(self.work / "dead-letter.jsonl"),
            mapping=MappingOptions(anonymous="alias"),
            delivery=options,
            suppressed=frozenset(suppressed),
        )
        ops = UserOps(options)
        try:
            return run_import(config, SilentReporter(), BrazeSink(options),
                              user_ops=user_ops or ops.deliver)  # fmt: skip
        finally:
            ops.close()

    def dead_letters(self) -> list[dict]:
        path = self.work / "dead-letter.jsonl"
        if not path.exists():
            return []
        return [orjson.loads(line) for line in path.read_bytes().splitlines()]

    def paths(self) -> list[str]:
        """The API paths the fake received, in arrival order."""
        return [request.path for request in self.fake.requests()]

    def where(self) -> dict[str, list[str]]:
        return events_by_profile(self.fake)

    def assert_final(self, expected: dict[str, list[str]]) -> None:
        """The fake holds exactly these profiles and events, nothing was dropped, and a
        second run sends nothing at all."""
        assert self.where() == {key: sorted(names) for key, names in expected.items()}
        assert self.fake.not_applied() == 0
        before = len(self.fake.requests())
        again = self.run()
        assert (again.requests, again.merges_sent, again.aliases_created) == (0, 0, 0)
        assert len(self.fake.requests()) == before


@pytest.fixture
def fake():
    with FakeBraze(api_key=KEY) as braze:
        yield braze


@pytest.fixture
def replays(fake, tmp_path):
    return Replays(fake, tmp_path)


# ------------------------------------------------------------------------ one run


def test_anonymous_lines_before_the_identify_in_one_file(replays):
    replays.add_file([
        visit("Viewed Home", None, "anon-a", T1),
        visit("Viewed Pricing", None, "anon-a", T2),
        _identify("user-1", "anon-a", T3, first_name="Ada"),
        visit("Subscribed", "user-1", "anon-a", T4),
    ])  # fmt: skip
    summary = replays.run()
    assert summary.anonymous_resolved == 2
    assert (summary.aliases_created, summary.merges_sent) == (0, 0)
    assert IDENTIFY_PATH not in replays.paths() and MERGE_PATH not in replays.paths()
    assert replays.fake.profile(user_alias=_alias("anon-a")) is None
    assert replays.fake.profile("user-1")["attributes"] == {"first_name": "Ada"}
    replays.assert_final({"user-1": ["Viewed Home", "Viewed Pricing", "Subscribed"]})


def test_anonymous_lines_in_a_file_before_the_one_with_the_identify(replays):
    replays.add_file([visit("Viewed Home", None, "anon-a", T1)])
    replays.add_file([_identify("user-1", "anon-a", T2), visit("Subscribed", "user-1", None, T3)])
    summary = replays.run()
    assert (summary.anonymous_resolved, summary.aliases_created, summary.merges_sent) == (1, 0, 0)
    replays.assert_final({"user-1": ["Viewed Home", "Subscribed"]})


def test_anonymous_lines_after_the_identify(replays):
    replays.add_file([
        _identify("user-1", "anon-a", T1),
        visit("Viewed Home", None, "anon-a", T2),
        visit("Logged Out Browse", None, "anon-a", T3),
    ])  # fmt: skip
    summary = replays.run()
    assert (summary.anonymous_resolved, summary.aliases_created) == (2, 0)
    replays.assert_final({"user-1": ["Viewed Home", "Logged Out Browse"]})


def test_two_devices_in_one_run_need_no_merge(replays):
    replays.add_file([
        visit("Phone Browse", None, "anon-phone", T1),
        visit("Laptop Browse", None, "anon-laptop", T2),
        _identify("user-1", "anon-phone", T3),
        visit("Subscribed", "user-1", "anon-laptop", T4),
    ])  # fmt: skip
    summary = replays.run()
    assert (summary.anonymous_resolved, summary.merges_sent) == (2, 0)
    replays.assert_final({"user-1": ["Phone Browse", "Laptop Browse", "Subscribed"]})


def test_alias_call_with_an_anonymous_previous_id(replays):
    replays.add_file([
        visit("Viewed Home", None, "anon-a", T1),
        alias_call("anon-a", "user-1", T2),
        visit("Subscribed", "user-1", None, T3),
    ])  # fmt: skip
    summary = replays.run()
    assert summary.anonymous_resolved == 1
    replays.assert_final({"user-1": ["Viewed Home", "Subscribed"]})


def test_alias_call_between_two_user_ids_in_one_run_merges_the_previous_one(replays):
    replays.add_file([
        visit("Old Account Event", "old-id", None, T1),
        alias_call("old-id", "new-id", T2),
        visit("New Account Event", "new-id", None, T3),
    ])  # fmt: skip
    summary = replays.run()
    assert summary.merges_sent == 1
    assert replays.paths().count(MERGE_PATH) == 1
    assert replays.fake.accepted("merge") == [{
        "identifier_to_merge": {"external_id": "old-id"},
        "identifier_to_keep": {"external_id": "new-id"},
    }]  # fmt: skip
    replays.assert_final({"new-id": ["Old Account Event", "New Account Event"]})


def test_an_anonymous_forever_visitor_keeps_an_alias_profile(replays):
    replays.add_file([
        visit("Viewed Home", None, "anon-lurker", T1),
        segment("identify", None, T2, anonymousId="anon-lurker", traits={"plan": "free"}),
        visit("Viewed Pricing", None, "anon-lurker", T3),
        _identify("user-1", "anon-other", T4),
    ])  # fmt: skip
    summary = replays.run()
    assert (summary.aliases_created, summary.anonymous_resolved) == (1, 0)
    lurker = replays.fake.profile(user_alias=_alias("anon-lurker"))
    assert lurker["external_id"] is None and lurker["attributes"] == {"plan": "free"}
    replays.assert_final({"alias:anon-lurker": ["Viewed Home", "Viewed Pricing"], "user-1": []})


def test_a_shared_device_keeps_its_first_link_by_event_time(replays):
    # Read first but later by event time: user-2's line loses anon-shared to user-1.
    replays.add_file([
        visit("Second Person Event", "user-2", "anon-shared", T3),
        visit("Anonymous Browse", None, "anon-shared", T2),
        _identify("user-1", "anon-shared", T1),
    ])  # fmt: skip
    summary = replays.run()
    assert summary.identity_conflicts == 1
    assert summary.anonymous_resolved == 1
    (conflict,) = [d for d in replays.dead_letters() if d["kind"] == "identity conflict"]
    assert conflict["line"] == 1
    assert conflict["record"] == {
        "anonymousId": "anon-shared", "userId": "user-2", "kept": "user-1", "time": T3,
    }  # fmt: skip
    assert "anon-shared" in conflict["reason"] and "user-1" in conflict["reason"]
    replays.assert_final({"user-1": ["Anonymous Browse"], "user-2": ["Second Person Event"]})


# ------------------------------------------------------------------ across runs


def test_a_later_run_finds_the_link_and_identifies_the_alias_profile(replays):
    replays.add_file([visit("Viewed Home", None, "anon-a", T1)])
    first = replays.run()
    assert first.aliases_created == 1
    assert replays.where() == {"alias:anon-a": ["Viewed Home"]}

    replays.add_file([
        visit("Viewed Pricing", None, "anon-a", T2),
        _identify("user-1", "anon-a", T3, first_name="Ada"),
    ])  # fmt: skip
    second = replays.run()
    assert (second.merges_sent, second.anonymous_resolved, second.aliases_created) == (1, 1, 0)
    assert replays.paths().count(IDENTIFY_PATH) == 1
    assert replays.paths().count(MERGE_PATH) == 0
    profile = replays.fake.profile("user-1")
    assert profile["user_aliases"] == [_alias("anon-a")]  # the alias now belongs to user-1
    assert replays.fake.profile(user_alias=_alias("anon-a")) == profile

    replays.add_file([visit("Came Back Logged Out", None, "anon-a", T4)])  # the link holds
    third = replays.run()
    assert (third.anonymous_resolved, third.merges_sent) == (1, 0)
    replays.assert_final({"user-1": ["Viewed Home", "Viewed Pricing", "Came Back Logged Out"]})


def test_two_devices_across_runs_identify_the_first_and_merge_the_second(replays):
    replays.add_file([
        visit("Phone Browse", None, "anon-phone", T1),
        visit("Laptop Browse", None, "anon-laptop", T2),
    ])  # fmt: skip
    assert replays.run().aliases_created == 2

    replays.add_file([
        _identify("user-1", "anon-phone", T3),
        visit("Subscribed", "user-1", "anon-laptop", T4),
    ])  # fmt: skip
    summary = replays.run()
    assert summary.merges_sent == 2
    assert replays.paths().count(IDENTIFY_PATH) == 1
    assert replays.paths().count(MERGE_PATH) == 1
    assert replays.run().rejected == 0
    profile = replays.fake.profile("user-1")
    assert len(profile["user_aliases"]) == 1  # Braze: one alias a label
    replays.assert_final({"user-1": ["Phone Browse", "Laptop Browse", "Subscribed"]})


def test_a_third_device_in_a_later_run_is_merged_not_identified(replays):
    replays.add_file([visit("Phone Browse", None, "anon-phone", T1)])
    replays.run()
    replays.add_file([_identify("user-1", "anon-phone", T2)])
    assert replays.run().merges_sent == 1  # identify: user-1 now holds an alias
    replays.add_file([visit("Tablet Browse", None, "anon-tablet", T3)])
    replays.run()
    replays.add_file([visit("Subscribed", "user-1", "anon-tablet", T4)])
    assert replays.run().merges_sent == 1
    assert replays.paths().count(IDENTIFY_PATH) == 1
    assert replays.paths().count(MERGE_PATH) == 1
    replays.assert_final({"user-1": ["Phone Browse", "Tablet Browse", "Subscribed"]})


def test_alias_call_in_a_later_run_merges_the_earlier_user_id(replays):
    replays.add_file([visit("Old Account Event", "old-id", None, T1)])
    replays.run()
    replays.add_file([
        alias_call("old-id", "new-id", T2),
        visit("New Account Event", "new-id", None, T3),
    ])  # fmt: skip
    assert replays.run().merges_sent == 1
    assert replays.fake.profile("old-id") is None
    replays.assert_final({"new-id": ["Old Account Event", "New Account Event"]})


def test_a_userid_merged_away_then_seen_again_is_merged_again(replays):
    """/users/merge deletes the profile it merges: a later line under the earlier userId
    makes that profile again, and it is merged again, not left beside the user."""
    replays.add_file([visit("Old Account Event", "old-id", None, T1)])
    replays.run()
    replays.add_file([alias_call("old-id", "new-id", T2), visit("New Event", "new-id", None, T3)])
    assert replays.run().merges_sent == 1
    replays.add_file([visit("Old App Still Running", "old-id", None, T4)])
    assert replays.run().merges_sent == 1
    replays.assert_final({"new-id": ["Old Account Event", "New Event", "Old App Still Running"]})


def test_alias_call_in_a_later_run_identifies_an_anonymous_previous_id(replays):
    replays.add_file([visit("Viewed Home", None, "anon-a", T1)])
    replays.run()
    replays.add_file([alias_call("anon-a", "user-1", T2), visit("Subscribed", "user-1", None, T3)])
    assert replays.run().merges_sent == 1
    assert replays.paths().count(IDENTIFY_PATH) == 1
    replays.assert_final({"user-1": ["Viewed Home", "Subscribed"]})


def test_a_conflict_with_a_link_an_earlier_run_recorded(replays):
    replays.add_file([_identify("user-1", "anon-shared", T1)])
    replays.run()
    replays.add_file([
        visit("Second Person Event", "user-2", "anon-shared", T2),
        visit("Anonymous Browse", None, "anon-shared", T3),
    ])  # fmt: skip
    summary = replays.run()
    assert (summary.identity_conflicts, summary.anonymous_resolved) == (1, 1)
    replays.assert_final({"user-1": ["Anonymous Browse"], "user-2": ["Second Person Event"]})


# ------------------------------------------------------------------ crash and resume


class _CrashOnFirstMerge:
    """A user-ops poster whose process dies when it is about to post its first merge."""

    def __init__(self, post) -> None:
        self._post = post
        self.crashed = False

    def __call__(self, path: str, body: bytes, permission: str) -> Delivered:
        if not self.crashed and path in (IDENTIFY_PATH, MERGE_PATH):
            self.crashed = True
            raise KeyboardInterrupt  # as a kill would stop the run
        return self._post(path, body, permission)


def test_a_crash_between_track_and_merge_resumes_into_the_merge(replays, fake):
    replays.add_file([
        visit("Phone Browse", None, "anon-phone", T1),
        visit("Laptop Browse", None, "anon-laptop", T1),
    ])  # fmt: skip
    replays.run()
    replays.add_file([
        _identify("user-1", "anon-phone", T2),
        visit("Subscribed", "user-1", "anon-laptop", T3),
    ])  # fmt: skip
    ops = UserOps(DeliveryOptions(endpoint=fake.url, api_key=KEY))
    crash = _CrashOnFirstMerge(ops.deliver)
    try:
        with pytest.raises(KeyboardInterrupt):
            replays.run(user_ops=crash)
    finally:
        ops.close()
    assert crash.crashed
    assert IDENTIFY_PATH not in replays.paths() and MERGE_PATH not in replays.paths()
    assert fake.profile("user-1")["events"][0]["name"] == "Subscribed"  # tracked, not merged

    resumed = replays.run()
    assert (resumed.requests, resumed.merges_sent) == (0, 2)  # nothing re-tracked
    assert replays.paths().count(IDENTIFY_PATH) == 1
    assert replays.paths().count(MERGE_PATH) == 1
    replays.assert_final({"user-1": ["Phone Browse", "Laptop Browse", "Subscribed"]})


def test_a_refused_merge_is_dead_lettered_and_not_retried(replays, fake):
    """A merge Braze refuses (400) is final: counted, written down, and not sent again."""
    replays.add_file([visit("Viewed Home", None, "anon-a", T1)])
    replays.run()
    replays.add_file([_identify("user-1", "anon-a", T2)])

    def refuse_identify(path: str, body: bytes, permission: str) -> Delivered:
        from segreplay.sink import Refusal

        return Delivered(bodies=[body], refusals=[Refusal(None, None, "simulated 400")])

    summary = replays.run(user_ops=refuse_identify)
    assert (summary.merges_sent, summary.rejected) == (0, 1)
    (letter,) = replays.dead_letters()
    assert (letter["source"], letter["reason"]) == (IDENTIFY_PATH, "simulated 400")
    assert replays.run().merges_sent == 0


# ------------------------------------------------------------------ the CLI


def _cli(fake: FakeBraze, work: Path, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRAZE_", "SEGREPLAY_"))}
    result = subprocess.run(
        [sys.executable, "-m", "segreplay", "import", str(work / "logs"), "--anonymous", "alias",
         "--endpoint", fake.url, "--api-key", KEY, "--state", str(work / "state.sqlite"),
         "--dead-letter", str(work / "dead-letter.jsonl"), "--json", *args],
        cwd=work, env=env, capture_output=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    return orjson.loads(result.stdout.splitlines()[-1])


def test_cli_cron_runs_merge_once(replays, fake, tmp_path):
    replays.add_file([visit("Viewed Home", None, "anon-a", T1)])
    first = _cli(fake, tmp_path)
    assert first["aliases_created"] == 1
    replays.add_file([_identify("user-1", "anon-a", T2), visit("Paid", None, "anon-a", T5)])
    second = _cli(fake, tmp_path)
    assert (second["merges_sent"], second["anonymous_resolved"]) == (1, 1)
    assert _cli(fake, tmp_path)["merges_sent"] == 0
    assert replays.where() == {"user-1": ["Paid", "Viewed Home"]}
    assert fake.not_applied() == 0


def test_a_pending_merge_naming_a_suppressed_user_waits(replays):
    replays.add_file([visit("Viewed Home", None, "anon-a", T1)])
    replays.run()
    replays.add_file([_identify("user-1", "anon-a", T2)])

    def crash(path, body, permission):
        raise RuntimeError("the machine went away before the merge")

    with pytest.raises(RuntimeError):
        replays.run(user_ops=crash)  # the merge is now pending in the state
    assert replays.run(suppressed={"e:user-1"}).merges_sent == 0
    assert IDENTIFY_PATH not in replays.paths()
    assert replays.run().merges_sent == 1  # no longer suppressed: it goes, once
    assert replays.paths().count(IDENTIFY_PATH) == 1
