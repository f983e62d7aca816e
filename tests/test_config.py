"""config.py: endpoints, rates, windows and option choices are validated in one place."""

from __future__ import annotations

import pytest

from segreplay.config import (
    DEFAULT_RATE,
    MappingOptions,
    parse_rate,
    parse_window_time,
    resolve_endpoint,
)
from segreplay.errors import UsageError


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        *(
            pytest.param(f"US-0{n}", f"https://rest.iad-0{n}.braze.com", id=f"US-0{n}")
            for n in range(1, 9)
        ),
        pytest.param("US-10", "https://rest.us-10.braze.com", id="US-10"),
        pytest.param("EU-01", "https://rest.fra-01.braze.eu", id="EU-01"),
        pytest.param("EU-02", "https://rest.fra-02.braze.eu", id="EU-02"),
        pytest.param("AU-01", "https://rest.au-01.braze.com", id="AU-01"),
        pytest.param("ID-01", "https://rest.id-01.braze.com", id="ID-01"),
        pytest.param("JP-01", "https://rest.jp-01.braze.com", id="JP-01"),
        pytest.param("KR-01", "https://rest.kr-01.braze.com", id="KR-01"),
        pytest.param("eu-01", "https://rest.fra-01.braze.eu", id="lower-case-instance"),
        pytest.param(" US-03 ", "https://rest.iad-03.braze.com", id="padded-instance"),
        pytest.param("rest.iad-03.braze.com", "https://rest.iad-03.braze.com", id="bare-host"),
        pytest.param(
            "https://rest.iad-03.braze.com", "https://rest.iad-03.braze.com", id="full-url"
        ),
        pytest.param(
            "https://rest.fra-02.braze.eu/", "https://rest.fra-02.braze.eu", id="trailing-slash"
        ),
        pytest.param(
            "https://rest.iad-03.braze.com/users/track",
            "https://rest.iad-03.braze.com",
            id="path-dropped",
        ),
        pytest.param("http://127.0.0.1:8765", "http://127.0.0.1:8765", id="loopback-ipv4"),
        pytest.param("http://localhost:8765/", "http://localhost:8765", id="localhost"),
        pytest.param("http://[::1]:8765", "http://[::1]:8765", id="loopback-ipv6"),
    ],
)
def test_resolve_endpoint(given: str, expected: str) -> None:
    assert resolve_endpoint(given) == expected


@pytest.mark.parametrize(
    ("given", "message", "hint"),
    [
        pytest.param(
            "US-09",
            "unknown Braze instance 'US-09'",
            "known instances: US-01, US-02, US-03, US-04, US-05, US-06, US-07, US-08, US-10, "
            "EU-01, EU-02, AU-01, ID-01, JP-01, KR-01",
            id="US-09",
        ),
        pytest.param(
            "sdk.iad-03.braze.com",
            "sdk.iad-03.braze.com is an SDK endpoint, not the REST API",
            "use the REST endpoint of the same instance, e.g. rest.iad-03.braze.com",
            id="sdk-host",
        ),
        pytest.param(
            "https://sdk.fra-01.braze.eu",
            "sdk.fra-01.braze.eu is an SDK endpoint, not the REST API",
            "use the REST endpoint of the same instance, e.g. rest.iad-03.braze.com",
            id="sdk-url",
        ),
        pytest.param(
            "https://https://rest.iad-03.braze.com",
            "the endpoint 'https://https://rest.iad-03.braze.com' has its scheme twice",
            "use an instance name such as US-03, or https://rest.iad-03.braze.com",
            id="double-scheme",
        ),
        pytest.param(
            "http://rest.iad-03.braze.com",
            "plain http:// is only for a local fake Braze on a loopback host",
            "use https:// for a real workspace",
            id="http-remote",
        ),
        pytest.param(
            "http://localhost.example.com",
            "plain http:// is only for a local fake Braze on a loopback host",
            "use https:// for a real workspace",
            id="http-not-really-localhost",
        ),
        pytest.param(
            "ftp://rest.iad-03.braze.com",
            "'ftp://rest.iad-03.braze.com' is not a Braze REST endpoint",
            "use an instance name such as US-03, or https://rest.iad-03.braze.com",
            id="other-scheme",
        ),
        pytest.param(
            "",
            "'' is not a Braze REST endpoint",
            "use an instance name such as US-03, or https://rest.iad-03.braze.com",
            id="empty",
        ),
    ],
)
def test_resolve_endpoint_refuses_with_the_right_form(given: str, message: str, hint: str) -> None:
    with pytest.raises(UsageError) as raised:
        resolve_endpoint(given)
    assert (raised.value.message, raised.value.hint) == (message, hint)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param(DEFAULT_RATE, (1500, 3.0), id="default"),
        pytest.param("3000/3", (3000, 3.0), id="braze-limit"),
        pytest.param(" 10 / 0.5 ", (10, 0.5), id="spaces-and-fraction"),
        pytest.param("1/60", (1, 60.0), id="slow"),
    ],
)
def test_parse_rate(given: str, expected: tuple[int, float]) -> None:
    assert parse_rate(given) == expected


@pytest.mark.parametrize("given", ["0/3", "10/0", "10/0.0", "1.5/3", "10", "ten/3", "-1/3", ""])
def test_parse_rate_refuses(given: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_rate(given)
    assert raised.value.message == f"--rate must look like N/SECONDS, e.g. 1500/3, not {given!r}"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param(None, None, id="unset"),
        pytest.param("2024-01-31", "2024-01-31T00:00:00.000Z", id="date"),
        pytest.param("2024-01-31T10:00:00+02:00", "2024-01-31T08:00:00.000Z", id="offset"),
    ],
)
def test_parse_window_time(given, expected) -> None:
    assert parse_window_time("--since", given) == expected


def test_parse_window_time_refuses() -> None:
    with pytest.raises(UsageError) as raised:
        parse_window_time("--until", "last tuesday")
    assert raised.value.message == "--until must be an ISO 8601 time, e.g. 2024-01-31T00:00:00Z"


@pytest.mark.parametrize(
    ("field", "option"),
    [("pages", "--pages"), ("screens", "--screens"), ("anonymous", "--anonymous")],
)
def test_mapping_options_refuse_unknown_choices(field: str, option: str) -> None:
    with pytest.raises(UsageError) as raised:
        MappingOptions(**{field: "sometimes"})
    assert raised.value.message.startswith(f"{option} must be one of ")
    assert raised.value.message.endswith(", not 'sometimes'")
