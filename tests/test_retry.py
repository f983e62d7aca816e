"""segreplay.retry without sockets: the request budget on a fake clock, and the retry
policy over scripted verdicts."""

from __future__ import annotations

import random
import threading

import orjson
import pytest

from segreplay.client import Verdict, VerdictKind
from segreplay.errors import AuthError, DeliveryError
from segreplay.retry import Abandoned, RequestBudget, RetryNotice, RetryPolicy
from segreplay.sink import Refusal

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
    budget.observe(Verdict(VerdictKind.ACCEPTED, remaining=4, reset_s=2.05), reserve=3)
    budget.take()
    assert clock() == 0.0
    budget.observe(Verdict(VerdictKind.ACCEPTED, remaining=3, reset_s=2.05), reserve=3)
    budget.take()
    assert clock() == pytest.approx(2.05)


# -------------------------------------------------------------------------- RetryPolicy


class NoJitter(random.Random):
    def uniform(self, low, high):
        return high


def _policy(max_attempts=4, **kwargs) -> tuple[RetryPolicy, FakeClock, list[RetryNotice]]:
    clock = FakeClock()
    notices: list[RetryNotice] = []
    budget = RequestBudget(1000, 1.0, clock=clock, sleep=clock.sleep)
    policy = RetryPolicy(budget, max_attempts=max_attempts, sleep=clock.sleep, rng=NoJitter(),
                         on_retry=notices.append, **kwargs)  # fmt: skip
    return policy, clock, notices


def _scripted(*verdicts: Verdict):
    """A post that answers with `verdicts` in turn (the last one for ever after)."""
    sent: list[bytes] = []

    def post(body: bytes) -> Verdict:
        sent.append(body)
        return verdicts[min(len(sent), len(verdicts)) - 1]

    return post, sent


ACCEPTED = Verdict(VerdictKind.ACCEPTED)
OOPS = Verdict(VerdictKind.RETRY, "Braze answered 500: oops")


def test_5xx_is_retried_with_exponential_backoff_and_said_each_time():
    policy, clock, notices = _policy()
    post, sent = _scripted(OOPS, OOPS, OOPS, ACCEPTED)
    delivered = policy.deliver(post, b"body")
    assert sent == [b"body"] * 4
    assert clock.sleeps == [1.0, 2.0, 4.0]
    assert (delivered.bodies, delivered.refusals, delivered.retries) == ([b"body"], [], 3)
    assert [str(n) for n in notices] == [
        "attempt 1 of 4 failed (Braze answered 500: oops); next in 1.0 s",
        "attempt 2 of 4 failed (Braze answered 500: oops); next in 2.0 s",
        "attempt 3 of 4 failed (Braze answered 500: oops); next in 4.0 s",
    ]


def test_backoff_is_capped():
    policy = RetryPolicy(RequestBudget(1, 1.0))
    assert all(0 <= policy.backoff(failures) <= 30.0 for failures in range(40))


def test_5xx_every_time_stops_with_delivery_error_after_max_attempts():
    policy, clock, _ = _policy(max_attempts=5)
    post, sent = _scripted(Verdict(VerdictKind.RETRY, "Braze answered 503: Service Unavailable"))
    with pytest.raises(DeliveryError) as raised:
        policy.deliver(post, b"body")
    assert raised.value.message == (
        "Braze did not take a request after 5 attempts (Braze answered 503: Service Unavailable)"
    )
    assert "resumes" in raised.value.hint
    assert len(sent) == 5
    assert len(clock.sleeps) == 4


def test_a_name_that_does_not_resolve_is_fatal_after_the_second_attempt():
    policy, _, notices = _policy(max_attempts=8)
    message = "the host rest.iad-99.braze.com does not resolve (ConnectError: [Errno -2] x)"
    post, sent = _scripted(Verdict(VerdictKind.NO_SUCH_HOST, message))
    with pytest.raises(DeliveryError) as raised:
        policy.deliver(post, b"body")
    assert len(sent) == 2
    assert raised.value.message == f"Braze did not take a request after 2 attempts ({message})"
    assert [n.attempt for n in notices] == [1]


@pytest.mark.parametrize(("permission"), ["users.track", "users.delete"])
def test_auth_failure_is_not_retried_and_names_the_permission(permission):
    policy, _, _ = _policy(permission=permission)
    post, sent = _scripted(Verdict(VerdictKind.AUTH, "Braze refused the API key (401: no)"))
    with pytest.raises(AuthError) as raised:
        policy.deliver(post, b"body")
    assert len(sent) == 1
    assert raised.value.message == "Braze refused the API key (401: no)"
    assert f"the {permission} permission" in raised.value.hint


def test_anything_else_stops_naming_the_endpoint():
    policy, _, _ = _policy()
    post, _ = _scripted(Verdict(VerdictKind.FATAL, "Braze answered 404: No such endpoint"))
    with pytest.raises(DeliveryError) as raised:
        policy.deliver(post, b"body")
    assert raised.value.hint == "check --endpoint"


