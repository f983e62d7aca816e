"""segreplay.client without sockets: answers classified, rate-limit waits, and one post
over httpx.MockTransport."""

from __future__ import annotations

import httpx
import orjson
import pytest

from segreplay.client import RESET_MARGIN_S as MARGIN  # waits end just after the reset
from segreplay.client import BrazeClient, Verdict, VerdictKind, classify, rate_limit_wait
from segreplay.sink import Refusal

KEY = "sk-unit-7c1e0b"
NOW = 1_709_650_000.0  # an epoch in March 2024
TIME = "2024-03-05T14:03:22.083Z"


def _body(payload) -> bytes:
    return orjson.dumps(payload)


# ---------------------------------------------------------------------------- classify


@pytest.mark.parametrize(
    ("status", "payload", "expected"),
    [
        (
            201,
            {"message": "success", "events_processed": 2},
            Verdict(VerdictKind.ACCEPTED),
        ),
        (
            201,
            {
                "message": "success",
                "errors": [
                    {"type": "'time' is not valid", "input_array": "events", "index": 3},
                    {"type": "'currency' is required", "input_array": "purchases", "index": 0},
                ],
            },
            Verdict(
                VerdictKind.ACCEPTED,
                refusals=(
                    Refusal("events", 3, "'time' is not valid"),
                    Refusal("purchases", 0, "'currency' is required"),
                ),
            ),
        ),
        (202, {"message": "queued"}, Verdict(VerdictKind.ACCEPTED)),
        (
            400,
            {"message": "Max Input Length Exceeded"},
            Verdict(VerdictKind.REFUSED, "Max Input Length Exceeded"),
        ),
        (
            401,
            {"message": "Invalid API key"},
            Verdict(VerdictKind.AUTH, "Braze refused the API key (401: Invalid API key)"),
        ),
        (
            403,
            {"message": "Forbidden"},
            Verdict(VerdictKind.AUTH, "Braze refused the API key (403: Forbidden)"),
        ),
        (
            404,
            {"message": "No such endpoint: /users/trak"},
            Verdict(VerdictKind.FATAL, "Braze answered 404: No such endpoint: /users/trak"),
        ),
        (
            413,
            {"message": "Payload Too Large"},
            Verdict(VerdictKind.TOO_LARGE, "Payload Too Large"),
        ),
        (
            500,
            {"message": "Internal Server Error"},
            Verdict(VerdictKind.RETRY, "Braze answered 500: Internal Server Error"),
        ),  # fmt: skip
        (502, None, Verdict(VerdictKind.RETRY, "Braze answered 502: HTTP 502")),
        (
            503,
            {"message": "Unavailable"},
            Verdict(VerdictKind.RETRY, "Braze answered 503: Unavailable"),
        ),
    ],
)
def test_classify(status, payload, expected):
    body = b"" if payload is None else _body(payload)
    assert classify(status, httpx.Headers(), body, NOW) == expected


def test_classify_reads_a_message_that_is_not_json():
    verdict = classify(400, httpx.Headers(), b"<html>Bad Request</html>", NOW)
    assert verdict == Verdict(VerdictKind.REFUSED, "<html>Bad Request</html>")


def test_classify_429_carries_the_wait():
    verdict = classify(
        429, httpx.Headers({"Retry-After": "4"}), _body({"message": "Rate limit exceeded"}), NOW
    )
    assert verdict == Verdict(VerdictKind.RATE_LIMITED, "Rate limit exceeded", wait_s=4 + MARGIN)


def test_classify_reads_the_budget_left_on_an_accepted_answer():
    headers = httpx.Headers({"X-RateLimit-Remaining": "3", "X-RateLimit-Reset": "2"})
    verdict = classify(201, headers, _body({"message": "success"}), NOW)
    assert (verdict.remaining, verdict.reset_s) == (3.0, 2 + MARGIN)


def test_classify_429_without_any_header_leaves_the_wait_to_backoff():
    assert classify(429, httpx.Headers(), b"", NOW) == Verdict(VerdictKind.RATE_LIMITED, "HTTP 429")


# ---------------------------------------------------------------------- rate_limit_wait


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "2"}, 2 + MARGIN),
        ({"retry-after": "2.5"}, 2.5 + MARGIN),
        ({"X-Ratelimit-Retry-After": "3"}, 3 + MARGIN),
        ({"X-RATELIMIT-RETRY-AFTER": "3"}, 3 + MARGIN),
        ({"x-ratelimit-retry-after": "0"}, MARGIN),
        # Retry-After wins over Reset when both are given
        ({"Retry-After": "1", "X-RateLimit-Reset": str(int(NOW) + 30)}, 1 + MARGIN),
        # epoch seconds: the wait is until then
        ({"X-RateLimit-Reset": str(int(NOW) + 7)}, 7 + MARGIN),
        ({"x-ratelimit-reset": str(int(NOW) + 7)}, 7 + MARGIN),
        # an epoch already past: go (just after) now
        ({"X-RateLimit-Reset": str(int(NOW) - 5)}, MARGIN),
        # small numbers are seconds remaining (MAU-priced accounts)
        ({"X-RateLimit-Reset": "5"}, 5 + MARGIN),
        ({"X-RATELIMIT-RESET": "1"}, 1 + MARGIN),
        ({}, None),
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Limit": "3000"}, None),
        ({"Retry-After": "soon"}, None),
    ],
)
def test_rate_limit_wait(headers, expected):
    wait = rate_limit_wait(httpx.Headers(headers), NOW)
    if expected is None:
        assert wait is None
    else:
        assert wait == pytest.approx(expected, abs=1e-9)


# ------------------------------------------------------------------------------- post


def test_post_sends_the_body_with_braze_headers():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json={"message": "success"})

    client = BrazeClient("https://rest.iad-03.braze.com", KEY,
                         transport=httpx.MockTransport(handler))  # fmt: skip
    verdict = client.post("/users/track", b'{"events":[]}')
    assert verdict == Verdict(VerdictKind.ACCEPTED)
    [request] = seen
    assert request.method == "POST"
    assert str(request.url) == "https://rest.iad-03.braze.com/users/track"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.headers["X-Braze-Bulk"] == "true"
    assert request.headers["Content-Type"] == "application/json"
    assert request.content == b'{"events":[]}'


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (httpx.ConnectError("[Errno -2] Name or service not known"), VerdictKind.NO_SUCH_HOST),
        (httpx.ConnectError("[Errno -3] Temporary failure in name resolution"),
         VerdictKind.NO_SUCH_HOST),
        (httpx.ConnectError("[Errno 111] Connection refused"), VerdictKind.RETRY),
        (httpx.ReadTimeout("timed out"), VerdictKind.RETRY),
    ],
)  # fmt: skip
def test_post_turns_network_errors_into_verdicts(error, kind):
    def handler(request):
        raise error

    client = BrazeClient("https://rest.iad-03.braze.com", KEY,
                         transport=httpx.MockTransport(handler))  # fmt: skip
    verdict = client.post("/users/track", b"{}")
    assert verdict.kind is kind
    if kind is VerdictKind.NO_SUCH_HOST:
        assert verdict.message.startswith("the host rest.iad-03.braze.com does not resolve (")
