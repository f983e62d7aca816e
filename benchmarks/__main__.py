"""`make bench`: throughput and memory, each as a ratio against a baseline measured in
the same run on the same archive (never absolute timings in tests).

  floor      the archive read, decompressed and every line parsed with orjson, bare loop
  ceiling    the floor plus the least a dry run must do for events (benchmarks/ceiling.py)
  dry run    `segreplay import --dry-run` (its own process: lines/s and peak RSS), with
             --anonymous alias; against the default --anonymous skip, the identity
             resolution pass's cost (r)
  live       `segreplay import` into the fake Braze, which runs in its own process
  resume     lines already acknowledged, skipped on resume, against processing them
  big state  the dry run against a state of 1M users and 10M messageIds, against an
             empty state: the state's cost in throughput, its size on disk
  fake       the fake Braze alone, so it is known not to be the bottleneck
  s3         the dry run from s3:// on moto's server against local files; listing 5,000
             objects (benchmarks/objstore_bench.py)
  workers    --workers 2 against --workers 1, dry and live; peak RSS per worker; the N
             that fills Braze's budget, on paper (benchmarks/workers_bench.py)

    python -m benchmarks [--lines 1000000] [--users 50000] [--repeat 2] [--skip-live] [--skip-fake]
                         [--state-users 1000000] [--state-messages 10000000]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
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
    stdout: list[bytes] = []
    reader = threading.Thread(target=lambda: stdout.append(process.stdout.read()))
    reader.start()
    peak = 0
    while process.poll() is None:
        peak = max(peak, _peak_rss(process.pid))
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    reader.join()
    if process.returncode not in (0, 3):
        raise SystemExit(f"segreplay {' '.join(args)} failed with {process.returncode}")
    return orjson.loads(stdout[0]), elapsed, peak


def _peak_rss(pid: int) -> int:
    """The process's own high-water RSS in bytes (0 once it has exited).

    Not wait4's ru_maxrss: a child spawned with vfork and exec keeps its parent's peak as
    its own, so a parent that once held 400 MB made every later child report 400 MB."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def delivery_alone(bodies_path: Path, requests: int = 9000) -> float:
    """The client's own capacity: sealed bodies straight into the sink, at --rate 3000/3
    for three budget windows (a shorter run would fit in the first window's burst),
    with the fake in its own process. Tells whether delivery or the pipeline limits (e)."""
    from segreplay.batching import Batch
    from segreplay.config import DeliveryOptions
    from segreplay.delivery import BrazeSink

    with open(bodies_path, "rb") as file:  # the first thousands, not all 300 MB
        bodies = [line.rstrip(b"\n") for line in itertools.islice(file, requests)]
    fake, url = start_fake()
    try:
        options = DeliveryOptions(url, _API_KEY, rate_requests=3000, rate_seconds=3.0)
        sink = BrazeSink(options)
        started = time.perf_counter()
        for seq, body in enumerate(bodies):
            batch = Batch(seq, body=body, count=1)
            while not sink.has_room(batch):
                sink.answers(None)
            sink.submit(batch)
        while sink.in_flight:
            sink.answers(None)
        sink.close()
        return len(bodies) / (time.perf_counter() - started)
    finally:
        fake.terminate()
        fake.wait()


def live_run(common: list[str], state: Path) -> tuple[dict, float, int]:
    """`run_measured` for a live replay into a fake Braze of its own, at --rate 3000/3."""
    fake, url = start_fake()
    try:
        return run_measured(
            ["import", *common, "--state", str(state), "--endpoint", url, "--api-key", _API_KEY,
             "--rate", "3000/3", "--concurrency", "8"]
        )  # fmt: skip
    finally:
        fake.terminate()
        fake.wait()


def start_fake() -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [str(BIN / "segreplay"), "fake-braze", "--port", "0", "--api-key", _API_KEY,
         "--rate", "1000000000/1"],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    line = process.stderr.readline()
    return process, line.strip().rsplit(" ", 1)[-1]


