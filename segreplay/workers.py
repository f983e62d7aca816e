"""`--workers N`: N shard processes on this machine, one run to the person who started it.

Each worker is `run_import` for one shard (its own state file, `--rate / N`, parts of
the --output and dead-letter files); the parent shows one progress display from their
snapshots, concatenates the parts, sums the summaries and turns a stop into SIGTERM for
every worker. Workers share a 429 through one "paused until" value.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import shutil
import signal
import time
from collections import Counter
from dataclasses import dataclass, fields, replace

from segreplay.config import DEFAULT_STOP_GRACE_S, DeliveryOptions, RunConfig
from segreplay.errors import FatalError, SegreplayError, UsageError
from segreplay.reporting import Change, Reporter, Summary
from segreplay.sharding import Shard, check_shard_count, shard_config
from segreplay.stopping import StopNow, StopRequest

PROGRESS_EVERY_S = 0.5  # a worker's progress snapshots, at most this often
MAX_PROBLEMS_SENT = 21  # the console shows 20 and says there are more
_POLL_S = 0.2
# Past --stop-grace, how long workers asked to stop may take before SIGKILL.
_KILL_MARGIN_S = 15.0
# Counts that describe the archive, not the work: the same in every shard.
_SHARED_MAX = {"files", "bytes_read", "elapsed_s"}
# What every shard settled before: only lines all of them had settled are settled.
_SHARED_MIN = {"files_already_done", "lines_already_done"}


@dataclass(frozen=True)
class _Job:
    config: RunConfig
    stop_grace_s: float


def worker_config(config: RunConfig, shard: Shard) -> RunConfig:
    """One shard's run: its own state file and its share of each request budget. Part
    files are the parent's business (`run_workers`)."""
    config = shard_config(config, shard)
    if config.delivery is None:
        return config
    return replace(config, delivery=_share(config.delivery, shard.count),
                   user_ops=config.user_ops and _share(config.user_ops, shard.count))  # fmt: skip


