"""The one module that owns JSON encoding and decoding (orjson)."""

import orjson

JSONDecodeError = orjson.JSONDecodeError


def loads(data: bytes | str):
    return orjson.loads(data)


def dumps(value) -> bytes:
    return orjson.dumps(value)


def dumps_canonical(value) -> bytes:
    """Key order does not matter: used to compare values, never to send them."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
