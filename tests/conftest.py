"""Shared helpers: Segment lines and archives made on the fly."""

from __future__ import annotations

import gzip
import itertools
import time
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


def track(event, user_id="u1", time="2024-03-05T14:03:22.083Z", messageId=None,  # noqa: N803
          **properties) -> dict:  # fmt: skip
    ids = {"messageId": messageId} if messageId is not None else {}
    return segment("track", user_id, time, event=event, properties=properties, **ids)


def visit(name: str, user: str | None, anon: str | None, time: str) -> dict:
    """A track line of an identity story; `anon` None leaves anonymousId out (a
    server-side call), `user` None makes it anonymous."""
    line = segment("track", user, time, event=name, properties={}, anonymousId=anon)
    if anon is None:
        del line["anonymousId"]
    return line


def alias_call(previous: str, user: str, time: str) -> dict:
    return segment("alias", user, time, previousId=previous)


def events_by_profile(fake, with_time: bool = False) -> dict[str, list]:
    """Each profile the fake holds (its external_id, or 'alias:<name>' when alias-only)
    and its events, sorted: their names, or (name, time)."""
    profiles = {}
    for profile in fake.profiles():
        key = profile["external_id"]
        if key is None:
            (alias,) = profile["user_aliases"]
            key = "alias:" + alias["alias_name"]
        events = profile["events"]
        profiles[key] = sorted(
            (event["name"], event["time"]) if with_time else event["name"] for event in events
        )
    return profiles


def wait_for_requests(fake, process, count: int, timeout_s: float = 60.0) -> None:
    """Until the fake has seen `count` requests; fails if `process` ended first."""
    deadline = time.monotonic() + timeout_s
    while fake.stats()["requests"] < count:
        if process.poll() is not None:
            _, stderr = process.communicate()
            raise AssertionError((stderr or b"").decode() or f"exit {process.returncode}")
        assert time.monotonic() < deadline, f"fewer than {count} requests in {timeout_s} s"
        time.sleep(0.01)


def worker_pids(pid: int) -> list[int]:
    """The shard processes `segreplay import --workers` (process `pid`) started."""
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()
                if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()]  # fmt: skip


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


class ScheduledSink:
    """A Braze that acknowledges every request, with its answers released on a schedule:
    `schedule(waiting)` says how many of the `waiting` answers (oldest first) a look
    without waiting gets; a blocking look gets at least one. `window` bounds the
    requests in flight (None: no bound). After `fail_after` requests the process "dies":
    submit raises, as a crash would stop the loop."""

    error = None
    budget_waits = 0
    unsent = 0

    def __init__(self, schedule=lambda waiting: waiting, window=None, fail_after=None):
        self._schedule = schedule
        self._window = window
        self._fail_after = fail_after
        self._waiting = []
        self.sent = 0

    def has_room(self, batch) -> bool:
        return self._window is None or len(self._waiting) < self._window

    def submit(self, batch) -> None:
        from segreplay.errors import DeliveryError
        from segreplay.sink import Answer

        if self._fail_after is not None and self.sent >= self._fail_after:
            raise DeliveryError("simulated crash")
        self.sent += 1
        self._waiting.append(Answer(batch, [batch.body]))

    def answers(self, timeout=0):
        count = self._schedule(len(self._waiting))
        if timeout != 0:
            count = max(count, 1)
        released, self._waiting = self._waiting[:count], self._waiting[count:]
        return released

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    def notices(self) -> list:
        return []

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on 127.0.0.1 (s3server.LocalS3), one per test process."""
    from s3server import LocalS3

    server = LocalS3()
    yield server
    server.stop()
