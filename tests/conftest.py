"""Shared helpers: Segment lines and archives made on the fly."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import orjson
import pytest

_ids = itertools.count(1)


def segment(kind: str, user_id="u1", time="2024-03-05T14:03:22.083Z", **fields) -> dict:
    """A Segment call as the S3 destination archives it (the fields mapping reads)."""
    line = {
        "type": kind,
        "userId": user_id,
        "anonymousId": "anon-1",
        "messageId": fields.pop("messageId", f"msg-{next(_ids)}"),
        "timestamp": time,
        "receivedAt": time,
    }
    line.update(fields)
    return line


def identify(user_id="u1", time="2024-03-05T14:03:22.083Z", **traits) -> dict:
    return segment("identify", user_id, time, traits=traits)


def track(event, user_id="u1", time="2024-03-05T14:03:22.083Z", **properties) -> dict:
    return segment("track", user_id, time, event=event, properties=properties)


def write_archive(path: Path, lines: list, compress: bool = True) -> Path:
    """Lines are dicts (encoded as JSON) or raw bytes (written as they are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(
        (line if isinstance(line, bytes) else orjson.dumps(line)) + b"\n" for line in lines
    )
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


@pytest.fixture
def archive(tmp_path):
    """archive(lines, name=...) -> path of a gzip archive file under tmp_path/logs."""

    def make(lines, name="src/1709596800000/part-1.gz", compress=True) -> Path:
        return write_archive(tmp_path / "logs" / name, lines, compress)

    return make


IDENTIFIER_KEYS = ("external_id", "user_alias", "braze_id", "_update_existing_only")


def final_attributes(bodies: list[dict]) -> dict[str, dict]:
    """Each user's attributes after every request body is applied in order, as Braze
    does: null unsets. Users with only events appear with no attributes."""
    users: dict[str, dict] = {}
    for body in bodies:
        for array in ("attributes", "events", "purchases"):
            for obj in body.get(array, ()):
                attributes = users.setdefault(obj["external_id"], {})
                if array != "attributes":
                    continue
                for key, value in obj.items():
                    if key in IDENTIFIER_KEYS:
                        continue
                    if value is None:
                        attributes.pop(key, None)
                    else:
                        attributes[key] = value
    return users
