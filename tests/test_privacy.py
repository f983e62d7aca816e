"""privacy.py, userops.py and deletion.py without a server: id files, the import check,
request planning, and the retry, 429, 401 and refusal rules with an injected transport."""

from __future__ import annotations

import io
import random

import httpx
import orjson
import pytest

from segreplay.config import DeleteConfig, DeliveryOptions
from segreplay.deletion import plan_requests, request_body, run_delete
from segreplay.errors import AuthError, UsageError
from segreplay.mapping import Rejected, SkipReason
from segreplay.privacy import Forgotten, IdKind, read_ids, user_digest, user_tag
from segreplay.reporting import SilentReporter
from segreplay.state import State
from segreplay.stopping import StopRequest
from segreplay.userops import UserOps


def _ids(tmp_path, text: str, kind: IdKind | None = IdKind.USER, name="ids.txt"):
    path = tmp_path / name
    path.write_text(text)
    return read_ids([(str(path), kind)])


def test_a_plain_list_skips_blanks_comments_and_repeats(tmp_path):
    found = _ids(tmp_path, "# from Segment\nu1\n\n  u2  \nu1\n#u3\n")
    assert [p.value for p in found.ids] == ["u1", "u2"]
    assert (found.read, found.duplicates) == (3, 1)
    assert found.ids[1].line == 4


@pytest.mark.parametrize("column", ["userId", "user_id", "external_id"])
def test_a_csv_is_read_by_its_id_column(tmp_path, column):
    found = _ids(tmp_path, f'email,{column},when\na@x,u1,2024\nb@x,,2024\nc@x,"u,2",2024\n')
    assert [p.value for p in found.ids] == ["u1", "u,2"]
    assert found.ids[0].line == 2


def test_a_suppress_csv_may_name_both_kinds(tmp_path):
    found = _ids(tmp_path, "userId,anonymousId\nu1,a1\n,a2\n", kind=None)
    assert [p.key for p in found.ids] == ["e:u1", "a:a1", "a:a2"]


def test_standard_input(tmp_path):
    found = read_ids([("-", IdKind.ANONYMOUS)], stdin=io.BytesIO(b"a1\na2\n"))
    assert [(p.key, p.source) for p in found.ids] == [("a:a1", "standard input")] + [
        ("a:a2", "standard input")
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "ids.txt: no ids in it"),
        ("# only a comment\n\n", "ids.txt: no ids in it"),
        ("email,name\na@x,A\n", "ids.txt: a CSV without a column named userId or user_id"),
        ("u1\n" + "x" * 988 + "\n", "ids.txt:2: an id longer than 987 bytes"),
    ],
)
def test_bad_id_files_say_what_is_wrong(tmp_path, text, message):
    with pytest.raises(UsageError) as caught:
        _ids(tmp_path, text)
    assert caught.value.message.startswith(f"{tmp_path}/{message}")


