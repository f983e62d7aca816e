"""The Braze HTTP client: request budget, retries, and every answer classified in one place.

`BrazeSink` takes sealed batches from the pipeline, keeps up to `concurrency` requests in
flight on worker threads, and hands each outcome back on the pipeline's thread, so state
is only ever written there. A user's attribute updates (and an alias's objects) are never
in two requests in flight at once, so Braze applies them in the order they were decided.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import httpx

from segreplay import __version__
from segreplay.batching import ARRAYS, Batch
from segreplay.config import DeliveryOptions
from segreplay.errors import AuthError, DeliveryError
from segreplay.jsonutil import JSONDecodeError, dumps, loads
from segreplay.ledger import Refusal, Settle
from segreplay.reporting import Summary

TRACK_PATH = "/users/track"
_BACKOFF_BASE_S = 0.5
_BACKOFF_CAP_S = 30.0
_MAX_RATE_LIMIT_WAITS = 200  # 429s for one request before giving up: about ten minutes
_RESET_MARGIN_S = 0.05  # Braze's reset is whole seconds; arrive just after it, not before
_EPOCH_THRESHOLD = 1e9  # X-RateLimit-Reset above this is an epoch, below it seconds


# answers ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do about one answer. `kind` is one of:
    accepted   refusals name the objects Braze refused (the rest are stored)
    refused    400: nothing in the request was accepted; dead-letter all of it
    too_large  413: split the request and send the halves
    rate_limited, retry   send the same request again after `wait_s` (None: back off)
    auth, fatal           stop the run"""

    kind: str
    message: str = ""
    refusals: tuple[Refusal, ...] = ()
    wait_s: float | None = None


def classify(status: int, headers: httpx.Headers, body: bytes, now: float) -> Verdict:
    """The one place that reads Braze's answers (braze-api.md, "Answers")."""
    if status in (200, 201, 202):
        payload = _json_object(body)
        refusals = tuple(
            Refusal(error.get("input_array"), error.get("index"), str(error.get("type", "")))
            for error in payload.get("errors") or ()
            if isinstance(error, dict) and isinstance(error.get("index"), int)
        )
        return Verdict("accepted", refusals=refusals)
    message = _message(body) or f"HTTP {status}"
    if status == 429:
        return Verdict("rate_limited", message, wait_s=rate_limit_wait(headers, now))
    if status >= 500:
        return Verdict("retry", f"Braze answered {status}: {message}")
    if status in (401, 403):
        return Verdict("auth", f"Braze refused the API key ({status}: {message})")
    if status == 413:
        return Verdict("too_large", message)
    if status == 400:
        return Verdict("refused", message)
    return Verdict("fatal", f"Braze answered {status}: {message}")


def rate_limit_wait(headers: httpx.Headers, now: float) -> float | None:
    """Seconds until Braze takes requests again, from whichever header it sent."""
    for name in ("x-ratelimit-retry-after", "retry-after"):
        seconds = _float_header(headers, name)
        if seconds is not None:
            return max(seconds, 0.0) + _RESET_MARGIN_S
    reset = _float_header(headers, "x-ratelimit-reset")
    if reset is None:
        return None
    if reset > _EPOCH_THRESHOLD:
        return max(reset - now, 0.0) + _RESET_MARGIN_S
    return max(reset, 0.0) + _RESET_MARGIN_S


def _float_header(headers: httpx.Headers, name: str) -> float | None:
    value = headers.get(name)  # httpx.Headers ignore case
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _json_object(body: bytes) -> dict:
    try:
        payload = loads(body) if body else {}
    except JSONDecodeError:
        return {}
    return payload if isinstance(payload, dict) else {}


def _message(body: bytes) -> str:
    payload = _json_object(body)
    message = payload.get("message")
    if isinstance(message, str) and message:
        return message[:300]
    return body[:300].decode("utf-8", "replace").strip()


# the request budget -------------------------------------------------------------------


