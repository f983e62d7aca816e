"""segreplay.client without sockets: answers classified, rate-limit waits, the request
budget on a fake clock, and BrazeSink over httpx.MockTransport."""

from __future__ import annotations

import threading
import time

import httpx
import orjson
import pytest

from segreplay import client
from segreplay.batching import Batch
from segreplay.client import _RESET_MARGIN_S as MARGIN  # waits end just after the reset
from segreplay.client import BrazeSink, RequestBudget, Verdict, classify, rate_limit_wait
from segreplay.config import DeliveryOptions
from segreplay.errors import AuthError, DeliveryError
from segreplay.ledger import Refusal
from segreplay.reporting import Summary

KEY = "sk-unit-7c1e0b"
NOW = 1_709_650_000.0  # an epoch in March 2024
TIME = "2024-03-05T14:03:22.083Z"


def _body(payload) -> bytes:
    return orjson.dumps(payload)


# ---------------------------------------------------------------------------- classify


@pytest.mark.parametrize(
    ("status", "payload", "expected"),
    [
        (
            201,
            {"message": "success", "events_processed": 2},
            Verdict("accepted"),
        ),
        (
            201,
            {
                "message": "success",
                "errors": [
                    {"type": "'time' is not valid", "input_array": "events", "index": 3},
                    {"type": "'currency' is required", "input_array": "purchases", "index": 0},
                ],
            },
            Verdict(
                "accepted",
                refusals=(
                    Refusal("events", 3, "'time' is not valid"),
                    Refusal("purchases", 0, "'currency' is required"),
                ),
            ),
        ),
        (202, {"message": "queued"}, Verdict("accepted")),
        (
            400,
            {"message": "Max Input Length Exceeded"},
            Verdict("refused", "Max Input Length Exceeded"),
        ),
        (
            401,
            {"message": "Invalid API key"},
            Verdict("auth", "Braze refused the API key (401: Invalid API key)"),
        ),
        (
            403,
            {"message": "Forbidden"},
            Verdict("auth", "Braze refused the API key (403: Forbidden)"),
        ),
        (
            404,
            {"message": "No such endpoint: /users/trak"},
            Verdict("fatal", "Braze answered 404: No such endpoint: /users/trak"),
        ),
        (413, {"message": "Payload Too Large"}, Verdict("too_large", "Payload Too Large")),
        (
            500,
            {"message": "Internal Server Error"},
            Verdict("retry", "Braze answered 500: Internal Server Error"),
        ),  # fmt: skip
        (502, None, Verdict("retry", "Braze answered 502: HTTP 502")),
        (503, {"message": "Unavailable"}, Verdict("retry", "Braze answered 503: Unavailable")),
    ],
)
def test_classify(status, payload, expected):
    body = b"" if payload is None else _body(payload)
    assert classify(status, httpx.Headers(), body, NOW) == expected


def test_classify_reads_a_message_that_is_not_json():
    verdict = classify(400, httpx.Headers(), b"<html>Bad Request</html>", NOW)
    assert verdict == Verdict("refused", "<html>Bad Request</html>")


def test_classify_429_carries_the_wait():
    verdict = classify(
        429, httpx.Headers({"Retry-After": "4"}), _body({"message": "Rate limit exceeded"}), NOW
    )
    assert verdict == Verdict("rate_limited", "Rate limit exceeded", wait_s=4 + MARGIN)


def test_classify_429_without_any_header_leaves_the_wait_to_backoff():
    assert classify(429, httpx.Headers(), b"", NOW) == Verdict("rate_limited", "HTTP 429")


# ---------------------------------------------------------------------- rate_limit_wait


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "2"}, 2 + MARGIN),
        ({"retry-after": "2.5"}, 2.5 + MARGIN),
        ({"X-Ratelimit-Retry-After": "3"}, 3 + MARGIN),
        ({"X-RATELIMIT-RETRY-AFTER": "3"}, 3 + MARGIN),
        ({"x-ratelimit-retry-after": "0"}, MARGIN),
        # Retry-After wins over Reset when both are given
        ({"Retry-After": "1", "X-RateLimit-Reset": str(int(NOW) + 30)}, 1 + MARGIN),
        # epoch seconds: the wait is until then
        ({"X-RateLimit-Reset": str(int(NOW) + 7)}, 7 + MARGIN),
        ({"x-ratelimit-reset": str(int(NOW) + 7)}, 7 + MARGIN),
        # an epoch already past: go (just after) now
        ({"X-RateLimit-Reset": str(int(NOW) - 5)}, MARGIN),
        # small numbers are seconds remaining (MAU-priced accounts)
        ({"X-RateLimit-Reset": "5"}, 5 + MARGIN),
        ({"X-RATELIMIT-RESET": "1"}, 1 + MARGIN),
        ({}, None),
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Limit": "3000"}, None),
        ({"Retry-After": "soon"}, None),
    ],
)
def test_rate_limit_wait(headers, expected):
    wait = rate_limit_wait(httpx.Headers(headers), NOW)
    if expected is None:
        assert wait is None
    else:
        assert wait == pytest.approx(expected, abs=1e-9)


