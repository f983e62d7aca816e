"""segreplay.delivery's BrazeSink over httpx.MockTransport: what goes out, what comes
back, and the order it keeps."""

from __future__ import annotations

import random
import threading
import time

import httpx
import orjson
import pytest

from segreplay.batching import Batch
from segreplay.config import DeliveryOptions
from segreplay.delivery import BrazeSink
from segreplay.errors import AuthError, DeliveryError
from segreplay.sink import Refusal

KEY = "sk-unit-7c1e0b"
TIME = "2024-03-05T14:03:22.083Z"


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


def _batch(seq: int = 0, events=(), ordered=()) -> Batch:
    batch = Batch(seq)
    batch.events.extend(events)
    batch.count = len(batch.events)
    batch.ordered_users.update(ordered)
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


def _sink(handler, **options) -> tuple[BrazeSink, Recorder, list[float]]:
    recorder = Recorder(handler)
    sleeps: list[float] = []
    sink = BrazeSink(_options(**options), httpx.MockTransport(recorder), sleep=sleeps.append,
                      rng=random.Random(0))  # fmt: skip
    return sink, recorder, sleeps


def _deliver(sink: BrazeSink, *batches: Batch) -> list:
    """Submit as the pipeline does, then wait for every answer."""
    answers = []
    try:
        for batch in batches:
            while not sink.has_room(batch):
                answers += sink.answers(None)
            sink.submit(batch)
        while sink.in_flight:
            answers += sink.answers(None)
    finally:
        sink.close()
    return answers


def _success(request: httpx.Request, number: int) -> httpx.Response:
    return httpx.Response(201, json={"message": "success"})


def test_an_answer_carries_the_batch_and_the_bodies_as_sent():
    batch = _batch(events=[_event("u1", 1), _event("u1", 2)])
    sink, recorder, sleeps = _sink(_success)
    [answer] = _deliver(sink, batch)
    assert [r.content for r in recorder.requests] == [batch.body]
    assert (answer.batch, answer.bodies, answer.refusals) == (batch, [batch.body], [])
    assert (answer.retries, answer.rate_limited, sleeps, sink.error) == (0, 0, [], None)


def test_refusals_come_back_with_their_batch():
    def handler(request, number):
        errors = [{"type": "'time' is not valid", "input_array": "events", "index": 1}]
        return httpx.Response(201, json={"message": "success", "errors": errors})

    batch = _batch(events=[_event("u1", 1), _event("u1", 2)])
    sink, _, _ = _sink(handler)
    [answer] = _deliver(sink, batch)
    assert answer.refusals == [Refusal("events", 1, "'time' is not valid")]


def test_retries_are_counted_on_the_answer_and_told_as_notices():
    def handler(request, number):
        if number == 1:
            return httpx.Response(503, json={"message": "Unavailable"})
        return httpx.Response(201, json={"message": "success"})

    sink, recorder, sleeps = _sink(handler)
    [answer] = _deliver(sink, _batch(events=[_event("u1", 1)]))
    assert (len(recorder.requests), answer.retries, len(sleeps)) == (2, 1, 1)
    [notice] = sink.notices()
    assert str(notice).startswith(
        "attempt 1 of 4 failed (Braze answered 503: Unavailable); next in "
    )
    assert sink.notices() == []


@pytest.mark.parametrize(
    ("status", "error"), [(401, AuthError), (404, DeliveryError), (500, DeliveryError)]
)
def test_a_fatal_answer_is_kept_as_the_error_and_stops_new_attempts(status, error):
    sink, recorder, _ = _sink(lambda request, number: httpx.Response(status, json={}),
                              concurrency=1)  # fmt: skip
    answers = _deliver(sink, _batch(events=[_event("u1", 1)]))
    assert answers == []
    assert isinstance(sink.error, error)
    assert KEY not in sink.error.message + (sink.error.hint or "")
    assert len(recorder.requests) == (4 if status == 500 else 1)


def test_a_stopped_sink_abandons_what_waits_and_answers_what_was_on_the_wire():
    on_the_wire = threading.Event()
    release = threading.Event()

    def handler(request, number):
        on_the_wire.set()
        assert release.wait(10)
        return httpx.Response(201, json={"message": "success"})

    sink = BrazeSink(_options(concurrency=2, rate_requests=1, rate_seconds=60.0),
                     httpx.MockTransport(Recorder(handler)))  # fmt: skip
    first, second = _batch(0, [_event("u1", 1)]), _batch(1, [_event("u2", 1)])
    sink.submit(first)
    assert on_the_wire.wait(10)
    sink.submit(second)  # waits a minute for the budget
    sink.stop()
    release.set()
    answers = []
    while sink.in_flight:
        answers += sink.answers(None)
    sink.close()
    assert [answer.batch for answer in answers] == [first]
    assert sink.error is None


def test_a_user_with_ordered_objects_is_never_in_flight_twice():
    sink, _, _ = _sink(_success)
    first = _batch(0, [_event("u1", 1)], ordered={"u1"})
    same_user = _batch(1, [_event("u1", 2)], ordered={"u1"})
    other_user = _batch(2, [_event("u2", 1)], ordered={"u2"})
    sink.submit(first)
    assert not sink.has_room(same_user)
    assert sink.has_room(other_user)
    while sink.in_flight:
        sink.answers(None)
    assert sink.has_room(same_user)
    sink.close()


def test_attribute_updates_of_one_user_are_never_in_flight_twice_but_events_are(tmp_path):
    """Braze applies a user's attribute updates in the order decided; events carry their
    own time and go in parallel (an alias's wait behind the object creating its profile)."""
    from conftest import identify, track, write_archive

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
        time.sleep(0.02)  # Braze's latency, so that requests overlap
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
        config, SilentReporter(), BrazeSink(config.delivery, httpx.MockTransport(handler))
    )
    assert summary.events_sent == 600
    assert overlaps == []
    assert event_overlap.is_set(), "events of one user never travelled in parallel"
