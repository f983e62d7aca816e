"""s3:// and gs:// sources against a real S3 API on 127.0.0.1 (moto's server): the same
replay as from local files, incremental runs by ETag, dropped connections resumed, kill -9
resumed, and errors that name the bucket and key. GCS runs offline through an injected store.
"""

from __future__ import annotations

import collections
import gzip
import os
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import orjson
import pytest
from conftest import identify, track, wait_for_requests, write_archive
from moto import settings as moto_settings
from obstore.store import GCSStore, MemoryStore
from s3server import CuttingProxy

from segreplay.errors import UsageError
from segreplay.fake import FakeBraze
from segreplay.objerrors import Scheme
from segreplay.objstore import ObjectSource, ObjectURL, connect
from segreplay.source import ArchiveFile, LineReader

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from samples.generate import generate  # noqa: E402

KEY = "objstore-test-key"


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("archive") / "segment-logs"
    generate(root, lines=3000, users=300, bad=False, seed=5)
    return root


_buckets = iter(range(1_000_000))


@pytest.fixture
def bucket(s3, logs) -> str:
    """A new bucket holding `logs` under segment-logs/."""
    name = f"archive-{next(_buckets)}"
    s3.upload_tree(name, logs, "segment-logs")
    return name


def _cli(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("BRAZE_", "SEGREPLAY_", "AWS_"))
    }
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "segreplay", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        timeout=120,
    )


