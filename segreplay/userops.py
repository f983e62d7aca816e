"""Posts to Braze's user-management endpoints (/users/delete, /users/identify and
/users/merge): one body at a time through one BrazeClient, under the one budget those
endpoints share, with the retry, 429 and 401/403 rules of /users/track (retry.py).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from segreplay.client import BrazeClient, Verdict, VerdictKind
from segreplay.config import DeliveryOptions
from segreplay.retry import Abandoned, Delivered, RequestBudget, RetryPolicy

_POLL_S = 0.2  # a wait (backoff, budget) looks at stop requests this often


@dataclass(slots=True)
class Posted:
    """A body's final answer: accepted (with Braze's JSON answer), or refused for
    `reason`; and what it took to get there."""

    accepted: bool
    reason: str = ""
    answer: dict = field(default_factory=dict)
    retries: int = 0
    rate_limited: int = 0


class UserOps:
    """Braze gives a workspace's user-management endpoints one budget, 20,000 requests a
    minute shared (braze-api.md): one UserOps, one budget, every such request."""

    def __init__(
        self,
        options: DeliveryOptions,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        stopping: Callable[[], bool] = lambda: False,
        shared_pause=None,
    ) -> None:
        """`stopping()` true: waits end early and no request is sent again (raising
        retry.Abandoned). Tests inject the transport, sleep, random source and clock;
        `shared_pause` lets `--workers` share a 429 (RequestBudget)."""
        self._options = options
        self._stopping = stopping
        self._sleep = sleep or self._wait_unless_stopped
        self._rng = rng
        self.budget = RequestBudget(options.rate_requests, options.rate_seconds, clock,
                                    self._sleep, shared_pause)  # fmt: skip
        self._client = BrazeClient(options.endpoint, options.api_key, options.timeout_s, 1,
                                   transport)  # fmt: skip
        self._policies: dict[str, RetryPolicy] = {}

    def deliver(self, path: str, body: bytes, permission: str) -> Delivered:
        """Send `body` to `path` until Braze answers it for good: the answered bodies and
        the items Braze refused (by index). Raises as `post` does."""
        return self._policy(permission).deliver(self._post_once(path, []), body)

    def post(self, path: str, body: bytes, permission: str) -> Posted:
        """Send `body` to `path` until Braze answers it for good. Raises AuthError on
        401/403 (naming `permission`), DeliveryError when retries or 429s run out,
        retry.Abandoned when stopping."""
        accepted: list[Verdict] = []
        delivered = self._policy(permission).deliver(self._post_once(path, accepted), body)
        refusal = delivered.refusals[0].reason if delivered.refusals else ""
        return Posted(
            accepted=not delivered.refusals,
            reason=refusal,
            answer=(accepted[-1].answer or {}) if accepted else {},
            retries=delivered.retries,
            rate_limited=delivered.rate_limited,
        )

    def _post_once(self, path: str, accepted: list[Verdict]) -> Callable[[bytes], Verdict]:

        def post_once(body: bytes) -> Verdict:
            verdict = self._client.post(path, body)
            if verdict.kind is VerdictKind.TOO_LARGE:
                # retry.py halves /users/track arrays on a 413. At most 50 items of at most
                # 987 bytes never reach Braze's 4 MB: the body is wrong, not too big.
                return Verdict(VerdictKind.REFUSED, f"request too large ({verdict.message})")
            if verdict.kind is VerdictKind.ACCEPTED:
                accepted.append(verdict)
            return verdict

        return post_once

    def close(self) -> None:
        self._client.close()

    def _policy(self, permission: str) -> RetryPolicy:
        policy = self._policies.get(permission)
        if policy is None:
            options = self._options
            policy = self._policies[permission] = RetryPolicy(
                self.budget,
                max_attempts=options.max_attempts,
                reserve=1,
                sleep=self._sleep,
                rng=self._rng,
                stopping=self._stopping,
                permission=permission,
                backoff_base_s=options.backoff_base_s,
            )
        return policy

    def _wait_unless_stopped(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, _POLL_S))
        raise Abandoned
