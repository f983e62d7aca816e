"""Identity across shards (issue 12, item 7) over real sockets: one story of anonymous
visitors, devices, alias calls and cron runs, replayed with 1, 2 and 3 shards in either
order, leaves the fake Braze with the same profiles and events, each once; every merge
is sent while Braze holds both of its profiles; a second run sends nothing."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest
from conftest import (
    alias_call,
    events_by_profile,
    segment,
    visit,
    wait_for_requests,
    worker_pids,
    write_archive,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segreplay.config import DeliveryOptions, MappingOptions, RunConfig
from segreplay.delivery import BrazeSink
from segreplay.fake import FakeBraze
from segreplay.mapping import ALIAS_LABEL
from segreplay.merging import MERGE_PATH
from segreplay.pipeline import run_import
from segreplay.reporting import SilentReporter, Summary
from segreplay.retry import Delivered
from segreplay.sharding import Shard, shard_config, shard_of
from segreplay.userops import UserOps
from segreplay.workers import merge_summaries

KEY = "identity-shards-key"
T1, T2, T3, T4, T5 = (f"2024-03-0{day}T10:00:00.000Z" for day in range(1, 6))


# The story, a list of files per cron run; and where Braze must end up.
RUNS = [
    [
        [
            visit("Phone Browse", None, "anon-phone", T1),
            visit("Laptop Browse", None, "anon-laptop", T1),
            visit("Lurk", None, "anon-lurker", T1),  # never linked: keeps its alias profile
            visit("Old Account Event", "old-id", None, T1),
            visit("Viewed Home", None, "anon-a", T1),
            visit("Before Signup", None, "anon-x", T1),  # linked in the same run: no merge
            segment("identify", "user-2", T2, anonymousId="anon-x", traits={"plan": "pro"}),
        ]
    ],
    [
        [
            segment(
                "identify", "user-1", T2, anonymousId="anon-phone", traits={"first_name": "Ada"}
            ),
            visit("Subscribed", "user-1", "anon-laptop", T3),  # a second device
            alias_call("old-id", "new-id", T2),  # a userId renamed
            visit("New Account Event", "new-id", None, T3),
            alias_call("anon-a", "user-3", T2),  # user-3 has no line of its own
            visit("Phone Again", None, "anon-phone", T4),  # after the link: sent as user-1
        ]
    ],
    [[visit("Tablet Browse", None, "anon-tablet", T4)]],
    [[visit("Tablet Signup", "user-1", "anon-tablet", T5)]],  # a third device
]
FINAL = {
    "user-1": ["Laptop Browse", "Phone Again", "Phone Browse", "Subscribed", "Tablet Browse",
               "Tablet Signup"],
    "user-2": ["Before Signup"],
    "new-id": ["New Account Event", "Old Account Event"],
    "user-3": ["Viewed Home"],
    "alias:anon-lurker": ["Lurk"],
}  # fmt: skip
# (profile merged away, profile kept), as state keys
MERGES = [("a:anon-phone", "e:user-1"), ("a:anon-laptop", "e:user-1"), ("e:old-id", "e:new-id"),
          ("a:anon-a", "e:user-3"), ("a:anon-tablet", "e:user-1")]  # fmt: skip


class _CheckedUserOps:
    """Posts merges through a real UserOps, first checking that the fake holds both
    profiles of every item: a merge sent earlier would be lost (Braze skips it)."""

    def __init__(self, fake: FakeBraze) -> None:
        self._fake = fake
        self._ops = UserOps(DeliveryOptions(endpoint=fake.url, api_key=KEY))
        self.items: list[tuple[str, dict]] = []
        self.crash_next = False  # the process dies as it is about to post
        self.refuse: set[str] = set()  # paths Braze answers with a 400

    def __call__(self, path: str, body: bytes, permission: str) -> Delivered:
        if path in self.refuse:
            from segreplay.sink import Refusal

            return Delivered(bodies=[body], refusals=[Refusal(None, None, "simulated 400")])
        if self.crash_next:
            self.crash_next = False
            raise KeyboardInterrupt
        request = orjson.loads(body)
        for item in request.get("aliases_to_identify", ()):
            assert self._fake.profile(item["external_id"]) is not None, item
            assert self._fake.profile(user_alias=item["user_alias"]) is not None, item
            self.items.append((path, item))
        for item in request.get("merge_updates", ()):
            for side in ("identifier_to_merge", "identifier_to_keep"):
                identifier = item[side]
                found = (
                    self._fake.profile(user_alias=identifier["user_alias"])
                    if "user_alias" in identifier
                    else self._fake.profile(identifier["external_id"])
                )
                assert found is not None, item
            self.items.append((path, item))
        return self._ops.deliver(path, body, permission)

    def close(self) -> None:
        self._ops.close()


class ShardedReplays:
    """One archive folder, a state in `count` shards, one fake: each run replays every
    shard, one after another, in `order`."""

    def __init__(self, fake: FakeBraze, work: Path, count: int, reverse: bool) -> None:
        self.fake = fake
        self.work = work
        self.logs = work / "logs"
        self.count = count
        self.order = list(range(count))[:: -1 if reverse else 1]
        self.user_ops = _CheckedUserOps(fake)
        self._files = 0

    def reshard(self, count: int) -> None:
        from segreplay.resharding import reshard

        reshard(str(self.work / "state.sqlite"), count)
        self.count, self.order = count, list(range(count))

    def add_file(self, lines: list[dict]) -> Path:
        self._files += 1
        return write_archive(self.logs / f"src/1709596800000/part-{self._files}.gz", lines)

    def run(self, only: tuple[int, ...] | None = None) -> Summary:
        """Each shard's run (`only` these, in that order: the others missed this night)."""
        options = DeliveryOptions(endpoint=self.fake.url, api_key=KEY)
        config = RunConfig(
            sources=(str(self.logs),),
            state_path=str(self.work / "state.sqlite"),
            dead_letter_path=str(self.work / "dead-letter.jsonl"),
            mapping=MappingOptions(anonymous="alias"),
            delivery=options,
        )
        summaries = [
            run_import(
                shard_config(config, Shard(index, self.count)),
                SilentReporter(),
                BrazeSink(options),
                user_ops=self.user_ops,
            )  # fmt: skip
            for index in (self.order if only is None else only)
        ]
        return merge_summaries(summaries)

    def where(self) -> dict[str, list[str]]:
        return events_by_profile(self.fake)


