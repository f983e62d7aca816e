"""Shards on one machine (issue 12's figures; (n) and (o) there, (p) and (q) here, as
the s3 figures took those letters first):

(p) a dry run with --workers 2 against --workers 1, taken in turn in the same run
    (target >= 1.6 on a 2-core machine)
(q) a live run into the fake Braze with --workers 2 against --workers 1 (target >= 1.4)
    peak RSS of each worker process (target < 200 MB)
    on paper: from the measured cost of a line decided and of a line another shard
    owns, the N at which the archive fills Braze's 3,000 requests / 3 s

  python -m benchmarks.workers_bench [--lines 200000] [--users 20000] [--repeat 2]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import orjson

from benchmarks.__main__ import _API_KEY, BIN, _peak_rss, archive, floor, start_fake

BRAZE_REQUESTS_PER_S = 1000  # 3,000 per 3 s
_WIDE_SHARDS = 64  # --shard 0/64: nearly every line is another shard's


CPU_SECONDS: dict[int, float] = {}  # pid -> CPU seconds of it and its workers


def run_tree(args: list[str]) -> tuple[dict, float, int, int]:
    """Run a segreplay command; return its --json summary, wall seconds, the peak RSS of
    the process itself and the highest peak RSS of any of its children (the workers).
    The CPU seconds of the whole tree land in CPU_SECONDS[0] (the last run)."""
    started = time.perf_counter()
    process = subprocess.Popen([str(BIN / "segreplay"), *args, "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    stdout: list[bytes] = []
    reader = threading.Thread(target=lambda: stdout.append(process.stdout.read()))
    reader.start()
    own = children = 0
    while True:
        own = max(own, _peak_rss(process.pid))
        for child in _children(process.pid):
            children = max(children, _peak_rss(child))
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    # wait4's usage includes the workers: the parent waited for them
    CPU_SECONDS[0] = usage.ru_utime + usage.ru_stime
    reader.join()
    if process.returncode not in (0, 3):
        raise SystemExit(f"segreplay {' '.join(args)} failed with {process.returncode}")
    return orjson.loads(stdout[0]), elapsed, own, children


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(child) for child in children.read().split()]
    except OSError:
        return []


def _live(common: list[str], state: Path, workers: int) -> tuple[dict, float, int, int]:
    fake, url = start_fake()
    try:
        return run_tree(
            ["import", *common, "--state", str(state), "--endpoint", url, "--api-key", _API_KEY,
             "--rate", "3000/3", "--concurrency", "8", "--workers", str(workers)]
        )  # fmt: skip
    finally:
        fake.terminate()
        fake.wait()


def figures(folder: Path, work: Path, repeat: int, skip_live: bool = False) -> None:
    # --anonymous skip: identity resolution (alias mode) does not run in shards yet
    common = [str(folder), "--dead-letter", str(work / "dead.jsonl"), "--anonymous", "skip"]
    best: dict[tuple[str, int], float] = {}
    worker_rss = 0
    runs: dict[tuple[str, int], dict] = {}
    for attempt in range(repeat):  # in turn, so a busy minute hits both sides
        for workers in (1, 2):
            state = work / f"dry-{attempt}-{workers}.sqlite"
            summary, seconds, own, children = run_tree(
                ["import", *common, "--dry-run", "--state", str(state), "--workers", str(workers)]
            )
            best[("dry", workers)] = min(best.get(("dry", workers), math.inf), seconds)
            best[("dry cpu", workers)] = min(best.get(("dry cpu", workers), math.inf),
                                             CPU_SECONDS[0])  # fmt: skip
            runs[("dry", workers)] = summary
            worker_rss = max(worker_rss, children if workers > 1 else own)
        if skip_live:
            continue
        for workers in (1, 2):
            state = work / f"live-{attempt}-{workers}.sqlite"
            summary, seconds, own, children = _live(common, state, workers)
            best[("live", workers)] = min(best.get(("live", workers), math.inf), seconds)
            best[("live cpu", workers)] = min(best.get(("live cpu", workers), math.inf),
                                              CPU_SECONDS[0])  # fmt: skip
            runs[("live", workers)] = summary
            worker_rss = max(worker_rss, children if workers > 1 else own)
    lines = runs[("dry", 1)]["lines"]
    assert runs[("dry", 2)]["lines"] == lines, (runs[("dry", 2)]["lines"], lines)
    dry = {w: lines / best[("dry", w)] for w in (1, 2)}
    print(f"\n(p) dry run, --workers 1                   {dry[1]:>11,.0f} lines/s")
    print(f"    dry run, --workers 2                   {dry[2]:>11,.0f} lines/s")
    print(f"    --workers 2 / --workers 1              {dry[2] / dry[1]:>11.2f}  (target >= 1.6)")
    _cpu_bound("dry", best)
    if not skip_live:
        live = {w: lines / best[("live", w)] for w in (1, 2)}
        print(f"(q) live, --workers 1                      {live[1]:>11,.0f} lines/s")
        print(f"    live, --workers 2                      {live[2]:>11,.0f} lines/s")
        print(
            f"    --workers 2 / --workers 1              {live[2] / live[1]:>11.2f}  (target >= 1.4)"
        )
        live_cpu = (best[("live cpu", 1)], best[("live cpu", 2)])
        print(f"    CPU s, --workers 1 / 2                {live_cpu[0]:>6.1f} / {live_cpu[1]:.1f}"
              "  (the fake's not counted)")  # fmt: skip
    print(
        f"    peak RSS of one worker                 {worker_rss / 2**20:>11,.0f} MB  (target < 200)"
    )
    _on_paper(folder, work, common, lines, runs[("dry", 1)]["requests"], best, skip_live)


def _cpu_bound(kind: str, best: dict) -> None:
    """What the ratio would be with two cores to itself: --workers 1's wall time against
    --workers 2's CPU time spread over two cores. On a machine other work shares, this
    separates what sharding costs from what the neighbours took."""
    cpu1, cpu2 = best[(f"{kind} cpu", 1)], best[(f"{kind} cpu", 2)]
    print(f"    CPU s, --workers 1 / 2                {cpu1:>6.1f} / {cpu2:.1f}")
    print(
        f"    --workers 1 wall / (--workers 2 CPU / 2) {best[(kind, 1)] / (cpu2 / 2):>9.2f}  (two idle cores)"
    )


def _on_paper(folder, work, common, lines, requests, best, skip_live) -> None:
    """A shard on its own core spends, per archive line, the cost of a line it does not
    own (read, parse, find the user) plus 1/N of the cost of deciding a line."""
    summary, seconds, _, _ = run_tree(
        ["import", *common, "--dry-run", "--state", str(work / "wide.sqlite"),
         "--shard", f"0/{_WIDE_SHARDS}"]
    )  # fmt: skip
    owned = summary["lines"]
    floor_lines, floor_s = floor(folder)
    cost_floor = floor_s / floor_lines
    cost_full = best[("dry", 1)] / lines
    # the wide shard decided `owned` lines fully and passed over the rest
    cost_other = (seconds - owned * cost_full) / (lines - owned)
    needed = BRAZE_REQUESTS_PER_S * lines / requests  # archive lines/s that fill Braze
    print(f"    on paper: a line read and parsed (floor)  {cost_floor * 1e6:>8.1f} µs")
    print(f"              a line another shard owns      {cost_other * 1e6:>8.1f} µs")
    print(f"              a line decided (dry run)       {cost_full * 1e6:>8.1f} µs")
    costs = [("dry run", cost_full)]
    if not skip_live:
        cost_live = best[("live", 1)] / lines
        print(f"              a line decided and sent (live) {cost_live * 1e6:>8.1f} µs")
        costs.append(("live", cost_live))
    print(f"              Braze's 3,000 / 3 s at {lines / requests:.0f} lines a request = "
          f"{needed:,.0f} archive lines/s")  # fmt: skip
    for name, cost in costs:
        budget = 1 / needed - cost_other
        if budget <= 0:
            print(
                f"              {name}: not reachable: reading alone costs more than the budget allows"
            )
            continue
        shards = math.ceil((cost - cost_other) / budget)
        print(f"              {name}: N = {shards} shards (cores), {needed / shards:,.0f} "
              f"lines/s decided per core")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-live", action="store_true")
    options = parser.parse_args()
    folder = archive(options.lines, options.users)
    print(f"archive: {options.lines:,} lines, {os.cpu_count()} cores")
    work = Path(tempfile.mkdtemp(prefix="segreplay-bench-workers-"))
    try:
        figures(folder, work, options.repeat, options.skip_live)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
