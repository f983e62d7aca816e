"""Pure functions: one Segment call -> the Braze objects it stands for, or why not.

No I/O and no state here: deduplication against what was already sent happens later
(`ledger.py`, `dedupe.py`). The rules are mapping.md's; docs/mapping.md explains each one.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from segreplay.config import MappingOptions
from segreplay.jsonutil import dumps
from segreplay.times import parse_date, parse_time

MAX_EXTERNAL_ID_BYTES = 987
MAX_KEY_CHARS = 255
MAX_STRING_CHARS = 255
MAX_NESTED_BYTES = 100_000
MAX_PURCHASE_QUANTITY = 100
# Above this a quantity is a data error, not an order: 1e18 would mean 1e16 purchases.
MAX_ORDER_QUANTITY = 10_000
ALIAS_LABEL = "segment_anonymous_id"
GROUP_PREFIX = "ab_segment_group_"
RESERVED_PROPERTY_KEYS = frozenset({"time", "event_name"})

_PURCHASE_NAMES = frozenset({"order completed", "completed order"})
# Segment ecommerce events that carry products but are not purchases: logging a viewed
# cart as a purchase would inflate revenue.
_BROWSING_NAMES = frozenset(
    name.lower()
    for name in (
        "Products Searched", "Product List Viewed", "Product List Filtered",
        "Promotion Viewed", "Promotion Clicked", "Product Clicked", "Product Viewed",
        "Product Added", "Product Removed", "Cart Viewed", "Checkout Started",
        "Checkout Step Viewed", "Checkout Step Completed", "Payment Info Entered",
        "Order Updated", "Order Refunded", "Order Cancelled", "Coupon Entered",
        "Coupon Applied", "Coupon Denied", "Coupon Removed", "Product Added to Wishlist",
        "Product Removed from Wishlist", "Wishlist Product Added to Cart", "Product Shared",
        "Cart Shared", "Product Reviewed",
    )
)  # fmt: skip

_GENDERS = {
    **dict.fromkeys(("m", "male", "man"), "M"),
    **dict.fromkeys(("f", "female", "woman", "w"), "F"),
    **dict.fromkeys(("o", "other", "non-binary", "nonbinary"), "O"),
    **dict.fromkeys(("n", "not applicable"), "N"),
    **dict.fromkeys(("p", "prefer not to say"), "P"),
}
# Segment trait -> Braze standard field, for plain string fields.
_STRING_TRAITS = {
    "firstName": "first_name",
    "first_name": "first_name",
    "lastName": "last_name",
    "last_name": "last_name",
    "phone": "phone",
    "avatar": "image_url",
}
_PRODUCT_ID_KEYS = ("product_id", "id", "sku")
# Fields a purchase carries as its own: not repeated in its properties.
_PURCHASE_FIELDS = frozenset({"price", "currency", "quantity"})
# Traits mapping.md names but does not send: `inspect` reports them as unmapped.
UNMAPPED_ADDRESS_KEYS = ("street", "state", "postalCode", "postal_code")


@dataclass(slots=True)
class Drop:
    """A field that is not sent; the rest of its object still goes."""

    key: str
    reason: str


@dataclass(slots=True)
class Rejected:
    """A line that yields nothing: the reason goes to the dead letter."""

    reason: str


class SkipReason(enum.StrEnum):
    """Why a line is deliberately not replayed; the value is its summary count's name."""

    ANONYMOUS = "skipped_anonymous"
    ALIAS = "skipped_alias"
    PAGE = "skipped_pages"
    SCREEN = "skipped_screens"
    OUTSIDE_WINDOW = "outside_window"
    FILTERED = "filtered"
    # Not the mapping's: the user is deleted (`segreplay delete`) or in a --suppress file.
    DELETED = "skipped_deleted"
    SUPPRESSED = "skipped_suppressed"


@dataclass(slots=True)
class Skipped:
    """A line deliberately not replayed."""

    reason: SkipReason