class RequestBudget:
    """At most `limit` requests in any `window_s` seconds (a sliding log), a shared pause
    after a 429, and a slow-down when Braze says the window is nearly spent."""

    def __init__(self, limit: int, window_s: float, clock=time.monotonic, sleep=time.sleep):
        self._limit = limit
        self._window_s = window_s
        self._clock = clock
        self._sleep = sleep
        self._sent: deque[float] = deque()
        self._lock = threading.Lock()
        self._paused_until = 0.0
        self.waits = 0

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + seconds)

    def observe(self, headers: httpx.Headers, now: float, reserve: int) -> None:
        """Slow down before Braze has to say no: when fewer than `reserve` requests are
        left in its window, wait for the window to reset."""
        remaining = _float_header(headers, "x-ratelimit-remaining")
        if remaining is not None and remaining <= reserve:
            wait_s = rate_limit_wait(headers, now)
            if wait_s is not None:
                self.pause(min(wait_s, 60.0))

    def take(self) -> None:
        """Block until one more request may go."""
        while True:
            with self._lock:
                now = self._clock()
                while self._sent and now - self._sent[0] >= self._window_s:
                    self._sent.popleft()
                wait_s = self._paused_until - now
                if wait_s <= 0 and len(self._sent) >= self._limit:
                    wait_s = self._sent[0] + self._window_s - now
                if wait_s <= 0:
                    self._sent.append(now)
                    return
                self.waits += 1
            self._sleep(wait_s)


# the sink -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Outcome:
    batch: Batch
    refusals: list[Refusal] = field(default_factory=list)
    retries: int = 0
    rate_limited: int = 0


