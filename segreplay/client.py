"""The Braze HTTP client: posts one body and classifies the answer, in one place.

`BrazeClient.post` never retries and never raises for an answer: it returns a `Verdict`
that says what to do about it (retry.py decides how, delivery.py schedules the requests).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from segreplay import __version__
from segreplay.jsonutil import JSONDecodeError, loads
from segreplay.sink import Refusal

TRACK_PATH = "/users/track"
RESET_MARGIN_S = 0.05  # Braze's reset is whole seconds; arrive just after it, not before
_EPOCH_THRESHOLD = 1e9  # X-RateLimit-Reset above this is an epoch, below it seconds
# What getaddrinfo says when a name does not resolve (glibc and musl wordings).
_NO_SUCH_HOST = ("Name or service not known", "nodename nor servname", "No address associated",
                 "Temporary failure in name resolution", "[Errno -2]", "[Errno -3]",
                 "[Errno -5]", "[Errno 8]")  # fmt: skip


class VerdictKind(enum.Enum):
    ACCEPTED = "accepted"  # stored; `refusals` name the objects Braze refused
    REFUSED = "refused"  # 400: nothing was accepted; dead-letter all of it
    TOO_LARGE = "too_large"  # 413: split the request and send the halves
    RATE_LIMITED = "rate_limited"  # 429: send again after `wait_s` (None: back off)
    RETRY = "retry"  # 5xx or a network error: back off and send again
    NO_SUCH_HOST = "no_such_host"  # the endpoint's name does not resolve
    AUTH = "auth"  # 401/403: stop the run
    FATAL = "fatal"  # anything else: stop the run


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: VerdictKind
    message: str = ""
    refusals: tuple[Refusal, ...] = ()
    wait_s: float | None = None
    # Braze's X-RateLimit-Remaining, and the seconds until its window resets.
    remaining: float | None = None
    reset_s: float | None = None


def classify(status: int, headers: httpx.Headers, body: bytes, now: float) -> Verdict:
    """The one place that reads Braze's answers (braze-api.md, "Answers")."""
    remaining = _float_header(headers, "x-ratelimit-remaining")
    reset_s = rate_limit_wait(headers, now) if remaining is not None else None
    if status in (200, 201, 202):
        payload = _json_object(body)
        refusals = tuple(
            Refusal(error.get("input_array"), error.get("index"), str(error.get("type", "")))
            for error in payload.get("errors") or ()
            if isinstance(error, dict) and isinstance(error.get("index"), int)
        )
        return Verdict(VerdictKind.ACCEPTED, refusals=refusals, remaining=remaining,
                       reset_s=reset_s)  # fmt: skip
    message = _message(body) or f"HTTP {status}"
    if status == 429:
        return Verdict(VerdictKind.RATE_LIMITED, message, wait_s=rate_limit_wait(headers, now))
    if status >= 500:
        return Verdict(VerdictKind.RETRY, f"Braze answered {status}: {message}")
    if status in (401, 403):
        return Verdict(VerdictKind.AUTH, f"Braze refused the API key ({status}: {message})")
    if status == 413:
        return Verdict(VerdictKind.TOO_LARGE, message)
    if status == 400:
        return Verdict(VerdictKind.REFUSED, message)
    return Verdict(VerdictKind.FATAL, f"Braze answered {status}: {message}")


def classify_transport_error(error: httpx.TransportError, host: str) -> Verdict:
    message = f"{type(error).__name__}: {error}"
    if isinstance(error, httpx.ConnectError) and any(s in str(error) for s in _NO_SUCH_HOST):
        return Verdict(VerdictKind.NO_SUCH_HOST, f"the host {host} does not resolve ({message})")
    return Verdict(VerdictKind.RETRY, message)


def rate_limit_wait(headers: httpx.Headers, now: float) -> float | None:
    """Seconds until Braze takes requests again, from whichever header it sent."""
    for name in ("x-ratelimit-retry-after", "retry-after"):
        seconds = _float_header(headers, name)
        if seconds is not None:
            return max(seconds, 0.0) + RESET_MARGIN_S
    reset = _float_header(headers, "x-ratelimit-reset")
    if reset is None:
        return None
    if reset > _EPOCH_THRESHOLD:
        return max(reset - now, 0.0) + RESET_MARGIN_S
    return max(reset, 0.0) + RESET_MARGIN_S


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


class BrazeClient:
    """Posts bodies to one workspace. Thread-safe: worker threads share one client."""

    def __init__(
        self,
        endpoint: str,
        api_key: str,
        timeout_s: float = 30.0,
        connections: int = 8,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # The transport, not a Client: every request is the same POST, and a Client's
        # per-request machinery (redirects, cookies, auth, hooks) cost a third of the CPU
        # a request takes. Tests swap in httpx.MockTransport here.
        self._transport = transport or httpx.HTTPTransport(
            limits=httpx.Limits(max_connections=connections), retries=0
        )
        self._endpoint = endpoint
        self._urls: dict[str, httpx.URL] = {}  # parsed once per path, not per request
        self._host = httpx.URL(endpoint).host
        self._clock = clock
        self._headers = httpx.Headers(
            {
                "Authorization": f"Bearer {api_key}",
                "Content-Type": "application/json",
                "X-Braze-Bulk": "true",
                "User-Agent": f"segreplay/{__version__}",
            }
        )
        self._extensions = {
            "timeout": {"connect": timeout_s, "read": timeout_s, "write": timeout_s,
                        "pool": timeout_s}
        }  # fmt: skip

    def post(self, path: str, body: bytes) -> Verdict:
        """Send `body` once and say what Braze's answer (or the network) means."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self._endpoint + path)
        request = httpx.Request(
            "POST", url, headers=self._headers, content=body, extensions=self._extensions
        )
        try:
            response = self._transport.handle_request(request)
            try:
                answer = response.read()
            finally:
                response.close()
        except httpx.TransportError as error:
            return classify_transport_error(error, self._host)
        return classify(response.status_code, response.headers, answer, self._clock())

    def close(self) -> None:
        self._transport.close()