# ------------------------------------------------------------------------ RequestBudget


class FakeClock:
    """A clock that moves only when somebody sleeps on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0, "the budget never sleeps for nothing"
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds


def _budget(limit: int, window_s: float) -> tuple[RequestBudget, FakeClock]:
    clock = FakeClock()
    return RequestBudget(limit, window_s, clock=clock, sleep=clock.sleep), clock


def _most_in_any_window(times: list[float], window_s: float) -> int:
    times = sorted(times)
    return max(sum(1 for t in times if start <= t < start + window_s) for start in times)


def test_budget_takes_at_most_limit_per_window():
    budget, clock = _budget(3, 1.0)
    taken = []
    for _ in range(10):
        budget.take()
        taken.append(clock())
    assert taken == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0]
    assert budget.waits == 3


def test_budget_window_slides():
    budget, clock = _budget(3, 1.0)
    taken = []
    for _ in range(12):
        budget.take()
        taken.append(clock())
        clock.now += 0.3  # a request takes 0.3 s
    assert _most_in_any_window(taken, 1.0) == 3
    # the 4th waits for the 1st to leave the window, not for a whole new window
    assert taken[:5] == pytest.approx([0.0, 0.3, 0.6, 1.0, 1.3])


def test_budget_never_exceeds_limit_with_threads():
    budget, clock = _budget(5, 2.0)
    taken = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(10):
            budget.take()
            with lock:
                taken.append(clock())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(taken) == 40
    assert _most_in_any_window(taken, 2.0) <= 5


def test_pause_blocks_every_taker_until_the_time():
    clock = FakeClock()
    takers = 6
    everyone_waiting = threading.Barrier(takers)

    def sleep(seconds: float) -> None:
        everyone_waiting.wait(5)  # the clock moves only once every taker is waiting
        clock.sleep(seconds)

    budget = RequestBudget(100, 1.0, clock=clock, sleep=sleep)
    budget.pause(2.5)
    budget.pause(1.0)  # a shorter pause never shortens the one in force
    taken = []
    lock = threading.Lock()

    def worker() -> None:
        budget.take()
        with lock:
            taken.append(clock())

    threads = [threading.Thread(target=worker) for _ in range(takers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(taken) == takers
    assert min(taken) >= 2.5
    assert clock.sleeps == [2.5] * takers
    assert budget.waits == takers


def test_pause_then_takes_go_at_the_time():
    budget, clock = _budget(100, 1.0)
    clock.now = 10.0
    budget.pause(2.5)
    budget.take()
    assert clock() == 12.5
    assert clock.sleeps == [2.5]
    budget.take()  # the pause is over
    assert clock() == 12.5


def test_observe_slows_down_when_remaining_reaches_the_reserve():
    budget, clock = _budget(100, 1.0)
    nearly_spent = httpx.Headers({"X-RateLimit-Remaining": "3", "X-RateLimit-Reset": "2"})
    budget.observe(httpx.Headers({"X-RateLimit-Remaining": "4", "X-RateLimit-Reset": "2"}), NOW, 3)
    budget.take()
    assert clock() == 0.0
    budget.observe(nearly_spent, NOW, reserve=3)
    budget.take()
    assert clock() == pytest.approx(2 + MARGIN)


# -------------------------------------------------------------------------- BrazeSink


def _options(**overrides) -> DeliveryOptions:
    fields = dict(
        endpoint="https://rest.iad-03.braze.com",
        api_key=KEY,
        rate_requests=1000,
        rate_seconds=1.0,
        concurrency=2,
        max_attempts=4,
    )
    fields.update(overrides)
    return DeliveryOptions(**fields)


def _event(user: str, n: int) -> dict:
    return {"external_id": user, "name": f"Event {n}", "time": TIME}


def _batch(seq: int = 0, attributes=(), events=(), user: str = "u1") -> Batch:
    batch = Batch(seq)
    for obj in attributes:
        batch.attributes[obj["external_id"]] = obj
    batch.events.extend(events)
    for obj in [*attributes, *events]:
        batch.effects.setdefault(obj["external_id"], {})
    batch.effects.setdefault(user, {})
    batch.count = len(batch.attributes) + len(batch.events)
    batch.seal()
    return batch


class Recorder:
    """Runs a handler per request and keeps every request it saw."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.requests.append(request)
            number = len(self.requests)
        return self.handler(request, number)

    def bodies(self) -> list[dict]:
        return [orjson.loads(request.content) for request in self.requests]


