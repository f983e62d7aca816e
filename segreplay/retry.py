"""How long to wait and whether to send again: the request budget, backoff with jitter,
and the one loop that takes a body from first attempt to Braze's final answer.

Sleeping, randomness and the clock are injected, so tests run the real policy at once.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from segreplay.client import Verdict, VerdictKind
from segreplay.errors import AuthError, DeliveryError
from segreplay.jsonutil import dumps, loads
from segreplay.sink import Refusal

BACKOFF_CAP_S = 30.0
MAX_RATE_LIMIT_WAITS = 200  # 429s for one request before giving up: about ten minutes
_NO_SUCH_HOST_ATTEMPTS = 2  # a name that does not resolve twice will not resolve soon
_ARRAYS = ("attributes", "events", "purchases")


class Abandoned(Exception):
    """The run is stopping: the request was not sent again, or, when `sent` is false,
    not at all."""

    def __init__(self, sent: bool = False) -> None:
        super().__init__("abandoned: the run is stopping")
        self.sent = sent


class RequestBudget:
    """At most `limit` requests in any `window_s` seconds (a sliding log), a shared pause
    after a 429, and a slow-down when Braze says the window is nearly spent."""

    def __init__(self, limit: int, window_s: float, clock=time.monotonic, sleep=time.sleep,
                 shared_pause=None):  # fmt: skip
        """`shared_pause`, a multiprocessing.Value('d') of `clock` time, makes a pause
        every process's: the workers of one machine (`--workers`) share a 429. Only with
        time.monotonic, which Linux keeps system-wide (CLOCK_MONOTONIC)."""
        self._limit = limit
        self._window_s = window_s
        self._clock = clock
        self._sleep = sleep
        self._sent: deque[float] = deque()
        self._lock = threading.Lock()
        self._paused_until = 0.0
        self._shared_pause = shared_pause
        self.waits = 0

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + seconds)
            shared = self._shared_pause
            if shared is not None:
                with shared.get_lock():
                    shared.value = max(shared.value, self._paused_until)

    def observe(self, verdict: Verdict, reserve: int) -> None:
        """Slow down before Braze has to say no: when fewer than `reserve` requests are
        left in its window, wait for the window to reset."""
        if verdict.remaining is not None and verdict.remaining <= reserve:
            if verdict.reset_s is not None:
                self.pause(min(verdict.reset_s, 60.0))

    def take(self) -> None:
        """Block until one more request may go."""
        while True:
            with self._lock:
                now = self._clock()
                while self._sent and now - self._sent[0] >= self._window_s:
                    self._sent.popleft()
                paused_until = self._paused_until
                if self._shared_pause is not None:
                    paused_until = max(paused_until, self._shared_pause.value)
                wait_s = paused_until - now
                if wait_s <= 0 and len(self._sent) >= self._limit:
                    wait_s = self._sent[0] + self._window_s - now
                if wait_s <= 0:
                    self._sent.append(now)
                    return
                self.waits += 1
            self._sleep(wait_s)


@dataclass(frozen=True, slots=True)
class RetryNotice:
    """One failed attempt, said as it happens: `attempt` of `max_attempts`, and the wait
    before the next one."""

    attempt: int
    max_attempts: int
    reason: str
    wait_s: float

    def __str__(self) -> str:
        return (
            f"attempt {self.attempt} of {self.max_attempts} failed ({self.reason}); "
            f"next in {self.wait_s:.1f} s"
        )


@dataclass(slots=True)
class Delivered:
    """A body's final answer: the bodies Braze answered (the body, or its parts after a
    413 split) and the objects it refused, indexed in the original body."""

    bodies: list[bytes] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    retries: int = 0
    rate_limited: int = 0
    attempts: int = 0  # posts made, retries and split halves included


class RetryPolicy:
    """Takes one body to its final answer through `post`: waits for the budget, backs off
    after 5xx and network errors, waits out 429s, splits on 413; raises AuthError or
    DeliveryError when the run must stop, Abandoned once `stopping()` is true."""

    def __init__(
        self,
        budget: RequestBudget,
        max_attempts: int = 8,
        reserve: int = 8,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        stopping: Callable[[], bool] = lambda: False,
        on_retry: Callable[[RetryNotice], None] = lambda notice: None,
        permission: str = "users.track",
        backoff_base_s: float = 0.5,
    ) -> None:
        self._budget = budget
        self._max_attempts = max_attempts
        self._reserve = reserve
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._stopping = stopping
        self._on_retry = on_retry
        self._permission = permission
        self._backoff_base_s = backoff_base_s

    def backoff(self, failures: int) -> float:
        """Exponential backoff with full jitter."""
        return self._rng.uniform(0, min(BACKOFF_CAP_S, self._backoff_base_s * 2**failures))

    def deliver(self, post: Callable[[bytes], Verdict], body: bytes) -> Delivered:
        delivered = Delivered()
        try:
            self._send(post, body, None, delivered)
        except Abandoned:
            raise Abandoned(delivered.attempts > 0) from None
        return delivered

    def _send(self, post, body: bytes, offsets: dict[str, int] | None, out: Delivered) -> None:
        failures = 0
        while True:
            if self._stopping():
                raise Abandoned(out.attempts > 0)
            self._budget.take()
            if self._stopping():
                raise Abandoned(out.attempts > 0)
            out.attempts += 1
            verdict = post(body)
            kind = verdict.kind
            if kind is VerdictKind.ACCEPTED:
                self._budget.observe(verdict, self._reserve)
                out.bodies.append(body)
                out.refusals.extend(_shift(verdict.refusals, offsets))
                return
            if kind is VerdictKind.REFUSED:
                out.bodies.append(body)
                out.refusals.extend(_whole(body, verdict.message, offsets))
                return
            if kind is VerdictKind.TOO_LARGE:
                halves = _split(body)
                if halves is None:
                    out.bodies.append(body)
                    out.refusals.extend(_whole(body, "request too large", offsets))
                    return
                for half, half_offsets in halves:
                    self._send(post, half, _compose(offsets, half_offsets), out)
                return
            if kind is VerdictKind.RATE_LIMITED:
                out.rate_limited += 1
                if out.rate_limited > MAX_RATE_LIMIT_WAITS:
                    raise DeliveryError(
                        "Braze kept answering 429 (rate limited) for one request",
                        "lower --rate, or run when less other traffic shares the workspace",
                    )
                self._budget.pause(
                    verdict.wait_s if verdict.wait_s is not None else self.backoff(0)
                )
                continue
            if kind is VerdictKind.RETRY or kind is VerdictKind.NO_SUCH_HOST:
                failures += 1
                out.retries += 1
                limit = self._max_attempts
                if kind is VerdictKind.NO_SUCH_HOST:
                    limit = min(limit, _NO_SUCH_HOST_ATTEMPTS)
                if failures >= limit:
                    raise DeliveryError(
                        f"Braze did not take a request after {failures} attempts "
                        f"({verdict.message})",
                        "check --endpoint, the network and Braze's status page; the same "
                        "command resumes where this run stopped",
                    )
                wait_s = self.backoff(failures)
                self._on_retry(RetryNotice(failures, limit, verdict.message, wait_s))
                self._sleep(wait_s)
                continue
            if kind is VerdictKind.AUTH:
                raise AuthError(
                    verdict.message,
                    f"check the key, that it has the {self._permission} permission, and "
                    "that --endpoint is your workspace's instance",
                )
            raise DeliveryError(verdict.message, "check --endpoint")


def _split(body: bytes) -> list[tuple[bytes, dict[str, int]]] | None:
    """Two bodies, the first and second half of the objects in body order, and the index
    offset of each array's part; None when a single object is too large by itself."""
    arrays = loads(body)
    # Halve the objects, not each array: halving arrays of one object each leaves the
    # first part empty and the second equal to the whole, which 413s again forever.
    objects = [(name, obj) for name, array in arrays.items() for obj in array]
    if len(objects) <= 1:
        return None
    middle = len(objects) // 2
    parts = []
    offsets: dict[str, int] = {}
    for half in (objects[:middle], objects[middle:]):
        part: dict[str, list] = {}
        for name, obj in half:
            part.setdefault(name, []).append(obj)
        parts.append((dumps(part), dict(offsets)))
        for name, array in part.items():
            offsets[name] = offsets.get(name, 0) + len(array)
    return parts


def _compose(outer: dict[str, int] | None, inner: dict[str, int]) -> dict[str, int]:
    return {name: (outer or {}).get(name, 0) + inner.get(name, 0) for name in _ARRAYS}


def _shift(refusals, offsets: dict[str, int] | None) -> list[Refusal]:
    if not offsets:
        return list(refusals)
    return [Refusal(r.array, r.index + offsets.get(r.array or "", 0), r.reason) for r in refusals]


def _whole(body: bytes, reason: str, offsets: dict[str, int] | None) -> list[Refusal]:
    if not offsets:
        return [Refusal(None, None, reason)]
    arrays = loads(body)
    return [
        Refusal(name, offsets.get(name, 0) + index, reason)
        for name, objects in arrays.items()
        for index in range(len(objects))
    ]
