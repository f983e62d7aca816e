"""State kept in a bucket, against moto's S3 server on 127.0.0.1: downloaded, worked on,
uploaded; a lease held by a live run refuses a second one, naming it; a stale lease is
taken over; shards keep one object each."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from s3server import LocalS3

from samples.generate import generate
from segreplay.fake import FakeBraze

SEGREPLAY = [sys.executable, "-m", "segreplay"]
KEY = "bucket-state-key"
BUCKET = "replay-state"


@pytest.fixture(scope="module")
def s3(s3):
    s3.bucket(BUCKET)
    return s3


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("archive") / "segment-logs"
    generate(root, lines=2000, users=200, bad=False, seed=8, days=1)
    return root


def _run(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("BRAZE_", "SEGREPLAY_", "AWS_"))
    }
    environment.update(env)
    return subprocess.run([*SEGREPLAY, *args], cwd=cwd, env=environment, capture_output=True,
                          timeout=120)  # fmt: skip


def _import(logs: Path, fake: FakeBraze, state: str, work: Path, env: dict, *options: str):
    return _run(
        "import", str(logs), "--endpoint", fake.url, "--api-key", KEY, "--state", state,
        "--dead-letter", str(work / "dl.jsonl"), "--json", *options, cwd=work, env=env,
    )  # fmt: skip


def _keys(s3: LocalS3, prefix: str) -> list[str]:
    listed = s3.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for item in listed.get("Contents", ()))


def test_the_state_lives_in_the_bucket_between_runs(s3, logs, tmp_path):
    state = f"s3://{BUCKET}/plain/state.sqlite"
    with FakeBraze(api_key=KEY) as fake:
        first = _import(logs, fake, state, tmp_path, s3.env())
        assert first.returncode == 0, first.stderr.decode()
        assert (
            f"state kept in {state}: a snapshot is uploaded every 300 s and at the end; after "
            "a crash (kill -9, a lost machine) the requests acknowledged since the last upload "
            "are sent again: at most 150,000 requests at this --rate (11,250,000 events)"
        ) in first.stderr.decode()
        sent = fake.stats()["requests"]
        assert sent > 10
        assert _keys(s3, "plain/") == ["plain/state.sqlite"]  # the lease is let go
        assert list(tmp_path.glob("*.sqlite")) == []  # no local state left behind

        again = _import(logs, fake, state, tmp_path, s3.env())
        assert again.returncode == 0, again.stderr.decode()
        summary = orjson.loads(again.stdout)
        assert (summary["requests"], summary["lines"]) == (0, 0)
        assert fake.stats()["requests"] == sent


def test_a_second_run_of_one_shard_is_refused_naming_the_holder(s3, logs, tmp_path):
    state = f"s3://{BUCKET}/held/state.sqlite"
    holder = {"host": "replay-7f9c", "pid": 4242, "since": "2026-11-30T12:00:00.000Z",
              "renewed": time.time(), "token": "x"}  # fmt: skip
    s3.client.put_object(Bucket=BUCKET, Key="held/state.sqlite.lease", Body=orjson.dumps(holder))
    with FakeBraze(api_key=KEY) as fake:
        result = _import(logs, fake, state, tmp_path, s3.env())
        assert fake.stats()["requests"] == 0
    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert (
        f"error: {state} is in use by another segreplay run: replay-7f9c pid 4242, since "
        f"2026-11-30T12:00:00.000Z (lease {state}.lease, renewed "
    ) in stderr
    assert "hint: wait for that run to finish; a lease not renewed for 900 s is taken over" in (
        stderr
    )
    assert _keys(s3, "held/") == ["held/state.sqlite.lease"]  # the holder's, untouched


def test_a_stale_lease_is_taken_over(s3, logs, tmp_path):
    state = f"s3://{BUCKET}/stale/state.sqlite"
    holder = {"host": "gone", "pid": 1, "since": "2026-11-30T12:00:00.000Z",
              "renewed": time.time() - 3600, "token": "x"}  # fmt: skip
    s3.client.put_object(Bucket=BUCKET, Key="stale/state.sqlite.lease", Body=orjson.dumps(holder))
    with FakeBraze(api_key=KEY) as fake:
        # Uploading at every step renews the lease it took over again and again.
        result = _import(logs, fake, state, tmp_path, s3.env(), "--state-upload-every", "0")
        assert result.returncode == 0, result.stderr.decode()
        assert _keys(s3, "stale/") == ["stale/state.sqlite"]
        again = _import(logs, fake, state, tmp_path, s3.env())
    assert orjson.loads(again.stdout)["requests"] == 0


def test_shards_keep_one_object_each_and_another_n_is_refused(s3, logs, tmp_path):
    state = f"s3://{BUCKET}/sharded/state.sqlite"
    with FakeBraze(api_key=KEY) as fake:
        result = _import(logs, fake, state, tmp_path, s3.env(), "--workers", "2")
        assert result.returncode == 0, result.stderr.decode()
        assert _keys(s3, "sharded/") == [
            "sharded/state.shard-0-of-2.sqlite",
            "sharded/state.shard-1-of-2.sqlite",
        ]
        other = _import(logs, fake, state, tmp_path, s3.env(), "--shard", "0/3")
    assert other.returncode == 2
    assert f"run `segreplay reshard --shards 3 --state {state}` first" in other.stderr.decode()
