"""Rate limiting and fault injection: a fixed request window aligned on the epoch, and one
seeded draw per request choosing its injected fault.
"""

from __future__ import annotations

import random

from segreplay.fake.config import FakeBrazeConfig


class _FixedWindow:
    """N requests per window, windows aligned on the epoch so resets are whole seconds."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._start = -1.0
        self._used = 0

    def take(self, now: float) -> tuple[bool, int, float]:
        """(allowed, remaining, window end) for one request arriving at `now`."""
        start = (now // self.window_s) * self.window_s
        if start != self._start:
            self._start = start
            self._used = 0
        allowed = self._used < self.limit
        if allowed:
            self._used += 1
        return allowed, self.limit - self._used, start + self.window_s


class _Faults:
    """One seeded draw per API request decides its fault, so a seed replays the same run."""

    def __init__(self, config: FakeBrazeConfig) -> None:
        self._rng = random.Random(config.seed)
        self._thresholds: list[tuple[float, str]] = []
        total = 0.0
        for name, rate in config.fault_rates().items():
            if rate > 0:
                total += rate
                self._thresholds.append((total, name))

    def draw(self) -> str | None:
        if not self._thresholds:
            return None
        roll = self._rng.random()
        for threshold, name in self._thresholds:
            if roll < threshold:
                return name
        return None

    def server_error(self) -> int:
        return self._rng.choice((500, 502, 503))