@contextmanager
def _sharded(work: Path, count: int, reverse: bool = False) -> Iterator[ShardedReplays]:
    """ShardedReplays over a fake Braze of its own, closed at the end."""
    with FakeBraze(api_key=KEY) as fake:
        replays = ShardedReplays(fake, work, count, reverse)
        try:
            yield replays
        finally:
            replays.user_ops.close()


def _browse_then_sign_up(replays: ShardedReplays, visitor: str, user: str) -> Path:
    """Night 1 (replayed): the visitor browses. Night 2 (not yet): they sign up as `user`.
    Returns night 2's file."""
    replays.add_file([visit("Browse", None, visitor, T1)])
    replays.run()
    return replays.add_file([segment("identify", user, T2, anonymousId=visitor, traits={})])


def _crossing(count: int) -> list[tuple[str, str]]:
    return [(gone, keep) for gone, keep in MERGES if shard_of(gone, count) != shard_of(keep, count)]


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reversed"])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_the_story_ends_the_same_in_any_number_of_shards(count, reverse, tmp_path):
    if count > 1:  # the story exercises what it is about
        assert len(_crossing(count)) >= 2
    with _sharded(tmp_path, count, reverse) as replays:
        fake = replays.fake
        merges_sent = 0
        for files in RUNS:
            for lines in files:
                replays.add_file(lines)
            summary = replays.run()
            assert (summary.rejected, summary.identity_conflicts) == (0, 0)
            merges_sent += summary.merges_sent
        assert replays.where() == FINAL
        assert fake.not_applied() == 0
        assert merges_sent == len(MERGES)
        # each merge once, each by the endpoint its shards allow
        sent = [(path, item) for path, item in replays.user_ops.items]
        assert len(sent) == len(MERGES)
        for path, item in sent:
            if path == MERGE_PATH:
                continue
            # /users/identify only where the alias's and the user's shards are one
            gone = "a:" + item["user_alias"]["alias_name"]
            assert shard_of(gone, count) == shard_of("e:" + item["external_id"], count)
        before = len(fake.requests())
        again = replays.run()
        assert (again.requests, again.merges_sent, again.aliases_created) == (0, 0, 0)
        assert len(fake.requests()) == before


