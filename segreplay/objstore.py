"""Lists and streams archive objects in S3 and GCS (`s3://`, `gs://`) through obstore.

An object is known by its key and ETag; it is read as a stream that, when the connection
drops, resumes with a range request from the last byte received.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import PreconditionError
from obstore.store import GCSStore, S3Store

from segreplay.config import LOOPBACK_HOSTS
from segreplay.errors import ObjectUnreadable, UsageError
from segreplay.objerrors import Scheme, describe, read_error

# A stream yields at least this much at a time: big enough that a chunk costs little per
# byte, small enough that memory stays flat.
CHUNK_BYTES = 1 << 20
# Tries in a row without a byte of progress before an object is given up as unreadable.
RESUME_TRIES = 5
# Listing descends at most this many folder levels (e.g. segment-logs/, source, day) to
# find folders to share out between the threads.
_MAX_LEVELS = 4
_LIST_THREADS = 16
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Fail fast on an endpoint that does not answer; the run as a whole is resumable.
_RETRY = {
    "max_retries": 3,
    "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2)},
    "retry_timeout": timedelta(seconds=20),
}
# A slow consumer (a rate-limited replay) may hold one GET open for a long time; should it
# outlast this, the stream resumes from its last byte.
_CLIENT = {"connect_timeout": "10 seconds", "timeout": "30 minutes"}


@dataclass(frozen=True, slots=True)
class ObjectURL:
    scheme: Scheme
    bucket: str
    key: str  # no leading slash; "" for the whole bucket

    @classmethod
    def parse(cls, url: str) -> ObjectURL:
        scheme, _, rest = url.partition("://")
        bucket, _, key = rest.partition("/")
        if scheme not in ("s3", "gs") or not bucket:
            raise UsageError(f"{url}: not an object URL", "write s3://bucket/prefix or gs://...")
        return cls(Scheme(scheme), bucket, key.lstrip("/"))

    def child(self, key: str) -> str:
        return f"{self.scheme.value}://{self.bucket}/{key}"


@dataclass(frozen=True, slots=True)
class ListedObject:
    url: str
    size: int
    mtime_ns: int
    etag: str | None

    @property
    def fingerprint(self) -> str:
        """What the state remembers the object by: a rewrite changes it, a read does not."""
        return f"etag:{self.etag}" if self.etag else f"size-mtime:{self.size}:{self.mtime_ns}"


StoreFactory = Callable[[Scheme, str], Any]  # (scheme, bucket) -> an obstore store


def connect(scheme: Scheme, bucket: str) -> Any:
    """A store for one bucket, with credentials from where the platform's tools find them."""
    if scheme is Scheme.GCS:  # application default credentials, GOOGLE_* variables
        return GCSStore(bucket, client_options=_CLIENT, retry_config=_RETRY)
    config: dict[str, Any] = {}
    client: dict[str, Any] = dict(_CLIENT)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme == "http":
            if (parts.hostname or "").lower() not in LOOPBACK_HOSTS:
                raise UsageError(
                    f"AWS_ENDPOINT_URL {endpoint}: plain http is only for a loopback host",
                    "use https:// for a remote S3-compatible store",
                )
            client["allow_http"] = True
        elif parts.scheme != "https" or not parts.hostname:
            raise UsageError(f"AWS_ENDPOINT_URL {endpoint!r} is not an http(s) URL")
        config["endpoint"] = endpoint
    provider = _profile_credentials()
    if provider is not None:
        config = {**provider.config, **config}
    return S3Store(
        bucket,
        config=config,
        client_options=client,
        retry_config=_RETRY,
        credential_provider=provider,
    )