class Call:
    """One Segment call, mapped. `user` is the state key of its Braze user.

    A plain class rather than a dataclass: one is built per archive line."""

    __slots__ = (
        "kind", "user", "identifier", "time", "message_id", "attributes", "events",
        "purchases", "drops", "rejected_objects", "measure_nested", "resolved_from",
    )  # fmt: skip

    def __init__(self, kind: str, user: str, identifier: dict, time: str, message_id) -> None:
        self.kind = kind
        self.user = user
        self.identifier = identifier
        self.time = time
        self.message_id: str | None = message_id
        self.attributes: dict | None = None  # Braze key -> value; None as a value unsets
        self.events: list[dict] = []
        self.purchases: list[dict] = []
        self.drops: list[Drop] = []
        self.rejected_objects: list[Rejected] = []
        self.measure_nested = True
        self.resolved_from = ""  # the anonymousId of an anonymous line sent as its userId

    @property
    def is_alias(self) -> bool:
        return "user_alias" in self.identifier

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"Call({fields})"


Mapped = Call | Rejected | Skipped


def map_call(record: dict, options: MappingOptions, line_bytes: int = 0,
             links: Mapping[str, str] | None = None) -> Mapped:  # fmt: skip
    """Map one parsed Segment line (a JSON object) to Braze objects.

    `line_bytes`, the line's length when known, spares measuring nested values of lines
    too short to hold one over Braze's size limit. `links` (anonymousId -> userId, with
    --anonymous alias) sends an anonymous line as the user it turned out to be."""
    kind = record.get("type")
    if not isinstance(kind, str) or not kind:
        if kind is None or kind == "":
            return Rejected("missing type")
        return Rejected(f"type must be a string, not {_json_type(kind)}")
    if kind == "alias":
        return Skipped(SkipReason.ALIAS)
    mapper = _MAPPERS.get(kind)
    if mapper is None:
        return Rejected(f"unknown type {kind!r}")
    if kind in ("page", "screen"):
        mode = options.pages if kind == "page" else options.screens
        if mode == "none" or (mode == "named" and not _nonblank(record.get("name"))):
            return Skipped(SkipReason.PAGE if kind == "page" else SkipReason.SCREEN)

    identity = resolve_identity(record, options, links)
    if type(identity) is not tuple:
        return identity
    user, identifier, resolved_from = identity
    time = event_time(record)
    if time is None:
        return Rejected("no parseable time in timestamp, originalTimestamp or receivedAt")
    if (options.since and time < options.since) or (options.until and time >= options.until):
        return Skipped(SkipReason.OUTSIDE_WINDOW)
    message_id = record.get("messageId")
    if message_id is not None and not isinstance(message_id, str):
        message_id = str(message_id)
    call = Call(kind, user, identifier, time, message_id or None)
    call.resolved_from = resolved_from
    call.measure_nested = not 0 < line_bytes < MAX_NESTED_BYTES
    return mapper(record, call, options)


def external_id_of(record: dict) -> str | Rejected:
    """The line's userId as a Braze external_id; "" when it has none."""
    user_id = record.get("userId")
    if isinstance(user_id, str):
        external_id = user_id.strip()
    elif user_id is None:
        return ""
    elif isinstance(user_id, int | float) and not isinstance(user_id, bool):
        external_id = str(int(user_id)) if float(user_id).is_integer() else repr(user_id)
    else:
        return Rejected(f"userId must be a string or a number, not {_json_type(user_id)}")
    if len(external_id.encode()) > MAX_EXTERNAL_ID_BYTES:
        return Rejected(f"userId is longer than {MAX_EXTERNAL_ID_BYTES} bytes")
    return external_id


def anonymous_id_of(record: dict, key: str = "anonymousId") -> str:
    """The line's anonymousId (or another id field, such as an alias call's previousId),
    stripped; "" when it has none."""
    anonymous_id = record.get(key)
    if isinstance(anonymous_id, int | float) and not isinstance(anonymous_id, bool):
        return str(anonymous_id)
    if not isinstance(anonymous_id, str):
        return ""
    return anonymous_id.strip()


def event_time(record: dict) -> str | None:
    """The line's event time, canonical UTC; None when no field holds a parseable one."""
    return (
        parse_time(record.get("timestamp"))
        or parse_time(record.get("originalTimestamp"))
        or parse_time(record.get("receivedAt"))
    )


def alias_identifier(anonymous_id: str) -> dict:
    return {"user_alias": {"alias_name": anonymous_id, "alias_label": ALIAS_LABEL}}


