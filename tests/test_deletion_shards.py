"""`segreplay delete` on a state kept in shards (--workers N, --shard I/N), on this machine
or in a bucket, as real processes against the fake Braze over a socket: every shard
records the deletion and holds nothing of the person, no plain state file appears beside
the shards, and later imports and deletes send nothing of theirs. Without a server: a
deletion some shards missed (a run killed between two shards) is completed there without
being sent again, and links are looked up in every shard."""

from __future__ import annotations

import gzip
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from conftest import identify, segment, track, write_archive

from samples.generate import generate
from segreplay.config import DeleteConfig, DeliveryOptions
from segreplay.deletion import run_delete
from segreplay.fake import FakeBraze
from segreplay.fake.config import KINDS
from segreplay.privacy import IdKind, read_ids, user_digest, user_tag
from segreplay.reporting import SilentReporter
from segreplay.sharding import shard_paths
from segreplay.state import State, StateLock
from segreplay.userops import UserOps

SEGREPLAY = [sys.executable, "-m", "segreplay"]
KEY = "delete-shards-key"
SHARDS = ["state.shard-0-of-2.sqlite", "state.shard-1-of-2.sqlite"]
T = "2024-03-09T00:00:00.000Z"


@dataclass(frozen=True)
class Person:
    """Someone the generated archive holds: a userId with the anonymousIds its lines link
    to it and an email it was identified with, searched for in raw bytes."""

    user: str
    email: str
    linked: tuple[str, ...]


@dataclass(frozen=True)
class Archive:
    logs: Path
    gone: Person  # deleted by userId
    visitor: str  # an anonymousId never linked to a user, deleted by anonymousId
    other: str  # a userId kept: proves the byte searches can find an id


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Archive:
    logs = tmp_path_factory.mktemp("archive") / "segment-logs"
    generate(logs, lines=1500, users=80, bad=False, seed=5, days=1, files_per_day=2)
    lines = [
        orjson.loads(line)
        for path in sorted(logs.rglob("*.gz"))
        for line in gzip.decompress(path.read_bytes()).splitlines()
    ]
    users = Counter(line["userId"] for line in lines if isinstance(line.get("userId"), str))
    owners: dict[str, set[str]] = {}  # anonymousId (or alias previousId) -> userIds it names
    for line in lines:
        for anonymous_id in (line.get("anonymousId"), line.get("previousId")):
            if line.get("userId") and anonymous_id:
                owners.setdefault(anonymous_id, set()).add(line["userId"])
    emails = {
        line["userId"]: line["traits"]["email"]
        for line in lines
        if line["type"] == "identify" and line.get("userId") and "email" in line.get("traits", {})
    }

    def linked(user: str) -> list[str]:
        return sorted(a for a, named in owners.items() if user in named)

    # Someone whose anonymousIds are theirs alone: no identity conflict decides who they are.
    candidates = [
        user for user, _ in users.most_common()
        if user.startswith("usr_") and user in emails and linked(user)
        and all(owners[a] == {user} for a in linked(user))
    ]  # fmt: skip
    gone, other = candidates[:2]
    anonymous = Counter(line["anonymousId"] for line in lines if not line.get("userId"))
    visitor = next(a for a, _ in anonymous.most_common() if a not in owners)
    person = Person(gone, emails[gone], tuple(linked(gone)))
    assert users[gone] > 5 and anonymous[visitor] > 1
    return Archive(logs, person, visitor, other)


def _environment(**extra: str) -> dict:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("BRAZE_", "SEGREPLAY_", "AWS_"))
    }
    clean.pop("JOB_COMPLETION_INDEX", None)
    return {**clean, **extra}


def _cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*SEGREPLAY, *args], cwd=cwd, env=_environment(**(env or {})),
                          capture_output=True, timeout=120)  # fmt: skip


def _import(fake: FakeBraze, logs: Path, work: Path, state: str = "state.sqlite", env=None):
    return _cli(
        "import", str(logs), "--endpoint", fake.url, "--api-key", KEY, "--state", state,
        "--dead-letter", "dead-letter.jsonl", "--anonymous", "alias", "--workers", "2",
        "--json", cwd=work, env=env,
    )  # fmt: skip


def _delete(fake: FakeBraze, work: Path, *ids: str, state: str = "state.sqlite", env=None):
    return _cli(
        "delete", *ids, "--endpoint", fake.url, "--api-key", KEY, "--state", state,
        "--dead-letter", "delete-dead-letter.jsonl", "--json", cwd=work, env=env,
    )  # fmt: skip


def _summary(result: subprocess.CompletedProcess) -> dict:
    assert result.stdout, result.stderr.decode()
    return orjson.loads(result.stdout.splitlines()[-1])