def _dry_run(source: str, work: Path, env: dict, name: str) -> bytes:
    output = work / f"{name}.jsonl"
    result = _cli(
        "import", source, "--dry-run", "--output", str(output), "--anonymous", "skip",
        "--state", str(work / "absent.sqlite"), "--dead-letter", str(work / f"{name}-dl.jsonl"),
        cwd=work, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    return output.read_bytes()


# ----------------------------------------------------------------------------- URLs


def test_object_urls_parse() -> None:
    assert ObjectURL.parse("s3://bkt/segment-logs/src") == ObjectURL(
        Scheme.S3, "bkt", "segment-logs/src"
    )
    assert ObjectURL.parse("gs://bkt") == ObjectURL(Scheme.GCS, "bkt", "")
    assert ObjectURL.parse("gs://bkt/a/b.gz").child("a/c.gz") == "gs://bkt/a/c.gz"
    with pytest.raises(UsageError, match="not an object URL"):
        ObjectURL.parse("s3://")


# ----------------------------------------------------------------------------- replays


def test_a_dry_run_from_s3_equals_the_one_from_local_files(s3, logs, bucket, tmp_path) -> None:
    local = _dry_run(str(logs), tmp_path, s3.env(), "local")
    remote = _dry_run(f"s3://{bucket}/segment-logs", tmp_path, s3.env(), "s3")
    assert remote == local and len(local.splitlines()) > 20


def test_mixed_sources_and_a_single_object(s3, logs, bucket, tmp_path) -> None:
    first = sorted(logs.rglob("*.gz"))[0]
    key = f"segment-logs/{first.relative_to(logs).as_posix()}"
    one = _dry_run(str(first), tmp_path, s3.env(), "one-local")
    assert _dry_run(f"s3://{bucket}/{key}", tmp_path, s3.env(), "one-s3") == one
    extra = write_archive(tmp_path / "extra.jsonl", [identify("zz", plan="pro")], compress=False)
    result = _cli("inspect", f"s3://{bucket}/{key}", str(extra), cwd=tmp_path, env=s3.env())
    assert result.returncode == 0, result.stderr.decode()


def test_content_is_sniffed_not_trusted_by_name(s3, tmp_path) -> None:
    plain = write_archive(tmp_path / "d" / "inflated.gz", [track("Ran", "u9")], compress=False)
    s3.upload_tree("sniffed", tmp_path / "d", "logs")
    result = _cli("inspect", "s3://sniffed/logs/inflated.gz", cwd=tmp_path, env=s3.env())
    assert result.returncode == 0, result.stderr.decode()
    assert b"Ran" in result.stdout + result.stderr
    assert plain.exists()


def _import(source: str, fake: FakeBraze, work: Path, env: dict) -> dict:
    result = _cli(
        "import", source, "--endpoint", fake.url, "--api-key", KEY, "--anonymous", "skip",
        "--state", str(work / "state.sqlite"), "--dead-letter", str(work / "dl.jsonl"), "--json",
        cwd=work, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    return orjson.loads(result.stdout)


def _object_gets(proxy: CuttingProxy) -> list[bytes]:
    """Paths of the object GETs the proxy saw (listings excluded)."""
    lines = [request.split(b"\r\n", 1)[0] for request in proxy.requests]
    return [
        line.split()[1] for line in lines if line.startswith(b"GET ") and b"list-type" not in line
    ]


def test_incremental_runs_read_only_new_or_rewritten_objects(s3, bucket, tmp_path) -> None:
    proxy = CuttingProxy(s3.endpoint)
    env = s3.env(proxy.endpoint)
    source = f"s3://{bucket}/segment-logs"
    with FakeBraze(api_key=KEY) as fake:
        first = _import(source, fake, tmp_path, env)
        assert first["requests"] > 20 and first["files_already_done"] == 0
        listed = first["files"]
        # A late file in a new day folder: the next run fetches it alone.
        new_key = "segment-logs/src-new/1710000000000/part-1.gz"
        write_archive(tmp_path / "new" / "part-1.gz", [identify("new-user", plan="pro")])
        s3.client.put_object(
            Bucket=bucket, Key=new_key, Body=(tmp_path / "new/part-1.gz").read_bytes()
        )
        proxy.requests.clear()
        second = _import(source, fake, tmp_path, env)
        assert _object_gets(proxy) == [f"/{bucket}/{new_key}".encode()]
        assert (second["files_already_done"], second["requests"]) == (listed, 1)
        # Nothing new: nothing fetched, nothing sent.
        proxy.requests.clear()
        third = _import(source, fake, tmp_path, env)
        assert _object_gets(proxy) == [] and third["requests"] == 0
        # Rewritten with one more line (a new ETag): read again, only the new line sent.
        lines = [identify("new-user", plan="pro"), track("Upgraded", "new-user")]
        s3.client.put_object(Bucket=bucket, Key=new_key, Body=gzip.compress(
            b"".join(orjson.dumps(line) + b"\n" for line in lines)))  # fmt: skip
        events_before = fake.stats()["accepted"]["event"]
        fourth = _import(source, fake, tmp_path, env)
        assert fourth["events_sent"] == 1 and fourth["attributes_sent"] == 0
        assert fake.stats()["accepted"]["event"] == events_before + 1
    proxy.close()


def test_a_connection_dropped_mid_object_loses_nothing(s3, logs, bucket, tmp_path) -> None:
    local = _dry_run(str(logs), tmp_path, s3.env(), "local")
    proxy = CuttingProxy(s3.endpoint)
    proxy.arm(after=40_000, times=6)  # past the listing, inside the objects
    remote = _dry_run(f"s3://{bucket}/segment-logs", tmp_path, s3.env(proxy.endpoint), "cut")
    assert proxy.cuts == 6
    assert any(b"range: bytes=" in request.lower() for request in proxy.requests)
    assert remote == local
    proxy.close()


def test_the_stream_resumes_from_the_last_byte_when_retries_give_up(
    s3, tmp_path, monkeypatch
) -> None:
    """Cut the same GET more often than the store retries it: segreplay's own range GET
    takes over, and every line arrives once, in order."""
    lines = [track(f"E{n}", f"u{n}") for n in range(20_000)]
    path = write_archive(tmp_path / "d" / "big.gz", lines)
    s3.upload_tree("resumed", tmp_path / "d", "logs")
    proxy = CuttingProxy(s3.endpoint)
    for name, value in s3.env(proxy.endpoint).items():
        monkeypatch.setenv(name, value)
    objects = ObjectSource()
    (listed,) = objects.discover("s3://resumed/logs")
    proxy.arm(after=30_000, times=12)
    stream = objects.open(listed.url, listed.size, listed.fingerprint)
    data = stream.read()
    assert data == path.read_bytes()
    assert stream.raw.resumes > 0 and proxy.cuts == 12
    proxy.close()


def test_kill_9_then_resume_skips_acknowledged_lines(s3, bucket, tmp_path) -> None:
    with FakeBraze(api_key=KEY, latency_ms=20.0) as fake:
        argv = [
            sys.executable, "-m", "segreplay", "import", f"s3://{bucket}/segment-logs",
            "--endpoint", fake.url, "--api-key", KEY, "--anonymous", "skip", "--json",
            "--state", str(tmp_path / "state.sqlite"), "--concurrency", "2",
        ]  # fmt: skip
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **s3.env()}
        process = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
        wait_for_requests(fake, process, 15)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        resumed = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr.decode()
        summary = orjson.loads(resumed.stdout)
        assert summary["lines_already_done"] + summary["files_already_done"] > 0
        expected = _dry_run(f"s3://{bucket}/segment-logs", tmp_path, s3.env(), "expected")
        events = collections.Counter(
            orjson.dumps(e, option=orjson.OPT_SORT_KEYS)
            for body in expected.splitlines()
            for e in orjson.loads(body).get("events", ())
        )
        stored = collections.Counter(
            orjson.dumps(e, option=orjson.OPT_SORT_KEYS) for e in fake.accepted("event")
        )
        assert not events - stored, "events lost"


# ----------------------------------------------------------------------------- errors


def _error(source: str, tmp_path: Path, env: dict) -> tuple[int, str]:
    result = _cli("import", source, "--dry-run", cwd=tmp_path, env=env)
    output = (result.stdout + result.stderr).decode()
    for secret in (env.get("AWS_SECRET_ACCESS_KEY"),):
        assert not secret or secret not in output
    return result.returncode, output


def test_a_missing_bucket_is_a_usage_error(s3, tmp_path) -> None:
    code, output = _error("s3://no-such-bucket/logs", tmp_path, s3.env())
    assert code == 2
    assert "Error: s3://no-such-bucket: the bucket does not exist" in output


def test_an_empty_prefix_is_a_usage_error(s3, bucket, tmp_path) -> None:
    code, output = _error(f"s3://{bucket}/segment-logz", tmp_path, s3.env())
    assert (code, "no such object or prefix" in output) == (2, True)


def test_an_endpoint_that_does_not_answer(s3, tmp_path) -> None:
    code, output = _error("s3://bkt/logs", tmp_path, s3.env("http://127.0.0.1:9"))
    assert code == 2
    assert "Error: s3://bkt/logs: the store does not answer" in output
    assert "AWS_ENDPOINT_URL" in output


def test_plain_http_only_for_a_loopback_endpoint(s3, tmp_path) -> None:
    code, output = _error("s3://bkt/logs", tmp_path, s3.env("http://s3.example.com"))
    assert code == 2 and "plain http is only for a loopback host" in output


@pytest.fixture
def enforced_auth(s3):
    """moto checks signatures and IAM policies from here on (for this test only)."""
    iam = boto3.client(
        "iam", endpoint_url=s3.endpoint, region_name="us-east-1",
        aws_access_key_id="x", aws_secret_access_key="x",
    )  # fmt: skip
    iam.create_user(UserName="lister")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "*"}],
    }
    iam.put_user_policy(
        UserName="lister", PolicyName="list", PolicyDocument=orjson.dumps(policy).decode()
    )
    key = iam.create_access_key(UserName="lister")["AccessKey"]
    before = moto_settings.INITIAL_NO_AUTH_ACTION_COUNT
    moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    yield key["AccessKeyId"], key["SecretAccessKey"]
    moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = before


