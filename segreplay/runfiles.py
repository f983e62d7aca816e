"""What `import` and `delete` share about the files they work on: the state (a private
copy for a dry run; for `delete`, every shard of it), the folders of the files they will
write, checked up front, and the run they record in the state."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from segreplay.bucket_state import DEFAULT_UPLOAD_EVERY_S, BucketState, is_bucket_path
from segreplay.errors import UsageError
from segreplay.sharding import kept_in, shard_paths
from segreplay.state import State, StateLock
from segreplay.stopping import StopNow
from segreplay.times import format_time


def check_folder(option: str, path: str | None) -> None:
    """Say so before the run, not after an hour of it, when a file cannot be written."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{option} {path}: the folder {folder} is not writable")


def now() -> str:
    """The time now, as runs and deletions are recorded in the state."""
    return format_time(datetime.now(UTC))


def open_state(state_path: str, dry_run: bool, stack: ExitStack) -> State:
    """The state a run works on, locked and closed with `stack`. A dry run works on a
    private copy, then drops it, so it sees everything earlier runs recorded and never
    changes the real file."""
    if not dry_run:
        stack.enter_context(StateLock(state_path))
        state = State(state_path)
        stack.callback(state.close)
        return state
    folder = tempfile.mkdtemp(prefix="segreplay-dry-run-")
    stack.callback(shutil.rmtree, folder, ignore_errors=True)
    scratch = os.path.join(folder, "state.sqlite")
    if os.path.exists(state_path):
        State.snapshot(state_path, scratch)
    state = State(scratch, durable=False)
    stack.callback(state.close)
    return state


@dataclass(frozen=True)
class KeptState:
    """A state file open for a run, wherever it is kept (`open_kept_state`)."""

    state: State
    bucket: BucketState | None  # kept in a bucket: downloaded, uploaded when the run ends
    made: bool  # no run had made this file yet


def open_kept_state(path: str, dry_run: bool, stack: ExitStack,
                    upload_every_s: float = DEFAULT_UPLOAD_EVERY_S) -> KeptState:  # fmt: skip
    """`open_state` for a state on this machine or in a bucket: a bucket's object is
    downloaded under its lease first and uploaded when `stack` closes, after the state
    (a dry run takes no lease and uploads nothing)."""
    bucket = None
    local = path
    if is_bucket_path(path):
        bucket = BucketState(path, upload_every_s)
        local = bucket.open(lease=not dry_run)
        stack.callback(bucket.close, upload=not dry_run)
    made = not os.path.exists(local)
    return KeptState(open_state(local, dry_run, stack), bucket, made)


@dataclass
class WholeState:
    """Every file a state is kept in, open (`open_whole_state`)."""

    states: list[State] = field(default_factory=list)
    new_shards: list[str] = field(default_factory=list)  # shard files no run had made yet


def open_whole_state(state_path: str, dry_run: bool, stack: ExitStack) -> WholeState:
    """The state as a whole, for a command that must change all of it: its one file, or
    each of its N shards (sharding.kept_in), each opened as `open_kept_state` does. A
    shard no run has made yet is made, so that it too knows what this run records."""
    paths = shard_paths(state_path, kept_in(state_path))
    whole = WholeState()
    for path in paths:
        kept = open_kept_state(path, dry_run, stack)
        if len(paths) > 1 and kept.made:
            whole.new_shards.append(path)
        whole.states.append(kept.state)
    return whole


@contextmanager
def recorded_run(
    state: State, summary, started: float, before_finish: Callable[[int], None] = lambda i: None
) -> Iterator[int]:
    """A run in the state's `runs` table, `running` while the block runs (it gets the
    run's id), then `finished`, `interrupted` (a stop or a signal) or `failed`, with the
    summary's counts and elapsed time. `summary` has `interrupted`, `elapsed_s` and
    `to_dict()`; `before_finish(run_id)` completes it first."""
    run_id = state.start_run(now())
    status = "failed"
    try:
        yield run_id
        status = "interrupted" if summary.interrupted else "finished"
    except (KeyboardInterrupt, StopNow):
        status = "interrupted"
        raise
    finally:
        before_finish(run_id)
        summary.elapsed_s = time.monotonic() - started
        state.finish_run(run_id, now(), status, summary.to_dict())