def resolve_identity(record: dict, options: MappingOptions,
                     links=None) -> tuple[str, dict, str] | Mapped:  # fmt: skip
    """(state key, Braze identifier, the anonymousId it was resolved from or ""), or why
    the line has no user. Sharding (sharding.py) keys lines by the same rules, so a shard
    owns a user exactly when mapping would name that user."""
    external_id = external_id_of(record)
    if type(external_id) is Rejected:
        return external_id
    if external_id:
        return "e:" + external_id, {"external_id": external_id}, ""
    if options.anonymous == "skip":
        return Skipped(SkipReason.ANONYMOUS)
    anonymous_id = anonymous_id_of(record)
    if not anonymous_id:
        return Skipped(SkipReason.ANONYMOUS)
    resolved = links.get(anonymous_id) if links else None
    if resolved is not None:
        return "e:" + resolved, {"external_id": resolved}, anonymous_id
    return "a:" + anonymous_id, alias_identifier(anonymous_id), ""


# identify ---------------------------------------------------------------------------


def _map_identify(record: dict, call: Call, options: MappingOptions) -> Mapped:
    traits = _object_field(record, "traits")
    if type(traits) is Rejected:
        return traits
    attributes: dict = {}
    drops = call.drops
    for key, value in traits.items():
        if key == "id":
            continue  # repeats userId
        braze_key = _STRING_TRAITS.get(key)
        if braze_key is not None:
            _put_string(attributes, drops, braze_key, key, value)
        elif key == "email":
            _put_string(
                attributes, drops, "email", key, value.strip() if isinstance(value, str) else value
            )
        elif key == "birthday":
            _put_normalized(attributes, drops, key, "dob", value, parse_date, "not a date")
        elif key == "gender":
            _put_normalized(attributes, drops, key, "gender", value, _gender, "not a known gender")
        elif key == "address":
            _put_address(attributes, drops, value)
        else:
            _put_custom(attributes, call, key, value)
    call.attributes = attributes
    return call


def _put_string(attributes: dict, drops: list[Drop], braze_key: str, key: str, value) -> None:
    if value is None:
        attributes[braze_key] = None
    elif isinstance(value, str):
        if len(value) > MAX_STRING_CHARS:
            drops.append(Drop(key, f"string longer than {MAX_STRING_CHARS} characters"))
        else:
            attributes[braze_key] = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        attributes[braze_key] = str(value)
    else:
        drops.append(Drop(key, f"{braze_key} must be a string, not {_json_type(value)}"))


def _put_normalized(attributes: dict, drops: list[Drop], trait: str, braze_key: str, value,
                    normalize, complaint: str) -> None:  # fmt: skip
    """A standard field Braze takes in one form only: normalized, or left out with a
    warning. Never sent as null for a value it cannot read: that would clear Braze's."""
    if value is None:
        attributes[braze_key] = None
        return
    normalized = normalize(value)
    if normalized is None:
        drops.append(Drop(trait, f"{complaint}: {value!r:.80}"))
    else:
        attributes[braze_key] = normalized


def _gender(value) -> str | None:
    return _GENDERS.get(value.strip().lower()) if isinstance(value, str) else None


def _put_address(attributes: dict, drops: list[Drop], value) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        drops.append(Drop("address", f"address must be an object, not {_json_type(value)}"))
        return
    if "city" in value:
        _put_string(attributes, drops, "home_city", "address.city", value["city"])
    if "country" in value:
        _put_string(attributes, drops, "country", "address.country", value["country"])


def _put_custom(attributes: dict, call: Call, key: str, value) -> None:
    problem = _key_problem(key) or _value_problem(value, call.measure_nested)
    if problem is None:
        attributes[key] = value
    else:
        call.drops.append(Drop(key, problem))


def _key_problem(key: str) -> str | None:
    if not key:
        return "empty key"
    if len(key) > MAX_KEY_CHARS:
        return f"key longer than {MAX_KEY_CHARS} characters"
    if key[0] == "$":
        return "key starts with $"
    return None


def _value_problem(value, measure_nested: bool) -> str | None:
    kind = type(value)
    if kind is str:
        if len(value) > MAX_STRING_CHARS:
            return f"string longer than {MAX_STRING_CHARS} characters"
    elif (kind is dict or kind is list) and measure_nested:
        if len(dumps(value)) > MAX_NESTED_BYTES:
            return f"value larger than {MAX_NESTED_BYTES:,} bytes"
    return None


