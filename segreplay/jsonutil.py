"""The one module that owns JSON encoding and decoding (orjson)."""

import orjson

JSONDecodeError = orjson.JSONDecodeError

# orjson's own functions, not wrappers: these run once per archive line.
loads = orjson.loads
dumps = orjson.dumps


def dumps_canonical(value) -> bytes:
    """Key order does not matter: used to compare values, never to send them."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