@pytest.mark.parametrize("missed", [0, 1])
def test_a_shard_that_missed_a_night_catches_up_without_duplicates_or_loss(missed, tmp_path):
    """Night 1 only one shard runs; night 2 both read both nights' files. The visitor's
    night-1 lines were the alias shard's then (no link yet), and stay its own: the
    catching-up shard does not resolve them with the link night 2 brought (found by
    trying it as a new user: once it sent them twice, once it lost them)."""
    phone, ada = "a:9a2b-phone", "e:usr_demo_ada"
    assert shard_of(phone, 2) != shard_of(ada, 2)
    with _sharded(tmp_path, 2, reverse=False) as replays:
        fake = replays.fake
        replays.add_file([visit("Viewed Pricing", None, "9a2b-phone", T1),
                          visit("Product Viewed", None, "9a2b-phone", T2)])  # fmt: skip
        replays.run(only=(1 - missed,))
        replays.add_file([
            segment("identify", "usr_demo_ada", T3, anonymousId="9a2b-phone", traits={}),
            visit("Signed Up", "usr_demo_ada", "9a2b-phone", T4),
        ])  # fmt: skip
        replays.run()
        assert replays.run().requests == 0
        assert replays.where() == {
            "usr_demo_ada": ["Product Viewed", "Signed Up", "Viewed Pricing"]
        }
        assert fake.not_applied() == 0


def test_a_merge_into_another_shards_user_makes_that_profile_first(tmp_path):
    """anon-a's alias profile lives in shard 1 of 2; the alias call names user-3, whose
    shard (0) has no line of theirs: shard 1 sends {external_id: user-3} itself, and the
    merge only once Braze acknowledged it. A crash between the two resumes into the
    merge alone."""
    assert (shard_of("a:anon-a", 2), shard_of("e:user-3", 2)) == (1, 0)
    with _sharded(tmp_path, 2, reverse=False) as replays:
        fake = replays.fake
        replays.add_file([visit("Viewed Home", None, "anon-a", T1)])
        replays.run()
        replays.add_file([alias_call("anon-a", "user-3", T2)])
        replays.user_ops.crash_next = True
        with pytest.raises(KeyboardInterrupt):
            replays.run()
        assert [request.path for request in fake.requests()][-1] == "/users/track"
        assert fake.profile("user-3") is not None  # made, not yet merged into
        summary = replays.run()
        assert (summary.merges_sent, summary.requests) == (1, 0)
        assert [request.path for request in fake.requests()][-2:] == ["/users/track", MERGE_PATH]
        assert replays.where() == {"user-3": ["Viewed Home"]}


def test_cli_workers_and_shards_send_the_demo_story_alike(tmp_path):
    """samples/identity-logs with --anonymous alias: one process, --workers 2, and three
    `--shard auto/3` processes started at once leave Braze the same."""
    logs = Path(__file__).parent.parent / "samples" / "identity-logs"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRAZE_", "SEGREPLAY_"))}

    def command(fake: FakeBraze, work: Path, *options: str) -> list[str]:
        return [sys.executable, "-m", "segreplay", "import", str(logs), "--anonymous", "alias",
                "--endpoint", fake.url, "--api-key", KEY, "--state", str(work / "state.sqlite"),
                "--dead-letter", str(work / "dead-letter.jsonl"), "--json", *options]  # fmt: skip

    results = {}
    for name, options, processes in (("one", (), 1), ("workers", ("--workers", "2"), 1),
                                     ("shards", ("--shard", "auto/3"), 3)):  # fmt: skip
        work = tmp_path / name
        work.mkdir()
        with FakeBraze(api_key=KEY) as fake:
            started = [
                subprocess.Popen(
                    command(fake, work, *options),
                    cwd=work,
                    env={**env, "JOB_COMPLETION_INDEX": str(index)},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )  # fmt: skip
                for index in range(processes)
            ]
            summaries = []
            for process in started:
                stdout, stderr = process.communicate(timeout=120)
                assert process.returncode == 0, stderr.decode()
                summaries.append(orjson.loads(stdout.splitlines()[-1]))
            profiles = sorted(
                orjson.dumps(
                    [
                        profile["external_id"],
                        [alias["alias_name"] for alias in profile["user_aliases"]
                         if alias["alias_label"] == ALIAS_LABEL and profile["external_id"] is None],
                        sorted(event["name"] for event in profile["events"]),
                        profile["attributes"],
                    ],
                    option=orjson.OPT_SORT_KEYS,
                )
                for profile in fake.profiles()
            )  # fmt: skip
            assert fake.not_applied() == 0
        # Shards may send more through alias profiles (lines that arrived before their
        # link), never another event.
        results[name] = (profiles, sum(s["events_sent"] for s in summaries))
    assert results["workers"] == results["one"]
    assert results["shards"] == results["one"]


