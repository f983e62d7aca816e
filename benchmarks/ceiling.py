"""(m) The ceiling: the least a dry run must do per line, written as one bare loop.

It reads and parses every line like the floor, then turns track and page lines into
events: user id, time, messageId digest, a dedupe check against an in-run set and a real
SQLite `delivered` table (read per chunk, written per group of requests), property
checks, request bodies of 75. Everything else a replay does is left out: identify
(attribute dedupe per user and key), purchases, screens, groups, aliases, dead letters,
summaries, checkpoints, ordering. Its ratio to the floor bounds what any CPython pipeline
of this shape can reach on one core: the real one does all of this and more.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import orjson
from isal import igzip

from segreplay.dedupe import message_digest
from segreplay.times import parse_time

_RESERVED = frozenset({"time", "event_name"})
_CHUNK = 2_000
_GROUP = 32 * 75


def ceiling(folder: Path, state_path: Path) -> tuple[int, float]:
    """Lines and seconds for the bare event loop over every file of `folder`."""
    db = sqlite3.connect(state_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=MEMORY")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("CREATE TABLE IF NOT EXISTS delivered (hash INTEGER PRIMARY KEY)")
    loads, dumps = orjson.loads, orjson.dumps
    pending: set[int] = set()
    events: list[dict] = []
    chunk: list[int] = []
    settled: list[int] = []
    lines = 0
    started = time.perf_counter()
    for path in sorted(folder.rglob("*.gz")):
        with igzip.open(path, "rb") as stream:
            for line in stream:
                lines += 1
                record = loads(line)
                kind = record.get("type")
                if kind != "track" and kind != "page":
                    continue
                user_id = record.get("userId")
                if type(user_id) is not str or not (user_id := user_id.strip()):
                    continue
                moment = parse_time(record.get("timestamp"))
                message_id = record.get("messageId")
                if moment is None or type(message_id) is not str:
                    continue
                digest = message_digest(message_id, 0)
                if digest in pending:
                    continue
                pending.add(digest)
                chunk.append(digest)
                if len(chunk) >= _CHUNK:
                    marks = ",".join("?" * len(chunk))
                    db.execute(f"SELECT hash FROM delivered WHERE hash IN ({marks})", chunk)
                    chunk = []
                properties = record.get("properties") or {}
                for key, value in properties.items():
                    if (
                        key in _RESERVED
                        or key[:1] == "$"
                        or (type(value) is str and len(value) > 255)
                    ):
                        break
                name = record.get("event") if kind == "track" else "Loaded a Page"
                events.append(
                    {"external_id": user_id, "name": name, "time": moment, "properties": properties}
                )
                settled.append(digest)
                if len(events) == 75:
                    dumps({"events": events})
                    events = []
                    if len(settled) >= _GROUP:
                        db.execute("BEGIN")
                        db.executemany(
                            "INSERT OR IGNORE INTO delivered (hash) VALUES (?)",
                            ((d,) for d in settled),
                        )
                        db.execute("COMMIT")
                        pending.difference_update(settled)
                        settled = []
    elapsed = time.perf_counter() - started
    db.close()
    return lines, elapsed