# track, page, screen -----------------------------------------------------------------


def _event_properties(properties: dict, call: Call) -> dict:
    """Properties Braze accepts; each one left out is a Drop."""
    kept = {}
    measure = call.measure_nested
    for key, value in properties.items():
        kind = type(value)
        if (
            # The usual property, checked inline: this loop runs for every property.
            0 < len(key) <= MAX_KEY_CHARS
            and key[0] != "$"
            and key not in RESERVED_PROPERTY_KEYS
            and (len(value) <= MAX_STRING_CHARS if kind is str else not measure)
        ):
            kept[key] = value
            continue
        if key in RESERVED_PROPERTY_KEYS:
            call.drops.append(Drop(key, "reserved property name in Braze"))
            continue
        problem = _key_problem(key) or _value_problem(value, measure)
        if problem is None:
            kept[key] = value
        else:
            call.drops.append(Drop(key, problem))
    return kept


def _new_event(call: Call, name: str, properties: dict, options: MappingOptions) -> dict:
    event = {**call.identifier, "name": name, "time": call.time}
    if properties:
        event["properties"] = properties
    if options.update_existing_only:
        event["_update_existing_only"] = True
    return event


def _allowed(name: str, options: MappingOptions) -> bool:
    if options.events_allow and name not in options.events_allow:
        return False
    return name not in options.events_deny


def _map_track(record: dict, call: Call, options: MappingOptions) -> Mapped:
    name = record.get("event")
    if not _nonblank(name):
        return Rejected("track without an event name")
    if not _allowed(name, options):
        return Skipped(SkipReason.FILTERED)
    properties = _object_field(record, "properties")
    if type(properties) is Rejected:
        return properties

    lowered = name.strip().lower()  # rules match "Order Completed " as "Order Completed"
    products = properties.get("products")
    is_order = lowered in _PURCHASE_NAMES
    if is_order and products is not None and not isinstance(products, list):
        return Rejected(f"properties.products must be a list, not {_json_type(products)}")
    has_products = isinstance(products, list) and bool(products)
    if has_products and lowered not in _BROWSING_NAMES:
        _add_purchases(call, properties, products, options)
        if not options.purchase_event_too:
            return call
    elif (
        options.log_purchase_when_revenue_present
        and not has_products
        # Ecommerce browsing and lifecycle events (Checkout Started, Order Refunded) are no
        # sale, whatever revenue they carry: a refund logged as a purchase adds revenue.
        and lowered not in _BROWSING_NAMES
        and _number(properties.get("revenue")) is not None
    ):
        _add_revenue_purchase(call, name, properties, options)
        if not options.purchase_event_too:
            return call
    elif is_order:
        call.drops.append(Drop("products", "order without products: logged as a custom event"))

    call.events.append(_new_event(call, name, _event_properties(properties, call), options))
    return call


def _add_purchases(call: Call, order: dict, products: list, options: MappingOptions) -> None:
    order_id = order.get("order_id", order.get("orderId"))
    for index, product in enumerate(products):
        where = f"products[{index}]"
        if not isinstance(product, dict):
            call.rejected_objects.append(Rejected(f"{where} is not an object"))
            continue
        id_key = next((k for k in _PRODUCT_ID_KEYS if _nonblank_id(product.get(k))), None)
        if id_key is None:
            call.rejected_objects.append(Rejected(f"{where} has no product_id, id or sku"))
            continue
        product_id = str(product[id_key]).strip()
        if len(product_id) > MAX_STRING_CHARS:
            call.rejected_objects.append(Rejected(f"{where}.product_id is longer than 255"))
            continue
        price = _number(product.get("price"))
        if price is None:
            call.rejected_objects.append(
                Rejected(f"{where}.price is not a number: {product.get('price')!r:.40}")
            )
            continue
        currency = _currency(product.get("currency") or order.get("currency"))
        if currency is None:
            call.rejected_objects.append(Rejected(f"{where} has no valid three-letter currency"))
            continue
        quantity = _quantity(1 if product.get("quantity") is None else product["quantity"])
        if quantity is None:
            call.rejected_objects.append(
                Rejected(
                    f"{where}.quantity must be a whole number from 1 to "
                    f"{MAX_ORDER_QUANTITY:,}: "
                    f"{product.get('quantity')!r:.40}"
                )
            )
            continue
        # The other fields go into properties (mapping.md): a `sku` beside a `product_id`
        # is kept; the identifier used and blank ones carry nothing.
        extra = {
            k: v
            for k, v in product.items()
            if k not in _PURCHASE_FIELDS
            and k != id_key
            and (k not in _PRODUCT_ID_KEYS or _nonblank_id(v))
        }
        if order_id is not None:
            extra["order_id"] = order_id
        properties = _event_properties(extra, call)
        while quantity > 0:
            # Braze takes at most 100 per purchase: split, adding up to the ordered quantity.
            portion = min(quantity, MAX_PURCHASE_QUANTITY)
            quantity -= portion
            call.purchases.append(
                _new_purchase(call, product_id, price, currency, portion, properties, options)
            )