def _deliver(handler, *batches: Batch, **options):
    """Send batches through a BrazeSink; returns (recorder, settled answers, summary, sleeps)."""
    recorder = Recorder(handler)
    settled: list[tuple[Batch, list[Refusal]]] = []
    summary = Summary()
    sleeps: list[float] = []
    sink = BrazeSink(
        _options(**options),
        settled.extend,
        summary,
        transport=httpx.MockTransport(recorder),
        sleep=sleeps.append,
    )
    try:
        for batch in batches:
            sink.submit(batch)
        sink.finish()
    finally:
        sink.close()
    return recorder, settled, summary, sleeps


def _success(request: httpx.Request, number: int) -> httpx.Response:
    return httpx.Response(201, json={"message": "success"})


def test_sink_sends_the_body_with_braze_headers():
    batch = _batch(events=[_event("u1", 1), _event("u1", 2)])
    recorder, settled, summary, sleeps = _deliver(_success, batch)
    [request] = recorder.requests
    assert request.method == "POST"
    assert str(request.url) == "https://rest.iad-03.braze.com/users/track"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.headers["X-Braze-Bulk"] == "true"
    assert request.headers["Content-Type"] == "application/json"
    assert request.content == batch.body
    assert settled == [(batch, [])]
    assert batch.answered_bodies == [batch.body]  # what --output records
    assert (summary.retries, summary.rate_limited, sleeps) == (0, 0, [])


def test_sink_hands_refusals_back_with_their_batch():
    def handler(request, number):
        errors = [{"type": "'time' is not valid", "input_array": "events", "index": 1}]
        return httpx.Response(201, json={"message": "success", "errors": errors})

    batch = _batch(events=[_event("u1", 1), _event("u1", 2)])
    _, settled, _, _ = _deliver(handler, batch)
    assert settled == [(batch, [Refusal("events", 1, "'time' is not valid")])]


def test_sink_400_refuses_the_whole_request_without_resending():
    def handler(request, number):
        return httpx.Response(400, json={"message": "Valid data must be provided"})

    batch = _batch(events=[_event("u1", 1)])
    recorder, settled, _, _ = _deliver(handler, batch)
    assert len(recorder.requests) == 1
    assert settled == [(batch, [Refusal(None, None, "Valid data must be provided")])]


def _too_large_above(limit: int, refuse=lambda array, obj: False):
    """413 for bodies of more than `limit` objects; below it, refuses the objects that
    `refuse(array, obj)` picks, by their index in the body they came in."""

    def handler(request, number):
        body = orjson.loads(request.content)
        if sum(len(objects) for objects in body.values()) > limit:
            return httpx.Response(413, json={"message": "Payload Too Large"})
        errors = [
            {"type": "refused", "input_array": array, "index": index}
            for array, objects in body.items()
            for index, obj in enumerate(objects)
            if refuse(array, obj)
        ]
        return httpx.Response(201, json={"message": "success", "errors": errors})

    return handler


def test_413_splits_and_remaps_refusal_indexes():
    events = [_event("u1", n) for n in range(8)]
    batch = _batch(events=events)

    def handler(request, number):
        body = orjson.loads(request.content)
        if len(body["events"]) > 2:
            return httpx.Response(413, json={"message": "Payload Too Large"})
        # refuse the second object of every part
        errors = [{"type": "refused", "input_array": "events", "index": 1}]
        return httpx.Response(201, json={"message": "success", "errors": errors})

    recorder, settled, _, _ = _deliver(handler, batch)
    sent = [body["events"] for body in recorder.bodies()[1:] if len(body["events"]) <= 2]
    # every event went exactly once, in order, in parts of two
    assert [event for part in sent for event in part] == events
    [(settled_batch, refusals)] = settled
    assert settled_batch is batch
    assert sorted(r.index for r in refusals) == [1, 3, 5, 7]
    assert {r.array for r in refusals} == {"events"}


