"""How many /users/track requests the fake Braze answers per second, so it is never the
bottleneck of a benchmark or a demo (target: 2,000 requests/s of 75-event bodies).

The fake runs in its own process; this process drives it over several keep-alive
connections with a bare asyncio client, first with requests the fake refuses at once (401:
the HTTP layer alone, the baseline), then with full 75-event bodies.

    python -m benchmarks.bench_fake [--seconds 5] [--connections 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import orjson

_API_KEY = "bench-key"
_SERVER = (
    "from segreplay.fake import FakeBrazeConfig, serve; "
    f"serve(FakeBrazeConfig(api_key={_API_KEY!r}, rate_limit=10**9))"
)
_OBJECTS_PER_REQUEST = 75
_DISTINCT_BODIES = 64
_MAX_REQUESTS = 200_000


def _event(user: int, n: int) -> dict:
    return {
        "external_id": f"user-{user:06d}",
        "name": ("Order Completed", "Product Viewed", "Signed Up")[n % 3],
        "time": f"2024-03-{1 + n % 28:02d}T12:{n % 60:02d}:07.123Z",
        "properties": {
            "order_id": f"o-{user}-{n}",
            "revenue": 19.99 + n,
            "currency": "EUR",
            "products": [{"sku": f"sku-{n % 17}", "quantity": 1 + n % 3}],
            "coupon": None,
        },
    }


def _request(body: bytes, api_key: str) -> bytes:
    head = (
        "POST /users/track HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\n"
        f"Authorization: Bearer {api_key}\r\n"
        "Content-Type: application/json\r\n"
        "X-Braze-Bulk: true\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _track_requests(api_key: str) -> list[bytes]:
    requests = []
    for b in range(_DISTINCT_BODIES):
        events = [_event(b * 1000 + i % 25, b * 100 + i) for i in range(_OBJECTS_PER_REQUEST)]
        requests.append(_request(orjson.dumps({"events": events}), api_key))
    return requests


async def _drive(port: int, requests: list[bytes], connections: int, seconds: float) -> dict:
    deadline = time.perf_counter() + seconds
    statuses: dict[int, int] = {}
    sent = 0

    async def one_connection(offset: int) -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        n = offset
        while time.perf_counter() < deadline and sent < _MAX_REQUESTS:
            sent += 1
            writer.write(requests[n % len(requests)])
            n += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = int(head.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
            await reader.readexactly(length)
            statuses[status] = statuses.get(status, 0) + 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one_connection(i * 7) for i in range(connections)))
    elapsed = time.perf_counter() - started
    return {"statuses": statuses, "elapsed": elapsed, "answered": sum(statuses.values())}


def _start_server() -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(
        [sys.executable, "-c", _SERVER],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    line = process.stderr.readline()
    if "listening on" not in line:
        process.kill()
        raise SystemExit(f"the fake did not start: {line!r}")
    return process, int(line.rsplit(":", 1)[1])


def _cpu_seconds(pid: int) -> float | None:
    """CPU time the fake has used so far (Linux only): shows whether it was saturated."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stats(port: int) -> dict:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/_fake/stats").json()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args(argv)

    process, port = _start_server()
    try:
        baseline = asyncio.run(
            _drive(port, [_request(b"{}", "wrong-key")], args.connections, args.seconds / 2)
        )
        requests = _track_requests(_API_KEY)
        cpu_before = _cpu_seconds(process.pid)
        track = asyncio.run(_drive(port, requests, args.connections, args.seconds))
        cpu_after = _cpu_seconds(process.pid)
        stats = _stats(port)
    finally:
        process.terminate()
        process.wait(timeout=10)

    baseline_rps = baseline["answered"] / baseline["elapsed"]
    track_rps = track["answered"] / track["elapsed"]
    objects_per_s = stats["accepted"]["event"] / track["elapsed"]
    ok = track["statuses"].get(201, 0) == track["answered"]
    print(f"fake Braze, {args.connections} keep-alive connections, {args.seconds:g} s")
    print(f"  baseline (401, HTTP layer only): {baseline_rps:8.0f} requests/s")
    print(
        f"  /users/track, 75 events each:    {track_rps:8.0f} requests/s, "
        f"{objects_per_s:8.0f} objects/s  ({track_rps / baseline_rps:.2f}x baseline)"
    )
    if cpu_before is not None and cpu_after is not None:
        busy = (cpu_after - cpu_before) / track["elapsed"]
        print(
            f"  the fake was busy {busy:.0%} of the time: "
            f"{track['answered'] / (cpu_after - cpu_before):.0f} requests per CPU second"
        )
    if not ok:
        print(f"  unexpected answers: {track['statuses']}")
    return {"baseline_rps": baseline_rps, "track_rps": track_rps, "objects_per_s": objects_per_s}


if __name__ == "__main__":
    main()