def _accept_all_state(folder: Path, state: Path) -> None:
    """A state in which every line of `folder` is acknowledged but no file is done, as
    after a run killed just before its last commit: the next run skips every line."""
    import sqlite3

    from segreplay.config import DeliveryOptions, MappingOptions, RunConfig
    from segreplay.pipeline import run_import
    from segreplay.reporting import SilentReporter
    from segreplay.sink import DrySink

    config = RunConfig(
        sources=(str(folder),),
        state_path=str(state),
        dead_letter_path=str(state.with_suffix(".dead.jsonl")),
        mapping=MappingOptions(anonymous="alias"),
        delivery=DeliveryOptions("http://127.0.0.1:9", "unused"),
    )
    run_import(config, SilentReporter(), DrySink())
    with sqlite3.connect(state) as db:
        db.execute("UPDATE files SET done = 0")


def resume(folder: Path, work: Path, common: list[str], dry_rate: float) -> None:
    state = work / "resume.sqlite"
    _accept_all_state(folder, state)
    summary, seconds, _ = run_measured(["import", *common, "--dry-run", "--state", str(state)])
    skipped = summary["lines_already_done"]
    skip_rate = skipped / seconds
    print(f"\n(h) resume: acknowledged lines skipped     {skip_rate:>12,.0f} lines/s")
    print(
        f"(i) skipping / processing (dry run)       {skip_rate / dry_rate:>12.1f}x  (target >= 5)"
    )