def _profile_credentials() -> Any:
    """boto3's credential chain when the credentials live in a profile (SSO, assumed
    roles, ~/.aws/credentials), which obstore does not read itself; None otherwise."""
    if os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return None  # obstore reads these itself, as the AWS CLI would before any profile
    profile = os.environ.get("AWS_PROFILE")
    files = [
        os.environ.get("AWS_CONFIG_FILE", os.path.expanduser("~/.aws/config")),
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE", os.path.expanduser("~/.aws/credentials")),
    ]
    if not profile and not any(os.path.exists(path) for path in files):
        return None  # ECS or EC2 role: obstore asks the platform
    try:
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        if not profile:
            return None
        raise UsageError(
            f"AWS_PROFILE={profile}: reading AWS profiles (and SSO) needs boto3",
            "pip install 'segreplay[s3]', or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        ) from None
    try:
        return Boto3CredentialProvider()
    except Exception as error:  # botocore raises many kinds; none may leak a secret
        raise UsageError(
            f"AWS credentials: {type(error).__name__} while reading profile {profile or 'default'}",
            "check AWS_PROFILE and ~/.aws/config; for SSO run `aws sso login` first",
        ) from None


class ObjectSource:
    """Lists and opens objects; `factory` builds the store for a bucket (tests inject one)."""

    def __init__(self, factory: StoreFactory = connect) -> None:
        self._factory = factory
        self._stores: dict[tuple[Scheme, str], Any] = {}

    def store(self, url: ObjectURL) -> Any:
        where = (url.scheme, url.bucket)
        if where not in self._stores:
            self._stores[where] = self._factory(*where)
        return self._stores[where]

    def discover(self, source: str) -> list[ListedObject]:
        """Every object under the prefix (or the one object it names), in key order.
        Raises UsageError when it cannot be listed: the run has not started yet."""
        url = ObjectURL.parse(source)
        store = self.store(url)
        try:
            found = _list_tree(store, url.key.rstrip("/"))
            if not found and url.key and not url.key.endswith("/"):
                found = [obstore.head(store, url.key)]
        except FileNotFoundError:
            raise UsageError(f"{source}: no such object or prefix") from None
        except Exception as error:
            message, hint = describe(error, url.scheme, url.bucket, url.key, listing=True)
            raise UsageError(message, hint) from None
        if not found:
            raise UsageError(f"{source}: the prefix holds no object")
        objects = [_listed(url, meta) for meta in found if not meta["path"].endswith("/")]
        return sorted(objects, key=lambda listed: listed.url)

    def open(self, source: str, size: int | None, fingerprint: str | None) -> io.BufferedReader:
        """The object's bytes as a buffered stream (peek, read1, tell) that resumes."""
        url = ObjectURL.parse(source)
        etag = fingerprint[5:] if fingerprint and fingerprint.startswith("etag:") else None
        raw = ObjectStream(self.store(url), url, size, etag)
        return io.BufferedReader(raw, buffer_size=CHUNK_BYTES)


def _list_tree(store: Any, prefix: str) -> list[dict]:
    """All objects under `prefix`. Folder levels are listed by delimiter until there are
    enough folders to share out (day folders, typically); the key range is then cut at
    folder boundaries into one run per thread, each listed in full pages in parallel."""
    found: dict[str, dict] = {}
    folders = [prefix]
    with ThreadPoolExecutor(_LIST_THREADS) as pool:
        for _ in range(_MAX_LEVELS):
            below: list[str] = []
            for listing in pool.map(
                lambda p: obstore.list_with_delimiter(store, p or None), folders
            ):
                found.update((meta["path"], meta) for meta in listing["objects"])
                below.extend(listing["common_prefixes"])
            if not below:
                return list(found.values())
            folders = below
            if len(folders) >= _LIST_THREADS:
                break
        # Keys sort as folder + "/" + name: cut the range there, not at the folder name.
        starts = sorted(folder + "/" for folder in folders)
        step = -(-len(starts) // _LIST_THREADS)
        bounds = starts[::step] + [None]
        runs = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
        for metas in pool.map(lambda run: _list_run(store, prefix, *run), runs):
            found.update((meta["path"], meta) for meta in metas)
    return list(found.values())


def _list_run(store: Any, prefix: str, first: str, stop: str | None) -> list[dict]:
    """Objects under `prefix` from `first` (a folder + "/") up to `stop`, excluded."""
    metas: list[dict] = []
    # The offset is exclusive; nothing sorts between a folder's "x/" and its first key.
    for page in obstore.list(store, prefix or None, offset=first, chunk_size=1000):
        for meta in page:
            if stop is not None and meta["path"] >= stop:
                return metas
            metas.append(meta)
    return metas


def _listed(url: ObjectURL, meta: dict) -> ListedObject:
    modified = meta["last_modified"] - _EPOCH
    mtime_ns = modified // timedelta(microseconds=1) * 1000
    return ListedObject(url.child(meta["path"]), meta["size"], mtime_ns, meta.get("e_tag"))


class ObjectStream(io.RawIOBase):
    """One object's bytes, fetched as a stream of chunks. A dropped connection (an error
    or a body shorter than the listed size) is resumed with a range GET from the last byte
    received, pinned to the ETag so that two versions are never spliced together."""

    def __init__(self, store: Any, url: ObjectURL, size: int | None, etag: str | None) -> None:
        super().__init__()
        self._store = store
        self._url = url
        self._size = size
        self._etag = etag
        self._chunks: Iterator[bytes] | None = None
        self._pending = memoryview(b"")
        self._received = 0  # bytes taken from the network: where a resume starts
        self._delivered = 0  # bytes handed to the reader
        self.resumes = 0

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._delivered

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = self._next_chunk()
            if not chunk:
                return 0
            self._pending = memoryview(chunk)
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        self._delivered += count
        return count

    def _next_chunk(self) -> bytes:
        tries = 0
        while self._size is None or self._received < self._size:
            try:
                if self._chunks is None:
                    self._chunks = self._get()
                chunk = next(self._chunks, b"")
            except PreconditionError:
                raise ObjectUnreadable(
                    f"{self._where()} was rewritten while it was read, after byte "
                    f"{self._received:,}; the next run reads the new version"
                ) from None
            except FileNotFoundError:
                raise ObjectUnreadable(f"{self._where()} was deleted before it was read") from None
            except Exception as error:
                self._chunks = None
                tries += 1
                if tries >= RESUME_TRIES or not _transient(error):
                    raise read_error(
                        error, self._url.scheme, self._url.bucket, self._url.key
                    ) from None
                self.resumes += 1
                continue
            if not chunk:
                if self._size is None:
                    return b""
                self._chunks = None  # the body ended short: the connection was cut
                tries += 1
                if tries >= RESUME_TRIES:
                    raise ObjectUnreadable(
                        f"{self._where()} ended at byte {self._received:,} of {self._size:,}"
                    )
                self.resumes += 1
                continue
            self._received += len(chunk)
            return chunk
        return b""

    def _get(self) -> Iterator[bytes]:
        options: dict[str, Any] = {}
        if self._etag:
            options["if_match"] = self._etag
        if self._received:
            options["range"] = {"offset": self._received}
        result = obstore.get(self._store, self._url.key, options=options)
        return iter(result.stream(min_chunk_size=CHUNK_BYTES))

    def _where(self) -> str:
        return self._url.child(self._url.key)


def _transient(error: Exception) -> bool:
    """A connection cut, a timeout or a 5xx: worth a range GET from the last byte."""
    text = str(error)
    return not any(word in text for word in ("403", "401", "AccessDenied", "NoSuchBucket"))
