"""A local stand-in for Braze's REST API: a real HTTP/1.1 server on 127.0.0.1 that enforces
Braze's contract (limits, errors, headers), injects faults on demand and records what it
accepted, for tests, rehearsals (`segreplay fake-braze`) and benchmarks.

Endpoints (all POST, `Authorization: Bearer <key>`, JSON body with Content-Length):
  /users/track     attributes/events/purchases, 75-object limit, 4 MB body limit
  /users/delete    {"external_ids", "user_aliases", "braze_ids"}, at most 50 ids
  /users/identify  {"aliases_to_identify": [...], "merge_behavior": "none"|"merge"}, at most 50
  /users/merge     {"merge_updates": [...]}, at most 50, answers 202
Their answers carry X-RateLimit-Limit/-Remaining/-Reset; /users/track allows a fixed window
of `rate_limit` requests per `rate_window_s` seconds and answers 429 beyond it.

Admin endpoints, no key needed (GET unless noted), for tests and scripts in other processes:
  /_fake/stats               counters only (cheap): requests, connections, by_status,
                             by_path, accepted per kind, rejected_objects, rate_limited,
                             injected faults by name, bytes_received
  /_fake/profiles            {"profiles": [...], "not_applied": n, "ignored_attributes": [...]}
  /_fake/accepted[?kind=K]   {"accepted": [{"request", "kind", "object"}, ...]}
  /_fake/requests            {"requests": [{"request", "method", "path", "arrived_at", "status"}]}
  /_fake/rate-limit-resets   {"resets": [{"request", "sent_at", "reset_at"}, ...]}
  POST /_fake/reset          forget everything recorded (configuration and log file stay)

A profile is {"braze_id", "external_id", "user_aliases", "attributes", "events",
"purchases"}: attributes applied in request order (null unsets), events and purchases kept
as the objects sent, so a resent event shows up twice. `not_applied` counts accepted objects
that changed nothing (an alias's default `_update_existing_only` for an unknown user).

Kinds of accepted objects: attribute, event, purchase (each valid /users/track object),
delete (each identifier of a delete request), identify (each valid alias item), merge (each
merge update). With `log_path`, each is also appended to that file as one JSON line,
`{"request": <request sequence number>, "kind": "<kind>", "object": {...}}`, flushed after
every request so another process can follow it.

Times (`arrived_at`, `sent_at`, `reset_at`) are UTC epoch seconds. The API key is never
echoed, logged or printed.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from typing import IO, Any
from urllib.parse import parse_qs

# The fake owns its own JSON and time checks instead of sharing segreplay's helpers: it
# stands for the other side of the wire, and a shared bug must not pass on both sides.
import orjson

__all__ = [
    "FakeBraze",
    "FakeBrazeConfig",
    "RateLimitReset",
    "RequestRecord",
    "serve",
]

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
_MAX_HEAD_BYTES = 64 * 1024

_ARRAYS = (("attributes", "attribute"), ("events", "event"), ("purchases", "purchase"))
_DELETE_ARRAYS = (
    ("external_ids", "external_id"),
    ("user_aliases", "user_alias"),
    ("braze_ids", "braze_id"),
)
_IDENTIFIER_REQUIRED = "'external_id', 'braze_id', 'user_alias', 'email' or 'phone' is required"
_NOTHING_VALID = "Valid data must be provided in the 'attributes', 'events', or 'purchases' fields."
_RESERVED_PROPERTY_KEYS = frozenset(("time", "event_name"))
_NOT_ATTRIBUTES = frozenset(("external_id", "user_alias", "braze_id", "_update_existing_only"))
_STANDARD_ATTRIBUTES = frozenset(
    (
        "first_name", "last_name", "email", "phone", "dob", "gender", "country", "home_city",
        "language", "time_zone", "image_url", "email_subscribe", "push_subscribe",
        "push_tokens", "current_location", "subscription_groups",
    )
)  # fmt: skip
_GENDERS = frozenset(("M", "F", "O", "N", "P"))
_SUBSCRIPTION_STATES = frozenset(("opted_in", "subscribed", "unsubscribed"))


# ---------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class FakeBrazeConfig:
    """Flags of `segreplay fake-braze` map 1:1 onto these fields (`--rate-429` -> rate_429)."""

    api_key: str = field(default="fake-key", repr=False)
    port: int = 0
    batch_limit: str = "combined"
    rate_limit: int = 3000
    rate_window_s: float = 3.0
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


# ------------------------------------------------------------------------------- validation


# Validation runs for every object, thousands of requests a second: the hot path wants only
# the reason an object is refused (None when valid), with the common valid case first so
# it costs a few dict lookups. The profile key is worked out again when the store replays.


def _identifier(obj: dict) -> tuple[tuple | None, str | None]:
    """(the profile key an object addresses, None) or (None, why it addresses none)."""
    external_id = obj.get("external_id")
    alias = obj.get("user_alias")
    braze_id = obj.get("braze_id")
    given = (external_id is not None) + (alias is not None) + (braze_id is not None)
    if given > 1:
        return None, "only one of 'external_id', 'braze_id' or 'user_alias' may be given"
    if external_id is not None:
        if type(external_id) is not str or not external_id:
            return None, "'external_id' is not valid"
        if len(external_id.encode()) > MAX_EXTERNAL_ID_BYTES:
            return None, "'external_id' is longer than 987 bytes"
        return ("external_id", external_id), None
    if alias is not None:
        key = _alias_key(alias)
        if key is None:
            return None, "'user_alias' must have string 'alias_name' and 'alias_label'"
        return key, None
    if braze_id is not None:
        if type(braze_id) is not str or not braze_id:
            return None, "'braze_id' is not valid"
        return ("braze_id", braze_id), None
    for name in ("email", "phone"):
        value = obj.get(name)
        if value is not None:
            if type(value) is not str or not value:
                return None, f"'{name}' is not valid"
            return (name, value), None
    return None, _IDENTIFIER_REQUIRED


def _alias_key(alias: Any) -> tuple | None:
    if type(alias) is not dict:
        return None
    name = alias.get("alias_name")
    label = alias.get("alias_label")
    if type(name) is not str or type(label) is not str or not name or not label:
        return None
    return ("alias", label, name)


def _common_reason(obj: dict) -> str | None:
    """Identifier and `_update_existing_only`, which every kind of object shares."""
    external_id = obj.get("external_id")
    # 246 characters cannot exceed 987 bytes in UTF-8: no need to encode in the common case.
    if not (
        type(external_id) is str
        and 0 < len(external_id) <= 246
        and obj.get("user_alias") is None
        and obj.get("braze_id") is None
    ):
        reason = _identifier(obj)[1]
        if reason is not None:
            return reason
    flag = obj.get("_update_existing_only")
    if flag is not None and type(flag) is not bool:
        return "'_update_existing_only' is not valid"
    return None


_fromisoformat = datetime.fromisoformat


def _time_reason(value: Any) -> str | None:
    try:
        _fromisoformat(value)
    except (TypeError, ValueError):
        return "'time' is required" if value is None else "'time' is not valid"
    return None


_KNOWN_PROPERTY_KEYS: dict[tuple, str | None] = {}  # key tuple -> reason, bounded below


def _properties_reason(properties: Any) -> str | None:
    if properties is None:
        return None
    if type(properties) is not dict:
        return "'properties' is not valid"
    # Events of one name share their property keys: check each distinct key set once.
    keys = tuple(properties)
    try:
        return _KNOWN_PROPERTY_KEYS[keys]
    except KeyError:
        pass
    reason = None
    for key in keys:
        if not key:
            reason = "property keys must not be empty"
        elif len(key) > MAX_KEY_CHARS:
            reason = "property key longer than 255 characters"
        elif key[0] == "$":
            reason = "property keys must not start with '$'"
        elif key in _RESERVED_PROPERTY_KEYS:
            reason = f"property key '{key}' is reserved"
        else:
            continue
        break
    if len(_KNOWN_PROPERTY_KEYS) < 10_000:
        _KNOWN_PROPERTY_KEYS[keys] = reason
    return reason


def _event_reason(event: dict) -> str | None:
    name = event.get("name")
    if type(name) is not str or not name:
        return "'name' is required" if name is None else "'name' is not valid"
    return (
        _common_reason(event)
        or _time_reason(event.get("time"))
        or _properties_reason(event.get("properties"))
    )


def _purchase_reason(purchase: dict) -> str | None:
    product_id = purchase.get("product_id")
    if product_id is None:
        return "'product_id' is required"
    if type(product_id) is not str or not product_id or len(product_id) > MAX_KEY_CHARS:
        return "'product_id' is not valid"
    currency = purchase.get("currency")
    if currency is None:
        return "'currency' is required"
    if type(currency) is not str or len(currency) != 3 or not currency.isascii():
        return "'currency' is not valid"
    if not currency.isalpha():
        return "'currency' is not valid"
    price = purchase.get("price")
    if price is None:
        return "'price' is required"
    if type(price) not in (int, float) or not math.isfinite(price):
        return "'price' is not valid"
    quantity = purchase.get("quantity")
    if quantity is not None and (type(quantity) is not int or not 1 <= quantity <= 100):
        return "'quantity' is not valid"
    return (
        _common_reason(purchase)
        or _time_reason(purchase.get("time"))
        or _properties_reason(purchase.get("properties"))
    )


def _attributes_reason(attributes: dict) -> str | None:
    # Standard fields are checked loosely; over-long custom keys and values are not errors
    # (Braze silently skips them): the store counts them as ignored instead.
    reason = _common_reason(attributes)
    if reason is not None:
        return reason
    gender = attributes.get("gender")
    if gender is not None and (type(gender) is not str or gender not in _GENDERS):
        return "'gender' is not valid"
    dob = attributes.get("dob")
    if dob is not None and not _is_date(dob):
        return "'dob' is not valid"
    for name in ("email_subscribe", "push_subscribe"):
        state = attributes.get(name)
        if state is not None and (type(state) is not str or state not in _SUBSCRIPTION_STATES):
            return f"'{name}' is not valid"
    return None


def _is_date(value: Any) -> bool:
    if type(value) is not str or len(value) != 10:
        return False
    try:
        date.fromisoformat(value)
    except ValueError:
        return False
    return True


_REASONS_BY_KIND = {
    "attribute": _attributes_reason,
    "event": _event_reason,
    "purchase": _purchase_reason,
}


# ------------------------------------------------------------------------------------ store


class _Profile:
    __slots__ = ("braze_id", "external_id", "aliases", "attributes", "events", "purchases")

    def __init__(self, braze_id: str) -> None:
        self.braze_id = braze_id
        self.external_id: str | None = None
        self.aliases: list[tuple[str, str]] = []  # (label, name)
        self.attributes: dict[str, Any] = {}
        self.events: list[dict] = []
        self.purchases: list[dict] = []

    def keys(self) -> list[tuple]:
        keys = [("braze_id", self.braze_id)]
        if self.external_id is not None:
            keys.append(("external_id", self.external_id))
        keys.extend(("alias", label, name) for label, name in self.aliases)
        for name in ("email", "phone"):
            if type(self.attributes.get(name)) is str:
                keys.append((name, self.attributes[name]))
        return keys

    def as_dict(self) -> dict:
        return {
            "braze_id": self.braze_id,
            "external_id": self.external_id,
            "user_aliases": [{"alias_name": n, "alias_label": lb} for lb, n in self.aliases],
            "attributes": dict(self.attributes),
            "events": list(self.events),
            "purchases": list(self.purchases),
        }


class _Store:
    """Profiles and accepted objects, journaled on arrival and built when asked for.

    Keeping every parsed object costs about 80 KB and 250 us a request (allocation, and the
    garbage collector walking ever more objects), which would halve the fake's throughput.
    So a /users/track request journals only its raw body and the indexes it refused, and
    queries replay the journal in arrival order: profiles come out exactly as if applied
    live. Not thread-safe: `_App` holds the lock around every call.
    """

    def __init__(self, log_path: str | None) -> None:
        self._log: IO[bytes] | None = open(log_path, "ab") if log_path else None  # noqa: SIM115
        self.clear()

    def clear(self) -> None:
        self._journal: list[tuple] = []  # (replay function, arguments) not yet applied
        self._index: dict[tuple, _Profile] = {}
        self._accepted: dict[str, list[tuple[int, dict]]] = {kind: [] for kind in KINDS}
        self._not_applied = 0
        self._ignored_attributes: list[dict] = []
        self._profiles_created = 0

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- arrival (hot path)

    def add_track(self, seq: int, body: bytes, refused: set, valid: list[tuple[str, dict]]):
        """A /users/track request with `valid` (kind, object) pairs; `refused` holds the
        (array name, index) of the others."""
        self._journal.append((self._replay_track, (seq, body, refused)))
        self._write_log(seq, valid)

    def add_identify(self, seq: int, items: list[tuple[tuple, tuple, dict]], merge: bool):
        self._journal.append((self._replay_identify, (items, merge)))
        self._keep(seq, "identify", [item for _, _, item in items])

    def add_merge(self, seq: int, pairs: list[tuple[tuple, tuple, dict]]) -> None:
        self._journal.append((self._replay_merge, (pairs,)))
        self._keep(seq, "merge", [update for _, _, update in pairs])

    def delete(self, seq: int, keys: list[tuple[tuple, dict]]) -> int:
        """Delete now (the answer counts the users that existed); returns that count."""
        self._catch_up()
        deleted = 0
        for key, _ in keys:
            profile = self._index.get(key)
            if profile is not None:
                self._drop(profile)
                deleted += 1
        self._keep(seq, "delete", [identifier for _, identifier in keys])
        return deleted

    def _keep(self, seq: int, kind: str, objects: list[dict]) -> None:
        self._accepted[kind].extend((seq, obj) for obj in objects)
        self._write_log(seq, [(kind, obj) for obj in objects])

    def _write_log(self, seq: int, items: list[tuple[str, dict]]) -> None:
        if self._log is None:
            return
        dumps = orjson.dumps
        lines = [dumps({"request": seq, "kind": kind, "object": obj}) for kind, obj in items]
        lines.append(b"")
        self._log.write(b"\n".join(lines))
        # Flushed per request: other processes follow the log while the fake runs.
        self._log.flush()

    # -- queries

    def profiles(self) -> list[_Profile]:
        self._catch_up()
        unique = {id(profile): profile for profile in self._index.values()}
        return list(unique.values())

    def profile(self, key: tuple) -> _Profile | None:
        self._catch_up()
        return self._index.get(key)

    def accepted(self, kind: str) -> list[tuple[int, dict]]:
        self._catch_up()
        return self._accepted[kind]

    def not_applied(self) -> int:
        self._catch_up()
        return self._not_applied

    def ignored_attributes(self) -> list[dict]:
        self._catch_up()
        return list(self._ignored_attributes)

    # -- replay

    def _catch_up(self) -> None:
        journal, self._journal = self._journal, []
        for replay, arguments in journal:
            replay(*arguments)

    def _replay_track(self, seq: int, body: bytes, refused: set) -> None:
        payload = orjson.loads(body)
        for name, kind in _ARRAYS:
            accepted = self._accepted[kind]
            for index, obj in enumerate(payload.get(name) or ()):
                if refused and (name, index) in refused:
                    continue
                accepted.append((seq, obj))
                key, _ = _identifier(obj)
                profile = self._profile_for(key, obj)
                if profile is None:
                    self._not_applied += 1
                elif kind == "event":
                    profile.events.append(obj)
                elif kind == "purchase":
                    profile.purchases.append(obj)
                else:
                    self._apply_attributes(seq, profile, obj)

    def _profile_for(self, key: tuple, obj: dict) -> _Profile | None:
        profile = self._index.get(key)
        if profile is not None:
            return profile
        update_existing_only = obj.get("_update_existing_only")
        if update_existing_only is None:
            # Braze's defaults: an external_id creates its profile, an alias needs false.
            update_existing_only = key[0] == "alias"
        if update_existing_only or key[0] == "braze_id":
            return None  # Braze assigns braze_ids: an unknown one cannot be created
        profile = self._new_profile()
        if key[0] == "external_id":
            profile.external_id = key[1]
        elif key[0] == "alias":
            profile.aliases.append((key[1], key[2]))
        else:
            profile.attributes[key[0]] = key[1]
        self._index[key] = profile
        return profile

    def _new_profile(self) -> _Profile:
        self._profiles_created += 1
        profile = _Profile(f"{self._profiles_created:024x}")
        self._index[("braze_id", profile.braze_id)] = profile
        return profile

    def _apply_attributes(self, seq: int, profile: _Profile, obj: dict) -> None:
        attributes = profile.attributes
        for key, value in obj.items():
            if key in _NOT_ATTRIBUTES:
                continue
            if value is None:
                self._unindex_contact(profile, key)
                attributes.pop(key, None)
                continue
            if key not in _STANDARD_ATTRIBUTES:
                reason = None
                if len(key) > MAX_KEY_CHARS:
                    reason = "key longer than 255 characters"
                elif type(value) is str and len(value) > MAX_KEY_CHARS:
                    reason = "value longer than 255 characters"
                if reason is not None:
                    self._ignored_attributes.append(
                        {"request": seq, "key": key[:MAX_KEY_CHARS], "reason": reason}
                    )
                    continue
            elif key in ("email", "phone") and type(value) is str:
                self._unindex_contact(profile, key)
                self._index[(key, value)] = profile
            attributes[key] = value

    def _unindex_contact(self, profile: _Profile, key: str) -> None:
        if key in ("email", "phone"):
            old = (key, profile.attributes.get(key))
            if self._index.get(old) is profile:
                del self._index[old]

    def _replay_identify(self, items: list[tuple[tuple, tuple, dict]], merge: bool) -> None:
        for external_key, alias_key, _ in items:
            identified = self._index.get(external_key)
            alias_profile = self._index.get(alias_key)
            if identified is None and alias_profile is not None:
                alias_profile.external_id = external_key[1]
                self._index[external_key] = alias_profile
                continue
            if identified is None:
                identified = self._new_profile()
                identified.external_id = external_key[1]
                self._index[external_key] = identified
            if alias_profile is None:
                identified.aliases.append(alias_key[1:])
                self._index[alias_key] = identified
            elif alias_profile is not identified:
                # Braze's default ("none") orphans the alias profile's data; "merge" keeps it.
                self._fold(identified, alias_profile, with_data=merge, move_aliases=True)

    def _replay_merge(self, pairs: list[tuple[tuple, tuple, dict]]) -> None:
        for gone_key, keep_key, _ in pairs:
            gone = self._index.get(gone_key)
            keep = self._index.get(keep_key)
            # Merging is asynchronous at Braze: unknown users are skipped, not reported.
            if gone is not None and keep is not None and gone is not keep:
                self._fold(keep, gone, with_data=True, move_aliases=False)

    def _fold(self, keep: _Profile, gone: _Profile, with_data: bool, move_aliases: bool):
        """`gone` disappears into `keep`, handing over the attributes only it has and its
        events and purchases (with_data), and its aliases (move_aliases)."""
        if with_data:
            for key, value in gone.attributes.items():
                keep.attributes.setdefault(key, value)
            keep.events.extend(gone.events)
            keep.purchases.extend(gone.purchases)
        self._drop(gone)
        for label, name in gone.aliases if move_aliases else ():
            if (label, name) not in keep.aliases:
                keep.aliases.append((label, name))
        for key in keep.keys():
            self._index.setdefault(key, keep)

    def _drop(self, profile: _Profile) -> None:
        for key in profile.keys():
            if self._index.get(key) is profile:
                del self._index[key]


# --------------------------------------------------------------------------- rate and faults


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


# -------------------------------------------------------------------------------------- app


@dataclass(slots=True)
class _Answer:
    status: int
    payload: Any = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    drop: bool = False


def _fatal(status: int, message: str, errors: list | None = None) -> _Answer:
    payload: dict[str, Any] = {"message": message}
    if errors is not None:
        payload["errors"] = errors
    return _Answer(status, payload)


class _App:
    """Turns one parsed HTTP request into an answer; knows nothing about sockets."""

    def __init__(self, config: FakeBrazeConfig) -> None:
        self.config = config
        self.lock = threading.Lock()
        self._expected_auth = b"bearer " + config.api_key.encode()
        self._faults = _Faults(config)
        self.store = _Store(config.log_path)
        self._routes = {
            "/users/track": self._users_track,
            "/users/delete": self._users_delete,
            "/users/identify": self._users_identify,
            "/users/merge": self._users_merge,
        }
        self.clear()

    def clear(self) -> None:
        self._track_window = _FixedWindow(self.config.rate_limit, self.config.rate_window_s)
        self._user_ops_window = _FixedWindow(USER_OPS_RATE_LIMIT, USER_OPS_RATE_WINDOW_S)
        self.store.clear()
        self.requests: list[RequestRecord] = []
        self.resets: list[RateLimitReset] = []
        self._by_status: dict[str, int] = {}
        self._by_path: dict[str, int] = {}
        self._injected = dict.fromkeys(self.config.fault_rates(), 0)
        self._accepted = dict.fromkeys(KINDS, 0)
        self.connections = 0
        self._rate_limited = 0
        self._rejected_objects = 0
        self._bytes_received = 0

    def close(self) -> None:
        with self.lock:
            self.store.close()

    # -- one request

    def handle(self, method: str, target: str, headers: dict, body: bytes, too_large: bool):
        path, _, query = target.partition("?")
        with self.lock:
            if path.startswith("/_fake/"):
                return self._admin(method, path, query)
            now = time.time()
            seq = len(self.requests) + 1
            answer = self._api(seq, now, method, path, headers, body, too_large)
            status = None if answer.drop else answer.status
            self.requests.append(RequestRecord(seq, method, path, now, status))
            key = str(status) if status is not None else "dropped"
            self._by_status[key] = self._by_status.get(key, 0) + 1
            self._by_path[path] = self._by_path.get(path, 0) + 1
            self._bytes_received += len(body)
            return answer

    def _api(self, seq, now, method, path, headers, body, too_large) -> _Answer:
        route = self._routes.get(path)
        if route is None:
            return _fatal(404, f"No such endpoint: {path}")
        if method != "POST":
            return _fatal(405, f"{path} takes POST")
        if not self._authorized(headers.get(b"authorization", b"")):
            # Braze echoes the key here; the fake never does.
            return _fatal(401, "Invalid API key")
        window = self._track_window if path == "/users/track" else self._user_ops_window
        allowed, remaining, window_end = window.take(now)
        rate_headers = self._rate_headers(window, remaining, window_end, now)
        if not allowed:
            self._rate_limited += 1
            return self._too_many(seq, now, window_end, rate_headers)
        fault = self._faults.draw()
        if fault is not None:
            self._injected[fault] += 1
        if fault == "429":
            return self._too_many(seq, now, window_end, rate_headers)
        if fault == "5xx":
            return _fatal(self._faults.server_error(), "Internal Server Error")
        if fault == "drop":
            return _Answer(0, drop=True)
        answer = self._process(seq, route, headers, body, too_large)
        answer.headers.extend(rate_headers)
        if fault == "processed_5xx":
            return _fatal(self._faults.server_error(), "Internal Server Error")
        if fault == "processed_drop":
            return _Answer(0, drop=True)
        return answer

    def _authorized(self, authorization: bytes) -> bool:
        # Constant-time compare; only the scheme is case-insensitive.
        scheme, _, key = authorization.partition(b" ")
        return hmac.compare_digest(scheme.lower() + b" " + key.strip(), self._expected_auth)

    def _rate_headers(self, window, remaining, window_end, now) -> list[tuple[str, str]]:
        if self.config.reset_style == "epoch":
            reset = str(math.ceil(window_end))
        else:
            reset = str(max(1, math.ceil(window_end - now)))
        return [
            ("X-RateLimit-Limit", str(window.limit)),
            ("X-RateLimit-Remaining", str(max(0, remaining))),
            ("X-RateLimit-Reset", reset),
        ]

    def _too_many(self, seq, now, window_end, rate_headers) -> _Answer:
        if self.config.reset_style == "epoch":
            reset_at = float(math.ceil(window_end))
            headers = rate_headers
        else:
            wait_s = max(1, math.ceil(window_end - now))
            reset_at = now + wait_s
            headers = [*rate_headers, ("X-Ratelimit-Retry-After", str(wait_s))]
        self.resets.append(RateLimitReset(seq, now, reset_at))
        answer = _fatal(429, "Rate limit exceeded")
        answer.headers = headers
        return answer

    def _process(self, seq, route, headers, body, too_large) -> _Answer:
        if too_large:
            return _fatal(413, "Payload Too Large: the body is over 4 MB")
        content_type = headers.get(b"content-type", b"").lower()
        if not content_type.startswith(b"application/json"):
            return _fatal(400, "Content-Type must be application/json")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _fatal(400, "Bad Request: the body is not valid JSON")
        if type(payload) is not dict:
            return _fatal(400, "Bad Request: the body must be a JSON object")
        return route(seq, payload, body)

    # -- endpoints

    def _users_track(self, seq: int, payload: dict, body: bytes) -> _Answer:
        arrays = []
        for name, kind in _ARRAYS:
            objects = payload.get(name)
            if objects is None:
                continue
            if type(objects) is not list:
                return _fatal(400, f"'{name}' must be an array")
            arrays.append((name, kind, objects))
        counts = [len(objects) for _, _, objects in arrays]
        if self.config.batch_limit == "combined":
            over = sum(counts) > MAX_OBJECTS
        else:
            over = any(count > MAX_OBJECTS for count in counts)
        if over:
            return _fatal(400, "Max Input Length Exceeded")
        errors = []
        refused = set()
        valid = []
        processed = {}
        for name, kind, objects in arrays:
            reason_for = _REASONS_BY_KIND[kind]
            before = len(valid)
            for index, obj in enumerate(objects):
                if type(obj) is dict:
                    reason = reason_for(obj)
                else:
                    reason = f"{kind} must be an object"
                if reason is None:
                    valid.append((kind, obj))
                else:
                    errors.append({"type": reason, "input_array": name, "index": index})
                    refused.add((name, index))
            processed[f"{name}_processed"] = len(valid) - before
        self._rejected_objects += len(errors)
        if not valid:
            return _fatal(400, _NOTHING_VALID, errors)
        self.store.add_track(seq, body, refused, valid)
        for kind, _ in valid:
            self._accepted[kind] += 1
        answer: dict[str, Any] = {"message": "success", **processed}
        if errors:
            answer["errors"] = errors
        return _Answer(201, answer)

    def _users_delete(self, seq: int, payload: dict, body: bytes) -> _Answer:
        keys = []
        for name, field_name in _DELETE_ARRAYS:
            values = payload.get(name)
            if values is None:
                continue
            if type(values) is not list:
                return _fatal(400, f"'{name}' must be an array")
            for value in values:
                if field_name == "user_alias":
                    key = _alias_key(value)
                elif type(value) is str and value:
                    key = (field_name, value)
                else:
                    key = None
                if key is None:
                    return _fatal(400, f"'{name}' holds an invalid identifier")
                keys.append((key, {field_name: value}))
        if not keys:
            return _fatal(400, "No users to delete: give external_ids, user_aliases or braze_ids")
        if len(keys) > MAX_IDS:
            return _fatal(400, "The max number of ids per request was exceeded")
        deleted = self.store.delete(seq, keys)
        self._accepted["delete"] += len(keys)
        return _Answer(201, {"message": "success", "deleted": deleted})

    def _users_identify(self, seq: int, payload: dict, body: bytes) -> _Answer:
        items = payload.get("aliases_to_identify")
        if type(items) is not list or not items:
            return _fatal(400, "'aliases_to_identify' must be a non-empty array")
        if len(items) > MAX_IDS:
            return _fatal(
                400, "The max number of external_ids and aliases per request was exceeded"
            )
        merge_behavior = payload.get("merge_behavior", "none")
        if merge_behavior not in ("none", "merge"):
            return _fatal(400, "'merge_behavior' must be 'none' or 'merge'")
        errors = []
        identified = []
        for index, item in enumerate(items):
            external_id = item.get("external_id") if type(item) is dict else None
            alias_key = _alias_key(item.get("user_alias")) if type(item) is dict else None
            if type(external_id) is not str or not external_id or alias_key is None:
                reason = "'external_id' and 'user_alias' are required"
                errors.append(
                    {"type": reason, "input_array": "aliases_to_identify", "index": index}
                )
                continue
            identified.append((("external_id", external_id), alias_key, item))
        if not identified:
            return _fatal(400, "No valid aliases to identify", errors)
        self.store.add_identify(seq, identified, merge=merge_behavior == "merge")
        self._accepted["identify"] += len(identified)
        answer: dict[str, Any] = {"message": "success", "aliases_processed": len(identified)}
        if errors:
            answer["errors"] = errors
        return _Answer(201, answer)

    def _users_merge(self, seq: int, payload: dict, body: bytes) -> _Answer:
        updates = payload.get("merge_updates")
        if type(updates) is not list or any(type(update) is not dict for update in updates):
            return _fatal(400, "'merge_updates' must be an array of objects")
        if len(updates) > MAX_IDS:
            return _fatal(400, "a single request may not contain more than 50 merge updates")
        pairs = []
        for update in updates:
            if set(update) != {"identifier_to_merge", "identifier_to_keep"}:
                return _fatal(
                    400,
                    "'merge_updates' must only have 'identifier_to_merge' and 'identifier_to_keep'",
                )
            gone = _merge_identifier(update["identifier_to_merge"])
            keep = _merge_identifier(update["identifier_to_keep"])
            if gone is None or keep is None:
                return _fatal(
                    400,
                    "identifiers must be objects with an 'external_id' property that is a "
                    "string, or 'user_alias' property that is an object",
                )
            if gone[0] != keep[0]:
                return _fatal(400, "identifiers must be objects of the same type")
            pairs.append((gone, keep, update))
        self.store.add_merge(seq, pairs)
        self._accepted["merge"] += len(pairs)
        return _Answer(202, {"message": "success"})

    # -- admin and queries (callers hold the lock)

    def _admin(self, method: str, path: str, query: str) -> _Answer:
        if path == "/_fake/reset":
            if method != "POST":
                return _fatal(405, f"{path} takes POST")
            self.clear()
            return _Answer(200, {"message": "reset"})
        if method != "GET":
            return _fatal(405, f"{path} takes GET")
        if path == "/_fake/stats":
            return _Answer(200, self.stats())
        if path == "/_fake/profiles":
            return _Answer(
                200,
                {
                    "profiles": self.profiles(),
                    "not_applied": self.store.not_applied(),
                    "ignored_attributes": self.store.ignored_attributes(),
                },
            )
        if path == "/_fake/accepted":
            kinds = parse_qs(query).get("kind")
            if kinds and kinds[0] not in KINDS:
                return _fatal(400, f"kind must be one of {', '.join(KINDS)}")
            return _Answer(200, {"accepted": self.accepted(kinds[0] if kinds else None)})
        if path == "/_fake/requests":
            return _Answer(200, {"requests": [_record_dict(r) for r in self.requests]})
        if path == "/_fake/rate-limit-resets":
            return _Answer(200, {"resets": [_record_dict(r) for r in self.resets]})
        return _fatal(404, f"No such endpoint: {path}")

    def stats(self) -> dict:
        # Counters only: stats must stay cheap however much the journal holds.
        return {
            "requests": len(self.requests),
            "connections": self.connections,
            "by_status": dict(self._by_status),
            "by_path": dict(self._by_path),
            "accepted": dict(self._accepted),
            "rejected_objects": self._rejected_objects,
            "rate_limited": self._rate_limited,
            "injected": dict(self._injected),
            "bytes_received": self._bytes_received,
        }

    def profiles(self) -> list[dict]:
        return [profile.as_dict() for profile in self.store.profiles()]

    def profile(self, key: tuple) -> dict | None:
        profile = self.store.profile(key)
        return None if profile is None else profile.as_dict()

    def accepted(self, kind: str | None) -> list[dict]:
        kinds = KINDS if kind is None else (kind,)
        return [
            {"request": seq, "kind": name, "object": obj}
            for name in kinds
            for seq, obj in self.store.accepted(name)
        ]

    def accepted_objects(self, kind: str) -> list[dict]:
        return [obj for _, obj in self.store.accepted(kind)]


def _merge_identifier(identifier: Any) -> tuple | None:
    if type(identifier) is not dict or len(identifier) != 1:
        return None
    if "external_id" in identifier:
        external_id = identifier["external_id"]
        return ("external_id", external_id) if type(external_id) is str and external_id else None
    return _alias_key(identifier.get("user_alias"))


def _record_dict(record: RequestRecord | RateLimitReset) -> dict:
    return {name: getattr(record, name) for name in record.__dataclass_fields__}


# ------------------------------------------------------------------------------------- HTTP

_REASONS = {
    200: "OK", 201: "Created", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized",
    404: "Not Found", 405: "Method Not Allowed", 411: "Length Required",
    413: "Payload Too Large", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
}  # fmt: skip


def _encode(answer: _Answer, keep_alive: bool) -> bytes:
    body = orjson.dumps(answer.payload)
    lines = [
        f"HTTP/1.1 {answer.status} {_REASONS.get(answer.status, 'Unknown')}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    lines.extend(f"{name}: {value}" for name, value in answer.headers)
    if not keep_alive:
        lines.append("Connection: close")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1") + body


class _Head:
    __slots__ = ("method", "target", "headers", "length", "keep_alive", "too_large")

    def __init__(self, method, target, headers, length, keep_alive, too_large) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.length = length
        self.keep_alive = keep_alive
        self.too_large = too_large


class _Connection(asyncio.Protocol):
    """HTTP/1.1 with Content-Length bodies and keep-alive; one request at a time per
    connection (a delayed answer pauses reading, which keeps pipelined answers in order)."""

    def __init__(self, app: _App, connections: set, latency_s: float) -> None:
        self._app = app
        self._connections = connections
        self._latency_s = latency_s
        self._buffer = bytearray()
        self._head: _Head | None = None
        self._discard = 0  # bytes of an over-limit body still to skip
        self._waiting = False
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._connections.add(self)
        with self._app.lock:
            self._app.connections += 1

    def connection_lost(self, exc) -> None:
        self._connections.discard(self)
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._waiting:
            self._process()

    def _process(self) -> None:
        buffer = self._buffer
        while self._transport is not None and not self._waiting:
            if self._head is None:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > _MAX_HEAD_BYTES:
                        self._fail(431, "Request header too large")
                    return
                head = self._parse_head(bytes(buffer[:end]))
                del buffer[: end + 4]
                if head is None:
                    return
                self._head = head
            head = self._head
            if head.too_large:
                # Read and forget the body, so the client sees the 413 and not a reset.
                skipped = min(len(buffer), self._discard)
                del buffer[:skipped]
                self._discard -= skipped
                if self._discard:
                    return
                body = b""
            else:
                if len(buffer) < head.length:
                    return
                body = bytes(buffer[: head.length])
                del buffer[: head.length]
            self._head = None
            answer = self._app.handle(head.method, head.target, head.headers, body, head.too_large)
            if self._latency_s:
                self._waiting = True
                self._transport.pause_reading()
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self._latency_s, self._deliver, answer, head)
            else:
                self._deliver(answer, head)

    def _deliver(self, answer: _Answer, head: _Head) -> None:
        transport = self._transport
        if transport is None:
            return
        if answer.drop or not head.keep_alive:
            if not answer.drop:
                transport.write(_encode(answer, keep_alive=False))
            transport.close()
            self._transport = None
            return
        transport.write(_encode(answer, keep_alive=True))
        if self._waiting:
            self._waiting = False
            self._timer = None
            transport.resume_reading()
            self._process()

    def _parse_head(self, raw: bytes) -> _Head | None:
        lines = raw.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._fail(400, "Malformed request line")
            return None
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                self._fail(400, "Malformed header line")
                return None
            headers[name.strip().lower()] = value.strip()
        if b"transfer-encoding" in headers:
            self._fail(411, "Send the body with Content-Length; chunked bodies are not supported")
            return None
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            length = -1
        if length < 0:
            self._fail(400, "Invalid Content-Length")
            return None
        connection = headers.get(b"connection", b"").lower()
        if parts[2] == b"HTTP/1.1":
            keep_alive = connection != b"close"
        else:
            keep_alive = connection == b"keep-alive"
        too_large = length > MAX_BODY_BYTES
        if too_large:
            self._discard = length
        if headers.get(b"expect", b"").lower() == b"100-continue":
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        method = parts[0].decode("latin-1")
        target = parts[1].decode("latin-1")
        return _Head(method, target, headers, length, keep_alive, too_large)

    def _fail(self, status: int, message: str) -> None:
        """A request the parser cannot frame: answer and close, the stream is unusable."""
        self._transport.write(_encode(_fatal(status, message), keep_alive=False))
        self._transport.close()
        self._transport = None


# ------------------------------------------------------------------------------ lifecycle


async def _listen(app: _App, port: int, connections: set) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    latency_s = app.config.latency_ms / 1000
    return await loop.create_server(
        lambda: _Connection(app, connections, latency_s), "127.0.0.1", port, reuse_address=True
    )


def _close_all(server: asyncio.Server, connections: set) -> None:
    server.close()
    for connection in list(connections):
        connection.close()


class FakeBraze:
    """The fake in a background thread, for tests:

    with FakeBraze(rate_5xx=0.2, seed=7) as braze:
        run_client(braze.url, braze.config.api_key)
        assert braze.stats()["accepted"]["event"] == 75
    """

    def __init__(self, config: FakeBrazeConfig | None = None, **overrides: Any) -> None:
        config = config or FakeBrazeConfig()
        self.config = replace(config, **overrides) if overrides else config
        self._app = _App(self.config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeBraze:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self._run(ready))
            except BaseException as error:  # surfaced in start(), not lost in the thread
                failure.append(error)
                ready.set()

        self._thread = threading.Thread(target=run, name="fake-braze", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    async def _run(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        connections: set = set()
        server = await _listen(self._app, self.config.port, connections)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        try:
            await self._stopped.wait()
        finally:
            _close_all(server, connections)

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout=10)
        self._thread = None
        self._app.close()

    def __enter__(self) -> FakeBraze:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- queries, safe from any thread

    def stats(self) -> dict:
        with self._app.lock:
            return self._app.stats()

    def profiles(self) -> list[dict]:
        with self._app.lock:
            return self._app.profiles()

    def profile(
        self,
        external_id: str | None = None,
        *,
        user_alias: dict | None = None,
        braze_id: str | None = None,
        email: str | None = None,
        phone: str | None = None,
    ) -> dict | None:
        """The profile one identifier points at, or None."""
        if external_id is not None:
            key = ("external_id", external_id)
        elif user_alias is not None:
            key = ("alias", user_alias["alias_label"], user_alias["alias_name"])
        elif braze_id is not None:
            key = ("braze_id", braze_id)
        elif email is not None:
            key = ("email", email)
        elif phone is not None:
            key = ("phone", phone)
        else:
            raise ValueError("give one identifier")
        with self._app.lock:
            return self._app.profile(key)

    def accepted(self, kind: str) -> list[dict]:
        """The accepted objects of one kind (see KINDS), in arrival order, as sent."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        with self._app.lock:
            return self._app.accepted_objects(kind)

    def requests(self) -> list[RequestRecord]:
        """Every API request (not admin ones), in arrival order."""
        with self._app.lock:
            return list(self._app.requests)

    @property
    def rate_limit_resets(self) -> list[RateLimitReset]:
        with self._app.lock:
            return list(self._app.resets)

    def early_requests(self, grace_s: float = 0.0) -> list[RequestRecord]:
        """Requests that arrived after a 429 (plus `grace_s` for ones already in flight)
        but before the reset that 429 advertised: a well-behaved client sends none."""
        with self._app.lock:
            requests, resets = list(self._app.requests), list(self._app.resets)
        early = []
        for request in requests:
            if any(
                reset.request != request.request
                and reset.sent_at + grace_s < request.arrived_at < reset.reset_at
                for reset in resets
            ):
                early.append(request)
        return early

    def ignored_attributes(self) -> list[dict]:
        """Custom attributes accepted but not applied (key or string value over 255)."""
        with self._app.lock:
            return self._app.store.ignored_attributes()

    def not_applied(self) -> int:
        """Accepted objects that changed nothing: `_update_existing_only` (an alias's
        default) for a user that did not exist, or an unknown braze_id."""
        with self._app.lock:
            return self._app.store.not_applied()

    def reset(self) -> None:
        with self._app.lock:
            self._app.clear()


def serve(config: FakeBrazeConfig) -> None:
    """Run in the foreground until SIGINT or SIGTERM (`segreplay fake-braze`)."""
    asyncio.run(_serve(config))


async def _serve(config: FakeBrazeConfig) -> None:
    app = _App(config)
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    connections: set = set()
    server = await _listen(app, config.port, connections)
    port = server.sockets[0].getsockname()[1]
    # The one print of the package outside cli.py: scripts wait for this line.
    print(f"fake Braze listening on http://127.0.0.1:{port}", file=sys.stderr, flush=True)
    try:
        await stopped.wait()
    finally:
        _close_all(server, connections)
        app.close()
