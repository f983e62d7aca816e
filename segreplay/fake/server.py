"""Starting and stopping the fake: `FakeBraze` runs it in a background thread for tests,
`serve` in the foreground for `segreplay fake-braze`.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
from dataclasses import replace
from typing import Any

from segreplay.fake.app import _App
from segreplay.fake.config import KINDS, FakeBrazeConfig, RateLimitReset, RequestRecord
from segreplay.fake.http import _Connection


async def _listen(app: _App, port: int, connections: set) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    latency_s = app.config.latency_ms / 1000
    return await loop.create_server(
        lambda: _Connection(app, connections, latency_s), "127.0.0.1", port, reuse_address=True
    )


def _close_all(server: asyncio.Server, connections: set) -> None:
    server.close()
    for connection in list(connections):
        connection.close()


class FakeBraze:
    """The fake in a background thread, for tests:

    with FakeBraze(rate_5xx=0.2, seed=7) as braze:
        run_client(braze.url, braze.config.api_key)
        assert braze.stats()["accepted"]["event"] == 75
    """

    def __init__(self, config: FakeBrazeConfig | None = None, clock=time.time,
                 **overrides: Any) -> None:  # fmt: skip
        """`clock` (epoch seconds) dates arrivals and drives the rate windows: tests pass
        one they move by hand instead of waiting for a window to pass."""
        config = config or FakeBrazeConfig()
        self.config = replace(config, **overrides) if overrides else config
        self._app = _App(self.config, clock)
        self._connections: set = set()  # open ones; changed on the fake's event loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeBraze:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self._run(ready))
            except BaseException as error:  # surfaced in start(), not lost in the thread
                failure.append(error)
                ready.set()

        self._thread = threading.Thread(target=run, name="fake-braze", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    async def _run(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        connections = self._connections
        server = await _listen(self._app, self.config.port, connections)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        try:
            await self._stopped.wait()
        finally:
            _close_all(server, connections)

    def open_connections(self) -> int:
        """Connections not yet closed. After a client died, 0 means the fake has read
        every byte it had sent."""
        return len(self._connections)

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout=10)
        self._thread = None
        self._app.close()

    def __enter__(self) -> FakeBraze:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- queries, safe from any thread

    def stats(self) -> dict:
        with self._app.lock:
            return self._app.stats()

    def profiles(self) -> list[dict]:
        with self._app.lock:
            return self._app.profiles()

    def profile(
        self,
        external_id: str | None = None,
        *,
        user_alias: dict | None = None,
        braze_id: str | None = None,
        email: str | None = None,
        phone: str | None = None,
    ) -> dict | None:
        """The profile one identifier points at, or None."""
        if external_id is not None:
            key = ("external_id", external_id)
        elif user_alias is not None:
            key = ("alias", user_alias["alias_label"], user_alias["alias_name"])
        elif braze_id is not None:
            key = ("braze_id", braze_id)
        elif email is not None:
            key = ("email", email)
        elif phone is not None:
            key = ("phone", phone)
        else:
            raise ValueError("give one identifier")
        with self._app.lock:
            return self._app.profile(key)

    def accepted(self, kind: str) -> list[dict]:
        """The accepted objects of one kind (see KINDS), in arrival order, as sent."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        with self._app.lock:
            return self._app.accepted_objects(kind)

    def requests(self) -> list[RequestRecord]:
        """Every API request (not admin ones), in arrival order."""
        with self._app.lock:
            return list(self._app.requests)

    @property
    def rate_limit_resets(self) -> list[RateLimitReset]:
        with self._app.lock:
            return list(self._app.resets)

    def early_requests(self, grace_s: float = 0.0) -> list[RequestRecord]:
        """Requests that arrived after a 429 (plus `grace_s` for ones already in flight)
        but before the reset that 429 advertised: a well-behaved client sends none."""
        with self._app.lock:
            requests, resets = list(self._app.requests), list(self._app.resets)
        early = []
        for request in requests:
            if any(
                reset.request != request.request
                and reset.sent_at + grace_s < request.arrived_at < reset.reset_at
                for reset in resets
            ):
                early.append(request)
        return early

    def ignored_attributes(self) -> list[dict]:
        """Custom attributes accepted but not applied (key or string value over 255)."""
        with self._app.lock:
            return self._app.store.ignored_attributes()

    def not_applied(self) -> int:
        """Accepted objects that changed nothing: `_update_existing_only` (an alias's
        default) for a user that did not exist, or an unknown braze_id."""
        with self._app.lock:
            return self._app.store.not_applied()

    def reset(self) -> None:
        with self._app.lock:
            self._app.clear()


def serve(config: FakeBrazeConfig) -> None:
    """Run in the foreground until SIGINT or SIGTERM (`segreplay fake-braze`)."""
    asyncio.run(_serve(config))


async def _serve(config: FakeBrazeConfig) -> None:
    app = _App(config)
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    connections: set = set()
    server = await _listen(app, config.port, connections)
    port = server.sockets[0].getsockname()[1]
    # The one print of the package outside cli.py: scripts wait for this line.
    print(f"fake Braze listening on http://127.0.0.1:{port}", file=sys.stderr, flush=True)
    try:
        await stopped.wait()
    finally:
        _close_all(server, connections)
        app.close()