def _visitors_archive(logs: Path, visitors: int = 240) -> None:
    """Night 1: every visitor browses anonymously (two files). Night 2: two in three sign
    up, some users on two devices, and browse on; the rest stay anonymous."""
    night_1: list[list[dict]] = [[], []]
    night_2: list[dict] = []
    for index in range(visitors):
        anon = f"visitor-{index:04d}"
        for step in range(3):
            night_1[step % 2].append(visit(f"Browse {index}.{step}", None, anon, T1))
        if index % 3:
            user = f"user-{index // 2:04d}"  # visitors 2k and 2k+1: one user, two devices
            night_2.append(segment("identify", user, T2, anonymousId=anon,
                                   traits={"plan": "pro", "devices": index % 2 + 1}))  # fmt: skip
            night_2.append(visit(f"Signed Up {index}", user, anon, T3))
        night_2.append(visit(f"Came Back {index}", None, anon, T4))
    for number, lines in enumerate([*night_1, night_2]):
        write_archive(logs / f"src/17095{number}0000000/part-{number}.gz", lines)


def test_kill_9_of_one_worker_with_identity_then_resume_loses_nothing(tmp_path):
    """--workers 2 --anonymous alias, one worker killed with -9 while visitors' histories
    go to alias profiles and users: the same command resumes, and Braze ends as after one
    undisturbed process, but for at most the killed worker's requests in flight."""
    logs = tmp_path / "logs"
    _visitors_archive(logs)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRAZE_", "SEGREPLAY_"))}

    def command(fake: FakeBraze, work: Path, *options: str) -> list[str]:
        return [sys.executable, "-m", "segreplay", "import", str(logs), "--anonymous", "alias",
                "--endpoint", fake.url, "--api-key", KEY, "--state", str(work / "state.sqlite"),
                "--dead-letter", str(work / "dead-letter.jsonl"), "--json", *options]  # fmt: skip

    (tmp_path / "one").mkdir()
    with FakeBraze(api_key=KEY) as fake:
        done = subprocess.run(command(fake, tmp_path / "one"), cwd=tmp_path, env=env,
                              capture_output=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        expected = events_by_profile(fake, with_time=True)
    assert sum(1 for key in expected if key.startswith("alias:")) == 80  # never signed up

    work = tmp_path / "killed"
    work.mkdir()
    with FakeBraze(api_key=KEY, latency_ms=40.0) as fake:
        argv = command(fake, work, "--workers", "2", "--concurrency", "2")
        process = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)  # fmt: skip
        wait_for_requests(fake, process, 4)
        workers = worker_pids(process.pid)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 1, stderr.decode()
        again = subprocess.run(argv, cwd=work, env=env, capture_output=True, timeout=120)
        assert again.returncode == 0, again.stderr.decode()
        got = events_by_profile(fake, with_time=True)
        assert fake.not_applied() == 0
    assert set(got) == set(expected)  # the same profiles: no alias left for a user
    extra = 0
    for key, events in expected.items():
        missing = collections.Counter(events) - collections.Counter(got[key])
        assert not missing, f"{key} lost {sorted(missing)}"
        extra += len(got[key]) - len(events)
    assert extra <= 2 * 75  # only the killed worker's requests in flight go twice


