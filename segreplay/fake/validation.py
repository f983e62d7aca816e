"""Braze's contract for /users/track objects: the reason one attribute, event or purchase
object is refused, or None when it is valid.
"""

from __future__ import annotations

import math
from datetime import date, datetime
from typing import Any

from segreplay.fake.config import MAX_EXTERNAL_ID_BYTES, MAX_KEY_CHARS

_IDENTIFIER_REQUIRED = "'external_id', 'braze_id', 'user_alias', 'email' or 'phone' is required"
_RESERVED_PROPERTY_KEYS = frozenset(("time", "event_name"))
_GENDERS = frozenset(("M", "F", "O", "N", "P"))
_SUBSCRIPTION_STATES = frozenset(("opted_in", "subscribed", "unsubscribed"))


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
