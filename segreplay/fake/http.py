"""The fake's HTTP/1.1 over asyncio: frames requests (Content-Length bodies, keep-alive),
hands each to the app, and writes its answer after the configured latency.
"""

from __future__ import annotations

import asyncio

import orjson

from segreplay.fake.app import _Answer, _App, _fatal
from segreplay.fake.config import MAX_BODY_BYTES

_MAX_HEAD_BYTES = 64 * 1024

_REASONS = {
    200: "OK", 201: "Created", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized",
    404: "Not Found", 405: "Method Not Allowed", 411: "Length Required",
    413: "Payload Too Large", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
}  # fmt: skip


def _encode(answer: _Answer, keep_alive: bool) -> bytes:
    body = orjson.dumps(answer.payload)
    lines = [
        f"HTTP/1.1 {answer.status} {_REASONS.get(answer.status, 'Unknown')}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    lines.extend(f"{name}: {value}" for name, value in answer.headers)
    if not keep_alive:
        lines.append("Connection: close")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1") + body


class _Head:
    __slots__ = ("method", "target", "headers", "length", "keep_alive", "too_large")

    def __init__(self, method, target, headers, length, keep_alive, too_large) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.length = length
        self.keep_alive = keep_alive
        self.too_large = too_large


class _Connection(asyncio.Protocol):
    """HTTP/1.1 with Content-Length bodies and keep-alive; one request at a time per
    connection (a delayed answer pauses reading, which keeps pipelined answers in order)."""

    def __init__(self, app: _App, connections: set, latency_s: float) -> None:
        self._app = app
        self._connections = connections
        self._latency_s = latency_s
        self._buffer = bytearray()
        self._head: _Head | None = None
        self._discard = 0  # bytes of an over-limit body still to skip
        self._waiting = False
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._connections.add(self)
        with self._app.lock:
            self._app.connections += 1

    def connection_lost(self, exc) -> None:
        self._connections.discard(self)
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._waiting:
            self._process()

    def _process(self) -> None:
        buffer = self._buffer
        while self._transport is not None and not self._waiting:
            if self._head is None:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > _MAX_HEAD_BYTES:
                        self._fail(431, "Request header too large")
                    return
                head = self._parse_head(bytes(buffer[:end]))
                del buffer[: end + 4]
                if head is None:
                    return
                self._head = head
            head = self._head
            if head.too_large:
                # Read and forget the body, so the client sees the 413 and not a reset.
                skipped = min(len(buffer), self._discard)
                del buffer[:skipped]
                self._discard -= skipped
                if self._discard:
                    return
                body = b""
            else:
                if len(buffer) < head.length:
                    return
                body = bytes(buffer[: head.length])
                del buffer[: head.length]
            self._head = None
            answer = self._app.handle(head.method, head.target, head.headers, body, head.too_large)
            if self._latency_s:
                self._waiting = True
                self._transport.pause_reading()
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self._latency_s, self._deliver, answer, head)
            else:
                self._deliver(answer, head)

    def _deliver(self, answer: _Answer, head: _Head) -> None:
        transport = self._transport
        if transport is None:
            return
        if answer.drop or not head.keep_alive:
            if not answer.drop:
                transport.write(_encode(answer, keep_alive=False))
            transport.close()
            self._transport = None
            return
        transport.write(_encode(answer, keep_alive=True))
        if self._waiting:
            self._waiting = False
            self._timer = None
            transport.resume_reading()
            self._process()

    def _parse_head(self, raw: bytes) -> _Head | None:
        lines = raw.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._fail(400, "Malformed request line")
            return None
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                self._fail(400, "Malformed header line")
                return None
            headers[name.strip().lower()] = value.strip()
        if b"transfer-encoding" in headers:
            self._fail(411, "Send the body with Content-Length; chunked bodies are not supported")
            return None
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            length = -1
        if length < 0:
            self._fail(400, "Invalid Content-Length")
            return None
        connection = headers.get(b"connection", b"").lower()
        if parts[2] == b"HTTP/1.1":
            keep_alive = connection != b"close"
        else:
            keep_alive = connection == b"keep-alive"
        too_large = length > MAX_BODY_BYTES
        if too_large:
            self._discard = length
        if headers.get(b"expect", b"").lower() == b"100-continue":
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        method = parts[0].decode("latin-1")
        target = parts[1].decode("latin-1")
        return _Head(method, target, headers, length, keep_alive, too_large)

    def _fail(self, status: int, message: str) -> None:
        """A request the parser cannot frame: answer and close, the stream is unusable."""
        self._transport.write(_encode(_fatal(status, message), keep_alive=False))
        self._transport.close()
        self._transport = None
