"""The files a command works on, shared by `import` and `delete`: the state (a private
copy for a dry run), and the folders of the files it will write, checked up front."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import ExitStack
from datetime import UTC, datetime

from segreplay.errors import UsageError
from segreplay.state import State, StateLock
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