def test_413_split_remaps_each_array_on_its_own():
    attributes = [{"external_id": f"u{n}", "first_name": f"Name {n}"} for n in range(4)]
    events = [_event(f"u{n}", n) for n in range(4)]
    batch = _batch(attributes=attributes, events=events)

    def refuse(array, obj):
        return obj.get("first_name") == "Name 3" or obj.get("name") == "Event 2"

    recorder, settled, _, _ = _deliver(_too_large_above(3, refuse), batch)
    delivered = [body for body in recorder.bodies() if sum(map(len, body.values())) <= 3]
    assert [a for body in delivered for a in body.get("attributes", [])] == attributes
    assert [e for body in delivered for e in body.get("events", [])] == events
    [(_, refusals)] = settled
    assert sorted((r.array, r.index) for r in refusals) == [("attributes", 3), ("events", 2)]


def test_413_with_one_object_per_array_still_splits():
    attributes = {"external_id": "u1", "first_name": "Ana"}
    event = _event("u1", 1)
    batch = _batch(attributes=[attributes], events=[event])
    recorder, settled, _, _ = _deliver(_too_large_above(1), batch)
    assert recorder.bodies() == [
        {"attributes": [attributes], "events": [event]},
        {"attributes": [attributes]},
        {"events": [event]},
    ]
    assert settled == [(batch, [])]
    # --output records the halves Braze took, not the body it answered with a 413
    assert batch.answered_bodies == [request.content for request in recorder.requests[1:]]


def test_413_for_a_single_object_refuses_it():
    batch = _batch(events=[_event("u1", 1), _event("u1", 2)])
    recorder, settled, _, _ = _deliver(_too_large_above(0), batch)
    assert len(recorder.requests) == 3  # the whole, then each half once
    assert batch.answered_bodies == [request.content for request in recorder.requests[1:]]
    [(_, refusals)] = settled
    assert refusals == [
        Refusal("events", 0, "request too large"),
        Refusal("events", 1, "request too large"),
    ]


def test_5xx_is_retried_with_exponential_backoff(monkeypatch):
    monkeypatch.setattr(client.random, "uniform", lambda low, high: high)  # no jitter

    def handler(request, number):
        if number <= 3:
            return httpx.Response((500, 502, 503)[number - 1], json={"message": "oops"})
        return httpx.Response(201, json={"message": "success"})

    batch = _batch(events=[_event("u1", 1)])
    recorder, settled, summary, sleeps = _deliver(handler, batch)
    assert len(recorder.requests) == 4
    assert {request.content for request in recorder.requests} == {batch.body}
    assert sleeps == [1.0, 2.0, 4.0]
    assert summary.retries == 3
    assert settled == [(batch, [])]


def test_backoff_is_capped():
    assert all(0 <= client._backoff(failures) <= 30.0 for failures in range(40))


def test_5xx_every_time_stops_with_delivery_error_after_max_attempts():
    def handler(request, number):
        return httpx.Response(503, json={"message": "Service Unavailable"})

    batch = _batch(events=[_event("u1", 1)])
    with pytest.raises(DeliveryError) as raised:
        _deliver(handler, batch, max_attempts=5)
    assert raised.value.message == (
        "Braze did not take a request after 5 attempts (Braze answered 503: Service Unavailable)"
    )
    assert "resumes" in raised.value.hint


def test_5xx_every_time_makes_exactly_max_attempts_and_settles_nothing():
    recorder = Recorder(lambda request, number: httpx.Response(500, json={"message": "x"}))
    settled: list = []
    sleeps: list = []
    sink = BrazeSink(
        _options(max_attempts=3),
        settled.extend,
        Summary(),
        transport=httpx.MockTransport(recorder),
        sleep=sleeps.append,
    )
    sink.submit(_batch(events=[_event("u1", 1)]))
    with pytest.raises(DeliveryError):
        sink.finish()
    assert len(recorder.requests) == 3
    assert len(sleeps) == 2
    assert settled == []


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failure_stops_with_a_hint(status):
    def handler(request, number):
        return httpx.Response(status, json={"message": "Invalid API key"})

    with pytest.raises(AuthError) as raised:
        _deliver(handler, _batch(events=[_event("u1", 1)]))
    error = raised.value
    assert error.message == f"Braze refused the API key ({status}: Invalid API key)"
    assert "users.track" in error.hint
    assert KEY not in error.message + error.hint


def test_auth_failure_is_not_retried():
    recorder = Recorder(lambda request, number: httpx.Response(401, json={"message": "no"}))
    sink = BrazeSink(
        _options(),
        [].extend,
        Summary(),
        transport=httpx.MockTransport(recorder),
        sleep=lambda seconds: None,
    )
    sink.submit(_batch(events=[_event("u1", 1)]))
    with pytest.raises(AuthError):
        sink.finish()
    assert len(recorder.requests) == 1


