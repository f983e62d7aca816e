"""mapping.py: one table per rule of mapping.md (Segment line -> Braze objects, Rejected,
Skipped or Drop), then property tests over arbitrary JSON.

Flags on attributes objects (`_update_existing_only`) are added by the pipeline, per
request, not here: the attributes below are exactly what mapping hands on.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segreplay import mapping
from segreplay.config import MappingOptions
from segreplay.mapping import Call, Rejected, Skipped, SkipReason, map_call
from segreplay.reporting import Summary
from segreplay.times import parse_time

T = "2024-03-05T14:03:22.083Z"
RECEIVED = "2024-03-05T14:03:23.000Z"
ORIGINAL = "2024-03-05T14:03:21.900Z"
GONE = object()  # a field left out of the line

DEFAULT = MappingOptions()
ALIAS = MappingOptions(anonymous="alias")
UPDATE_ONLY = MappingOptions(update_existing_only=True)
EXT = {"external_id": "u1"}
ANON = {"user_alias": {"alias_name": "anon-1", "alias_label": "segment_anonymous_id"}}


def line(kind: str, **fields) -> dict:
    record = {
        "type": kind,
        "userId": "u1",
        "anonymousId": "anon-1",
        "messageId": "m1",
        "timestamp": T,
        "receivedAt": RECEIVED,
    }
    for key, value in fields.items():
        if value is GONE:
            record.pop(key, None)
        else:
            record[key] = value
    return record


def identify(traits, **fields) -> dict:
    return line("identify", traits=traits, **fields)


def track(event, properties=GONE, **fields) -> dict:
    return line("track", event=event, properties=properties, **fields)


def page(name=GONE, category=GONE, properties=GONE, kind="page", **fields) -> dict:
    return line(kind, name=name, category=category, properties=properties, **fields)


def order(products, name="Order Completed", **properties) -> dict:
    return track(name, {"order_id": "o-1", "products": products, **properties})


def ev(name, properties=None, time=T, who=EXT, **flags) -> dict:
    event = {**who, "name": name, "time": time, **flags}
    if properties:
        event["properties"] = properties
    return event


def pur(product_id, price, currency="USD", quantity=1, properties=None, who=EXT, **flags):
    purchase = {
        **who,
        "product_id": product_id,
        "currency": currency,
        "price": price,
        "quantity": quantity,
        "time": T,
        **flags,
    }
    if properties:
        purchase["properties"] = properties
    return purchase


@dataclass
class Out:
    """What a Call carries, in a form a table can spell out."""

    attributes: dict | None = None
    events: list = field(default_factory=list)
    purchases: list = field(default_factory=list)
    drops: list = field(default_factory=list)  # (key, reason)
    rejected: list = field(default_factory=list)  # reasons of rejected objects
    who: dict = field(default_factory=lambda: EXT)


def outcome(mapped) -> Out | Rejected | Skipped:
    if not isinstance(mapped, Call):
        return mapped
    return Out(
        attributes=mapped.attributes,
        events=mapped.events,
        purchases=mapped.purchases,
        drops=[(d.key, d.reason) for d in mapped.drops],
        rejected=[r.reason for r in mapped.rejected_objects],
        who=mapped.identifier,
    )


def check(record: dict, options: MappingOptions, expected) -> None:
    assert outcome(map_call(record, options)) == expected


# identity ---------------------------------------------------------------------------

SIGNED_UP = [ev("Signed Up")]

IDENTITY = [
    pytest.param(track("Signed Up"), DEFAULT, Out(events=SIGNED_UP), id="string"),
    pytest.param(
        track("Signed Up", userId=12345),
        DEFAULT,
        Out(events=[ev("Signed Up", who={"external_id": "12345"})], who={"external_id": "12345"}),
        id="number",
    ),
    pytest.param(
        track("Signed Up", userId=12345.0),
        DEFAULT,
        Out(events=[ev("Signed Up", who={"external_id": "12345"})], who={"external_id": "12345"}),
        id="whole-float",
    ),
    pytest.param(track("Signed Up", userId="  u1\t"), DEFAULT, Out(events=SIGNED_UP), id="padded"),
    pytest.param(track("Signed Up", userId=None), DEFAULT, Skipped("skipped_anonymous"), id="null"),
    pytest.param(track("Signed Up", userId=GONE), DEFAULT, Skipped("skipped_anonymous"), id="gone"),
    pytest.param(track("Signed Up", userId=""), DEFAULT, Skipped("skipped_anonymous"), id="empty"),
    pytest.param(
        track("Signed Up", userId="  "), DEFAULT, Skipped("skipped_anonymous"), id="blank"
    ),
    pytest.param(
        track("Signed Up", userId="x" * 987),
        DEFAULT,
        Out(
            events=[ev("Signed Up", who={"external_id": "x" * 987})],
            who={"external_id": "x" * 987},
        ),
        id="987-bytes",
    ),
    pytest.param(
        track("Signed Up", userId="x" * 988),
        DEFAULT,
        Rejected("userId is longer than 987 bytes"),
        id="988-bytes",
    ),
    pytest.param(
        track("Signed Up", userId="é" * 494),  # 494 characters, 988 bytes
        DEFAULT,
        Rejected("userId is longer than 987 bytes"),
        id="988-utf8-bytes",
    ),
    pytest.param(
        track("Signed Up", userId=["u1"]),
        DEFAULT,
        Rejected("userId must be a string or a number, not a list"),
        id="list",
    ),
    pytest.param(
        track("Signed Up", userId={"id": "u1"}),
        DEFAULT,
        Rejected("userId must be a string or a number, not an object"),
        id="object",
    ),
    pytest.param(
        track("Signed Up", userId=True),
        DEFAULT,
        Rejected("userId must be a string or a number, not a boolean"),
        id="boolean",
    ),
    # --anonymous alias
    pytest.param(
        track("Signed Up", userId=None),
        ALIAS,
        Out(events=[ev("Signed Up", who=ANON)], who=ANON),
        id="alias-null",
    ),
    pytest.param(
        track("Signed Up", userId=GONE, anonymousId=" anon-1 "),
        ALIAS,
        Out(events=[ev("Signed Up", who=ANON)], who=ANON),
        id="alias-padded",
    ),
    pytest.param(
        track("Signed Up", userId=None, anonymousId=42),
        ALIAS,
        Out(
            events=[
                ev("Signed Up", who={"user_alias": {**ANON["user_alias"], "alias_name": "42"}})
            ],
            who={"user_alias": {**ANON["user_alias"], "alias_name": "42"}},
        ),
        id="alias-numeric",
    ),
    pytest.param(track("Signed Up"), ALIAS, Out(events=SIGNED_UP), id="alias-known-user"),
    pytest.param(
        track("Signed Up", userId=None, anonymousId=GONE),
        ALIAS,
        Skipped("skipped_anonymous"),
        id="alias-without-anonymousId",
    ),
    pytest.param(
        track("Signed Up", userId=None, anonymousId=" "),
        ALIAS,
        Skipped("skipped_anonymous"),
        id="alias-blank-anonymousId",
    ),
    pytest.param(
        identify({"plan": "pro"}, userId=None),
        ALIAS,
        Out(attributes={"plan": "pro"}, who=ANON),
        id="alias-identify",
    ),
    # --update-existing-only
    pytest.param(
        track("Signed Up"),
        UPDATE_ONLY,
        Out(events=[ev("Signed Up", _update_existing_only=True)]),
        id="update-only-event",
    ),
    pytest.param(
        order([{"product_id": "p1", "price": 5}]),
        UPDATE_ONLY,
        Out(purchases=[pur("p1", 5, properties={"order_id": "o-1"}, _update_existing_only=True)]),
        id="update-only-purchase",
    ),
    pytest.param(
        identify({"plan": "pro"}),
        UPDATE_ONLY,
        Out(attributes={"plan": "pro"}),
        id="update-only-attributes-flag-left-to-pipeline",
    ),
]


@pytest.mark.parametrize(("record", "options", "expected"), IDENTITY)
def test_identity(record, options, expected) -> None:
    check(record, options, expected)


@pytest.mark.parametrize(
    ("record", "options", "user"),
    [
        pytest.param(track("A", userId=" 12345 "), DEFAULT, "e:12345", id="external"),
        pytest.param(track("A", userId=12345), DEFAULT, "e:12345", id="same-for-number"),
        pytest.param(track("A", userId=None), ALIAS, "a:anon-1", id="alias"),
    ],
)
def test_state_key_of_the_user(record, options, user) -> None:
    assert map_call(record, options).user == user


@pytest.mark.parametrize(
    ("message_id", "expected"),
    [("m1", "m1"), ("personas_abc", "personas_abc"), (7, "7"), ("", None), (GONE, None)],
)
def test_message_id(message_id, expected) -> None:
    assert map_call(track("A", messageId=message_id), DEFAULT).message_id == expected


# time -------------------------------------------------------------------------------

NO_TIME = Rejected("no parseable time in timestamp, originalTimestamp or receivedAt")

TIME = [
    pytest.param(track("A", originalTimestamp=ORIGINAL), T, id="timestamp-first"),
    pytest.param(track("A", timestamp=GONE, originalTimestamp=ORIGINAL), ORIGINAL, id="original"),
    pytest.param(track("A", timestamp=None), RECEIVED, id="receivedAt"),
    pytest.param(
        track("A", timestamp="yesterday", originalTimestamp=ORIGINAL),
        ORIGINAL,
        id="first-that-parses",
    ),
    pytest.param(track("A", timestamp="2024-03-05T16:03:22.083+02:00"), T, id="offset-plus"),
    pytest.param(track("A", timestamp="2024-03-05T09:03:22.083-05:00"), T, id="offset-minus"),
    pytest.param(
        track("A", timestamp="2024-03-05T14:03:22Z"), "2024-03-05T14:03:22.000Z", id="no-fraction"
    ),
    pytest.param(
        track("A", timestamp=GONE, originalTimestamp="2024-03-05T14:03:22.083000+00:00"),
        T,
        id="python-isoformat",
    ),
    pytest.param(track("A", timestamp="2024-03-05T14:03:22.083"), T, id="no-offset-is-utc"),
    pytest.param(track("A", timestamp=1709647402083), RECEIVED, id="epoch-number-not-read"),
    pytest.param(
        track("A", timestamp="2024-02-30T00:00:00.000Z"), RECEIVED, id="impossible-date-skipped"
    ),
    pytest.param(
        track("A", timestamp="yesterday", originalTimestamp="", receivedAt=None),
        NO_TIME,
        id="none-parses",
    ),
    pytest.param(
        track("A", timestamp=GONE, receivedAt=GONE, sentAt=T), NO_TIME, id="sentAt-not-used"
    ),
    pytest.param(
        track("A", timestamp="0001-01-01T00:00:00+05:00", receivedAt=GONE),
        NO_TIME,
        id="out-of-range",
    ),
]


@pytest.mark.parametrize(("record", "expected"), TIME)
def test_time(record, expected) -> None:
    mapped = map_call(record, DEFAULT)
    if isinstance(expected, Rejected):
        assert mapped == expected
    else:
        assert outcome(mapped) == Out(events=[ev("A", time=expected)])
        assert mapped.time == expected


def test_identify_time_is_canonical_too() -> None:
    mapped = map_call(identify({"plan": "pro"}, timestamp="2024-03-06T06:03:22+09:00"), DEFAULT)
    assert mapped.time == "2024-03-05T21:03:22.000Z"


# identify: standard fields ----------------------------------------------------------

LONG = "x" * 256
MAX = "x" * 255

STANDARD = [
    pytest.param({"firstName": "Jane"}, {"first_name": "Jane"}, [], id="firstName"),
    pytest.param({"first_name": "Jane"}, {"first_name": "Jane"}, [], id="first_name"),
    pytest.param({"lastName": "Kim"}, {"last_name": "Kim"}, [], id="lastName"),
    pytest.param({"last_name": "Kim"}, {"last_name": "Kim"}, [], id="last_name"),
    pytest.param(
        {"email": "  Jane.Kim@Example.com \n"}, {"email": "Jane.Kim@Example.com"}, [], id="email"
    ),
    pytest.param({"phone": "+1 555 0100"}, {"phone": "+1 555 0100"}, [], id="phone"),
    pytest.param({"phone": 5550100}, {"phone": "5550100"}, [], id="phone-number"),
    pytest.param(
        {"avatar": "https://x.test/a.png"}, {"image_url": "https://x.test/a.png"}, [], id="avatar"
    ),
    pytest.param({"birthday": "1990-04-12"}, {"dob": "1990-04-12"}, [], id="dob-date"),
    pytest.param(
        {"birthday": "1988-07-01T00:00:00.000Z"}, {"dob": "1988-07-01"}, [], id="dob-datetime"
    ),
    pytest.param(
        {"birthday": "1985-11-30T23:30:00-05:00"}, {"dob": "1985-12-01"}, [], id="dob-utc-date"
    ),
    pytest.param(
        {"birthday": "1979-02-03T10:00:00Z"}, {"dob": "1979-02-03"}, [], id="dob-no-fraction"
    ),
    pytest.param(
        {"birthday": "sometime in the 90s", "plan": "pro"},
        {"plan": "pro"},
        [("birthday", "not a date: 'sometime in the 90s'")],
        id="dob-unparseable-dropped",
    ),
    pytest.param(
        {"birthday": 19900412}, {}, [("birthday", "not a date: 19900412")], id="dob-number"
    ),
    pytest.param({"birthday": None}, {"dob": None}, [], id="dob-null-unsets"),
    pytest.param(
        {
            "address": {
                "city": "Lyon",
                "country": "France",
                "street": "1 rue",
                "state": "ARA",
                "postalCode": "69001",
            }
        },
        {"home_city": "Lyon", "country": "France"},
        [],
        id="address",
    ),
    pytest.param({"address": {"country": "FR"}}, {"country": "FR"}, [], id="country-code"),
    pytest.param({"address": {"street": "1 rue"}}, {}, [], id="address-rest-not-sent"),
    pytest.param({"address": None}, {}, [], id="address-null"),
    pytest.param({"address": {"city": None}}, {"home_city": None}, [], id="city-null-unsets"),
    pytest.param(
        {"address": "1 rue de la Paix"},
        {},
        [("address", "address must be an object, not a string")],
        id="address-string",
    ),
    pytest.param(
        {"address": {"city": LONG}},
        {},
        [("address.city", "string longer than 255 characters")],
        id="city-too-long",
    ),
    pytest.param({"id": "u1", "plan": "pro"}, {"plan": "pro"}, [], id="id-dropped"),
    pytest.param({"firstName": None}, {"first_name": None}, [], id="null-unsets"),
    pytest.param(
        {"firstName": True},
        {},
        [("firstName", "first_name must be a string, not a boolean")],
        id="boolean-name",
    ),
    pytest.param(
        {"lastName": ["Kim"]},
        {},
        [("lastName", "last_name must be a string, not a list")],
        id="list-name",
    ),
    pytest.param(
        {"email": LONG + "@x.test"},
        {},
        [("email", "string longer than 255 characters")],
        id="email-too-long",
    ),
    pytest.param({}, {}, [], id="no-traits"),
]


@pytest.mark.parametrize(("traits", "attributes", "drops"), STANDARD)
def test_identify_standard_fields(traits, attributes, drops) -> None:
    check(identify(traits), DEFAULT, Out(attributes=attributes, drops=drops))


GENDERS = [
    *(("M", s) for s in ("m", "M", "male", "Male", "MALE", "man", " Man ")),
    *(("F", s) for s in ("f", "F", "female", "Female", "woman", "Woman", "w", "W")),
    *(("O", s) for s in ("o", "other", "Other", "non-binary", "Non-Binary", "nonbinary")),
    *(("N", s) for s in ("n", "N", "not applicable", "Not Applicable")),
    *(("P", s) for s in ("p", "P", "prefer not to say", "Prefer Not To Say")),
]


@pytest.mark.parametrize(("expected", "spelling"), GENDERS, ids=[s for _, s in GENDERS])
def test_gender_spellings(expected: str, spelling: str) -> None:
    check(identify({"gender": spelling}), DEFAULT, Out(attributes={"gender": expected}))


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        pytest.param("attack helicopter", "not a known gender: 'attack helicopter'", id="words"),
        pytest.param("", "not a known gender: ''", id="empty"),
        pytest.param("mal", "not a known gender: 'mal'", id="typo"),
        pytest.param(1, "not a known gender: 1", id="number"),
        pytest.param(["m"], "not a known gender: ['m']", id="list"),
    ],
)
def test_unknown_gender_is_dropped_never_sent_as_null(value, reason: str) -> None:
    mapped = map_call(identify({"gender": value, "plan": "pro"}), DEFAULT)
    assert outcome(mapped) == Out(attributes={"plan": "pro"}, drops=[("gender", reason)])
    assert "gender" not in mapped.attributes


def test_gender_null_unsets() -> None:
    check(identify({"gender": None}), DEFAULT, Out(attributes={"gender": None}))


# identify: custom attributes --------------------------------------------------------

NESTED = {"plan": {"tier": "gold", "seats": [1, 2]}, "flags": {}}
BIG = {"profile": {"bio": "y" * 300}}

CUSTOM = [
    pytest.param({"plan": "pro"}, {"plan": "pro"}, [], id="string"),
    pytest.param({"PlanTier": "Pro"}, {"PlanTier": "Pro"}, [], id="case-kept"),
    pytest.param(
        {"logins": 42, "score": 4.5, "neg": -1},
        {"logins": 42, "score": 4.5, "neg": -1},
        [],
        id="numbers",
    ),
    pytest.param(
        {"is_verified": True, "churned": False},
        {"is_verified": True, "churned": False},
        [],
        id="booleans",
    ),
    pytest.param({"tags": ["a", "b", 3]}, {"tags": ["a", "b", 3]}, [], id="array"),
    pytest.param({"tags": []}, {"tags": []}, [], id="empty-array"),
    pytest.param(NESTED, NESTED, [], id="nested-objects"),
    pytest.param(
        {"signed_up_at": "2024-03-05T14:03:22.083Z", "renewal": "2024-04-01"},
        {"signed_up_at": "2024-03-05T14:03:22.083Z", "renewal": "2024-04-01"},
        [],
        id="date-strings-as-they-are",
    ),
    pytest.param({"referral_code": None}, {"referral_code": None}, [], id="null-kept-as-None"),
    pytest.param(
        {"lifetime_value_bucket": "high"},
        {"lifetime_value_bucket": "high"},
        [],
        id="engage-computed-trait",
    ),
    pytest.param({"bio": MAX}, {"bio": MAX}, [], id="255-characters"),
    pytest.param(
        {"bio": LONG, "plan": "pro"},
        {"plan": "pro"},
        [("bio", "string longer than 255 characters")],
        id="256-characters",
    ),
    pytest.param({"": 1, "plan": "pro"}, {"plan": "pro"}, [("", "empty key")], id="empty-key"),
    pytest.param({"k" * 255: 1}, {"k" * 255: 1}, [], id="255-character-key"),
    pytest.param(
        {"k" * 256: 1}, {}, [("k" * 256, "key longer than 255 characters")], id="256-character-key"
    ),
    pytest.param(
        {"$email_subscribe": "opted_in"},
        {},
        [("$email_subscribe", "key starts with $")],
        id="dollar-key",
    ),
    pytest.param({"price$": 1}, {"price$": 1}, [], id="dollar-inside-key"),
    pytest.param(BIG, BIG, [], id="long-string-in-nested-kept"),
    pytest.param(
        {"blob": {"text": ["y" * 1000] * 101}},
        {},
        [("blob", "value larger than 100,000 bytes")],
        id="nested-over-100KB",
    ),
]


@pytest.mark.parametrize(("traits", "attributes", "drops"), CUSTOM)
def test_identify_custom_attributes(traits, attributes, drops) -> None:
    check(identify(traits), DEFAULT, Out(attributes=attributes, drops=drops))


def test_nested_size_is_measured_only_when_the_line_could_hold_one_too_big() -> None:
    traits = {"blob": {"text": ["y" * 1000] * 101}}
    too_big = [("blob", "value larger than 100,000 bytes")]
    assert [(d.key, d.reason) for d in map_call(identify(traits), DEFAULT, 0).drops] == too_big
    assert [(d.key, d.reason) for d in map_call(identify(traits), DEFAULT, 200_000).drops] == (
        too_big
    )
    # A caller that says the line is short vouches that no value in it can be 100 KB.
    assert map_call(identify(traits), DEFAULT, 500).attributes == traits


@pytest.mark.parametrize(
    ("traits", "reason"),
    [
        pytest.param('{"plan": "pro"}', "traits must be an object, not a string", id="string"),
        pytest.param(["plan"], "traits must be an object, not a list", id="list"),
        pytest.param(7, "traits must be an object, not a number", id="number"),
    ],
)
def test_identify_traits_of_the_wrong_type_are_rejected(traits, reason: str) -> None:
    check(identify(traits), DEFAULT, Rejected(reason))


def test_identify_without_traits_still_maps_to_an_empty_attributes_object() -> None:
    check(identify(GONE), DEFAULT, Out(attributes={}))
    check(identify(None), DEFAULT, Out(attributes={}))


# track: custom events ---------------------------------------------------------------

NESTED_PROPS = {"video": {"id": "v1", "chapters": [1, 2]}, "tags": ["a"], "n": None, "ok": True}

TRACK = [
    pytest.param(
        track("Video Played", NESTED_PROPS),
        Out(events=[ev("Video Played", NESTED_PROPS)]),
        id="nested-kept",
    ),
    pytest.param(track("Signed Up"), Out(events=SIGNED_UP), id="no-properties"),
    pytest.param(track("Signed Up", None), Out(events=SIGNED_UP), id="null-properties"),
    pytest.param(track("Signed Up", {}), Out(events=SIGNED_UP), id="empty-properties"),
    pytest.param(track(GONE), Rejected("track without an event name"), id="no-name"),
    pytest.param(track(""), Rejected("track without an event name"), id="empty-name"),
    pytest.param(track("  "), Rejected("track without an event name"), id="blank-name"),
    pytest.param(track(5), Rejected("track without an event name"), id="number-name"),
    pytest.param(
        track("Signed Up", '{"plan": "pro"}'),
        Rejected("properties must be an object, not a string"),
        id="properties-string",
    ),
    pytest.param(
        track("Signed Up", ["plan"]),
        Rejected("properties must be an object, not a list"),
        id="properties-list",
    ),
    pytest.param(
        track("A", {"time": "now", "event_name": "B", "$current_url": "/", "plan": "pro"}),
        Out(
            events=[ev("A", {"plan": "pro"})],
            drops=[
                ("time", "reserved property name in Braze"),
                ("event_name", "reserved property name in Braze"),
                ("$current_url", "key starts with $"),
            ],
        ),
        id="reserved-keys-dropped",
    ),
    pytest.param(
        track("A", {"description": LONG, "title": MAX}),
        Out(
            events=[ev("A", {"title": MAX})],
            drops=[("description", "string longer than 255 characters")],
        ),
        id="long-string-dropped",
    ),
    pytest.param(
        track("A", {"": 1, "k" * 256: 2}),
        Out(
            events=[ev("A")],
            drops=[("", "empty key"), ("k" * 256, "key longer than 255 characters")],
        ),
        id="bad-keys-dropped",
    ),
    pytest.param(
        track("A", {"blob": {"text": ["y" * 1000] * 101}}),
        Out(events=[ev("A")], drops=[("blob", "value larger than 100,000 bytes")]),
        id="nested-over-100KB",
    ),
    pytest.param(
        track("Order Shipped", {"products": "p1"}),
        Out(events=[ev("Order Shipped", {"products": "p1"})]),
        id="products-not-a-list-on-custom-event",
    ),
]


@pytest.mark.parametrize(("record", "expected"), TRACK)
def test_track(record, expected) -> None:
    check(record, DEFAULT, expected)


# track: purchases -------------------------------------------------------------------

TEE = {"product_id": "p1", "sku": "s1", "name": "Tee", "price": 19.99, "quantity": 2}
OID = {"order_id": "o-1"}

PURCHASES = [
    pytest.param(
        order([TEE, {"product_id": "p2", "price": 5}], currency="EUR"),
        DEFAULT,
        Out(
            purchases=[
                pur("p1", 19.99, "EUR", 2, {"sku": "s1", "name": "Tee", **OID}),
                pur("p2", 5, "EUR", 1, OID),
            ]
        ),
        id="order-completed",
    ),
    *(
        pytest.param(
            order([{"product_id": "p1", "price": 5}], name=name),
            DEFAULT,
            Out(purchases=[pur("p1", 5, properties=OID)]),
            id=name,
        )
        for name in ("order completed", "ORDER COMPLETED", "Completed Order", "completed order")
    ),
    pytest.param(
        track("Completed Order", {"orderId": "v1-9", "products": [{"id": "p9", "price": "3.5"}]}),
        DEFAULT,
        Out(purchases=[pur("p9", 3.5, properties={"order_id": "v1-9"})]),
        id="v1-orderId-and-id",
    ),
    pytest.param(
        order([{"product_id": "p1", "price": 5}], name="Bundle Purchased"),
        DEFAULT,
        Out(purchases=[pur("p1", 5, properties=OID)]),
        id="custom-name-with-products",
    ),
    pytest.param(
        track("Bundle Purchased", {"products": [{"product_id": "p1", "price": 5}]}),
        DEFAULT,
        Out(purchases=[pur("p1", 5)]),
        id="no-order-id",
    ),
    # product_id, else id, else sku; the identifiers not used are the product's other
    # fields, so they go into properties (issue 13, item 8)
    pytest.param(
        order([{"product_id": "a", "id": "b", "sku": "c", "price": 1}]),
        DEFAULT,
        Out(purchases=[pur("a", 1, properties={"id": "b", "sku": "c", **OID})]),
        id="product_id-first",
    ),
    pytest.param(
        order([{"id": "b", "sku": "c", "price": 1}]),
        DEFAULT,
        Out(purchases=[pur("b", 1, properties={"sku": "c", **OID})]),
        id="then-id",
    ),
    pytest.param(
        order([{"sku": "c", "price": 1}]),
        DEFAULT,
        Out(purchases=[pur("c", 1, properties=OID)]),
        id="then-sku",
    ),
    pytest.param(
        order([{"product_id": "", "sku": "c", "price": 1}]),
        DEFAULT,
        Out(purchases=[pur("c", 1, properties=OID)]),
        id="empty-product_id-skipped",
    ),
    pytest.param(
        order([{"product_id": 123, "price": 1}]),
        DEFAULT,
        Out(purchases=[pur("123", 1, properties=OID)]),
        id="numeric-product_id",
    ),
    pytest.param(
        order([{"name": "Tee", "price": 1}]),
        DEFAULT,
        Out(rejected=["products[0] has no product_id, id or sku"]),
        id="no-id",
    ),
    # price
    pytest.param(
        order([{"sku": "c", "price": "19.99"}]),
        DEFAULT,
        Out(purchases=[pur("c", 19.99, properties=OID)]),
        id="price-numeric-string",
    ),
    pytest.param(
        order([{"sku": "c", "price": "20"}]),
        DEFAULT,
        Out(purchases=[pur("c", 20, properties=OID)]),
        id="price-whole-string",
    ),
    pytest.param(
        order([{"sku": "c", "price": 0}]),
        DEFAULT,
        Out(purchases=[pur("c", 0, properties=OID)]),
        id="price-zero",
    ),
    pytest.param(
        order([{"sku": "c", "price": "abc"}]),
        DEFAULT,
        Out(rejected=["products[0].price is not a number: 'abc'"]),
        id="price-abc",
    ),
    pytest.param(
        order([{"sku": "c"}]),
        DEFAULT,
        Out(rejected=["products[0].price is not a number: None"]),
        id="price-missing",
    ),
    pytest.param(
        order([{"sku": "c", "price": True}]),
        DEFAULT,
        Out(rejected=["products[0].price is not a number: True"]),
        id="price-boolean",
    ),
    pytest.param(
        order([{"sku": "c", "price": "NaN"}]),
        DEFAULT,
        Out(rejected=["products[0].price is not a number: 'NaN'"]),
        id="price-nan",
    ),
    # currency: product, else order, else USD; upper-cased; three letters
    pytest.param(
        order([{"sku": "c", "price": 1, "currency": "eur"}], currency="GBP"),
        DEFAULT,
        Out(purchases=[pur("c", 1, "EUR", properties=OID)]),
        id="product-currency",
    ),
    pytest.param(
        order([{"sku": "c", "price": 1}], currency="gbp"),
        DEFAULT,
        Out(purchases=[pur("c", 1, "GBP", properties=OID)]),
        id="order-currency",
    ),
    pytest.param(
        order([{"sku": "c", "price": 1, "currency": ""}], currency="JPY"),
        DEFAULT,
        Out(purchases=[pur("c", 1, "JPY", properties=OID)]),
        id="empty-falls-back",
    ),
    pytest.param(
        order([{"sku": "c", "price": 1}]),
        DEFAULT,
        Out(purchases=[pur("c", 1, "USD", properties=OID)]),
        id="default-USD",
    ),
    pytest.param(
        order([{"sku": "c", "price": 1, "currency": "euro"}]),
        DEFAULT,
        Out(rejected=["products[0] has no valid three-letter currency"]),
        id="currency-four-letters",
    ),
    pytest.param(
        order([{"sku": "c", "price": 1}], currency="€"),
        DEFAULT,
        Out(rejected=["products[0] has no valid three-letter currency"]),
        id="currency-symbol",
    ),
    pytest.param(
        order([{"sku": "c", "price": 1, "currency": 978}]),
        DEFAULT,
        Out(rejected=["products[0] has no valid three-letter currency"]),
        id="currency-number",
    ),
    # quantity
    pytest.param(
        order([{"sku": "c", "price": 1}]),
        DEFAULT,
        Out(purchases=[pur("c", 1, quantity=1, properties=OID)]),
        id="quantity-default",
    ),
    pytest.param(
        order([{"sku": "c", "price": 1, "quantity": None}]),
        DEFAULT,
        Out(purchases=[pur("c", 1, quantity=1, properties=OID)]),
        id="quantity-null",
    ),
    pytest.param(
        order([{"sku": "c", "price": 1, "quantity": "3"}]),
        DEFAULT,
        Out(purchases=[pur("c", 1, quantity=3, properties=OID)]),
        id="quantity-string",
    ),
    pytest.param(
        order([{"sku": "c", "price": 1, "quantity": 100}]),
        DEFAULT,
        Out(purchases=[pur("c", 1, quantity=100, properties=OID)]),
        id="quantity-100",
    ),
    pytest.param(
        order([{"sku": "c", "price": 1, "quantity": 250}]),
        DEFAULT,
        Out(purchases=[pur("c", 1, quantity=q, properties=OID) for q in (100, 100, 50)]),
        id="quantity-250-split",
    ),
    pytest.param(
        order([{"sku": "c", "price": 1, "quantity": 201}]),
        DEFAULT,
        Out(purchases=[pur("c", 1, quantity=q, properties=OID) for q in (100, 100, 1)]),
        id="quantity-201-split",
    ),
    pytest.param(
        order([{"sku": "c", "price": 1, "quantity": 0}]),
        DEFAULT,
        Out(rejected=["products[0].quantity must be a whole number from 1 to 10,000: 0"]),
        id="quantity-0",
    ),
    pytest.param(
        order([{"sku": "c", "price": 1, "quantity": -2}]),
        DEFAULT,
        Out(rejected=["products[0].quantity must be a whole number from 1 to 10,000: -2"]),
        id="quantity-negative",
    ),
    pytest.param(
        order([{"sku": "c", "price": 1, "quantity": 2.5}]),
        DEFAULT,
        Out(rejected=["products[0].quantity must be a whole number from 1 to 10,000: 2.5"]),
        id="quantity-fraction",
    ),
    pytest.param(
        order([{"sku": "c", "price": 1, "quantity": 1e18}]),
        DEFAULT,
        Out(rejected=["products[0].quantity must be a whole number from 1 to 10,000: 1e+18"]),
        id="quantity-absurd",
    ),
    # the rest of each product, and the order's id
    pytest.param(
        order([{"sku": "c", "price": 1, "name": "Mug", "$src": "x", "time": 1, "brand": LONG}]),
        DEFAULT,
        Out(
            purchases=[pur("c", 1, properties={"name": "Mug", **OID})],
            drops=[
                ("$src", "key starts with $"),
                ("time", "reserved property name in Braze"),
                ("brand", "string longer than 255 characters"),
            ],
        ),
        id="product-fields-checked-like-properties",
    ),
    pytest.param(
        order([{"sku": "c", "price": 1}, "p2", {"sku": "d", "price": "x"}]),
        DEFAULT,
        Out(
            purchases=[pur("c", 1, properties=OID)],
            rejected=["products[1] is not an object", "products[2].price is not a number: 'x'"],
        ),
        id="bad-products-rejected-one-by-one",
    ),
    # no products, or products that are not a list
    pytest.param(
        order({"sku": "c", "price": 1}),
        DEFAULT,
        Rejected("properties.products must be a list, not an object"),
        id="products-object",
    ),
    pytest.param(
        order("p1, p2", name="completed order"),
        DEFAULT,
        Rejected("properties.products must be a list, not a string"),
        id="products-string",
    ),
    pytest.param(
        track("Order Completed", {"order_id": "o-1", "revenue": 10}),
        DEFAULT,
        Out(
            events=[ev("Order Completed", {"order_id": "o-1", "revenue": 10})],
            drops=[("products", "order without products: logged as a custom event")],
        ),
        id="order-without-products",
    ),
    pytest.param(
        order([]),
        DEFAULT,
        Out(
            events=[ev("Order Completed", {"order_id": "o-1", "products": []})],
            drops=[("products", "order without products: logged as a custom event")],
        ),
        id="order-with-empty-products",
    ),
    # --purchase-event-too
    pytest.param(
        order([{"sku": "c", "price": 1}]),
        MappingOptions(purchase_event_too=True),
        Out(
            purchases=[pur("c", 1, properties=OID)],
            events=[
                ev("Order Completed", {"order_id": "o-1", "products": [{"sku": "c", "price": 1}]})
            ],
        ),
        id="purchase-event-too",
    ),
    # --log-purchase-when-revenue-present
    pytest.param(
        track("Subscription Started", {"revenue": 9.99, "currency": "usd", "plan": "pro"}),
        MappingOptions(log_purchase_when_revenue_present=True),
        Out(purchases=[pur("Subscription Started", 9.99, "USD", 1, {"plan": "pro"})]),
        id="revenue-purchase",
    ),
    pytest.param(
        track("Subscription Started", {"revenue": "9.99"}),
        MappingOptions(log_purchase_when_revenue_present=True),
        Out(purchases=[pur("Subscription Started", 9.99)]),
        id="revenue-numeric-string-default-USD",
    ),
    pytest.param(
        track("Subscription Started", {"revenue": 9.99, "currency": "usd"}),
        DEFAULT,
        Out(events=[ev("Subscription Started", {"revenue": 9.99, "currency": "usd"})]),
        id="revenue-without-the-option",
    ),
    pytest.param(
        track("Subscription Started", {"revenue": "lots"}),
        MappingOptions(log_purchase_when_revenue_present=True),
        Out(events=[ev("Subscription Started", {"revenue": "lots"})]),
        id="revenue-not-numeric",
    ),
    pytest.param(
        track("Subscription Started", {"revenue": 9.99, "currency": "dollars"}),
        MappingOptions(log_purchase_when_revenue_present=True),
        Out(rejected=["revenue purchase has no valid currency"]),
        id="revenue-bad-currency",
    ),
    pytest.param(
        track("Subscription Started", {"revenue": 9.99}),
        MappingOptions(log_purchase_when_revenue_present=True, purchase_event_too=True),
        Out(
            purchases=[pur("Subscription Started", 9.99)],
            events=[ev("Subscription Started", {"revenue": 9.99})],
        ),
        id="revenue-purchase-event-too",
    ),
    pytest.param(
        order([{"sku": "c", "price": 1}], revenue=50),
        MappingOptions(log_purchase_when_revenue_present=True),
        Out(purchases=[pur("c", 1, properties=OID)]),
        id="products-win-over-revenue",
    ),
    pytest.param(
        track("Checkout Started", {"revenue": 50, "products": [{"sku": "c", "price": 50}]}),
        MappingOptions(log_purchase_when_revenue_present=True),
        Out(
            events=[
                ev("Checkout Started", {"revenue": 50, "products": [{"sku": "c", "price": 50}]})
            ]
        ),
        id="browsing-event-with-products-and-revenue-stays-an-event",
    ),
    pytest.param(
        track("Order Refunded", {"revenue": 50}),
        MappingOptions(log_purchase_when_revenue_present=True),
        Out(events=[ev("Order Refunded", {"revenue": 50})]),
        id="a-refund-with-revenue-is-no-purchase",
    ),
    pytest.param(
        track("Free Trial Claimed", {"revenue": 0}),
        MappingOptions(log_purchase_when_revenue_present=True),
        Out(purchases=[pur("Free Trial Claimed", 0)]),
        id="a-revenue-of-0-is-numeric",
    ),
    pytest.param(
        track("Order Completed ", {"products": [{"sku": "c", "price": 1}]}),
        DEFAULT,
        Out(purchases=[pur("c", 1)]),
        id="event-name-matched-without-surrounding-spaces",
    ),
]


@pytest.mark.parametrize(("record", "options", "expected"), PURCHASES)
def test_purchases(record, options, expected) -> None:
    check(record, options, expected)


BROWSING = [
    "Products Searched", "Product List Viewed", "Product List Filtered", "Promotion Viewed",
    "Promotion Clicked", "Product Clicked", "Product Viewed", "Product Added", "Product Removed",
    "Cart Viewed", "Checkout Started", "Checkout Step Viewed", "Checkout Step Completed",
    "Payment Info Entered", "Order Updated", "Order Refunded", "Order Cancelled",
    "Coupon Entered", "Coupon Applied", "Coupon Denied", "Coupon Removed",
    "Product Added to Wishlist", "Product Removed from Wishlist",
    "Wishlist Product Added to Cart", "Product Shared", "Cart Shared", "Product Reviewed",
]  # fmt: skip


@pytest.mark.parametrize("name", [*BROWSING, "cart viewed", "PRODUCT VIEWED"])
def test_browsing_events_with_products_stay_events(name: str) -> None:
    properties = {"products": [{"product_id": "p1", "price": 5, "quantity": 1}], "cart_id": "c"}
    check(track(name, properties), DEFAULT, Out(events=[ev(name, properties)]))


def test_browsing_list_is_the_one_in_mapping_md() -> None:
    assert len(BROWSING) == len(set(BROWSING)) == 27
    assert {name.lower() for name in BROWSING} == mapping._BROWSING_NAMES


# page and screen --------------------------------------------------------------------

PAGES_NAMED = MappingOptions(pages="named")
SCREENS_ALL = MappingOptions(screens="all")

PAGES = [
    pytest.param(
        page("Pricing", "Docs", {"url": "https://x.test/pricing"}),
        DEFAULT,
        Out(
            events=[
                ev(
                    "Viewed Docs Pricing Page",
                    {"url": "https://x.test/pricing", "name": "Pricing", "category": "Docs"},
                )
            ]
        ),
        id="named-with-category",
    ),
    pytest.param(
        page("Pricing", properties={"path": "/pricing"}),
        DEFAULT,
        Out(events=[ev("Viewed Pricing Page", {"path": "/pricing", "name": "Pricing"})]),
        id="named",
    ),
    pytest.param(
        page(properties={"path": "/"}),
        DEFAULT,
        Out(events=[ev("Loaded a Page", {"path": "/"})]),
        id="unnamed",
    ),
    pytest.param(page(), DEFAULT, Out(events=[ev("Loaded a Page")]), id="unnamed-bare"),
    pytest.param(
        page("  ", properties={"path": "/"}),
        DEFAULT,
        Out(events=[ev("Loaded a Page", {"path": "/", "name": "  "})]),
        id="blank-name-is-unnamed",
    ),
    pytest.param(
        page("Pricing", "", {}),
        DEFAULT,
        Out(events=[ev("Viewed Pricing Page", {"name": "Pricing", "category": ""})]),
        id="blank-category",
    ),
    pytest.param(
        page("Pricing", properties={"name": "old", "$x": 1, "time": 2}),
        DEFAULT,
        Out(
            events=[ev("Viewed Pricing Page", {"name": "Pricing"})],
            drops=[("$x", "key starts with $"), ("time", "reserved property name in Braze")],
        ),
        id="properties-checked",
    ),
    pytest.param(
        page("Pricing", properties="x"),
        DEFAULT,
        Rejected("properties must be an object, not a string"),
        id="properties-string",
    ),
    pytest.param(
        page("Pricing"),
        PAGES_NAMED,
        Out(events=[ev("Viewed Pricing Page", {"name": "Pricing"})]),
        id="pages-named-named",
    ),
    pytest.param(page(), PAGES_NAMED, Skipped("skipped_pages"), id="pages-named-unnamed"),
    pytest.param(
        page("Pricing"), MappingOptions(pages="none"), Skipped("skipped_pages"), id="pages-none"
    ),
    pytest.param(
        page("Home", kind="screen"), DEFAULT, Skipped("skipped_screens"), id="screens-default-none"
    ),
    pytest.param(
        page("Home", kind="screen"),
        SCREENS_ALL,
        Out(events=[ev("Viewed Home Screen", {"name": "Home"})]),
        id="screen-named",
    ),
    pytest.param(
        page("Home", "Onboarding", kind="screen"),
        SCREENS_ALL,
        Out(
            events=[ev("Viewed Onboarding Home Screen", {"name": "Home", "category": "Onboarding"})]
        ),
        id="screen-named-with-category",
    ),
    pytest.param(
        page(kind="screen"), SCREENS_ALL, Out(events=[ev("Loaded a Screen")]), id="screen-unnamed"
    ),
    pytest.param(
        page(kind="screen"),
        MappingOptions(screens="named"),
        Skipped("skipped_screens"),
        id="screens-named-unnamed",
    ),
    pytest.param(
        page("Pricing", userId=None), DEFAULT, Skipped("skipped_anonymous"), id="anonymous-page"
    ),
]


@pytest.mark.parametrize(("record", "options", "expected"), PAGES)
def test_pages_and_screens(record, options, expected) -> None:
    check(record, options, expected)


# group, alias, types ----------------------------------------------------------------

GROUPS = [
    pytest.param(
        line("group", groupId="acme", traits={"name": "Acme", "plan": "enterprise"}),
        Out(attributes={"ab_segment_group_acme": True}),
        id="group-traits-not-sent",
    ),
    pytest.param(
        line("group", groupId=42),
        Out(attributes={"ab_segment_group_42": True}),
        id="numeric-groupId",
    ),
    pytest.param(
        line("group", groupId=" acme "),
        Out(attributes={"ab_segment_group_acme": True}),
        id="padded-groupId",
    ),
    pytest.param(line("group"), Rejected("group without a groupId"), id="no-groupId"),
    pytest.param(line("group", groupId=""), Rejected("group without a groupId"), id="empty"),
    pytest.param(line("group", groupId=None), Rejected("group without a groupId"), id="null"),
    pytest.param(
        line("group", groupId="g" * 239),
        Rejected("groupId makes an attribute key longer than 255 characters"),
        id="key-too-long",
    ),
    pytest.param(
        line("group", groupId="acme", userId=None), Skipped("skipped_anonymous"), id="anonymous"
    ),
]


@pytest.mark.parametrize(("record", "expected"), GROUPS)
def test_group(record, expected) -> None:
    check(record, DEFAULT, expected)


TYPES = [
    pytest.param(line("alias", previousId="old"), Skipped("skipped_alias"), id="alias"),
    pytest.param(line("flush"), Rejected("unknown type 'flush'"), id="unknown"),
    pytest.param(line("Identify", traits={}), Rejected("unknown type 'Identify'"), id="case"),
    pytest.param(line("identify", type=GONE), Rejected("missing type"), id="missing"),
    pytest.param(line("identify", type=""), Rejected("missing type"), id="empty"),
    pytest.param(line("identify", type=None), Rejected("missing type"), id="null"),
    pytest.param(
        line("identify", type=["identify"]),
        Rejected("type must be a string, not a list"),
        id="list",
    ),
]


@pytest.mark.parametrize(("record", "expected"), TYPES)
def test_types(record, expected) -> None:
    check(record, DEFAULT, expected)


# window and event filters -----------------------------------------------------------

WINDOW = MappingOptions(since="2024-03-05T00:00:00.000Z", until="2024-03-06T00:00:00.000Z")


@pytest.mark.parametrize(
    ("timestamp", "inside"),
    [
        pytest.param("2024-03-05T00:00:00.000Z", True, id="since-inclusive"),
        pytest.param("2024-03-05T23:59:59.999Z", True, id="last-ms"),
        pytest.param("2024-03-06T00:00:00.000Z", False, id="until-exclusive"),
        pytest.param("2024-03-04T23:59:59.999Z", False, id="before"),
        pytest.param("2024-03-05T01:00:00+02:00", False, id="offset-before-since-in-utc"),
        pytest.param("2024-03-05T23:30:00-05:00", False, id="offset-after-until-in-utc"),
    ],
)
def test_since_until_window(timestamp: str, inside: bool) -> None:
    for record in (track("A", timestamp=timestamp), identify({"plan": "pro"}, timestamp=timestamp)):
        mapped = map_call(record, WINDOW)
        assert isinstance(mapped, Call) if inside else mapped == Skipped("outside_window")


ALLOW = MappingOptions(events_allow=frozenset({"Signed Up", "Order Completed"}))
DENY = MappingOptions(events_deny=frozenset({"Signed Up", "Viewed Pricing Page"}))

FILTERS = [
    pytest.param(track("Signed Up"), ALLOW, Out(events=SIGNED_UP), id="allowed"),
    pytest.param(track("Video Played"), ALLOW, Skipped("filtered"), id="not-allowed"),
    pytest.param(track("signed up"), ALLOW, Skipped("filtered"), id="allow-is-exact"),
    pytest.param(
        order([{"sku": "c", "price": 1}]),
        ALLOW,
        Out(purchases=[pur("c", 1, properties=OID)]),
        id="allowed-order",
    ),
    pytest.param(page("Pricing"), ALLOW, Skipped("filtered"), id="page-not-allowed"),
    pytest.param(
        identify({"plan": "pro"}),
        ALLOW,
        Out(attributes={"plan": "pro"}),
        id="identify-not-filtered",
    ),
    pytest.param(track("Signed Up"), DENY, Skipped("filtered"), id="denied"),
    pytest.param(track("Video Played"), DENY, Out(events=[ev("Video Played")]), id="not-denied"),
    pytest.param(page("Pricing"), DENY, Skipped("filtered"), id="page-denied-by-event-name"),
    pytest.param(
        order([{"sku": "c", "price": 1}]),
        MappingOptions(events_deny=frozenset({"Order Completed"})),
        Skipped("filtered"),
        id="order-denied",
    ),
]


@pytest.mark.parametrize(("record", "options", "expected"), FILTERS)
def test_event_filters(record, options, expected) -> None:
    check(record, options, expected)


def test_every_skip_counter_is_a_summary_count() -> None:
    counters = {
        "skipped_anonymous",
        "skipped_alias",
        "skipped_pages",
        "skipped_screens",
        "outside_window",
        "filtered",
    }
    tables = IDENTITY + PAGES + FILTERS
    produced = {
        p.values[-1].reason for p in [*tables, *GROUPS, *TYPES] if isinstance(p.values[-1], Skipped)
    }
    assert produced | {"outside_window"} == counters
    # Two reasons are the import's, not the mapping's: deleted and suppressed users.
    privacy = {"skipped_deleted", "skipped_suppressed"}
    assert {reason.value for reason in SkipReason} == counters | privacy
    assert counters | privacy <= set(Summary().to_dict())


# properties -------------------------------------------------------------------------

_CANONICAL = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z").fullmatch
# What orjson can hand over: ints within 64 bits (unsigned at the top), finite floats.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=8,
)
SEGMENT_KEYS = [
    "type", "userId", "anonymousId", "messageId", "timestamp", "originalTimestamp",
    "receivedAt", "sentAt", "traits", "properties", "event", "name", "category", "groupId",
    "previousId", "context", "version",
]  # fmt: skip
any_record = st.dictionaries(st.sampled_from(SEGMENT_KEYS) | st.text(max_size=8), json_values)

TIMES = [T, "2024-03-05T16:03:22+02:00", "2024-03-05T14:03:22.083", "2024-03-07"]
TRAIT_KEYS = [
    "firstName", "first_name", "lastName", "email", "phone", "birthday", "gender", "address",
    "avatar", "id", "plan", "$x", "", "tags",
]  # fmt: skip
PROPERTY_KEYS = [
    "revenue", "currency", "order_id", "orderId", "time", "event_name", "$x", "", "name",
    "category",
]  # fmt: skip
# Quantities stay small: a quantity of 10**18 would be split into 10**16 purchases.
product = st.fixed_dictionaries(
    {"price": st.sampled_from([5, 19.99, "19.99", " 5 ", "1e3", 0, -1, "abc", None, True])},
    optional={
        "product_id": st.sampled_from(["p1", "", " ", 123, None, "p" * 256]),
        "id": st.sampled_from(["i1", 7, False]),
        "sku": st.sampled_from(["s1", ""]),
        "currency": st.sampled_from(["usd", "EUR", "euro", "", None, 978]),
        "quantity": st.integers(-3, 450) | st.sampled_from(["2", "2.5", None, True, 1.5]),
        "name": json_values,
        "$x": scalars,
        "time": scalars,
    },
)
products = st.lists(product | st.sampled_from([None, "p1", 3, []]), max_size=4)
properties = st.dictionaries(
    st.sampled_from(PROPERTY_KEYS) | st.text(max_size=8), json_values, max_size=6
).flatmap(
    lambda base: st.one_of(
        st.just(base), products.map(lambda items: {**base, "products": items}), json_values
    )
)
event_names = st.one_of(
    st.sampled_from(["Order Completed", "completed order", "Cart Viewed", "Bundle Purchased"]),
    st.sampled_from(["Signed Up", "", " ", None]),
    json_values,
)


def _typed(kind: str, fields: dict) -> dict:
    return {**line(kind), **fields}


# A well-formed line of each type, with some of its fields replaced: most examples get past
# identity and time to the type's own rules (the test above puts junk everywhere).
typed_record = st.builds(
    _typed,
    st.sampled_from(["identify", "track", "page", "screen", "group", "alias"]),
    st.fixed_dictionaries(
        {"event": event_names, "properties": properties},
        optional={
            "userId": st.sampled_from([" u2 ", 12345, 1.5, "", None, ["u1"], "é" * 494]),
            "anonymousId": st.sampled_from(["", None, 7]),
            "timestamp": st.sampled_from([*TIMES, "x", None, "0001-01-01T00:00:00+05:00"]),
            "originalTimestamp": st.sampled_from([*TIMES, "x", ""]),
            "messageId": st.text(max_size=8) | json_values,
            "traits": st.dictionaries(
                st.sampled_from(TRAIT_KEYS) | st.text(max_size=8), json_values
            )
            | json_values,
            "name": st.sampled_from(["Home", "", " "]) | json_values,
            "category": st.sampled_from(["Docs", ""]) | json_values,
            "groupId": st.sampled_from(["acme", "", 42]) | json_values,
        },
    ),
)
order_record = st.builds(
    lambda name, order, items, opts: {
        **line("track", event=name, properties={**order, "products": items}),
        **opts,
    },
    st.sampled_from(["Order Completed", "completed order", "Bundle Purchased", "Cart Viewed"]),
    st.dictionaries(st.sampled_from(PROPERTY_KEYS), scalars, max_size=4),
    products,
    st.fixed_dictionaries({}, optional={"userId": st.sampled_from([None, 12345])}),
)
options = st.builds(
    MappingOptions,
    pages=st.sampled_from(["all", "named", "none"]),
    screens=st.sampled_from(["all", "named", "none"]),
    anonymous=st.sampled_from(["skip", "alias"]),
    update_existing_only=st.booleans(),
    purchase_event_too=st.booleans(),
    log_purchase_when_revenue_present=st.booleans(),
    since=st.sampled_from([None, "2024-03-05T00:00:00.000Z"]),
    until=st.sampled_from([None, "2024-03-06T00:00:00.000Z"]),
)
line_bytes = st.sampled_from([0, 300, 200_000])
PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _check_invariants(record: dict, opts: MappingOptions, size: int) -> None:
    before = copy.deepcopy(record)
    mapped = map_call(record, opts, size)
    assert record == before, "map_call changed its input"
    assert isinstance(mapped, Call | Rejected | Skipped)
    assert outcome(map_call(copy.deepcopy(record), opts, size)) == outcome(mapped)
    if not isinstance(mapped, Call):
        return
    assert len(mapped.identifier) == 1
    assert set(mapped.identifier) <= {"external_id", "user_alias"}
    assert _CANONICAL(mapped.time) and parse_time(mapped.time) == mapped.time
    for obj in (*mapped.events, *mapped.purchases):
        assert sum(key in obj for key in ("external_id", "user_alias", "braze_id")) == 1
        assert {k: obj[k] for k in mapped.identifier} == mapped.identifier
        assert obj["time"] == mapped.time
        for key, value in obj.get("properties", {}).items():
            assert key and len(key) <= 255 and key[0] != "$"
            assert key not in ("time", "event_name")
            assert not isinstance(value, str) or len(value) <= 255
    for event in mapped.events:
        assert isinstance(event["name"], str) and event["name"].strip()
    for purchase in mapped.purchases:
        assert isinstance(purchase["product_id"], str) and 0 < len(purchase["product_id"]) <= 255
        assert re.fullmatch("[A-Z]{3}", purchase["currency"])
        assert type(purchase["price"]) in (int, float)
        assert type(purchase["quantity"]) is int and 1 <= purchase["quantity"] <= 100
    for key, value in (mapped.attributes or {}).items():
        assert key and len(key) <= 255 and key[0] != "$"
        assert not isinstance(value, str) or len(value) <= 255


@PROPERTY_SETTINGS
@given(record=any_record, opts=options, size=line_bytes)
def test_never_raises_on_arbitrary_json(record, opts, size) -> None:
    _check_invariants(record, opts, size)


@PROPERTY_SETTINGS
@given(record=typed_record, opts=options, size=line_bytes)
def test_invariants_on_calls_of_every_type(record, opts, size) -> None:
    _check_invariants(record, opts, size)


@PROPERTY_SETTINGS
@given(record=order_record, opts=options, size=line_bytes)
def test_invariants_on_orders(record, opts, size) -> None:
    _check_invariants(record, opts, size)