class BrazeSink:
    """Delivers batches to /users/track with up to `concurrency` requests in flight."""

    def __init__(
        self,
        options: DeliveryOptions,
        settle: Settle,
        summary: Summary,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self._options = options
        self._settle = settle
        self._summary = summary
        # Waits (backoff, rate budget) end early when the run stops, so no worker keeps
        # the process alive after Ctrl-C. Tests inject a sleep that records instead.
        self._stopping = threading.Event()
        self._sleep = sleep or self._wait_unless_stopped
        self._budget = RequestBudget(options.rate_requests, options.rate_seconds, sleep=self._sleep)
        # The transport, not a Client: every request is the same POST, and a Client's
        # per-request machinery (redirects, cookies, auth, hooks) cost a third of the CPU
        # a request takes. Tests swap in httpx.MockTransport here.
        self._transport = transport or httpx.HTTPTransport(
            limits=httpx.Limits(max_connections=options.concurrency), retries=0
        )
        self._url = httpx.URL(options.endpoint + TRACK_PATH)
        self._headers = httpx.Headers(
            {
                "Authorization": f"Bearer {options.api_key}",
                "Content-Type": "application/json",
                "X-Braze-Bulk": "true",
                "User-Agent": f"segreplay/{__version__}",
            }
        )
        timeout = options.timeout_s
        self._extensions = {
            "timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
        }
        self._pool = ThreadPoolExecutor(options.concurrency, thread_name_prefix="braze")
        self._in_flight: dict[Future, Batch] = {}
        self._users_in_flight: set[str] = set()
        self._fatal: BaseException | None = None
        self._closed = False  # after Ctrl-C or a fatal error: workers stop retrying

    def submit(self, batch: Batch) -> None:
        while self._in_flight and (
            len(self._in_flight) >= self._options.concurrency
            or not self._users_in_flight.isdisjoint(batch.ordered_users)
        ):
            self._collect(block=True)
        self._raise_if_failed()
        future = self._pool.submit(self._deliver, batch)
        self._in_flight[future] = batch
        self._users_in_flight.update(batch.ordered_users)
        # Answers are settled when a slot is needed, not as each arrives: several then
        # share one state transaction. An answered request keeps its slot until then, so
        # what a crash can resend is still at most `concurrency` requests.

    def finish(self) -> None:
        try:
            while self._in_flight:
                self._collect(block=True)
            self._raise_if_failed()
        finally:
            self.close()

    def close(self) -> None:
        self._closed = True
        self._stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._transport.close()

    def _wait_unless_stopped(self, seconds: float) -> None:
        if self._stopping.wait(seconds):
            raise DeliveryError("the run was stopped")

    def _raise_if_failed(self) -> None:
        if self._fatal is not None:
            # Let what is in flight land and be recorded before stopping.
            while self._in_flight:
                self._collect(block=True)
            error, self._fatal = self._fatal, None
            raise error

    def _collect(self, block: bool) -> None:
        """Settle every finished request, in one state transaction."""
        if not self._in_flight:
            return
        done, _ = wait(self._in_flight, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        answers = []
        for future in done:
            batch = self._in_flight.pop(future)
            self._users_in_flight.difference_update(batch.ordered_users)
            try:
                outcome = future.result()
            except BaseException as error:  # noqa: BLE001 - re-raised by _raise_if_failed
                self._fatal = self._fatal or error
                continue
            self._summary.retries += outcome.retries
            self._summary.rate_limited += outcome.rate_limited
            answers.append((outcome.batch, outcome.refusals))
        if answers:
            self._settle(answers)

    # worker threads ------------------------------------------------------------------

    def _deliver(self, batch: Batch) -> _Outcome:
        outcome = _Outcome(batch)
        self._send(batch.body, batch, outcome, offsets=None)
        return outcome

    def _send(self, body: bytes, batch: Batch, outcome: _Outcome, offsets) -> None:
        """Send one body until Braze takes it; record refusals against `batch`, shifting
        indexes by `offsets` when the body is a part of the batch (after a 413)."""
        failures = 0
        while True:
            if self._fatal is not None or self._closed:
                raise DeliveryError("stopped: another request failed, or the run was stopped")
            self._budget.take()
            try:
                request = httpx.Request(
                    "POST", self._url, headers=self._headers, content=body,
                    extensions=self._extensions,
                )  # fmt: skip
                response = self._transport.handle_request(request)
                try:
                    answer = response.read()
                finally:
                    response.close()
                now = time.time()
                verdict = classify(response.status_code, response.headers, answer, now)
                self._budget.observe(response.headers, now, reserve=self._options.concurrency)
            except httpx.TransportError as error:
                verdict = Verdict("retry", f"{type(error).__name__}: {error}")
            if verdict.kind == "accepted":
                batch.answered_bodies.append(body)
                outcome.refusals.extend(_shift(verdict.refusals, offsets))
                return
            if verdict.kind == "refused":
                batch.answered_bodies.append(body)
                outcome.refusals.extend(_whole(body, verdict.message, offsets))
                return
            if verdict.kind == "too_large":
                halves = _split(body)
                if halves is None:
                    batch.answered_bodies.append(body)
                    outcome.refusals.extend(_whole(body, "request too large", offsets))
                    return
                for half, half_offsets in halves:
                    self._send(half, batch, outcome, _compose(offsets, half_offsets))
                return
            if verdict.kind == "rate_limited":
                outcome.rate_limited += 1
                if outcome.rate_limited > _MAX_RATE_LIMIT_WAITS:
                    raise DeliveryError(
                        "Braze kept answering 429 (rate limited) for one request",
                        "lower --rate, or run when less other traffic shares the workspace",
                    )
                self._budget.pause(verdict.wait_s if verdict.wait_s is not None else _backoff(0))
                continue
            if verdict.kind == "retry":
                failures += 1
                outcome.retries += 1
                if failures >= self._options.max_attempts:
                    raise DeliveryError(
                        f"Braze did not take a request after {failures} attempts "
                        f"({verdict.message})",
                        "check the endpoint and Braze's status page; the same command "
                        "resumes where this run stopped",
                    )
                self._sleep(_backoff(failures))
                continue
            if verdict.kind == "auth":
                raise AuthError(
                    verdict.message,
                    "check the key, that it has the users.track permission, and that "
                    "--endpoint is your workspace's instance",
                )
            raise DeliveryError(verdict.message, "check --endpoint")


def _backoff(failures: int) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2**failures))


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
    return {name: (outer or {}).get(name, 0) + inner.get(name, 0) for name in ARRAYS}


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


def braze_sink(options: DeliveryOptions, transport: httpx.BaseTransport | None = None):
    """A `make_sink` for `run_import`: delivery to Braze with these options."""

    def make_sink(settle: Settle, summary: Summary) -> BrazeSink:
        return BrazeSink(options, settle, summary, transport=transport)

    return make_sink