def test_404_stops_with_delivery_error_naming_the_endpoint():
    def handler(request, number):
        return httpx.Response(404, json={"message": "No such endpoint: /users/track"})

    with pytest.raises(DeliveryError) as raised:
        _deliver(handler, _batch(events=[_event("u1", 1)]))
    assert raised.value.message == "Braze answered 404: No such endpoint: /users/track"
    assert raised.value.hint == "check --endpoint"


@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectError("connection refused"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.ReadTimeout("timed out"),
        httpx.ReadError("connection reset"),
    ],
)
def test_transport_errors_are_retried(error):
    def handler(request, number):
        if number <= 2:
            raise error
        return httpx.Response(201, json={"message": "success"})

    batch = _batch(events=[_event("u1", 1)])
    recorder, settled, summary, sleeps = _deliver(handler, batch)
    assert len(recorder.requests) == 3
    assert summary.retries == 2
    assert len(sleeps) == 2
    assert settled == [(batch, [])]


def test_transport_errors_every_time_stop_with_delivery_error():
    def handler(request, number):
        raise httpx.ConnectError("connection refused")

    with pytest.raises(DeliveryError) as raised:
        _deliver(handler, _batch(events=[_event("u1", 1)]), max_attempts=3)
    assert raised.value.message == (
        "Braze did not take a request after 3 attempts (ConnectError: connection refused)"
    )


def test_429_waits_as_told_then_resends():
    def handler(request, number):
        if number == 1:
            return httpx.Response(
                429, headers={"X-Ratelimit-Retry-After": "0"}, json={"message": "slow down"}
            )
        return httpx.Response(201, json={"message": "success"})

    batch = _batch(events=[_event("u1", 1)])
    recorder = Recorder(handler)
    settled: list = []
    summary = Summary()
    sink = BrazeSink(_options(), settled.extend, summary, transport=httpx.MockTransport(recorder))
    started = time.monotonic()
    sink.submit(batch)
    sink.finish()
    elapsed = time.monotonic() - started
    assert len(recorder.requests) == 2
    assert recorder.requests[0].content == recorder.requests[1].content == batch.body
    assert elapsed >= MARGIN
    assert (summary.rate_limited, summary.retries) == (1, 0)
    assert settled == [(batch, [])]


def test_attribute_updates_of_one_user_are_never_in_flight_twice_but_events_are(tmp_path):
    """Braze applies a user's attribute updates in the order decided; events carry their
    own time and go in parallel (an alias's wait behind the object creating its profile)."""
    from conftest import identify, track, write_archive

    from segreplay.client import braze_sink
    from segreplay.config import MappingOptions, RunConfig
    from segreplay.pipeline import run_import
    from segreplay.reporting import SilentReporter

    in_flight: list[dict] = []
    overlaps: list[str] = []
    event_overlap = threading.Event()
    lock = threading.Lock()

    def handler(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        updates = {
            obj.get("external_id") or obj["user_alias"]["alias_name"]
            for obj in body.get("attributes", [])
        }
        events = {obj.get("external_id") for obj in body.get("events", [])}
        with lock:
            for other in in_flight:
                overlaps.extend(sorted(updates & other["updates"]))
                if events & other["events"]:
                    event_overlap.set()
            entry = {"updates": updates, "events": events}
            in_flight.append(entry)
        time.sleep(0.02)
        with lock:
            in_flight.remove(entry)
        return httpx.Response(201, json={"message": "success"})

    lines = []
    for n in range(600):
        user, time_ = f"u{n % 3}", f"2024-03-05T10:{n // 60:02d}:{n % 60:02d}.000Z"
        if n % 200 < 3:  # now and then an update for each user, between runs of events
            lines.append(identify(user, time_, n=n))
        lines.append(track("Played", user, time_))
    path = write_archive(tmp_path / "a.gz", lines)
    config = RunConfig(
        sources=(str(path),),
        state_path=str(tmp_path / "state.sqlite"),
        dead_letter_path=str(tmp_path / "dead.jsonl"),
        batch_limit="per-type",
        mapping=MappingOptions(),
        delivery=_options(concurrency=4),
    )
    summary = run_import(
        config, SilentReporter(), braze_sink(config.delivery, httpx.MockTransport(handler))
    )
    assert summary.events_sent == 600
    assert overlaps == []
    assert event_overlap.is_set(), "events of one user never travelled in parallel"
