"""State kept in a bucket (`--state s3://bucket/key.sqlite`, or gs://), for machines that
keep no disk: downloaded at the start, worked on as a local copy, uploaded as a SQLite
snapshot every few minutes and at the end, under a lease so one shard has one writer.

The lease is the object `<key>.lease`, written with conditional puts: created only if
absent (If-None-Match), renewed only if unchanged since this run wrote it (If-Match). A
lease not renewed for STALE_AFTER_UPLOADS upload intervals belongs to a run that died,
and the next run takes it over.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from segreplay.errors import FatalError, StateError
from segreplay.jsonutil import dumps, loads
from segreplay.times import format_time

DEFAULT_UPLOAD_EVERY_S = 300.0
STALE_AFTER_UPLOADS = 3  # a lease older than this many upload intervals may be taken over
LEASE_SUFFIX = ".lease"


def is_bucket_path(path: str) -> bool:
    return path.startswith(("s3://", "gs://"))


def duplicate_bound(url: str, upload_every_s: float, rate_requests: int | None,
                    rate_seconds: float | None) -> str:  # fmt: skip
    """What a crash can cost, said at the start of a run."""
    text = (
        f"state kept in {url}: a snapshot is uploaded every {upload_every_s:g} s and at the "
        "end; after a crash (kill -9, a lost machine) the requests acknowledged since the "
        "last upload are sent again"
    )
    if rate_requests and rate_seconds:
        requests = int(upload_every_s * rate_requests / rate_seconds)
        text += f": at most {requests:,} requests at this --rate ({requests * 75:,} events)"
    return text


class BucketState:
    """One state object in a bucket and its lease; `open` gives the local work copy."""

    def __init__(self, url: str, upload_every_s: float = DEFAULT_UPLOAD_EVERY_S,
                 store: Any = None, clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        from segreplay.objstore import ObjectURL, connect

        self.url = url
        self._where = ObjectURL.parse(url)
        if not self._where.key:
            raise StateError(f"--state {url}: name an object, e.g. s3://bucket/replay/state.sqlite")
        self._store = store if store is not None else connect(self._where.scheme,
                                                              self._where.bucket)  # fmt: skip
        self._upload_every_s = upload_every_s
        self._clock = clock
        self._lease_key = self._where.key + LEASE_SUFFIX
        self._lease_version: dict | None = None  # what If-Match names: our last lease write
        self._since = ""
        self._token = uuid.uuid4().hex
        self._last_upload = clock()
        self._folder: str | None = None
        self.local_path: str | None = None

    # the run ------------------------------------------------------------------------

    def open(self, lease: bool = True) -> str:
        """Take the lease (unless only reading, as a dry run does), download the state if
        it exists, and return the path of the local work copy."""
        if lease:
            self._take_lease()
        try:
            return self._download()
        except BaseException:
            self.close(upload=False)  # let the lease go: nothing was done under it
            raise

    def _download(self) -> str:
        self._folder = tempfile.mkdtemp(prefix="segreplay-state-")
        self.local_path = os.path.join(self._folder, os.path.basename(self._where.key))
        try:
            data = self._call("read", lambda: self._obstore().get(self._store, self._where.key))
        except _Missing:
            data = None
        if data is not None:
            fd = os.open(self.local_path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as local:
                for chunk in data:
                    local.write(chunk)
        self._last_upload = self._clock()
        return self.local_path

    def due(self) -> bool:
        return self._clock() - self._last_upload >= self._upload_every_s

    def upload(self) -> None:
        """Renew the lease, then put a consistent snapshot of the work copy."""
        from segreplay.state import State

        assert self.local_path is not None and self._folder is not None
        self._renew_lease()
        snapshot = os.path.join(self._folder, "snapshot.sqlite")
        if os.path.exists(snapshot):
            os.remove(snapshot)
        if not os.path.exists(self.local_path):
            return
        State.snapshot(self.local_path, snapshot)
        self._call("write", lambda: self._obstore().put(self._store, self._where.key,
                                                         Path(snapshot)))  # fmt: skip
        os.remove(snapshot)
        self._last_upload = self._clock()

    def close(self, upload: bool = True) -> None:
        """The last upload, then the lease let go and the work copy removed."""
        try:
            if upload and self._lease_version is not None:
                self.upload()
        finally:
            if self._lease_version is not None:
                self._lease_version = None
                try:
                    self._obstore().delete(self._store, self._lease_key)
                except Exception:  # noqa: BLE001 - a lease left behind goes stale
                    pass
            if self._folder is not None:
                shutil.rmtree(self._folder, ignore_errors=True)
                self._folder = None

    # the lease ----------------------------------------------------------------------

    def _lease_body(self) -> bytes:
        return dumps({
            "host": socket.gethostname(), "pid": os.getpid(), "since": self._since,
            "renewed": self._clock(), "token": self._token,
        })  # fmt: skip

    def _take_lease(self) -> None:
        obstore = self._obstore()
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        self._since = format_time(datetime.fromtimestamp(self._clock(), UTC))
        try:
            self._lease_version = self._call("write", lambda: obstore.put(
                self._store, self._lease_key, self._lease_body(), mode="create"
            ))  # fmt: skip
            return
        except AlreadyExistsError:
            pass
        result = obstore.get(self._store, self._lease_key)
        holder = loads(bytes(result.bytes()))
        etag = result.meta.get("e_tag")
        age_s = self._clock() - float(holder.get("renewed", 0))
        stale_s = STALE_AFTER_UPLOADS * self._upload_every_s
        if age_s < stale_s:
            raise StateError(
                f"{self.url} is in use by another segreplay run: {holder.get('host')} pid "
                f"{holder.get('pid')}, since {holder.get('since')} (lease "
                f"{self.url}{LEASE_SUFFIX}, renewed {age_s:,.0f} s ago)",
                "wait for that run to finish; a lease not renewed for "
                f"{stale_s:g} s is taken over (docs/scale.md)",
            )
        try:  # the holder died: take its lease over, unless another run just did
            self._lease_version = obstore.put(self._store, self._lease_key, self._lease_body(),
                                              mode={"e_tag": etag})  # fmt: skip
        except PreconditionError:
            raise StateError(f"{self.url}: another run took the lease first",
                             "wait for that run to finish") from None  # fmt: skip

    def _renew_lease(self) -> None:
        from obstore.exceptions import PreconditionError

        if self._lease_version is None:
            return
        try:
            self._lease_version = self._obstore().put(
                self._store, self._lease_key, self._lease_body(),
                mode={"e_tag": self._lease_version.get("e_tag")},
            )  # fmt: skip
        except PreconditionError:
            self._lease_version = None  # not ours any more: never write the state again
            raise StateError(
                f"{self.url}: the lease was taken over by another run (this one was not "
                "heard from for too long)",
                "the other run goes on from the last upload; this one stops without writing",
            ) from None

    # obstore ------------------------------------------------------------------------

    @staticmethod
    def _obstore():
        import obstore

        return obstore

    def _call(self, action: str, operation):
        from segreplay.objerrors import describe

        try:
            return operation()
        except FileNotFoundError:  # obstore's NotFoundError is one
            if action == "read":
                raise _Missing from None
            raise
        except Exception as error:
            if type(error).__name__ in ("AlreadyExistsError", "PreconditionError"):
                raise
            message, hint = describe(error, self._where.scheme, self._where.bucket,
                                     self._where.key, listing=False)  # fmt: skip
            raise FatalError(message.replace("could not read", f"could not {action}"),
                             hint) from error  # fmt: skip


class _Missing(Exception):
    """No state object yet: the first run."""


def existing_keys(url: str) -> list[str]:
    """The state objects beside `url` (itself and its shards), as URLs."""
    from segreplay.objstore import ObjectURL, connect

    where = ObjectURL.parse(url)
    store = connect(where.scheme, where.bucket)
    root = where.key.rpartition(".")[0] or where.key
    folder = where.key.rpartition("/")[0]
    found = []
    # obstore lists by folder, not by string prefix: the state's folder, then its names
    for page in BucketState._obstore().list(store, folder or None):
        for meta in page:
            key = meta["path"]
            if key.startswith(root) and not key.endswith(LEASE_SUFFIX):
                found.append(where.child(key))
    return found