def _secrets(archive: Archive) -> list[str]:
    gone = archive.gone
    return [gone.user, gone.email, archive.visitor, *gone.linked]


def _ids_files(work: Path, archive: Archive) -> tuple[str, ...]:
    (work / "gone.txt").write_text(f"# deletion requests\n{archive.gone.user}\n")
    (work / "gone-anon.txt").write_text(f"{archive.visitor}\n")
    return ("--user-ids", "gone.txt", "--anonymous-ids", "gone-anon.txt")


def _assert_every_shard_forgot(paths: list[Path], archive: Archive) -> None:
    """Each shard records every deletion as a digest, erased, and no byte of it (WAL
    included) holds an id or value of theirs."""
    gone = archive.gone
    keys = [f"e:{gone.user}", f"a:{archive.visitor}", *(f"a:{a}" for a in gone.linked)]
    everyone = b""
    for path in paths:
        state = State(str(path))
        try:
            assert {user_digest(key) for key in keys} <= set(state.deleted_digests()), path
            assert state.erasures_pending() == 0
            assert state.runs(1)[0].summary["command"] == "delete"
        finally:
            state.close()
        raw = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
        for secret in _secrets(archive):
            assert secret.encode() not in raw, (path, secret)
        everyone += raw
    assert archive.other.encode() in everyone  # the search itself works


def test_delete_reaches_every_shard_and_no_later_run_sends_anything_of_theirs(archive, tmp_path):
    gone = archive.gone
    logs = tmp_path / "logs"
    shutil.copytree(archive.logs, logs / "first")
    with FakeBraze(api_key=KEY) as fake:
        first = _import(fake, logs, tmp_path)
        assert first.returncode == 0, first.stderr.decode()
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("state.shard-*"))
        assert gone.user.encode() in raw and archive.visitor.encode() in raw
        assert fake.profile(gone.user) is not None

        deleted = _delete(fake, tmp_path, *_ids_files(tmp_path, archive))
        assert deleted.returncode == 0, deleted.stderr.decode()
        summary = _summary(deleted)
        assert (summary["deleted"], summary["already_deleted"]) == (2 + len(gone.linked), 0)
        assert summary["erased_messages"] > 0
        assert fake.profile(gone.user) is None
        assert sorted(p.name for p in tmp_path.glob("state*.sqlite")) == SHARDS  # no plain file
        _assert_every_shard_forgot([tmp_path / name for name in SHARDS], archive)

        # The same files delivered again (their lines' messageIds were erased with the
        # person), and new lines of theirs beside a newcomer's: only the newcomer goes.
        shutil.copytree(archive.logs, logs / "redelivered")
        write_archive(logs / "later" / "day.gz", [
            identify(gone.user, T, email="back-again@example.com"),
            track("Came Back", gone.user, T),
            segment("track", None, T, event="Visited", anonymousId=archive.visitor),
            segment("track", None, T, event="Visited", anonymousId=gone.linked[0]),
            identify("newcomer-51c2", T, plan="pro"),
        ])  # fmt: skip
        before = {kind: len(fake.accepted(kind)) for kind in KINDS}
        again = _import(fake, logs, tmp_path)
        assert again.returncode == 0, again.stderr.decode()
        assert _summary(again)["skipped_deleted"] > 4
        sent_after = [obj for kind in KINDS for obj in fake.accepted(kind)[before[kind] :]]
        assert any(obj.get("external_id") == "newcomer-51c2" for obj in sent_after)
        for obj in sent_after:
            for secret in _secrets(archive):
                assert secret.encode() not in orjson.dumps(obj), (secret, obj)
        assert fake.profile(gone.user) is None

        deletes = len(fake.deleted())
        second = _delete(fake, tmp_path, *_ids_files(tmp_path, archive))
        assert second.returncode == 0, second.stderr.decode()
        assert (_summary(second)["requests"], _summary(second)["already_deleted"]) == (0, 2)
        assert len(fake.deleted()) == deletes

    # and the anonymousId of their new identify line (conftest's "anon-1"): the archive
    # says it is theirs, so it was deleted with them (a shared device too: privacy first)
    status = _cli("status", "--state", SHARDS[1], cwd=tmp_path)
    assert f"{3 + len(gone.linked)} deleted ids" in status.stdout.decode()
    assert "delete: 0 ids deleted, 0 requests" in status.stdout.decode()
    whole = _cli("status", "--state", "state.sqlite", cwd=tmp_path)  # the --state imports use
    assert whole.returncode == 0, whole.stderr.decode()
    text = whole.stdout.decode()
    assert text.startswith("state state.sqlite is kept in 2 shards\n")
    assert text.count(f"{3 + len(gone.linked)} deleted ids") == 2  # every shard knows them
    as_json = orjson.loads(_cli("status", "--state", "state.sqlite", "--json", cwd=tmp_path).stdout)
    assert [shard["state"] for shard in as_json["shards"]] == SHARDS