def big_state(work: Path, common: list[str], dry_rate: float, users: int, messages: int) -> None:
    """Fill a state with `users` users (ten attributes each) and `messages` digests."""
    import random
    import sqlite3

    from segreplay.state import State

    path = DATA / f"state-{users}-{messages}.sqlite"
    if not path.exists():
        print(f"\nbuilding a state of {users:,} users and {messages:,} messageIds ...", flush=True)
        partial = path.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        State(str(partial)).close()
        rng = random.Random(7)
        db = sqlite3.connect(partial)
        with db:  # one transaction; close() below folds the WAL back into the file
            blob = orjson.dumps({
                f"trait_{k}": [f"value-{k}", "2024-03-05T14:03:22.083Z"] for k in range(10)
            })  # fmt: skip
            db.executemany(
                "INSERT INTO users VALUES (?, ?, 1)",
                ((f"e:bulk-user-{n}", blob) for n in range(users)),
            )
            db.executemany(
                "INSERT OR IGNORE INTO delivered (hash) VALUES (?)",
                ((rng.getrandbits(63),) for _ in range(messages)),
            )
        db.close()
        partial.rename(path)
    size = path.stat().st_size
    started = time.perf_counter()
    snapshot = work / "snapshot.sqlite"
    State.snapshot(str(path), str(snapshot))
    copy_s = time.perf_counter() - started
    live_state = work / "big.sqlite"
    shutil.copy(path, live_state)
    summary, seconds, rss = run_measured(
        ["import", *common, "--dry-run", "--state", str(live_state)]
    )
    rate = summary["lines"] / seconds
    print(
        f"\n(j) state of {users:,} users, {messages:,} messageIds: {size / 2**20:,.0f} MB on disk"
    )
    print(
        f"(k) dry run against it (incl. its copy)   {rate:>12,.0f} lines/s, {rss / 2**20:,.0f} MB peak RSS"
    )
    print(f"(l) big state / empty state               {rate / dry_rate:>12.2f}  (target >= 0.75)")
    print(f"    of which copying the state for the dry run: {copy_s:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs of each figure; the best counts"
    )
    parser.add_argument("--skip-live", action="store_true")
    parser.add_argument("--skip-fake", action="store_true")
    parser.add_argument("--state-users", type=int, default=1_000_000)
    parser.add_argument("--state-messages", type=int, default=10_000_000)
    options = parser.parse_args()

    folder = archive(options.lines, options.users)
    size = sum(p.stat().st_size for p in folder.rglob("*.gz"))
    print(f"archive: {options.lines:,} lines, {size / 1e6:,.1f} MB compressed\n")

    work = Path(tempfile.mkdtemp(prefix="segreplay-bench-"))
    try:
        from benchmarks.ceiling import ceiling

        common = [str(folder), "--dead-letter", str(work / "dead.jsonl"), "--anonymous", "alias"]
        # The machine is shared: each figure is the best of `--repeat` runs, taken in turn
        # with the others, so a busy minute does not land on one side of a ratio only.
        floor_s = ceiling_s = dry_s = live_s = skip_s = float("inf")
        dry_rss = live_rss = 0
        for attempt in range(options.repeat):
            lines, seconds = floor(folder)
            floor_s = min(floor_s, seconds)
            ceiling_s = min(ceiling_s, ceiling(folder, work / f"ceiling-{attempt}.sqlite")[1])
            summary, seconds, rss = run_measured(
                ["import", *common, "--dry-run", "--state", str(work / "dry.sqlite"),
                 "--output", str(work / "requests.jsonl")]
            )  # fmt: skip
            dry_s, dry_rss = min(dry_s, seconds), max(dry_rss, rss)
            # The default (--anonymous skip): no resolution pass, anonymous lines skipped.
            skipped, seconds, _ = run_measured(
                ["import", str(folder), "--dead-letter", str(work / "dead.jsonl"), "--dry-run",
                 "--state", str(work / f"skip-{attempt}.sqlite")]
            )  # fmt: skip
            skip_s = min(skip_s, seconds)
            if not options.skip_live:
                live, seconds, rss = live_run(common, work / f"live-{attempt}.sqlite")
                live_s, live_rss = min(live_s, seconds), max(live_rss, rss)

        floor_rate = lines / floor_s
        dry_rate = summary["lines"] / dry_s
        print(f"(best of {options.repeat} runs each)")
        print(f"(a) floor: read + gunzip + orjson.loads   {floor_rate:>12,.0f} lines/s")
        print(
            f"(m) ceiling: events only, bare loop / floor {floor_s / ceiling_s:>9.2f}  (what any pipeline of this shape can reach)"
        )
        print(f"(b) dry run (whole process)               {dry_rate:>12,.0f} lines/s")
        print(
            f"(c) dry run / floor                       {dry_rate / floor_rate:>12.2f}  (target >= 0.5)"
        )
        print(
            f"(d) dry run peak RSS                      {dry_rss / 2**20:>12,.0f} MB  (target < 200)"
        )
        print(f"    requests {summary['requests']:,}, data points {summary['data_points']:,}")
        skip_rate = skipped["lines"] / skip_s
        print(f"(r) dry run, default --anonymous skip     {skip_rate:>12,.0f} lines/s")
        print(
            f"(r) --anonymous alias / skip              {dry_rate / skip_rate:>12.2f}  (target >= 0.8: resolution stays cheap)"
        )

        if not options.skip_live:
            live_rate = live["lines"] / live_s
            print(f"\n(e) live into the fake (own process)      {live_rate:>12,.0f} lines/s")
            print(
                f"(f) live / dry run                        {live_rate / dry_rate:>12.2f}  (target >= 0.7)"
            )
            print(
                f"(g) live requests/s at --rate 3000/3      {live['requests'] / live_s:>12,.0f}  (target >= 1,000 when the rate allows)"
            )
            print(
                f"    peak RSS {live_rss / 2**20:,.0f} MB, retries {live['retries']}, rate-limit waits {live['rate_limited']}"
            )
            delivery_rate = delivery_alone(work / "requests.jsonl")
            print(
                f"(g2) delivery alone: the dry run's bodies  {delivery_rate:>11,.0f} requests/s  (client and fake, no pipeline)"
            )
            if live["requests"] != summary["requests"]:
                print(
                    f"    note: live sent {live['requests']:,} requests, the dry run {summary['requests']:,}"
                )

        resume(folder, work, common, dry_rate)
        from benchmarks import workers_bench

        workers_bench.figures(folder, work, options.repeat, options.skip_live)
        from benchmarks import objstore_bench

        objstore_bench.s3_dry_run(folder, work, options.repeat)
        objstore_bench.listing(options.repeat)
        if options.state_users:
            big_state(work, common, dry_rate, options.state_users, options.state_messages)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if not options.skip_fake:
        print()
        from benchmarks import bench_fake

        sys.argv = ["bench_fake", "--seconds", "3"]
        bench_fake.main()


if __name__ == "__main__":
    main()