@st.composite
def _stories(draw):
    """Nights of an archive: visitors browsing, some signing up (one user may have
    several devices), users browsing, some renamed by an alias call; and which shards
    run each night, in which order."""
    nights = draw(st.integers(2, 4))
    visitors = draw(st.integers(1, 5))
    users = [f"user-{index}" for index in range(draw(st.integers(1, 3)))]
    count = draw(st.integers(1, 3))
    files: list[list[dict]] = [[] for _ in range(nights)]
    expected: dict[str, list[str]] = {}
    for visitor in range(visitors):
        anon = f"visitor-{visitor}"
        link = draw(st.one_of(st.none(), st.tuples(st.sampled_from(users),
                                                   st.integers(0, nights - 1))))  # fmt: skip
        owner = link[0] if link else "alias:" + anon
        if link:
            expected.setdefault(owner, [])  # the identify makes the profile
        for night in range(nights):
            if link and link[1] == night:
                files[night].append(segment("identify", link[0], T2, anonymousId=anon,
                                            traits={"plan": "pro"}))  # fmt: skip
            for step in range(draw(st.integers(0, 2))):
                name = f"{anon} night {night} step {step}"
                files[night].append(visit(name, None, anon, T1))
                expected.setdefault(owner, []).append(name)
    for user in users:
        for night in range(nights):
            if draw(st.booleans()):
                name = f"{user} night {night}"
                files[night].append(visit(name, user, None, T3))
                expected.setdefault(user, []).append(name)
        renamed_at = draw(st.one_of(st.none(), st.integers(0, nights - 1)))
        if renamed_at is not None:  # an earlier userId, until an alias call renames it
            previous = f"old-{user}"
            files[renamed_at].append(alias_call(previous, user, T4))
            expected.setdefault(user, [])
            for night in range(renamed_at + 1):
                name = f"{previous} night {night}"
                files[night].append(visit(name, previous, None, T1))
                expected[user].append(name)
    for lines in files:
        draw(st.randoms()).shuffle(lines)
    runs = [draw(st.permutations(range(count)).flatmap(
                lambda order: st.lists(st.sampled_from(order), unique=True, max_size=count)))
            for _ in range(nights)]  # fmt: skip
    return count, files, runs, {key: sorted(names) for key, names in expected.items()}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(story=_stories())
def test_any_nights_any_shards_any_schedule_end_as_the_archive_says(story, tmp_path_factory):
    """Whatever the number of shards, whichever of them run each night and in which
    order: once all have run over every night, each event is once on the profile the
    archive says (its user's, or its never-linked visitor's alias profile)."""
    count, files, runs, expected = story
    work = tmp_path_factory.mktemp("story")
    with _sharded(work, count, reverse=False) as replays:
        fake = replays.fake
        for lines, shards in zip(files, runs, strict=True):
            replays.add_file(lines)
            if shards:
                replays.run(only=tuple(shards))
        replays.run()
        assert replays.where() == expected
        assert fake.not_applied() == 0
        assert replays.run().requests == 0


def test_a_reshard_after_a_missed_night_still_merges(tmp_path):
    """The visitor's shard missed the night that linked it to a user; a reshard then moves
    the alias profile into a shard that has the link but no merge planned for it (found
    by a new-user trial): the reshard plans it."""
    visitor, user = "visitor-3", "u1"
    assert (shard_of("a:" + visitor, 2), shard_of("e:" + user, 2)) == (1, 0)
    with _sharded(tmp_path, 2, reverse=False) as replays:
        _browse_then_sign_up(replays, visitor, user)
        replays.run(only=(0,))  # the visitor's shard misses this night
        replays.reshard(3)
        assert replays.run().merges_sent == 1
        assert replays.run().requests == 0
        assert replays.where() == {user: ["Browse"]}


def test_a_late_file_older_than_the_link_after_the_merge_loses_nothing(tmp_path):
    """A file that shows up after the cross-shard merge, with a modification time older
    than the link's file (a sync that lagged for one source): its visitor lines are the
    alias's shard's, and the alias profile is gone from Braze. The shard makes it again
    and merges it again; once lost silently (found by a new-user trial)."""
    visitor, user = "visitor-3", "u1"
    assert (shard_of("a:" + visitor, 2), shard_of("e:" + user, 2)) == (1, 0)
    with _sharded(tmp_path, 2, reverse=False) as replays:
        fake = replays.fake
        link_file = _browse_then_sign_up(replays, visitor, user)
        assert replays.run().merges_sent == 1
        late = write_archive(replays.logs / "mobile/1709596800000/late.gz",
                             [visit("Mobile Browse", None, visitor, T3)])  # fmt: skip
        arrived = link_file.stat().st_mtime_ns - 1_000_000
        os.utime(late, ns=(arrived, arrived))
        assert replays.run().merges_sent == 1  # the alias made again, merged again
        assert replays.run().requests == 0
        assert replays.where() == {user: ["Browse", "Mobile Browse"]}
        assert fake.not_applied() == 0


