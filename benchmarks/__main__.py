"""`make bench`: throughput and memory, each as a ratio against a baseline measured in
the same run on the same archive (never absolute timings in tests).

  floor      the archive read, decompressed and every line parsed with orjson, bare loop
  dry run    `segreplay import --dry-run` (its own process: lines/s and peak RSS)
  live       `segreplay import` into the fake Braze, which runs in its own process
  fake       the fake Braze alone, so it is known not to be the bottleneck

    python -m benchmarks [--lines 1000000] [--users 50000] [--skip-live] [--skip-fake]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench-data"
BIN = Path(sys.executable).parent
_API_KEY = "bench-key"


def archive(lines: int, users: int) -> Path:
    """A generated archive, cached in bench-data/ (same arguments, same bytes)."""
    sys.path.insert(0, str(ROOT))
    from samples.generate import generate

    folder = DATA / f"archive-{lines}-{users}"
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"generating {lines:,} lines for {users:,} users in {folder} ...", flush=True)
        generate(folder, lines=lines, users=users, bad=False, days=7, files_per_day=4)
        (folder / ".complete").touch()
    return folder


def floor(folder: Path) -> tuple[int, float]:
    from isal import igzip

    lines = 0
    started = time.perf_counter()
    for path in sorted(folder.rglob("*.gz")):
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        with (igzip.open if gzipped else open)(path, "rb") as stream:
            for line in stream:
                orjson.loads(line)
                lines += 1
    return lines, time.perf_counter() - started


def run_measured(args: list[str], env: dict | None = None) -> tuple[dict, float, int]:
    """Run a segreplay command; return its --json summary, wall seconds and peak RSS."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(BIN / "segreplay"), *args, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) not in (0, 3):
        raise SystemExit(f"segreplay {' '.join(args)} failed with {status}")
    return orjson.loads(stdout), elapsed, usage.ru_maxrss * 1024


def start_fake() -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [str(BIN / "segreplay"), "fake-braze", "--port", "0", "--api-key", _API_KEY,
         "--rate-limit", "1000000000"],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    line = process.stderr.readline()
    return process, line.strip().rsplit(" ", 1)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--skip-live", action="store_true")
    parser.add_argument("--skip-fake", action="store_true")
    options = parser.parse_args()

    folder = archive(options.lines, options.users)
    size = sum(p.stat().st_size for p in folder.rglob("*.gz"))
    print(f"archive: {options.lines:,} lines, {size / 1e6:,.1f} MB compressed\n")

    lines, floor_s = floor(folder)
    floor_rate = lines / floor_s
    print(f"(a) floor: read + gunzip + orjson.loads   {floor_rate:>12,.0f} lines/s")

    work = Path(tempfile.mkdtemp(prefix="segreplay-bench-"))
    try:
        common = [str(folder), "--dead-letter", str(work / "dead.jsonl"), "--anonymous", "alias"]
        summary, dry_s, dry_rss = run_measured(
            ["import", *common, "--dry-run", "--state", str(work / "dry.sqlite")]
        )
        dry_rate = summary["lines"] / dry_s
        print(f"(b) dry run (whole process)               {dry_rate:>12,.0f} lines/s")
        print(f"(c) dry run / floor                       {dry_rate / floor_rate:>12.2f}  (target >= 0.5)")
        print(f"(d) dry run peak RSS                      {dry_rss / 2**20:>12,.0f} MB  (target < 200)")
        print(f"    requests {summary['requests']:,}, data points {summary['data_points']:,}")

        if not options.skip_live:
            fake, url = start_fake()
            try:
                live, live_s, live_rss = run_measured(
                    ["import", *common, "--state", str(work / "live.sqlite"), "--endpoint", url,
                     "--api-key", _API_KEY, "--rate", "3000/3", "--concurrency", "8"]
                )  # fmt: skip
            finally:
                fake.terminate()
                fake.wait()
            live_rate = live["lines"] / live_s
            print(f"\n(e) live into the fake (own process)      {live_rate:>12,.0f} lines/s")
            print(f"(f) live / dry run                        {live_rate / dry_rate:>12.2f}  (target >= 0.7)")
            print(f"(g) live requests/s at --rate 3000/3      {live['requests'] / live_s:>12,.0f}  (target >= 1,000 when the rate allows)")
            print(f"    peak RSS {live_rss / 2**20:,.0f} MB, retries {live['retries']}, rate-limit waits {live['rate_limited']}")
            if live["requests"] != summary["requests"]:
                print(f"    note: live sent {live['requests']:,} requests, the dry run {summary['requests']:,}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if not options.skip_fake:
        print()
        from benchmarks import bench_fake

        sys.argv = ["bench_fake", "--seconds", "3"]
        bench_fake.main()


if __name__ == "__main__":
    main()
