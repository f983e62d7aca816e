"""The fake's settings (one field per `segreplay fake-braze` flag), Braze's limits as named
constants, and the records it keeps of requests and 429s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BATCH_LIMIT_MODES = ("combined", "per-type")
RESET_STYLES = ("epoch", "seconds")
KINDS = ("attribute", "event", "purchase", "delete", "identify", "merge")

MAX_OBJECTS = 75
# Braze says "4 MB"; the stricter decimal reading makes a client that packs up to 4 MiB fail
# here rather than in production.
MAX_BODY_BYTES = 4_000_000
MAX_IDS = 50
MAX_EXTERNAL_ID_BYTES = 987
MAX_KEY_CHARS = 255
USER_OPS_RATE_LIMIT = 20_000
USER_OPS_RATE_WINDOW_S = 60.0

_ARRAYS = (("attributes", "attribute"), ("events", "event"), ("purchases", "purchase"))


@dataclass(frozen=True)
class FakeBrazeConfig:
    """Flags of `segreplay fake-braze` map onto these fields (`--rate-429` -> rate_429;
    `--rate N/SECONDS` -> rate_limit, rate_window_s; `--user-ops-rate N/SECONDS` ->
    user_ops_rate_limit, user_ops_rate_window_s)."""

    api_key: str = field(default="fake-key", repr=False)
    port: int = 0
    batch_limit: str = "combined"
    rate_limit: int = 3000
    rate_window_s: float = 3.0
    # /users/delete, /users/identify and /users/merge share one budget (--user-ops-rate)
    user_ops_rate_limit: int = USER_OPS_RATE_LIMIT
    user_ops_rate_window_s: float = USER_OPS_RATE_WINDOW_S
    reset_style: str = "epoch"
    rate_429: float = 0.0
    rate_5xx: float = 0.0
    rate_processed_5xx: float = 0.0
    rate_drop: float = 0.0
    rate_processed_drop: float = 0.0
    latency_ms: float = 0.0
    seed: int = 0
    log_path: str | None = None

    def __post_init__(self) -> None:
        if not self.api_key:
            raise ValueError("api_key must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.batch_limit not in BATCH_LIMIT_MODES:
            raise ValueError(f"batch_limit must be one of {BATCH_LIMIT_MODES}")
        if self.reset_style not in RESET_STYLES:
            raise ValueError(f"reset_style must be one of {RESET_STYLES}")
        if self.rate_limit < 1 or self.rate_window_s <= 0:
            raise ValueError("rate_limit must be >= 1 and rate_window_s > 0")
        if self.user_ops_rate_limit < 1 or self.user_ops_rate_window_s <= 0:
            raise ValueError("user_ops_rate_limit must be >= 1 and user_ops_rate_window_s > 0")
        if self.latency_ms < 0:
            raise ValueError("latency_ms must be >= 0")
        rates = self.fault_rates()
        if any(not 0 <= rate <= 1 for rate in rates.values()) or sum(rates.values()) > 1:
            raise ValueError("fault rates must each be in 0..1 and add up to at most 1")

    def fault_rates(self) -> dict[str, float]:
        return {
            "429": self.rate_429,
            "5xx": self.rate_5xx,
            "processed_5xx": self.rate_processed_5xx,
            "drop": self.rate_drop,
            "processed_drop": self.rate_processed_drop,
        }


@dataclass(frozen=True)
class RequestRecord:
    request: int
    method: str
    path: str
    arrived_at: float
    status: int | None  # None: the connection was dropped without an answer


@dataclass(frozen=True)
class RateLimitReset:
    """One 429 sent: when, and the reset it advertised (as epoch seconds, rounded up)."""

    request: int
    sent_at: float
    reset_at: float
