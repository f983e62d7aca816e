"""One parsed HTTP request in, one answer out: routing, authorization, rate limits, faults,
the /users/* endpoints and the /_fake/* admin endpoints. Knows nothing about sockets.
"""

from __future__ import annotations

import hmac
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

# The fake owns its own JSON and time checks instead of sharing segreplay's helpers: it
# stands for the other side of the wire, and a shared bug must not pass on both sides.
import orjson

from segreplay.fake.config import (
    _ARRAYS,
    KINDS,
    MAX_EXTERNAL_ID_BYTES,
    MAX_IDS,
    MAX_OBJECTS,
    FakeBrazeConfig,
    RateLimitReset,
    RequestRecord,
)
from segreplay.fake.faults import _Faults, _FixedWindow
from segreplay.fake.store import _Store
from segreplay.fake.validation import _REASONS_BY_KIND, _alias_key

_DELETE_ARRAYS = (
    ("external_ids", "external_id"),
    ("user_aliases", "user_alias"),
    ("braze_ids", "braze_id"),
)
_NOTHING_VALID = "Valid data must be provided in the 'attributes', 'events', or 'purchases' fields."


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

    def __init__(self, config: FakeBrazeConfig, clock=time.time) -> None:
        self.config = config
        self._clock = clock
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
        self._user_ops_window = _FixedWindow(
            self.config.user_ops_rate_limit, self.config.user_ops_rate_window_s
        )
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
            now = self._clock()
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
        given = [name for name, _ in _DELETE_ARRAYS if payload.get(name) is not None]
        if len(given) > 1:
            # Braze's page: only one kind of identifier in a single request.
            return _fatal(400, "Only one of external_ids, user_aliases or braze_ids may be given")
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
                if field_name == "external_id" and len(value.encode()) > MAX_EXTERNAL_ID_BYTES:
                    return _fatal(400, f"'{name}' holds an id longer than 987 bytes")
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
            # Either may be an external_id or a user_alias (Braze's page): an anonymous
            # visitor's second device joins its user by merge, alias into external_id.
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
                    "deleted": self.store.deleted(),
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