def test_a_missing_file(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        read_ids([(str(tmp_path / "nope.txt"), IdKind.USER)])


def test_forgotten_tells_deleted_from_suppressed():
    forgotten = Forgotten([user_digest("e:gone"), user_digest("a:anon-gone")], {"e:quiet"})
    assert forgotten
    assert forgotten.reason("e:gone") is SkipReason.DELETED
    assert forgotten.reason("a:anon-gone") is SkipReason.DELETED
    assert forgotten.reason("e:quiet") is SkipReason.SUPPRESSED
    assert forgotten.reason("e:other") is None
    assert forgotten.reason_for_record({"userId": " gone "}) is SkipReason.DELETED
    assert forgotten.reason_for_record({"userId": None, "anonymousId": "anon-gone"})
    assert forgotten.reason_for_record({"userId": 5}) is None
    rejected = Rejected("no parseable time")
    assert forgotten.reason_for(rejected, {"userId": "gone"}) is SkipReason.DELETED
    assert forgotten.reason_for(rejected, None) is None  # not JSON: no ids to look at
    assert not Forgotten()


def test_requests_hold_at_most_50_ids_of_one_kind(tmp_path):
    users = "\n".join(f"u{i}" for i in range(120))
    found = read_ids(
        [(str(_write(tmp_path, "u.txt", users)), IdKind.USER)]
        + [(str(_write(tmp_path, "a.txt", "a1\na2")), IdKind.ANONYMOUS)]
    )
    plan = plan_requests(found.ids)
    # anonymousIds first: a userId's deletion drops the links that name them
    assert [len(group) for group in plan.requests] == [2, 50, 50, 20]
    assert orjson.loads(request_body(plan.requests[0])) == {
        "user_aliases": [
            {"alias_name": "a1", "alias_label": "segment_anonymous_id"},
            {"alias_name": "a2", "alias_label": "segment_anonymous_id"},
        ]
    }
    assert list(orjson.loads(request_body(plan.requests[-1]))) == ["external_ids"]


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


# the client, with a transport that answers from a script ------------------------------

OPTIONS = DeliveryOptions(endpoint="http://braze.test", api_key="k", max_attempts=3)


class Script:
    """Answers requests in turn from (status, json, headers); records bodies and sleeps.
    Its clock moves only when something sleeps."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.bodies: list[dict] = []
        self.sleeps: list[float] = []
        self.now = 0.0

    def transport(self) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            self.bodies.append(orjson.loads(request.content))
            status, payload, headers = self.answers.pop(0)
            return httpx.Response(status, json=payload, headers=headers)

        return httpx.MockTransport(handle)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def client(self, options: DeliveryOptions = OPTIONS, stopping=lambda: False) -> UserOps:
        return UserOps(options, transport=self.transport(), sleep=self.sleep,
                       rng=random.Random(7), clock=lambda: self.now,
                       stopping=stopping)  # fmt: skip


OK = (201, {"deleted": 1, "message": "success"}, {})


def test_429_waits_for_braze_and_5xx_backs_off():
    script = Script(
        (429, {"message": "Rate limit exceeded"}, {"X-Ratelimit-Retry-After": "7"}),
        (503, {"message": "busy"}, {}),
        OK,
    )
    posted = script.client().post("/users/delete", b'{"external_ids":["u1"]}', "users.delete")
    assert posted.accepted and posted.answer == {"deleted": 1, "message": "success"}
    assert (posted.rate_limited, posted.retries) == (1, 1)
    assert script.sleeps[0] == pytest.approx(7.05)  # the budget's pause, then a backoff
    assert len(script.bodies) == 3


def test_a_refused_key_names_the_permission():
    script = Script((403, {"message": "forbidden"}, {}))
    with pytest.raises(AuthError) as caught:
        script.client().post("/users/delete", b"{}", "users.delete")
    assert "users.delete permission" in caught.value.hint


def test_a_refused_request_is_dead_lettered_and_not_recorded(tmp_path):
    script = Script((400, {"message": "bad ids"}, {}), OK)
    found = _ids(tmp_path, "\n".join(f"u{i}" for i in range(51)))
    config = DeleteConfig(
        str(tmp_path / "state.sqlite"), str(tmp_path / "dead.jsonl"), delivery=OPTIONS
    )
    summary, _ = run_delete(config, found, SilentReporter(),
                            make_userops=lambda options, stopping: script.client())  # fmt: skip
    assert (summary.rejected, summary.deleted, summary.requests) == (50, 1, 2)
    assert summary.had_problems
    dead = [orjson.loads(line) for line in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
    assert dead[0]["record"] == "u0" and dead[0]["reason"] == "bad ids"
    assert dead[0]["line"] == 1 and len(dead) == 50
    state = State(str(tmp_path / "state.sqlite"))
    assert state.deleted_digests() == [user_digest("e:u50")]
    state.close()


def test_erasing_leaves_no_byte_of_theirs_even_without_secure_delete(tmp_path):
    """Some SQLite builds zero deleted rows (SECURE_DELETE), most do not: the erasure must
    not depend on it. Old values overwritten in earlier transactions count too."""
    path = tmp_path / "state.sqlite"
    state = State(str(path))
    state._db.execute("PRAGMA secure_delete=OFF")
    users = {f"e:someone-{i:04d}": {"email": [f"someone-{i:04d}@x", "t"]} for i in range(2000)}
    state.commit(1, users, [], [])
    gone = "e:gone-4b1d"
    for value in ("first-4b1d@x", "second-4b1d@x", "third-4b1d@x"):
        state.commit(1, {gone: {"email": [value, "t"]}}, [(77, user_tag(gone))], [])
    state.record_deletions([gone], "2024-01-01T00:00:00.000Z")
    assert state.erase_deleted() == 1
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("state.sqlite*"))
    assert b"someone-1999@x" in raw
    for secret in (b"gone-4b1d", b"first-4b1d", b"second-4b1d", b"third-4b1d"):
        assert secret not in raw
    assert state.counts()["deleted_users"] == 1 and state.erasures_pending() == 0
    state.close()


def test_a_413_is_a_refusal_not_a_split():
    """retry.py halves /users/track bodies on a 413; 50 ids cannot be too large, so the
    request is refused whole (dead-lettered by the caller), and sent once."""
    script = Script((413, {"message": "Payload Too Large"}, {}))
    posted = script.client().post("/users/delete", b'{"external_ids":["u1","u2"]}', "users.delete")
    assert not posted.accepted and "too large" in posted.reason
    assert len(script.bodies) == 1


def test_every_user_management_endpoint_shares_one_budget():
    options = DeliveryOptions(endpoint="http://braze.test", api_key="k", rate_requests=1,
                              rate_seconds=60)  # fmt: skip
    script = Script(OK, (201, {"aliases_processed": 1, "message": "success"}, {}))
    client = script.client(options)
    client.post("/users/delete", b'{"external_ids":["u1"]}', "users.delete")
    client.post("/users/identify", b'{"aliases_to_identify":[]}', "users.identify")
    assert script.sleeps == [pytest.approx(60.0)]  # the second waited for the first's window


def test_a_stop_between_requests_records_what_was_acknowledged(tmp_path):
    stop = StopRequest()
    script = Script(OK, OK)
    found = _ids(tmp_path, "\n".join(f"u{i}" for i in range(120)))
    config = DeleteConfig(str(tmp_path / "state.sqlite"), None, delivery=OPTIONS)

    def make(options, stopping):
        client = script.client(stopping=stopping)
        post = client.post

        def post_then_stop(*args):
            posted = post(*args)
            stop.request(15)  # SIGTERM arrives while the first request is answered
            return posted

        client.post = post_then_stop
        return client

    summary, _ = run_delete(config, found, SilentReporter(), stop, make_userops=make)
    assert summary.interrupted and (summary.requests, summary.deleted) == (1, 50)
    state = State(str(tmp_path / "state.sqlite"))
    assert len(state.deleted_digests()) == 50
    assert [run.status for run in state.runs()] == ["interrupted"]
    state.close()
