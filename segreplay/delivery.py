"""Schedules requests to /users/track: up to `concurrency` in flight on worker threads,
and never two at once for a user whose objects must arrive in order.

Answers wait in finished futures until the pipeline's loop pulls them (`answers`), so
state is only ever written on that loop's thread, between chunks of lines.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import httpx

from segreplay.batching import Batch
from segreplay.client import TRACK_PATH, BrazeClient
from segreplay.config import DeliveryOptions
from segreplay.retry import Abandoned, RequestBudget, RetryNotice, RetryPolicy
from segreplay.sink import Answer


class BrazeSink:
    """Delivers batches to Braze; see the module docstring. Tests inject the transport,
    sleep, random source and clock; `shared_pause` lets `--workers` share a 429 (see
    RequestBudget)."""

    def __init__(
        self,
        options: DeliveryOptions,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        shared_pause=None,
    ) -> None:
        self._concurrency = options.concurrency
        # Waits (backoff, the rate budget) end early when the run stops, so no worker
        # keeps the process alive after a stop. Tests inject a sleep that records.
        self._stopping = threading.Event()
        sleep = sleep or self._wait_unless_stopped
        self.budget = RequestBudget(
            options.rate_requests, options.rate_seconds, clock, sleep, shared_pause
        )
        self._notices: deque[RetryNotice] = deque()
        self._policy = RetryPolicy(
            self.budget,
            max_attempts=options.max_attempts,
            reserve=options.concurrency,
            sleep=sleep,
            rng=rng,
            stopping=self._stopping.is_set,
            on_retry=self._notices.append,
            backoff_base_s=options.backoff_base_s,
        )
        self._client = BrazeClient(
            options.endpoint, options.api_key, options.timeout_s, options.concurrency, transport
        )
        self._post = functools.partial(self._client.post, TRACK_PATH)
        self._pool = ThreadPoolExecutor(options.concurrency, thread_name_prefix="braze")
        self._in_flight: dict[Future, Batch] = {}
        self._users_in_flight: set[str] = set()
        self.error: BaseException | None = None  # what stopped delivery, once it has
        self.unsent = 0  # submitted, then abandoned by a stop before any attempt

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def has_room(self, batch: Batch) -> bool:
        return len(self._in_flight) < self._concurrency and self._users_in_flight.isdisjoint(
            batch.ordered_users
        )

    def submit(self, batch: Batch) -> None:
        future = self._pool.submit(self._deliver, batch)
        self._in_flight[future] = batch
        self._users_in_flight.update(batch.ordered_users)

    def answers(self, timeout: float | None = 0) -> list[Answer]:
        if not self._in_flight:
            return []
        done, _ = wait(self._in_flight, timeout=timeout, return_when=FIRST_COMPLETED)
        answers = []
        for future in done:
            batch = self._in_flight.pop(future)
            self._users_in_flight.difference_update(batch.ordered_users)
            try:
                answers.append(future.result())
            except Abandoned as abandoned:
                # Never answered: its lines stay unacknowledged and are read again.
                self.unsent += not abandoned.sent
            except BaseException as error:  # noqa: BLE001 - the pipeline raises it
                if self.error is None:
                    self.error = error
                self.stop()
        return answers

    def notices(self) -> list[RetryNotice]:
        """Failed attempts since the last call, oldest first."""
        notices = []
        while self._notices:
            notices.append(self._notices.popleft())
        return notices

    @property
    def budget_waits(self) -> int:
        return self.budget.waits

    def stop(self) -> None:
        self._stopping.set()

    def close(self) -> None:
        self.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def _wait_unless_stopped(self, seconds: float) -> None:
        if self._stopping.wait(seconds):
            raise Abandoned(sent=False)  # deliver() says whether an attempt was made

    def _deliver(self, batch: Batch) -> Answer:
        delivered = self._policy.deliver(self._post, batch.body)
        return Answer(batch, delivered.bodies, delivered.refusals, delivered.retries,
                      delivered.rate_limited)  # fmt: skip