def test_bad_credentials_and_access_denied(s3, bucket, tmp_path, enforced_auth) -> None:
    access_key, secret = enforced_auth
    wrong = {**s3.env(), "AWS_SECRET_ACCESS_KEY": "wrong-SECRET-5f4e3d"}
    code, output = _error(f"s3://{bucket}/segment-logs", tmp_path, wrong)
    assert code == 2
    assert f"Error: s3://{bucket}/segment-logs: the store refused the credentials" in output
    assert "AWS_PROFILE" in output
    # Allowed to list but not to read: the run stops (exit 1) and names s3:GetObject.
    lister = {**s3.env(), "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret}
    code, output = _error(f"s3://{bucket}/segment-logs", tmp_path, lister)
    assert code == 1
    assert "access denied to read (AccessDenied)" in output
    assert f"the credentials need the permission s3:GetObject on arn:aws:s3:::{bucket}/*" in output


# ----------------------------------------------------------------------------- GCS, offline


def test_gcs_lists_and_reads_through_the_same_code_path(tmp_path) -> None:
    """gs:// goes through the same obstore calls; here the store is an in-memory one."""
    memory = MemoryStore()
    made: list[tuple[Scheme, str]] = []

    def factory(scheme: Scheme, bucket: str) -> MemoryStore:
        made.append((scheme, bucket))
        return memory

    lines = [identify("u1", plan="pro"), track("Ran", "u1")]
    body = gzip.compress(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    for key in ("logs/src/1709683200000/b.gz", "logs/src/1709596800000/a.gz"):
        memory.put(key, body)
    objects = ObjectSource(factory)
    listed = objects.discover("gs://bkt/logs")
    assert [o.url for o in listed] == [
        "gs://bkt/logs/src/1709596800000/a.gz",
        "gs://bkt/logs/src/1709683200000/b.gz",
    ]
    assert made == [(Scheme.GCS, "bkt")]
    data = objects.open(listed[0].url, listed[0].size, listed[0].fingerprint).read()
    assert data == body
    with pytest.raises(UsageError, match="gs://bkt/nope: no such object or prefix"):
        objects.discover("gs://bkt/nope")


def test_gcs_store_is_built_for_the_bucket() -> None:
    assert isinstance(connect(Scheme.GCS, "segment-archive"), GCSStore)


def test_a_done_object_is_known_without_reading_it() -> None:
    archive = ArchiveFile("s3://b/k.gz", 10, 1, 'etag:"abc"')
    reader = LineReader(archive, lambda problem: None)
    assert reader.bytes_read == 10  # nothing opened


def test_a_listing_shared_out_between_threads_finds_every_object_once() -> None:
    """Many folders, cut into runs at folder boundaries: names that sort differently as
    folders and as keys ("d-1" before "d/"), objects beside folders, none lost or twice."""
    memory = MemoryStore()
    keys = [f"logs/src/{day:04d}/part-{n}.gz" for day in range(0, 400, 3) for n in range(3)]
    keys += ["logs/src/0003-x/late.gz", "logs/src/00030/odd.gz", "logs/src/top.gz", "logs/a.gz"]
    for key in keys:
        memory.put(key, b"{}\n")
    listed = ObjectSource(lambda scheme, bucket: memory).discover("gs://bkt/logs/")
    assert [o.url for o in listed] == sorted(f"gs://bkt/{key}" for key in keys)
