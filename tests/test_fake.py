"""The fake Braze over real sockets: contract, rate limits, faults, profiles, admin API."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import orjson
import pytest

from segreplay.fake import FakeBraze, FakeBrazeConfig

KEY = "test-key-5f3a9c"
TIME = "2024-03-05T14:03:22.083Z"

REQUIRED = "'external_id', 'braze_id', 'user_alias', 'email' or 'phone' is required"
ONE_ID = "only one of 'external_id', 'braze_id' or 'user_alias' may be given"
BAD_ALIAS = "'user_alias' must have string 'alias_name' and 'alias_label'"
MERGE_KEYS = "'merge_updates' must only have 'identifier_to_merge' and 'identifier_to_keep'"
MERGE_IDS = (
    "identifiers must be objects with an 'external_id' property that is a string, "
    "or 'user_alias' property that is an object"
)


def _event(external_id: str = "u1", **fields) -> dict:
    return {"external_id": external_id, "name": "Order Completed", "time": TIME, **fields}


def _purchase(external_id: str = "u1", **fields) -> dict:
    base = {"product_id": "sku-1", "currency": "EUR", "price": 9.5, "time": TIME}
    return {"external_id": external_id, **base, **fields}


def _client(braze: FakeBraze, key: str = KEY) -> httpx.Client:
    return httpx.Client(base_url=braze.url, headers={"Authorization": f"Bearer {key}"}, timeout=10)


@pytest.fixture(scope="module")
def shared():
    """One fake for the stateless checks; tests that count things start their own."""
    with FakeBraze(api_key=KEY) as braze:
        yield braze


@pytest.fixture()
def braze():
    with FakeBraze(api_key=KEY) as braze:
        yield braze


@pytest.fixture()
def client(braze):
    with _client(braze) as client:
        yield client


# ------------------------------------------------------------------------------------ auth


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key-77", "Basic " + KEY, KEY])
def test_bad_or_missing_key_is_401_and_never_echoed(shared, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    response = httpx.post(f"{shared.url}/users/track", json={"events": [_event()]}, headers=headers)
    assert response.status_code == 401
    assert response.json() == {"message": "Invalid API key"}
    answer = response.text + str(response.headers)
    assert KEY not in answer
    assert "wrong-key-77" not in answer


def test_key_is_not_in_config_repr():
    assert KEY not in repr(FakeBrazeConfig(api_key=KEY))


def test_bearer_scheme_is_case_insensitive(shared):
    response = httpx.post(
        f"{shared.url}/users/track",
        json={"events": [_event()]},
        headers={"Authorization": f"bearer {KEY}"},
    )
    assert response.status_code == 201


# ------------------------------------------------------------------------------ validation

_INVALID = [
    ("events", _event(external_id=None), REQUIRED),
    ("events", _event(braze_id="b1"), ONE_ID),
    ("events", _event(external_id="é" * 494), "'external_id' is longer than 987 bytes"),
    ("events", _event(external_id=42), "'external_id' is not valid"),
    ("events", {**_event(external_id=None), "user_alias": {"alias_name": "a"}}, BAD_ALIAS),
    ("events", _event(name=None), "'name' is required"),
    ("events", _event(name=""), "'name' is not valid"),
    ("events", _event(time=None), "'time' is required"),
    ("events", _event(time="yesterday"), "'time' is not valid"),
    ("events", _event(time=1709647402), "'time' is not valid"),
    ("events", _event(properties=["a"]), "'properties' is not valid"),
    ("events", _event(properties={"": 1}), "property keys must not be empty"),
    ("events", _event(properties={"$revenue": 1}), "property keys must not start with '$'"),
    ("events", _event(properties={"time": 1}), "property key 'time' is reserved"),
    ("events", _event(properties={"event_name": 1}), "property key 'event_name' is reserved"),
    ("events", _event(properties={"k" * 256: 1}), "property key longer than 255 characters"),
    ("events", _event(_update_existing_only="yes"), "'_update_existing_only' is not valid"),
    ("events", "not an object", "event must be an object"),
    ("purchases", _purchase(product_id=None), "'product_id' is required"),
    ("purchases", _purchase(product_id="p" * 256), "'product_id' is not valid"),
    ("purchases", _purchase(currency=None), "'currency' is required"),
    ("purchases", _purchase(currency="EURO"), "'currency' is not valid"),
    ("purchases", _purchase(currency="E1R"), "'currency' is not valid"),
    ("purchases", _purchase(price=None), "'price' is required"),
    ("purchases", _purchase(price="9.99"), "'price' is not valid"),
    ("purchases", _purchase(price=True), "'price' is not valid"),
    ("purchases", _purchase(quantity=0), "'quantity' is not valid"),
    ("purchases", _purchase(quantity=101), "'quantity' is not valid"),
    ("purchases", _purchase(quantity=1.5), "'quantity' is not valid"),
    ("purchases", _purchase(time=None), "'time' is required"),
    ("purchases", _purchase(properties={"$x": 1}), "property keys must not start with '$'"),
    ("attributes", {"external_id": "u1", "gender": "X"}, "'gender' is not valid"),
    ("attributes", {"external_id": "u1", "dob": "1990-13-01"}, "'dob' is not valid"),
    ("attributes", {"external_id": "u1", "dob": "01/02/1990"}, "'dob' is not valid"),
    (
        "attributes",
        {"external_id": "u1", "email_subscribe": "yes"},
        "'email_subscribe' is not valid",
    ),
    ("attributes", {"first_name": "Ann"}, REQUIRED),
]

_VALID = {"events": _event("ok"), "purchases": _purchase("ok"), "attributes": {"external_id": "ok"}}


@pytest.mark.parametrize(("array", "obj", "reason"), _INVALID)
def test_invalid_object_is_refused_and_its_neighbour_accepted(shared, array, obj, reason):
    with _client(shared) as client:
        response = client.post("/users/track", json={array: [_VALID[array], obj]})
    assert response.status_code == 201
    assert response.json() == {
        "message": "success",
        f"{array}_processed": 1,
        "errors": [{"type": reason, "input_array": array, "index": 1}],
    }


_ACCEPTED = [
    ("events", _event(external_id="é" * 493 + "a")),  # 987 bytes exactly
    ("events", {"email": "a@example.com", "name": "x", "time": TIME}),
    ("events", {"phone": "+15043277269", "name": "x", "time": TIME}),
    ("events", {"braze_id": "5e8f0b0e1b2c3d4e5f6a7b8c", "name": "x", "time": TIME}),
    ("events", {**_event(external_id=None), "user_alias": {"alias_name": "a", "alias_label": "l"}}),
    ("events", _event(time="2024-03-05T15:03:22+01:00")),
    ("events", _event(time="2024-03-05T14:03:22")),
    ("events", _event(properties={"nested": {"a": [1, {"b": None}]}, "k" * 255: 1})),
    ("purchases", _purchase(quantity=100, price=0, properties={"size": "L"})),
    ("attributes", {"external_id": "u1", "gender": None, "dob": "1990-02-01", "x": [1]}),
]


@pytest.mark.parametrize(("array", "obj"), _ACCEPTED)
def test_valid_object_is_accepted(shared, array, obj):
    with _client(shared) as client:
        response = client.post("/users/track", json={array: [obj]})
    assert response.status_code == 201
    assert response.json() == {"message": "success", f"{array}_processed": 1}


def test_errors_name_array_and_index_and_only_valid_objects_are_kept(braze, client):
    body = {
        "attributes": [{"external_id": "a", "x": 1}, {"external_id": "a", "gender": "?"}],
        "events": [_event(name=None), _event("a"), _event(time="no")],
        "purchases": [_purchase("a")],
    }
    response = client.post("/users/track", json=body)
    assert response.status_code == 201
    assert response.json() == {
        "message": "success",
        "attributes_processed": 1,
        "events_processed": 1,
        "purchases_processed": 1,
        "errors": [
            {"type": "'gender' is not valid", "input_array": "attributes", "index": 1},
            {"type": "'name' is required", "input_array": "events", "index": 0},
            {"type": "'time' is not valid", "input_array": "events", "index": 2},
        ],
    }
    assert braze.accepted("event") == [_event("a")]
    assert braze.accepted("attribute") == [{"external_id": "a", "x": 1}]
    assert braze.accepted("purchase") == [_purchase("a")]
    assert braze.stats()["rejected_objects"] == 3


def test_nothing_valid_is_400_with_errors_and_nothing_kept(braze, client):
    response = client.post("/users/track", json={"events": [_event(name=None), {"name": "x"}]})
    assert response.status_code == 400
    assert response.json()["message"] == (
        "Valid data must be provided in the 'attributes', 'events', or 'purchases' fields."
    )
    assert [error["index"] for error in response.json()["errors"]] == [0, 1]
    assert braze.accepted("event") == []


@pytest.mark.parametrize(
    ("content", "content_type", "message"),
    [
        (b"{not json", "application/json", "Bad Request: the body is not valid JSON"),
        (b"[]", "application/json", "Bad Request: the body must be a JSON object"),
        (b'{"events": {}}', "application/json", "'events' must be an array"),
        (b"{}", "application/json", None),
        (b'{"events": []}', "application/json", None),
        (
            orjson.dumps({"events": [_event()]}),
            "text/plain",
            "Content-Type must be application/json",
        ),
    ],
)
def test_malformed_requests_are_400(shared, content, content_type, message):
    with _client(shared) as client:
        response = client.post(
            "/users/track", content=content, headers={"Content-Type": content_type}
        )
    assert response.status_code == 400
    if message is not None:
        assert response.json()["message"] == message


# --------------------------------------------------------------------------------- limits


def test_combined_limit_counts_all_arrays(shared):
    with _client(shared) as client:
        events = [_event(f"u{i}") for i in range(40)]
        at_limit = {"events": events, "attributes": [{"external_id": "a"}] * 35}
        over = {"events": events, "attributes": [{"external_id": "a"}] * 36}
        assert client.post("/users/track", json=at_limit).status_code == 201
        response = client.post("/users/track", json=over)
    assert response.status_code == 400
    assert response.json() == {"message": "Max Input Length Exceeded"}


def test_per_type_limit_counts_each_array():
    with FakeBraze(api_key=KEY, batch_limit="per-type") as braze, _client(braze) as client:
        full = {
            "events": [_event()] * 75,
            "attributes": [{"external_id": "a"}] * 75,
            "purchases": [_purchase()] * 75,
        }
        response = client.post("/users/track", json=full)
        assert response.status_code == 201
        assert response.json()["events_processed"] == 75
        assert client.post("/users/track", json={"events": [_event()] * 76}).status_code == 400
        assert braze.stats()["accepted"] == {
            "attribute": 75,
            "event": 75,
            "purchase": 75,
            "delete": 0,
            "identify": 0,
            "merge": 0,
        }


def test_body_over_4_mb_is_413_and_the_connection_stays_usable(braze, client):
    big = {"events": [_event(properties={"blob": "x" * 4_000_000})]}
    response = client.post("/users/track", json=big)
    assert response.status_code == 413
    just_under = {"events": [_event(properties={"blob": "x" * 3_900_000})]}
    assert client.post("/users/track", json=just_under).status_code == 201
    assert braze.stats()["connections"] == 1
    assert len(braze.accepted("event")) == 1


# ------------------------------------------------------------------------------- profiles


def test_attributes_apply_in_order_and_null_unsets(braze, client):
    client.post(
        "/users/track",
        json={
            "attributes": [
                {"external_id": "u1", "plan": "free", "tags": ["a"], "address": {"city": "Oslo"}},
                {"external_id": "u1", "plan": "pro", "email": "u1@example.com"},
            ]
        },
    )
    client.post("/users/track", json={"attributes": [{"external_id": "u1", "tags": None}]})
    profile = braze.profile("u1")
    assert profile["attributes"] == {
        "plan": "pro",
        "address": {"city": "Oslo"},
        "email": "u1@example.com",
    }
    assert braze.profile(email="u1@example.com")["external_id"] == "u1"


def test_resent_events_are_kept_twice(braze, client):
    for _ in range(2):
        client.post("/users/track", json={"events": [_event("u1")], "purchases": [_purchase()]})
    profile = braze.profile("u1")
    assert profile["events"] == [_event("u1"), _event("u1")]
    assert len(profile["purchases"]) == 2
    assert braze.stats()["accepted"]["event"] == 2


def test_alias_needs_explicit_update_existing_only_false(braze, client):
    alias = {"alias_name": "anon-1", "alias_label": "segment_anonymous_id"}
    client.post("/users/track", json={"events": [{"user_alias": alias, "name": "x", "time": TIME}]})
    assert braze.profile(user_alias=alias) is None
    assert braze.not_applied() == 1
    client.post(
        "/users/track",
        json={"attributes": [{"user_alias": alias, "_update_existing_only": False, "a": 1}]},
    )
    client.post("/users/track", json={"events": [{"user_alias": alias, "name": "y", "time": TIME}]})
    profile = braze.profile(user_alias=alias)
    assert profile["attributes"] == {"a": 1}
    assert [event["name"] for event in profile["events"]] == ["y"]
    assert profile["user_aliases"] == [alias]


def test_update_existing_only_true_does_not_create(braze, client):
    client.post(
        "/users/track",
        json={"attributes": [{"external_id": "new", "_update_existing_only": True, "a": 1}]},
    )
    assert braze.profile("new") is None
    assert braze.not_applied() == 1


def test_over_long_custom_attributes_are_accepted_but_not_applied(braze, client):
    response = client.post(
        "/users/track",
        json={"attributes": [{"external_id": "u1", "bio": "b" * 256, "k" * 256: 1, "ok": 1}]},
    )
    assert response.json() == {"message": "success", "attributes_processed": 1}
    assert braze.profile("u1")["attributes"] == {"ok": 1}
    assert [item["reason"] for item in braze.ignored_attributes()] == [
        "value longer than 255 characters",
        "key longer than 255 characters",
    ]


# ---------------------------------------------------------------------------- rate limits


class ManualClock:
    """Epoch seconds that move only when the test says: a burst never straddles a reset,
    and nobody waits for a window to pass."""

    def __init__(self, now: float = 1_709_650_000.25) -> None:  # early in a 1 s window
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_fixed_window_epoch_reset():
    clock = ManualClock()
    with FakeBraze(api_key=KEY, rate_limit=5, rate_window_s=1.0, clock=clock) as braze, \
            _client(braze) as c:  # fmt: skip
        answers = [c.post("/users/track", json={"events": [_event()]}) for _ in range(6)]
        clock.now += 0.1  # after the 429, before its reset
        early = c.post("/users/track", json={"events": [_event()]})
        assert [a.status_code for a in answers] == [201] * 5 + [429]
        assert early.status_code == 429
        assert [a.headers["X-RateLimit-Remaining"] for a in answers] == [
            "4",
            "3",
            "2",
            "1",
            "0",
            "0",
        ]
        assert all(a.headers["X-RateLimit-Limit"] == "5" for a in answers)
        reset = int(answers[5].headers["X-RateLimit-Reset"])
        assert reset == 1_709_650_001  # the end of the window, in whole seconds
        assert "X-Ratelimit-Retry-After" not in answers[5].headers
        assert braze.rate_limit_resets[0].reset_at == reset
        assert braze.rate_limit_resets[0].request == 6
        clock.now = reset + 0.01
        after = c.post("/users/track", json={"events": [_event()]})
        assert after.status_code == 201
        # The 7th request came before the advertised reset; the 8th waited for it.
        assert [r.request for r in braze.early_requests()] == [7]
        stats = braze.stats()
        assert stats["rate_limited"] == 2
        assert stats["accepted"]["event"] == 6
        assert stats["by_status"] == {"201": 6, "429": 2}


def test_fixed_window_seconds_reset_and_retry_after():
    config = FakeBrazeConfig(api_key=KEY, rate_limit=5, rate_window_s=1.0, reset_style="seconds")
    with FakeBraze(config, clock=ManualClock()) as braze, _client(braze) as client:
        answers = [client.post("/users/track", json={"events": [_event()]}) for _ in range(6)]
    assert [a.status_code for a in answers] == [201] * 5 + [429]
    assert answers[0].headers["X-RateLimit-Reset"] == "1"
    assert answers[5].headers["X-Ratelimit-Retry-After"] == "1"
    [reset] = braze.rate_limit_resets
    assert reset.reset_at == pytest.approx(reset.sent_at + 1)


# --------------------------------------------------------------------------------- faults


def test_rate_5xx_answers_5xx_without_processing():
    with FakeBraze(api_key=KEY, rate_5xx=1.0) as braze, _client(braze) as client:
        statuses = {
            client.post("/users/track", json={"events": [_event()]}).status_code for _ in range(10)
        }
        assert statuses <= {500, 502, 503} and statuses
        assert braze.accepted("event") == []
        assert braze.stats()["injected"]["5xx"] == 10


def test_processed_5xx_keeps_the_objects_then_answers_5xx():
    with FakeBraze(api_key=KEY, rate_processed_5xx=1.0) as braze, _client(braze) as client:
        response = client.post("/users/track", json={"events": [_event("lost-ack")]})
        assert response.status_code in (500, 502, 503)
        assert braze.profile("lost-ack")["events"] == [_event("lost-ack")]


@pytest.mark.parametrize(("field", "kept"), [("rate_drop", 0), ("rate_processed_drop", 1)])
def test_drop_closes_the_connection_without_answer(field, kept):
    with FakeBraze(api_key=KEY, **{field: 1.0}) as braze, _client(braze) as client:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            client.post("/users/track", json={"events": [_event()]})
        assert len(braze.accepted("event")) == kept
        assert braze.requests()[0].status is None
        assert braze.stats()["by_status"] == {"dropped": 1}


def test_injected_429_advertises_a_reset():
    with FakeBraze(api_key=KEY, rate_429=1.0) as braze, _client(braze) as client:
        response = client.post("/users/track", json={"events": [_event()]})
        assert response.status_code == 429
        assert int(response.headers["X-RateLimit-Reset"]) >= time.time()
        assert len(braze.rate_limit_resets) == 1
        assert braze.accepted("event") == []


def test_faults_follow_the_seed():
    def statuses(seed: int) -> list[int]:
        with FakeBraze(api_key=KEY, rate_5xx=0.5, seed=seed) as braze, _client(braze) as c:
            return [
                c.post("/users/track", json={"events": [_event()]}).status_code for _ in range(30)
            ]

    first = statuses(3)
    assert first == statuses(3)
    assert 201 in first and any(status >= 500 for status in first)


def test_fault_rates_must_add_up_to_at_most_one():
    with pytest.raises(ValueError, match="fault rates"):
        FakeBrazeConfig(rate_5xx=0.6, rate_drop=0.5)
    with pytest.raises(ValueError, match="batch_limit"):
        FakeBrazeConfig(batch_limit="whatever")


def test_latency_delays_answers_but_connections_run_concurrently():
    with FakeBraze(api_key=KEY, latency_ms=300) as braze:
        durations = []

        def one() -> None:
            with _client(braze) as client:
                started = time.perf_counter()
                assert client.post("/users/track", json={"events": [_event()]}).status_code == 201
                durations.append(time.perf_counter() - started)

        started = time.perf_counter()
        threads = [threading.Thread(target=one) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert min(durations) >= 0.3
        assert time.perf_counter() - started < 1.0


def test_keep_alive_and_concurrent_clients(braze):
    with _client(braze) as client:
        for i in range(20):
            assert (
                client.post("/users/track", json={"events": [_event(f"u{i}")]}).status_code == 201
            )
    assert braze.stats()["connections"] == 1

    def send(n: int) -> None:
        with _client(braze) as client:
            for i in range(10):
                client.post("/users/track", json={"events": [_event(f"t{n}-{i}")]})

    threads = [threading.Thread(target=send, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert braze.stats()["accepted"]["event"] == 70
    assert len(braze.profiles()) == 70


def _raw(port: int, data: bytes, expect: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        received = b""
        while received.count(b"HTTP/1.1 ") < expect:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def test_pipelined_requests_are_answered_in_order(shared):
    def request(path: str, body: bytes) -> bytes:
        return (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    good = orjson.dumps({"events": [_event()]})
    data = (
        request("/users/track", good) + request("/nowhere", b"{}") + request("/users/track", good)
    )
    answer = _raw(shared.port, data, expect=3)
    statuses = [int(part[:3]) for part in answer.split(b"HTTP/1.1 ")[1:]]
    assert statuses == [201, 404, 201]


def test_chunked_bodies_are_refused_with_411(shared):
    data = (
        f"POST /users/track HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    ).encode()
    assert _raw(shared.port, data, expect=1).startswith(b"HTTP/1.1 411 ")


def test_expect_100_continue_is_honoured(shared):
    body = orjson.dumps({"events": [_event()]})
    head = (
        f"POST /users/track HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nExpect: 100-continue\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as sock:
        sock.sendall(head)
        assert sock.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 201 ")


# ------------------------------------------------------------------- delete, identify, merge


def test_delete_counts_existing_users(braze, client):
    client.post("/users/track", json={"events": [_event("a"), _event("b"), _event("c")]})
    response = client.post("/users/delete", json={"external_ids": ["a", "b", "nobody"]})
    assert response.status_code == 201
    assert response.json() == {"message": "success", "deleted": 2}
    assert braze.profile("a") is None and braze.profile("b") is None
    assert braze.profile("c") is not None
    assert "X-RateLimit-Remaining" in response.headers
    too_many = client.post("/users/delete", json={"external_ids": [f"u{i}" for i in range(51)]})
    assert too_many.status_code == 400
    assert too_many.json()["message"] == "The max number of ids per request was exceeded"


def test_delete_by_alias_and_braze_id(braze, client):
    alias = {"alias_name": "n", "alias_label": "l"}
    client.post(
        "/users/track",
        json={
            "attributes": [
                {"user_alias": alias, "_update_existing_only": False},
                {"external_id": "x"},
            ]
        },
    )
    braze_id = braze.profile("x")["braze_id"]
    both = client.post("/users/delete", json={"user_aliases": [alias], "braze_ids": [braze_id]})
    assert both.status_code == 400  # Braze: one kind of identifier a request
    assert "Only one of" in both.json()["message"]
    assert client.post("/users/delete", json={"user_aliases": [alias]}).json()["deleted"] == 1
    assert client.post("/users/delete", json={"braze_ids": [braze_id]}).json()["deleted"] == 1
    assert braze.profiles() == []
    shown = client.get("/_fake/profiles").json()
    assert shown["profiles"] == []
    assert [entry["identifier"] for entry in shown["deleted"]] == [
        {"user_alias": alias},
        {"braze_id": braze_id},
    ]
    assert all(entry["found"] for entry in shown["deleted"])


def test_delete_refuses_an_external_id_over_987_bytes(braze, client):
    response = client.post("/users/delete", json={"external_ids": ["x" * 988]})
    assert response.status_code == 400
    assert "987 bytes" in response.json()["message"]
    assert braze.deleted() == []


def _alias_profile(client: httpx.Client, alias: dict) -> None:
    client.post(
        "/users/track",
        json={
            "attributes": [{"user_alias": alias, "_update_existing_only": False, "anon": 1}],
            "events": [{"user_alias": alias, "name": "anon_event", "time": TIME}],
        },
    )


@pytest.mark.parametrize(("merge_behavior", "carried"), [(None, []), ("merge", ["anon_event"])])
def test_identify_into_existing_user(braze, client, merge_behavior, carried):
    alias = {"alias_name": "anon-1", "alias_label": "segment_anonymous_id"}
    _alias_profile(client, alias)
    client.post("/users/track", json={"events": [_event("u1")]})
    body: dict = {"aliases_to_identify": [{"external_id": "u1", "user_alias": alias}]}
    if merge_behavior:
        body["merge_behavior"] = merge_behavior
    response = client.post("/users/identify", json=body)
    assert response.status_code == 201
    assert response.json() == {"message": "success", "aliases_processed": 1}
    profile = braze.profile("u1")
    assert braze.profile(user_alias=alias) == profile
    assert [e["name"] for e in profile["events"]] == ["Order Completed", *carried]
    assert ("anon" in profile["attributes"]) == bool(carried)
    assert len(braze.profiles()) == 1


def test_identify_unknown_external_id_identifies_the_alias_profile(braze, client):
    alias = {"alias_name": "anon-2", "alias_label": "segment_anonymous_id"}
    _alias_profile(client, alias)
    client.post(
        "/users/identify",
        json={"aliases_to_identify": [{"external_id": "new", "user_alias": alias}]},
    )
    profile = braze.profile("new")
    assert profile["attributes"] == {"anon": 1}
    assert profile["user_aliases"] == [alias]
    too_many = [{"external_id": f"u{i}", "user_alias": alias} for i in range(51)]
    assert client.post("/users/identify", json={"aliases_to_identify": too_many}).status_code == 400


def test_identify_keeps_one_alias_a_label(braze, client):
    """Braze: a user holding an alias of the label already is not combined with another
    alias-only profile of that label (a second device): both stay as they were."""
    phone = {"alias_name": "anon-phone", "alias_label": "segment_anonymous_id"}
    laptop = {"alias_name": "anon-laptop", "alias_label": "segment_anonymous_id"}
    _alias_profile(client, phone)
    _alias_profile(client, laptop)
    client.post("/users/track", json={"events": [_event("u1")]})
    for alias in (phone, laptop):
        response = client.post(
            "/users/identify",
            json={"aliases_to_identify": [{"external_id": "u1", "user_alias": alias}],
                  "merge_behavior": "merge"},
        )  # fmt: skip
        assert response.json() == {"message": "success", "aliases_processed": 1}
    user = braze.profile("u1")
    assert user["user_aliases"] == [phone]
    assert [e["name"] for e in user["events"]] == ["Order Completed", "anon_event"]
    left = braze.profile(user_alias=laptop)
    assert left["external_id"] is None and len(left["events"]) == 1
    # Another label is another matter.
    other = {"alias_name": "crm-7", "alias_label": "crm_id"}
    _alias_profile(client, other)
    client.post("/users/identify", json={
        "aliases_to_identify": [{"external_id": "u1", "user_alias": other}],
        "merge_behavior": "merge",
    })  # fmt: skip
    assert braze.profile(user_alias=other)["external_id"] == "u1"
    assert len(braze.profiles()) == 2


def test_identify_without_an_alias_only_profile_changes_nothing(braze, client):
    alias = {"alias_name": "anon-3", "alias_label": "segment_anonymous_id"}
    client.post("/users/track", json={"events": [_event("u1")]})
    item = {"external_id": "u1", "user_alias": alias}
    nobody = {"external_id": "nobody", "user_alias": alias}
    response = client.post("/users/identify", json={"aliases_to_identify": [item, nobody]})
    assert response.json() == {"message": "success", "aliases_processed": 2}  # syntax only
    assert braze.profile(user_alias=alias) is None
    assert braze.profile("nobody") is None
    assert braze.profile("u1")["user_aliases"] == []
    # An alias already identified belongs to its user: it is not moved to another.
    _alias_profile(client, alias)
    client.post("/users/identify", json={"aliases_to_identify": [item]})
    client.post("/users/identify", json={"aliases_to_identify": [nobody]})
    assert braze.profile(user_alias=alias)["external_id"] == "u1"
    assert braze.profile("nobody") is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "'aliases_to_identify' must be a non-empty array"),
        ({"aliases_to_identify": []}, "'aliases_to_identify' must be a non-empty array"),
        (
            {"aliases_to_identify": [{"external_id": "u1"}]},
            "No valid aliases to identify",
        ),
        (
            {"aliases_to_identify": [{"external_id": "u1", "user_alias": {"alias_name": "n",
             "alias_label": "l"}}], "merge_behavior": "all"},
            "'merge_behavior' must be 'none' or 'merge'",
        ),
    ],
)  # fmt: skip
def test_identify_refuses_bad_bodies(shared, body, message):
    with _client(shared) as client:
        response = client.post("/users/identify", json=body)
    assert response.status_code == 400
    assert response.json()["message"] == message


def test_user_ops_endpoints_share_one_budget():
    clock = ManualClock()
    with FakeBraze(api_key=KEY, user_ops_rate_limit=3, user_ops_rate_window_s=60.0,
                   clock=clock) as braze, _client(braze) as client:  # fmt: skip
        alias = {"alias_name": "n", "alias_label": "l"}
        merge = {"identifier_to_merge": {"external_id": "a"},
                 "identifier_to_keep": {"external_id": "b"}}  # fmt: skip
        answers = [
            client.post("/users/delete", json={"external_ids": ["a"]}),
            client.post("/users/identify", json={
                "aliases_to_identify": [{"external_id": "a", "user_alias": alias}]}),
            client.post("/users/merge", json={"merge_updates": [merge]}),
            client.post("/users/identify", json={
                "aliases_to_identify": [{"external_id": "a", "user_alias": alias}]}),
        ]  # fmt: skip
        assert [a.status_code for a in answers] == [201, 201, 202, 429]
        assert [a.headers["X-RateLimit-Limit"] for a in answers] == ["3"] * 4
        assert client.post("/users/track", json={"events": [_event()]}).status_code == 201
        clock.now += 60
        assert client.post("/users/merge", json={"merge_updates": [merge]}).status_code == 202


def test_merge_folds_one_user_into_another(braze, client):
    client.post(
        "/users/track",
        json={
            "attributes": [
                {"external_id": "old", "a": "old", "b": "old"},
                {"external_id": "cur", "a": "cur"},
            ],
            "events": [_event("old"), _event("cur")],
        },
    )
    update = {
        "identifier_to_merge": {"external_id": "old"},
        "identifier_to_keep": {"external_id": "cur"},
    }
    response = client.post("/users/merge", json={"merge_updates": [update]})
    assert response.status_code == 202
    assert response.json() == {"message": "success"}
    assert braze.profile("old") is None
    kept = braze.profile("cur")
    assert kept["attributes"] == {"a": "cur", "b": "old"}
    assert len(kept["events"]) == 2
    assert braze.accepted("merge") == [update]


def test_merge_folds_an_alias_profile_into_a_user(braze, client):
    # Braze's page once asked for identifiers of one type; it now names external_id,
    # user_alias, email and phone for either side (a second device's alias profile).
    alias = {"alias_name": "anon-2", "alias_label": "segment_anonymous_id"}
    _alias_profile(client, alias)
    client.post("/users/track", json={"events": [_event("u1")]})
    update = {"identifier_to_merge": {"user_alias": alias},
              "identifier_to_keep": {"external_id": "u1"}}  # fmt: skip
    response = client.post("/users/merge", json={"merge_updates": [update]})
    assert response.status_code == 202
    kept = braze.profile("u1")
    assert [e["name"] for e in kept["events"]] == ["Order Completed", "anon_event"]
    assert kept["attributes"] == {"anon": 1}
    assert kept["user_aliases"] == []  # the merged profile is deleted, its alias with it
    assert braze.profile(user_alias=alias) is None
    assert len(braze.profiles()) == 1


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ("x", "'merge_updates' must be an array of objects"),
        ([{"identifier_to_merge": {"external_id": "a"}}], MERGE_KEYS),
        (
            [
                {
                    "identifier_to_merge": {"external_id": 1},
                    "identifier_to_keep": {"external_id": "b"},
                }
            ],
            MERGE_IDS,
        ),
        (
            [
                {
                    "identifier_to_merge": {"external_id": "a"},
                    "identifier_to_keep": {"external_id": "b"},
                }
            ]
            * 51,
            "a single request may not contain more than 50 merge updates",
        ),
    ],
)
def test_merge_refuses_bad_updates(shared, updates, message):
    with _client(shared) as client:
        response = client.post("/users/merge", json={"merge_updates": updates})
    assert response.status_code == 400
    assert response.json() == {"message": message}


# ------------------------------------------------------------------------ routes and admin


def test_unknown_path_is_404_and_wrong_method_405(shared):
    with _client(shared) as client:
        assert client.post("/users/nothing", json={}).status_code == 404
        assert client.get("/users/track").status_code == 405


def test_admin_endpoints(braze, client):
    client.post(
        "/users/track",
        json={"events": [_event("u1")], "attributes": [{"external_id": "u1", "a": 1}]},
    )
    client.post("/users/track", json={"events": [_event(name=None)]})
    admin = httpx.Client(base_url=braze.url)  # no key needed

    stats = admin.get("/_fake/stats").json()
    assert stats["requests"] == 2
    assert stats["by_status"] == {"201": 1, "400": 1}
    assert stats["by_path"] == {"/users/track": 2}
    assert stats["accepted"]["event"] == 1 and stats["accepted"]["attribute"] == 1
    assert stats["rejected_objects"] == 1

    profiles = admin.get("/_fake/profiles").json()
    assert [p["external_id"] for p in profiles["profiles"]] == ["u1"]
    assert profiles["not_applied"] == 0

    accepted = admin.get("/_fake/accepted", params={"kind": "event"}).json()["accepted"]
    assert accepted == [{"request": 1, "kind": "event", "object": _event("u1")}]
    assert len(admin.get("/_fake/accepted").json()["accepted"]) == 2
    assert admin.get("/_fake/accepted", params={"kind": "nope"}).status_code == 400

    requests = admin.get("/_fake/requests").json()["requests"]
    assert [(r["request"], r["path"], r["status"]) for r in requests] == [
        (1, "/users/track", 201),
        (2, "/users/track", 400),
    ]
    assert admin.get("/_fake/rate-limit-resets").json() == {"resets": []}
    assert admin.get("/_fake/other").status_code == 404

    assert admin.post("/_fake/reset").status_code == 200
    assert admin.get("/_fake/stats").json()["requests"] == 0
    assert braze.profiles() == []


def test_log_file_has_one_line_per_accepted_object(tmp_path):
    log = tmp_path / "accepted.jsonl"
    with FakeBraze(api_key=KEY, log_path=str(log)) as braze, _client(braze) as client:
        client.post(
            "/users/track",
            json={"events": [_event("a"), _event(name=None)], "purchases": [_purchase("a")]},
        )
        client.post("/users/delete", json={"external_ids": ["a"]})
        lines = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    assert lines == [
        {"request": 1, "kind": "event", "object": _event("a")},
        {"request": 1, "kind": "purchase", "object": _purchase("a")},
        {"request": 2, "kind": "delete", "object": {"external_id": "a"}},
    ]
    assert KEY not in log.read_text()


def test_serve_prints_its_address_and_stops_on_sigterm():
    code = (
        "from segreplay.fake import FakeBrazeConfig, serve; "
        f"serve(FakeBrazeConfig(api_key={KEY!r}))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = process.stderr.readline()
        assert line.startswith("fake Braze listening on http://127.0.0.1:")
        url = line.split(" on ", 1)[1].strip()
        response = httpx.post(
            f"{url}/users/track",
            json={"events": [_event()]},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert response.status_code == 201
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        out, err = process.communicate()
        assert KEY not in out + err + line
    finally:
        if process.poll() is None:
            process.kill()


def test_merge_joins_an_alias_profile_into_a_known_user(shared):
    """identity.md: a visitor's second device joins its user with /users/merge, the alias
    to merge and the external_id to keep (Braze's page allows either identifier)."""
    alias = {"alias_name": "phone-1", "alias_label": "segment_anonymous_id"}
    with _client(shared) as client:
        client.post("/users/track", json={
            "attributes": [{"user_alias": alias, "_update_existing_only": False}],
            "events": [{"user_alias": alias, "name": "App Opened", "time": "2024-03-05T10:00:00Z"}],
        })  # fmt: skip
        client.post("/users/track", json={"attributes": [{"external_id": "ada", "plan": "free"}]})
        response = client.post("/users/merge", json={"merge_updates": [
            {"identifier_to_merge": {"user_alias": alias}, "identifier_to_keep": {"external_id": "ada"}}
        ]})  # fmt: skip
    assert response.status_code == 202
    assert [e["name"] for e in shared.profile("ada")["events"]] == ["App Opened"]
    assert shared.profile(user_alias=alias) is None