def test_429_waits_as_told_then_resends():
    policy, clock, _ = _policy()
    post, sent = _scripted(Verdict(VerdictKind.RATE_LIMITED, "slow down", wait_s=0.05), ACCEPTED)
    delivered = policy.deliver(post, b"body")
    assert sent == [b"body", b"body"]
    assert clock.sleeps == [0.05]
    assert (delivered.rate_limited, delivered.retries) == (1, 0)


def test_400_refuses_the_whole_body_without_resending():
    policy, _, _ = _policy()
    post, sent = _scripted(Verdict(VerdictKind.REFUSED, "Valid data must be provided"))
    delivered = policy.deliver(post, b"body")
    assert sent == [b"body"]
    assert delivered.refusals == [Refusal(None, None, "Valid data must be provided")]
    assert delivered.bodies == [b"body"]


def test_a_stopping_run_sends_nothing_more():
    stopping = threading.Event()
    policy, _, _ = _policy(stopping=stopping.is_set)
    post, sent = _scripted(OOPS)
    stopping.set()
    with pytest.raises(Abandoned) as abandoned:
        policy.deliver(post, b"body")
    assert sent == [] and abandoned.value.sent is False


def test_a_request_abandoned_in_its_backoff_was_sent():
    stopping = threading.Event()
    clock = FakeClock()
    policy = RetryPolicy(RequestBudget(10, 1.0, clock=clock, sleep=clock.sleep),
                         sleep=lambda seconds: stopping.set(),  # the stop comes in the backoff
                         stopping=stopping.is_set)  # fmt: skip
    post, sent = _scripted(OOPS)
    with pytest.raises(Abandoned) as abandoned:
        policy.deliver(post, b"body")
    assert sent == [b"body"] and abandoned.value.sent is True


def _too_large_above(limit: int, refuse=lambda array, obj: False):
    """413 for bodies of more than `limit` objects; below it, refuses the objects that
    `refuse(array, obj)` picks, by their index in the body they came in."""
    sent: list[bytes] = []

    def post(body: bytes) -> Verdict:
        sent.append(body)
        arrays = orjson.loads(body)
        if sum(len(objects) for objects in arrays.values()) > limit:
            return Verdict(VerdictKind.TOO_LARGE, "Payload Too Large")
        return Verdict(VerdictKind.ACCEPTED, refusals=tuple(
            Refusal(array, index, "refused")
            for array, objects in arrays.items()
            for index, obj in enumerate(objects)
            if refuse(array, obj)
        ))  # fmt: skip

    return post, sent


def _event(user: str, n: int) -> dict:
    return {"external_id": user, "name": f"Event {n}", "time": "2024-03-05T14:03:22.083Z"}


def test_413_splits_and_remaps_refusal_indexes():
    events = [_event("u1", n) for n in range(8)]
    post, sent = _too_large_above(
        2, lambda array, obj: obj["name"] in ("Event 1", "Event 3", "Event 5", "Event 7")
    )
    policy, _, _ = _policy()
    delivered = policy.deliver(post, orjson.dumps({"events": events}))
    parts = [orjson.loads(body)["events"] for body in delivered.bodies]
    # every event went exactly once, in order, in parts of two
    assert [event for part in parts for event in part] == events
    assert sorted(r.index for r in delivered.refusals) == [1, 3, 5, 7]
    assert {r.array for r in delivered.refusals} == {"events"}


def test_413_split_remaps_each_array_on_its_own():
    attributes = [{"external_id": f"u{n}", "first_name": f"Name {n}"} for n in range(4)]
    events = [_event(f"u{n}", n) for n in range(4)]

    def refuse(array, obj):
        return obj.get("first_name") == "Name 3" or obj.get("name") == "Event 2"

    post, _ = _too_large_above(3, refuse)
    policy, _, _ = _policy()
    delivered = policy.deliver(post, orjson.dumps({"attributes": attributes, "events": events}))
    bodies = [orjson.loads(body) for body in delivered.bodies]
    assert [a for body in bodies for a in body.get("attributes", [])] == attributes
    assert [e for body in bodies for e in body.get("events", [])] == events
    refused = sorted((r.array, r.index) for r in delivered.refusals)
    assert refused == [("attributes", 3), ("events", 2)]


def test_413_with_one_object_per_array_still_splits():
    attributes = {"external_id": "u1", "first_name": "Ana"}
    event = _event("u1", 1)
    post, sent = _too_large_above(1)
    policy, _, _ = _policy()
    delivered = policy.deliver(post, orjson.dumps({"attributes": [attributes], "events": [event]}))
    assert [orjson.loads(body) for body in sent] == [
        {"attributes": [attributes], "events": [event]},
        {"attributes": [attributes]},
        {"events": [event]},
    ]
    # --output records the halves Braze took, not the body it answered with a 413
    assert delivered.bodies == sent[1:]
    assert delivered.refusals == []


def test_413_for_a_single_object_refuses_it():
    post, sent = _too_large_above(0)
    policy, _, _ = _policy()
    delivered = policy.deliver(post, orjson.dumps({"events": [_event("u1", 1), _event("u1", 2)]}))
    assert len(sent) == 3  # the whole, then each half once
    assert delivered.bodies == sent[1:]
    assert delivered.refusals == [
        Refusal("events", 0, "request too large"),
        Refusal("events", 1, "request too large"),
    ]
