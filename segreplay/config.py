"""Settings as frozen dataclasses, defaults as named constants, validated in one place.

The CLI builds these from options; library callers build them directly.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from segreplay.errors import UsageError
from segreplay.times import parse_time

DEFAULT_STATE_PATH = "segreplay-state.sqlite"
DEFAULT_DEAD_LETTER_PATH = "segreplay-dead-letter.jsonl"
DEFAULT_RATE = "1500/3"  # half of Braze's 3,000 per 3 s: live traffic shares the budget
# /users/delete, /users/identify, /users/merge, /users/alias/*: 20,000 a minute shared by
# the workspace; half of it, as for /users/track.
DEFAULT_USER_OPS_RATE = "10000/60"
MAX_IDS_PER_REQUEST = 50
DEFAULT_CONCURRENCY = 8
DEFAULT_STOP_GRACE_S = 20.0  # under Kubernetes' 30 s between SIGTERM and SIGKILL
MAX_OBJECTS_PER_REQUEST = 75
MAX_BODY_BYTES = 4_000_000  # Braze answers 413 above 4 MB; stay under with margin
MAX_LINE_BYTES = 1 << 20  # Segment caps a call at 32 KB; a 1 MiB line is not a Segment call

PAGE_MODES = ("all", "named", "none")
ANONYMOUS_MODES = ("skip", "alias")
BATCH_LIMITS = ("combined", "per-type")

_INSTANCES = {
    **{f"US-0{n}": f"rest.iad-0{n}.braze.com" for n in range(1, 9)},
    "US-10": "rest.us-10.braze.com",
    "EU-01": "rest.fra-01.braze.eu",
    "EU-02": "rest.fra-02.braze.eu",
    "AU-01": "rest.au-01.braze.com",
    "ID-01": "rest.id-01.braze.com",
    "JP-01": "rest.jp-01.braze.com",
    "KR-01": "rest.kr-01.braze.com",
}
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}


@dataclass(frozen=True)
class MappingOptions:
    """How Segment calls become Braze objects (mapping.md)."""

    pages: str = "all"
    screens: str = "none"
    anonymous: str = "skip"
    update_existing_only: bool = False
    purchase_event_too: bool = False
    log_purchase_when_revenue_present: bool = False
    since: str | None = None  # canonical UTC time, inclusive
    until: str | None = None  # canonical UTC time, exclusive
    events_allow: frozenset[str] = frozenset()
    events_deny: frozenset[str] = frozenset()

    def decides_lines(self) -> str:
        """The options that decide which lines are sent and as what, as a short readable
        string: a file read with other ones is read again (cli.md, "Options change what a
        file means")."""
        parts = [f"pages={self.pages}", f"screens={self.screens}", f"anonymous={self.anonymous}"]
        if self.since or self.until:
            parts.append(f"window={self.since or ''}..{self.until or ''}")
        if self.events_allow:
            parts.append("events-allow=" + "|".join(sorted(self.events_allow)))
        if self.events_deny:
            parts.append("events-deny=" + "|".join(sorted(self.events_deny)))
        if self.purchase_event_too:
            parts.append("purchase-event-too")
        if self.log_purchase_when_revenue_present:
            parts.append("log-purchase-when-revenue-present")
        return " ".join(parts)

    def __post_init__(self) -> None:
        _check_choice("--pages", self.pages, PAGE_MODES)
        _check_choice("--screens", self.screens, PAGE_MODES)
        _check_choice("--anonymous", self.anonymous, ANONYMOUS_MODES)


@dataclass(frozen=True)
class DeliveryOptions:
    """Where and how fast to send. The key never appears in a repr."""

    endpoint: str  # resolved base URL, e.g. https://rest.iad-03.braze.com
    api_key: str = field(repr=False)
    rate_requests: int = 1500
    rate_seconds: float = 3.0
    concurrency: int = DEFAULT_CONCURRENCY
    timeout_s: float = 30.0
    max_attempts: int = 8
    backoff_base_s: float = 0.5  # the first wait after a 5xx or a network error, doubling


@dataclass(frozen=True)
class RunConfig:
    sources: tuple[str, ...]
    state_path: str = DEFAULT_STATE_PATH
    dry_run: bool = False
    diff: bool = False
    output_path: str | None = None
    dead_letter_path: str = DEFAULT_DEAD_LETTER_PATH
    batch_limit: str = "combined"
    mapping: MappingOptions = field(default_factory=MappingOptions)
    delivery: DeliveryOptions | None = None  # None only for a dry run
    # /users/identify and /users/merge (--anonymous alias): their own budget, --user-ops-rate
    user_ops: DeliveryOptions | None = None
    suppressed: frozenset[str] = frozenset()  # --suppress: user keys never to send
    # (index, count): decide only the lines of this shard's users (sharding.py); None
    # for the whole archive. `state_path` is then the shard's own file.
    shard: tuple[int, int] | None = None
    # --state s3://...: how often the work copy is uploaded (bucket_state.py)
    state_upload_every_s: float = 300.0

    def decides_lines(self) -> str:
        """MappingOptions.decides_lines, and the --suppress list as a digest (the ids are
        never written to the state): a file read while someone was suppressed is read
        again once they are not, so their lines are sent then."""
        options = self.mapping.decides_lines()
        if not self.suppressed:
            return options
        listed = "\n".join(sorted(self.suppressed)).encode()
        return f"{options} suppress={hashlib.blake2b(listed, digest_size=4).hexdigest()}"

    def __post_init__(self) -> None:
        _check_choice("--batch-limit", self.batch_limit, BATCH_LIMITS)
        if not self.sources:
            raise UsageError("no SOURCE given", "name a file, a directory, a glob or -")
        if self.diff and not self.dry_run:
            raise UsageError("--diff goes with --dry-run", "add --dry-run to see the diff")
        if not self.dry_run and self.delivery is None:
            raise UsageError(
                "no Braze endpoint and key",
                "pass --endpoint and --api-key (or BRAZE_REST_ENDPOINT and BRAZE_API_KEY), "
                "or use --dry-run",
            )


@dataclass(frozen=True)
class DeleteConfig:
    """`segreplay delete`: where the state and the dead letter are, and how to send."""

    state_path: str = DEFAULT_STATE_PATH
    dead_letter_path: str | None = DEFAULT_DEAD_LETTER_PATH
    dry_run: bool = False
    delivery: DeliveryOptions | None = None  # None only for a dry run

    def __post_init__(self) -> None:
        if not self.dry_run and self.delivery is None:
            raise UsageError(
                "no Braze endpoint and key",
                "pass --endpoint and --api-key (or BRAZE_REST_ENDPOINT and BRAZE_API_KEY), "
                "or use --dry-run",
            )


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{option} must be one of {', '.join(choices)}, not {value!r}")


def parse_rate(text: str, option: str = "--rate") -> tuple[int, float]:
    """`1500/3` -> (1500, 3.0): N requests per SECONDS."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*", text)
    if not match or int(match[1]) < 1 or float(match[2]) <= 0:
        raise UsageError(f"{option} must look like N/SECONDS, e.g. {DEFAULT_RATE}, not {text!r}")
    return int(match[1]), float(match[2])


def parse_window_time(option: str, text: str | None) -> str | None:
    if text is None:
        return None
    parsed = parse_time(text if "T" in text else f"{text}T00:00:00Z")
    if parsed is None:
        raise UsageError(f"{option} must be an ISO 8601 time, e.g. 2024-01-31T00:00:00Z")
    return parsed


def resolve_endpoint(text: str) -> str:
    """An instance name (`US-03`), a host or a URL -> the REST base URL, or a UsageError."""
    given = text.strip()
    right_form = "use an instance name such as US-03, or https://rest.iad-03.braze.com"
    if re.fullmatch(r"[A-Za-z]{2}-\d{2}", given):
        host = _INSTANCES.get(given.upper())
        if host is None:
            raise UsageError(
                f"unknown Braze instance {given!r}",
                f"known instances: {', '.join(_INSTANCES)}",
            )
        return f"https://{host}"
    if re.match(r"(?i)^https?://https?://", given):
        raise UsageError(f"the endpoint {given!r} has its scheme twice", right_form)
    if "://" not in given:
        given = f"https://{given}"
    parts = urlsplit(given)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise UsageError(f"{text!r} is not a Braze REST endpoint", right_form)
    if host.startswith("sdk.") or ".sdk." in host:
        raise UsageError(
            f"{host} is an SDK endpoint, not the REST API",
            "use the REST endpoint of the same instance, e.g. rest.iad-03.braze.com",
        )
    if parts.scheme == "http" and host not in LOOPBACK_HOSTS:
        raise UsageError(
            "plain http:// is only for a local fake Braze on a loopback host",
            "use https:// for a real workspace",
        )
    netloc = parts.netloc
    return f"{parts.scheme}://{netloc}".rstrip("/")
