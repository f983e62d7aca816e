"""Identity over real sockets (identity.md): `import --anonymous alias` into the fake Braze,
for every order of anonymous lines, identifies, alias calls, files and runs the contract
names. Each test reads the fake's final profiles: every event on the right profile exactly
once, no alias-only profile left for a linked anonymousId, nothing dropped for a missing
profile, and a second run sends nothing."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from conftest import segment, write_archive

from segreplay.config import DeliveryOptions, MappingOptions, RunConfig
from segreplay.delivery import braze_sink
from segreplay.fake import FakeBraze
from segreplay.mapping import ALIAS_LABEL
from segreplay.merging import IDENTIFY_PATH, MERGE_PATH
from segreplay.pipeline import run_import
from segreplay.reporting import SilentReporter, Summary
from segreplay.retry import Delivered
from segreplay.userops import UserOps

KEY = "identity-test-key"
T1, T2, T3, T4, T5 = (f"2024-03-0{day}T10:00:00.000Z" for day in range(1, 6))


def _track(name: str, user: str | None, anon: str | None, time: str) -> dict:
    """A track line; `anon` None leaves anonymousId out (a server-side call)."""
    line = segment("track", user, time, event=name, properties={}, anonymousId=anon)
    if anon is None:
        del line["anonymousId"]
    return line


def _identify(user: str, anon: str, time: str, **traits) -> dict:
    return segment("identify", user, time, anonymousId=anon, traits=traits)


def _alias_call(previous: str, user: str, time: str) -> dict:
    return segment("alias", user, time, previousId=previous)


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

    def run(self, user_ops=None, dry_run: bool = False) -> Summary:
        options = DeliveryOptions(endpoint=self.fake.url, api_key=KEY)
        config = RunConfig(
            sources=(str(self.logs),),
            state_path=str(self.work / "state.sqlite"),
            dry_run=dry_run,
            output_path=str(self.work / "sent.jsonl"),
            dead_letter_path=str(self.work / "dead-letter.jsonl"),
            mapping=MappingOptions(anonymous="alias"),
            delivery=options,
        )
        ops = UserOps(options)
        try:
            return run_import(config, SilentReporter(), braze_sink(options),
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
        """Each profile (its external_id, or 'alias:<name>' when alias-only) and the
        names of the events it holds, sorted."""
        profiles = {}
        for profile in self.fake.profiles():
            key = profile["external_id"]
            if key is None:
                (alias,) = profile["user_aliases"]
                key = "alias:" + alias["alias_name"]
            profiles[key] = sorted(event["name"] for event in profile["events"])
        return profiles

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


def test_a_third_device_in_a_later_run_is_merged_not_identified(replays):
    replays.add_file([_track("Phone Browse", None, "anon-phone", T1)])
    replays.run()
    replays.add_file([_identify("user-1", "anon-phone", T2)])
    assert replays.run().merges_sent == 1  # identify: user-1 now holds an alias
    replays.add_file([_track("Tablet Browse", None, "anon-tablet", T3)])
    replays.run()
    replays.add_file([_track("Subscribed", "user-1", "anon-tablet", T4)])
    assert replays.run().merges_sent == 1
    assert replays.paths().count(IDENTIFY_PATH) == 1
    assert replays.paths().count(MERGE_PATH) == 1
    replays.assert_final({"user-1": ["Phone Browse", "Tablet Browse", "Subscribed"]})


def test_a_refused_merge_is_dead_lettered_and_not_retried(replays, fake):
    """A merge Braze refuses (400) is final: counted, written down, and not sent again."""
    replays.add_file([_track("Viewed Home", None, "anon-a", T1)])
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