@pytest.mark.parametrize("count", [1, 2])
def test_a_deleted_users_devices_are_deleted_with_them_even_when_linked_later(count, tmp_path):
    """u2 asked to be forgotten after night 1, before the archive said which visitors
    were theirs. Night 2 links two of them to u2: their alias profiles are deleted in
    Braze, their lines (before and after the link) are never sent, in any later night
    either; another visitor is untouched (found by a new-user trial: their history kept
    flowing into alias profiles)."""
    from segreplay.sharding import shard_paths
    from segreplay.state import State

    with _sharded(tmp_path, count, reverse=False) as replays:
        fake = replays.fake
        replays.add_file([visit("Phone Browse", None, "v1", T1),
                          visit("Tablet Browse", None, "v7", T1),
                          visit("Someone Else", None, "v9", T1)])  # fmt: skip
        replays.run()
        assert {"alias:v1", "alias:v7"} <= set(replays.where())
        for path in shard_paths(str(tmp_path / "state.sqlite"), count):
            state = State(path)
            state.record_deletions(["e:u2"], "2024-03-02T00:00:00.000Z")
            state.close()
        replays.add_file([
            visit("Before Signup", None, "v1", T1),
            segment("identify", "u2", T2, anonymousId="v1", traits={"email": "u2@x.org"}),
            visit("After", None, "v1", T3),
            visit("Second Device", "u2", "v7", T3),
        ])  # fmt: skip
        summary = replays.run()
        replays.add_file([visit("Again", None, "v1", T4), visit("More", None, "v7", T4)])
        later = replays.run()
        assert summary.skips["skipped_deleted"] == 4
        assert later.skips["skipped_deleted"] == 2 and later.requests == 0
        assert replays.where() == {"alias:v9": ["Someone Else"]}
        deleted = [item["identifier"] for item in fake.deleted() if item["found"]]
        assert sorted(identifier["user_alias"]["alias_name"] for identifier in deleted) == [
            "v1",
            "v7",
        ]


@pytest.mark.parametrize("count", [1, 2])
def test_deleting_a_user_spares_a_shared_device_that_is_someone_elses(count, tmp_path):
    """A device first linked to v, later also to u: it is v's (the first link keeps).
    Deleting u leaves it, and v's profile, alone; once its alias had been identified into
    v, deleting that alias would have deleted v (found by a new-user trial)."""
    from segreplay.sharding import shard_paths
    from segreplay.state import State

    with _sharded(tmp_path, count, reverse=False) as replays:
        fake = replays.fake
        replays.add_file([visit("Shared Browse", None, "sh", T1)])
        replays.run()
        replays.add_file([segment("identify", "v", T2, anonymousId="sh", traits={}),
                          visit("V Own", "v", None, T2)])  # fmt: skip
        replays.run()
        replays.add_file([segment("identify", "u", T3, anonymousId="sh", traits={})])
        replays.run()  # a conflict: sh stays v's
        for path in shard_paths(str(tmp_path / "state.sqlite"), count):
            state = State(path)
            state.record_deletions(["e:u"], "2024-03-04T00:00:00.000Z")
            state.close()
        replays.add_file([segment("identify", "u", T4, anonymousId="sh", traits={}),
                          visit("Shared Later", None, "sh", T5)])  # fmt: skip
        later = replays.run()
        assert later.skips["skipped_deleted"] == 1  # u's identify; sh's browse is v's
        assert not [item for item in fake.deleted() if item["found"]]
        assert replays.where()["v"] == ["Shared Browse", "Shared Later", "V Own"]


def test_a_refused_deletion_of_a_linked_device_still_forgets_it_and_names_no_id(tmp_path):
    """Braze refuses the /users/delete of a deleted person's device: the refusal is
    dead-lettered as a count (their ids never reach segreplay's outputs), and the device
    is recorded as deleted all the same: none of its lines goes."""
    from segreplay.state import State

    with _sharded(tmp_path, 1, reverse=False) as replays:
        replays.add_file([visit("Phone Browse", None, "v1-secret", T1)])
        replays.run()
        state = State(str(tmp_path / "state.sqlite"))
        state.record_deletions(["e:u2-secret"], "2024-03-02T00:00:00.000Z")
        state.close()
        replays.user_ops.refuse.add("/users/delete")
        replays.add_file([
            segment("identify", "u2-secret", T2, anonymousId="v1-secret", traits={}),
            visit("After", None, "v1-secret", T3),
        ])  # fmt: skip
        summary = replays.run()
        assert (summary.rejected, summary.skips["skipped_deleted"], summary.requests) == (1, 2, 0)
        dead_letter = (tmp_path / "dead-letter.jsonl").read_bytes()
        assert b"simulated 400" in dead_letter and b"secret" not in dead_letter