def _share(options: DeliveryOptions, count: int) -> DeliveryOptions:
    return replace(options, rate_requests=max(1, options.rate_requests // count))


def merge_summaries(parts: list[Summary]) -> Summary:
    """The run's summary from its shards': counts of work add up (each line and user is
    one shard's); counts of the archive are every shard's; a line counts as settled
    before only when every shard had settled it."""
    merged = Summary()
    for item in fields(Summary):
        name = item.name
        values = [getattr(part, name) for part in parts]
        if name == "skips":
            for value in values:
                merged.skips.update(value)
        elif name in ("dry_run", "interrupted"):
            setattr(merged, name, any(values))
        elif name == "lines_elsewhere":
            pass  # in one run of all shards, every line is someone's
        elif name in _SHARED_MAX:
            setattr(merged, name, max(values))
        elif name in _SHARED_MIN:
            setattr(merged, name, min(values))
        else:
            setattr(merged, name, sum(values))
    return merged


def run_workers(
    config: RunConfig,
    count: int,
    reporter: Reporter,
    stop: StopRequest,
    stop_grace_s: float = DEFAULT_STOP_GRACE_S,
    start_method: str = "spawn",
) -> Summary:
    """Replay `config` with `count` shard processes. Returns the summed summary
    (`interrupted` when `stop` was requested); raises the first worker's error, or a
    FatalError when a worker died, after stopping the others."""
    if "-" in config.sources:
        raise UsageError("standard input cannot be shared out to --workers", "pass files")
    check_shard_count(config.state_path, count)
    context = multiprocessing.get_context(start_method)
    messages = context.Queue()
    # One 429 pause for /users/track and one for the user-management endpoints.
    shared_pauses = (context.Value("d", 0.0), context.Value("d", 0.0))
    parts = _Parts(config, count)
    workers = []
    for index in range(count):
        shard = Shard(index, count)
        job_config = replace(
            worker_config(config, shard),
            output_path=parts.output(index),
            dead_letter_path=parts.dead_letter(index),
        )
        process = context.Process(
            target=_worker_main,
            args=(_Job(job_config, stop_grace_s), messages, shared_pauses),
            name=f"segreplay-shard-{shard}",
            daemon=False,
        )
        workers.append(process)
    run = _Run(workers, messages, reporter, stop, stop_grace_s + _KILL_MARGIN_S)
    try:
        for process in workers:
            process.start()
        run.wait()
    except BaseException:
        # A second signal here is a second SIGTERM there: each worker stops at once.
        run.stop_all(signal.SIGTERM)
        run.join(timeout=stop_grace_s + 5)
        raise
    finally:
        parts.combine()
    if run.error is not None:
        raise run.error
    summary = merge_summaries(run.summaries)
    summary.interrupted = stop.requested or summary.interrupted
    return summary


class _Run:
    """The parent's loop: messages from the workers, their exits, and stops."""

    def __init__(self, workers, messages, reporter: Reporter, stop: StopRequest,
                 kill_after_s: float) -> None:  # fmt: skip
        """`kill_after_s`: how long workers asked to stop may take before SIGKILL."""
        self._workers = workers
        self._messages = messages
        self._reporter = reporter
        self._stop = stop
        self._kill_after_s = kill_after_s
        self._kill_at: float | None = None  # set once the workers are asked to stop
        self._latest: list[tuple[Summary, int, int] | None] = [None] * len(workers)
        self._finished: dict[int, Summary] = {}
        self._ended: set[int] = set()  # finished, failed or died
        self._forwarded = False
        self.error: SegreplayError | None = None

    @property
    def summaries(self) -> list[Summary]:
        return [self._finished.get(i) or (s[0] if s else Summary())
                for i, s in enumerate(self._latest)]  # fmt: skip

    def wait(self) -> None:
        try:
            while len(self._ended) < len(self._workers):
                if self._stop.requested and not self._forwarded:
                    self._forwarded = True
                    self.stop_all(signal.SIGTERM)
                if self._kill_at is not None and time.monotonic() > self._kill_at:
                    # A worker killed while it held the message queue's lock leaves the
                    # others unable to say they are done: they would wait forever.
                    self._kill_at = None
                    self.stop_all(signal.SIGKILL)
                try:
                    self._handle(self._messages.get(timeout=_POLL_S))
                except queue_module.Empty:
                    self._check_exits()
        finally:
            self._forwarded = True  # from here on, a SIGTERM to a worker is a second one
        self.join(timeout=10)

    def _check_exits(self) -> None:
        for index, process in enumerate(self._workers):
            if index in self._ended or process.exitcode is None:
                continue
            self._drain()  # what it sent before it exited
            if index in self._ended:
                continue
            self._ended.add(index)
            if self._forwarded and process.exitcode == -signal.SIGTERM:
                continue  # stopped before it could listen for a stop: nothing to record
            if self.error is None:
                self.error = FatalError(
                    f"the worker for shard {index}/{len(self._workers)} ended unexpectedly "
                    f"({_describe_exit(process.exitcode)}); the other shards were stopped",
                    "run the same command to resume: every acknowledged request is in the state",
                )
            self._stop_others()

    def _drain(self) -> None:
        while True:
            try:
                self._handle(self._messages.get(timeout=0.05))
            except queue_module.Empty:
                return

    def _handle(self, message: tuple) -> None:
        kind, index, *payload = message
        reporter = self._reporter
        if kind == "progress":
            self._latest[index] = tuple(payload)
            self._show_progress()
        elif kind == "problem":
            reporter.problem(payload[0])
        elif kind == "notice":
            reporter.notice(f"shard {index}/{len(self._workers)}: {payload[0]}")
        elif kind == "changes":
            reporter.changes(payload[0])
        elif kind == "done":
            self._finished[index] = payload[0]
            self._ended.add(index)
        elif kind == "error":
            usage, text, hint = payload
            self._ended.add(index)
            if self.error is None:
                self.error = (UsageError if usage else FatalError)(text, hint)
            self._stop_others()

    def _show_progress(self) -> None:
        snapshots = [s for s in self._latest if s is not None]
        summary = merge_summaries([s[0] for s in snapshots])
        count = len(self._workers)
        done = sum(s[1] for s in snapshots) // count
        total = max(s[2] for s in snapshots)
        self._reporter.progress(summary, done, total)

    def _stop_others(self) -> None:
        if not self._forwarded:
            self._forwarded = True
            self.stop_all(signal.SIGTERM)

    def stop_all(self, signum: int) -> None:
        if signum == signal.SIGTERM and self._kill_at is None:
            self._kill_at = time.monotonic() + self._kill_after_s
        for process in self._workers:
            if process.pid is not None and process.exitcode is None:
                try:
                    os.kill(process.pid, signum)
                except ProcessLookupError:
                    pass

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for process in self._workers:
            if process.pid is not None:
                process.join(max(0.0, deadline - time.monotonic()))


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


class _Parts:
    """Each worker's --output and dead-letter files, made whole at the end: the output
    in shard order (each body once), the dead letter appended to, as a run appends."""

    def __init__(self, config: RunConfig, count: int) -> None:
        self._output = config.output_path
        self._dead_letter = config.dead_letter_path
        self._count = count
        for index in range(count):
            for path in (self.output(index), self.dead_letter(index)):
                if path is not None and os.path.exists(path):
                    os.remove(path)  # left by a run that was killed

    def output(self, index: int) -> str | None:
        return None if self._output is None else f"{self._output}.part-{index}"

    def dead_letter(self, index: int) -> str:
        return f"{self._dead_letter}.part-{index}"

    def combine(self) -> None:
        if self._output is not None:
            self._concatenate(self._output, "wb", [self.output(i) for i in range(self._count)])
        parts = [self.dead_letter(i) for i in range(self._count)]
        if any(os.path.exists(part) for part in parts):
            self._concatenate(self._dead_letter, "ab", parts)

    @staticmethod
    def _concatenate(path: str, mode: str, parts: list) -> None:
        with open(path, mode) as whole:
            for part in parts:
                if os.path.exists(part):
                    with open(part, "rb") as piece:
                        shutil.copyfileobj(piece, whole, 1 << 20)
                    os.remove(part)


# ------------------------------------------------------------------------ in the worker


class _QueueReporter:
    """A worker's Reporter: everything goes to the parent, progress at most every
    PROGRESS_EVERY_S, problems only as many as the console shows."""

    def __init__(self, messages, index: int, stop: StopRequest) -> None:
        self._messages = messages
        self._index = index
        self._stop = stop
        self._parent = os.getppid()
        self._problems = 0
        self._last_progress = 0.0

    def problem(self, record: dict) -> None:
        self._problems += 1
        if self._problems <= MAX_PROBLEMS_SENT:
            self._messages.put(("problem", self._index, record))

    def notice(self, message: str) -> None:
        self._messages.put(("notice", self._index, message))

    def progress(self, summary: Summary, bytes_done: int, bytes_total: int) -> None:
        now = time.monotonic()
        if now - self._last_progress < PROGRESS_EVERY_S:
            return
        self._last_progress = now
        if os.getppid() != self._parent and not self._stop.requested:
            # The parent was killed (-9): nobody shows this run any more; stop cleanly.
            self._stop.request(signal.SIGTERM)
        # A copy: the queue pickles it later, on its own thread, while the run goes on.
        snapshot = replace(summary, skips=Counter(summary.skips))
        self._messages.put(("progress", self._index, snapshot, bytes_done, bytes_total))

    def changes(self, changes: list[Change]) -> None:
        self._messages.put(("changes", self._index, changes))


def _worker_main(job: _Job, messages, shared_pauses) -> None:
    # The terminal's Ctrl-C reaches the whole process group; the parent turns any stop
    # into one SIGTERM per worker, so a worker listens to SIGTERM alone and counts once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import gc

    gc.set_threshold(100_000, 50, 1000)  # as the CLI does (cli.main)
    from segreplay.pipeline import replay_into_braze

    config = job.config
    index = config.shard[0] if config.shard else 0
    stop = StopRequest()
    reporter = _QueueReporter(messages, index, stop)
    status = 0
    try:
        with stop.installed():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            summary = replay_into_braze(config, reporter, stop, job.stop_grace_s, shared_pauses)
        messages.put(("done", index, summary))
    except SegreplayError as error:
        messages.put(("error", index, isinstance(error, UsageError), error.message, error.hint))
        status = 2 if isinstance(error, UsageError) else 1
    except (KeyboardInterrupt, StopNow):
        status = 128 + signal.SIGTERM
    messages.close()
    messages.join_thread()  # every message is in the pipe before the process ends
    # Without joining delivery threads still waiting on an answer (as cli._exit_now).
    os._exit(status)