def test_a_dry_run_sees_the_deletions_of_every_shard_and_changes_none(tmp_path):
    paths = shard_paths(str(tmp_path / "state.sqlite"), 2)
    for path, deleted in zip(paths, (["e:both", "e:first-only"], ["e:both"]), strict=True):
        state = State(path)
        state.record_deletions(deleted, T)
        state.close()
    before = [Path(path).read_bytes() for path in paths]
    (tmp_path / "ids.txt").write_text("both\nfirst-only\nnew\n")
    result = _cli("delete", "--user-ids", "ids.txt", "--dry-run", "--state", "state.sqlite",
                  cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == "would delete userId new\n"
    assert [Path(path).read_bytes() for path in paths] == before
    assert not (tmp_path / "state.sqlite").exists()


def test_a_state_kept_both_in_one_file_and_in_shards_is_a_usage_error(tmp_path):
    """What an older `segreplay delete` left beside shard files: which set is the state
    is for the user to say, not for a delete to guess."""
    for path in [str(tmp_path / "state.sqlite"), *shard_paths(str(tmp_path / "state.sqlite"), 2)]:
        State(path).close()
    (tmp_path / "ids.txt").write_text("u1\n")
    with FakeBraze(api_key=KEY) as fake:
        result = _delete(fake, tmp_path, "--user-ids", "ids.txt")
        assert fake.requests() == []
    assert result.returncode == 2
    stderr = result.stderr.decode()
    assert "the state state.sqlite is kept in one file and in 2 shards at once" in stderr
    assert "move the others away, and run the same command again" in stderr


def test_a_delete_is_refused_while_any_shard_is_in_use(tmp_path):
    paths = shard_paths(str(tmp_path / "state.sqlite"), 2)
    for path in paths:
        State(path).close()
    (tmp_path / "ids.txt").write_text("u1\n")
    with FakeBraze(api_key=KEY) as fake, StateLock(paths[1]):
        result = _delete(fake, tmp_path, "--user-ids", "ids.txt")
        assert fake.requests() == []
    assert result.returncode == 1
    assert "error: state.shard-1-of-2.sqlite is in use by another segreplay run" in (
        result.stderr.decode()
    )
    state = State(paths[0])
    assert state.runs() == [] and state.deleted_digests() == []
    state.close()


# ------------------------------------------------------------------- without a server


def _noting() -> tuple[SilentReporter, list[str]]:
    """A reporter that keeps its notices."""
    notices: list[str] = []
    reporter = SilentReporter()
    reporter.notice = notices.append
    return reporter, notices


class _Braze:
    """/users/delete answered 201 through an injected transport; the bodies it got."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

    def userops(self, options: DeliveryOptions, stopping=lambda: False) -> UserOps:
        def handle(request: httpx.Request) -> httpx.Response:
            body = orjson.loads(request.content)
            self.bodies.append(body)
            named = len(body.get("external_ids", ())) + len(body.get("user_aliases", ()))
            return httpx.Response(201, json={"deleted": named, "message": "success"})

        return UserOps(options, transport=httpx.MockTransport(handle), sleep=lambda s: None,
                       rng=random.Random(3), stopping=stopping)  # fmt: skip


def test_a_deletion_some_shards_missed_is_completed_there_without_sending_it_again(tmp_path):
    """A run killed after recording `half` in shards 0 and 2 but before shard 1: the next
    run records it in shard 1 and erases what shard 1 still held of them, unsent. A link
    only shard 1 holds still takes `fresh`'s anonymousId along. A partial deletion this
    run does not name (`other`: a file holds no ids to tell the others) is pointed out."""
    state_path = str(tmp_path / "state.sqlite")
    paths = shard_paths(state_path, 3)
    for index, path in enumerate(paths):
        state = State(path)
        if index == 1:
            state.commit(1, {"e:half": {"email": ["half-9d2e@example.com", T]}},
                         [(77, user_tag("e:half"))], [])  # fmt: skip
            state.record_links([("anon-of-fresh", "fresh", T, None)])
        else:
            state.record_deletions(["e:half"], T)
        if index == 2:
            state.record_deletions(["e:other"], T)
        state.close()
    (tmp_path / "ids.txt").write_text("half\nfresh\n")
    ids = read_ids([(str(tmp_path / "ids.txt"), IdKind.USER)])
    options = DeliveryOptions(endpoint="http://braze.test", api_key="k")
    config = DeleteConfig(state_path, None, delivery=options)
    braze = _Braze()
    reporter, notices = _noting()
    summary, _ = run_delete(config, ids, reporter, make_userops=braze.userops)
    assert notices == [
        f"deletions recorded in only some shards of {state_path} and not named here: 1 (a "
        "delete stopped between two shards); run that delete again with the same ids before "
        "the next import, so that every shard has them"
    ]
    assert braze.bodies == [
        {"user_aliases": [{"alias_name": "anon-of-fresh", "alias_label": "segment_anonymous_id"}]},
        {"external_ids": ["fresh"]},
    ]
    assert (summary.already_deleted, summary.deleted, summary.requests) == (1, 2, 2)
    assert summary.erased_messages == 1  # shard 1's messageId of `half`
    keys = ["e:half", "e:fresh", "a:anon-of-fresh"]
    for path in paths:
        state = State(path)
        assert {user_digest(key) for key in keys} <= set(state.deleted_digests()), path
        assert state.user_attributes("e:half") is None and state.erasures_pending() == 0
        assert [run.status for run in state.runs()] == ["finished"]
        state.close()
    assert b"half-9d2e" not in b"".join(p.read_bytes() for p in tmp_path.glob("state.shard-1*"))
    assert not os.path.exists(state_path)

    again, _ = run_delete(config, ids, SilentReporter(), make_userops=braze.userops)
    assert (again.already_deleted, again.requests) == (2, 0) and len(braze.bodies) == 2


def test_a_shard_no_run_has_made_yet_is_made_holding_the_deletions(tmp_path):
    """`--shard I/N` machines that each keep their own file: a delete on one of them makes
    the others' files here too, and says so."""
    state_path = str(tmp_path / "state.sqlite")
    paths = shard_paths(state_path, 3)
    State(paths[1]).close()
    (tmp_path / "ids.txt").write_text("u1\n")
    config = DeleteConfig(state_path, None, delivery=DeliveryOptions("http://braze.test", "k"))
    reporter, notices = _noting()
    summary, _ = run_delete(config, read_ids([(str(tmp_path / "ids.txt"), IdKind.USER)]),
                            reporter, make_userops=_Braze().userops)  # fmt: skip
    assert summary.deleted == 1
    for path in paths:
        state = State(path)
        assert state.deleted_digests() == [user_digest("e:u1")]
        state.close()
    assert notices == [
        f"{path} did not exist: made, to hold the deletions; if that shard runs on another "
        "machine with its own state, run the same delete there too"
        for path in (paths[0], paths[2])
    ]


# ------------------------------------------------------------------------ in a bucket

BUCKET = "delete-shards"


@pytest.fixture(scope="module")
def s3(s3):
    s3.bucket(BUCKET)
    return s3


def test_a_state_in_a_bucket_is_deleted_from_in_every_shard_object(archive, s3, tmp_path):
    state = f"s3://{BUCKET}/replay/state.sqlite"
    env = s3.env()
    with FakeBraze(api_key=KEY) as fake:
        first = _import(fake, archive.logs, tmp_path, state, env)
        assert first.returncode == 0, first.stderr.decode()
        deleted = _delete(fake, tmp_path, *_ids_files(tmp_path, archive), state=state, env=env)
        assert deleted.returncode == 0, deleted.stderr.decode()
        assert _summary(deleted)["deleted"] == 2 + len(archive.gone.linked)
        listed = s3.client.list_objects_v2(Bucket=BUCKET, Prefix="replay/")
        keys = sorted(item["Key"] for item in listed["Contents"])
        assert keys == [f"replay/{name}" for name in SHARDS]  # leases let go, no plain object
        assert list(tmp_path.glob("*.sqlite*")) == []  # nothing left on this machine
        for key in keys:
            body = s3.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            (tmp_path / "downloaded").mkdir(exist_ok=True)
            (tmp_path / "downloaded" / Path(key).name).write_bytes(body)
        _assert_every_shard_forgot([tmp_path / "downloaded" / name for name in SHARDS], archive)

        deletes = len(fake.deleted())
        again = _delete(fake, tmp_path, *_ids_files(tmp_path, archive), state=state, env=env)
        assert again.returncode == 0, again.stderr.decode()
        assert _summary(again)["requests"] == 0 and len(fake.deleted()) == deletes
        replay = _import(fake, archive.logs, tmp_path, state, env)
        assert replay.returncode == 0, replay.stderr.decode()
        assert _summary(replay)["requests"] == 0