def _add_revenue_purchase(call: Call, name: str, properties: dict, options: MappingOptions) -> None:
    currency = _currency(properties.get("currency"))
    if currency is None:
        call.rejected_objects.append(Rejected("revenue purchase has no valid currency"))
        return
    kept = _event_properties(
        {k: v for k, v in properties.items() if k not in ("revenue", "currency")}, call
    )
    call.purchases.append(
        _new_purchase(call, name, _number(properties["revenue"]), currency, 1, kept, options)
    )


def _new_purchase(call, product_id, price, currency, quantity, properties, options) -> dict:
    purchase = {
        **call.identifier,
        "product_id": product_id,
        "currency": currency,
        "price": price,
        "quantity": quantity,
        "time": call.time,
    }
    if properties:
        purchase["properties"] = properties
    if options.update_existing_only:
        purchase["_update_existing_only"] = True
    return purchase


def _map_page(record: dict, call: Call, options: MappingOptions) -> Mapped:
    noun = "Page" if call.kind == "page" else "Screen"
    name = record.get("name")
    category = record.get("category")
    if _nonblank(name):
        event_name = (
            f"Viewed {category} {name} {noun}" if _nonblank(category) else f"Viewed {name} {noun}"
        )
    else:
        event_name = f"Loaded a {noun}"
    if not _allowed(event_name, options):
        return Skipped(SkipReason.FILTERED)
    properties = _object_field(record, "properties")
    if type(properties) is Rejected:
        return properties
    properties = dict(properties)
    if name is not None:
        properties["name"] = name
    if category is not None:
        properties["category"] = category
    call.events.append(_new_event(call, event_name, _event_properties(properties, call), options))
    return call


def _map_group(record: dict, call: Call, options: MappingOptions) -> Mapped:
    group_id = record.get("groupId")
    if not _nonblank_id(group_id):
        return Rejected("group without a groupId")
    key = f"{GROUP_PREFIX}{str(group_id).strip()}"
    if len(key) > MAX_KEY_CHARS:
        return Rejected(f"groupId makes an attribute key longer than {MAX_KEY_CHARS} characters")
    call.attributes = {key: True}
    return call


_MAPPERS = {
    "identify": _map_identify,
    "track": _map_track,
    "page": _map_page,
    "screen": _map_page,
    "group": _map_group,
}


# values -------------------------------------------------------------------------------


def _object_field(record: dict, key: str) -> dict | Rejected:
    """`traits` or `properties`: an object, absent (empty), or a reason to reject the line."""
    value = record.get(key)
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    return Rejected(f"{key} must be an object, not {_json_type(value)}")


def _nonblank(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _nonblank_id(value) -> bool:
    if isinstance(value, bool):
        return False
    return _nonblank(value) or isinstance(value, int | float)


def _number(value) -> int | float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        if number != number or number in (float("inf"), float("-inf")):
            return None
        return int(number) if number.is_integer() and "." not in value else number
    return None


def _quantity(value) -> int | None:
    number = _number(value)
    if number is None or not float(number).is_integer() or not 1 <= number <= MAX_ORDER_QUANTITY:
        return None
    return int(number)


def _currency(value) -> str | None:
    if value is None:
        return "USD"
    if not isinstance(value, str):
        return None
    code = value.strip().upper()
    return code if len(code) == 3 and code.isascii() and code.isalpha() else None


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"
