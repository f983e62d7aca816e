"""Wires the stages of a replay: source -> mapping -> dedupe (ledger.py) -> batching ->
sink (Braze, or a dry run), over the state a run works on."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time as _time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from segreplay.config import RunConfig
from segreplay.errors import UsageError
from segreplay.jsonutil import JSONDecodeError, loads
from segreplay.ledger import Ledger, Settle, Sink
from segreplay.mapping import Call, Skipped, map_call
from segreplay.reporting import DeadLetter, Reporter, Summary
from segreplay.source import ArchiveFile, LineReader, ReadProblem, discover
from segreplay.state import State, StateLock
from segreplay.times import format_time

_FINGERPRINT_BYTES = 65536
_CHUNK_LINES = 2_000  # lines decided together: state is read once per chunk


def _fingerprint(archive: ArchiveFile) -> str:
    if archive.size is None:
        return ""
    with open(archive.path, "rb") as file:
        return hashlib.blake2b(file.read(_FINGERPRINT_BYTES), digest_size=16).hexdigest()


def _check_folder(option: str, path: str | None) -> None:
    """Say so before the run, not after an hour of it, when a file cannot be written."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{option} {path}: the folder {folder} is not writable")


def _now() -> str:
    return format_time(datetime.now(UTC))


def run_import(
    config: RunConfig,
    reporter: Reporter,
    make_sink: Callable[[Settle, Summary], Sink] | None = None,
) -> Summary:
    """Replay `config.sources`; `make_sink(settle, summary)` builds the delivery sink
    (a dry run when None). Returns the summary; raises SegreplayError when it stops."""
    started = _time.monotonic()
    archives = discover(config.sources)
    _check_folder("--output", config.output_path)
    _check_folder("--dead-letter", config.dead_letter_path)
    if not config.dry_run:
        _check_folder("--state", config.state_path)
    summary = Summary(dry_run=config.dry_run, files=len(archives))
    session = open_state(config)
    state = session.state
    dead_letter = DeadLetter(config.dead_letter_path, reporter)
    output = open(config.output_path, "wb") if config.output_path else None  # noqa: SIM115
    run_id = state.start_run(_now())
    status = "failed"
    ledger = None
    try:
        ledger = Ledger(state, run_id, config, summary, reporter, dead_letter)
        if make_sink is not None:
            ledger.sink = make_sink(ledger.settle, summary)
        ledger.output = output
        _replay(archives, config, state, ledger, summary, reporter, dead_letter)
        ledger.batcher.flush()
        ledger.sink.finish()
        ledger.commit()
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        if ledger is not None:
            ledger.sink.close()
        summary.users = state.users_in_run(run_id)
        summary.elapsed_s = _time.monotonic() - started
        state.finish_run(run_id, _now(), status, summary.to_dict())
        dead_letter.close()
        if output is not None:
            output.close()
        session.close()
    return summary


def _replay(archives, config, state, ledger, summary, reporter, dead_letter) -> None:
    bytes_total = sum(a.size or 0 for a in archives)
    bytes_before = 0
    options = config.mapping

    def on_problem(problem: ReadProblem) -> None:
        if problem.skipped_file:
            summary.files_skipped += 1
            kind = "skipped file"
        elif problem.truncated:
            summary.files_truncated += 1
            kind = "truncated file"
        else:
            summary.invalid += 1
            kind = "invalid"
        record = problem.raw.decode("utf-8", "backslashreplace") if problem.raw else None
        dead_letter.write(problem.path, problem.line, kind, problem.reason, record)

    for archive in archives:
        skip = 0
        checkpoint = state.checkpoint(archive.path) if archive.size is not None else None
        if archive.fingerprint is not None:
            fingerprint = archive.fingerprint  # an object's ETag, from its listing
        elif (
            checkpoint is not None
            and checkpoint.size == archive.size
            and checkpoint.mtime_ns == archive.mtime_ns
        ):
            fingerprint = checkpoint.fingerprint  # untouched since: no need to read it
        else:
            fingerprint = _fingerprint(archive)
        if (
            checkpoint is not None
            and checkpoint.size == archive.size
            and checkpoint.fingerprint == fingerprint
        ):
            if checkpoint.done:
                summary.files_already_done += 1
                bytes_before += archive.size
                continue
            skip = checkpoint.lines_acked
            summary.lines_already_done += skip
        progress = ledger.open_file(archive, fingerprint, skip)
        reader = LineReader(archive, on_problem)
        path = archive.path
        chunk: list = []
        add = chunk.append
        for number, raw in reader.lines(skip):
            if len(chunk) >= _CHUNK_LINES:
                summary.lines += len(chunk)
                ledger.decide_chunk(progress, chunk)
                chunk = []
                add = chunk.append
                reporter.progress(summary, bytes_before + reader.bytes_read, bytes_total)
            try:
                record = loads(raw)
            except JSONDecodeError as error:
                _reject_line(dead_letter, summary, path, number, _json_problem(error), raw)
                add((number, 0, None))
                continue
            if type(record) is not dict:
                _reject_line(dead_letter, summary, path, number, "not a JSON object", raw)
                add((number, 0, None))
                continue
            mapped = map_call(record, options, len(raw))
            if type(mapped) is Call:
                if mapped.drops or mapped.rejected_objects:
                    _dead_letter_parts(dead_letter, summary, path, number, mapped, record)
                add((number, len(raw), mapped))
                continue
            if type(mapped) is Skipped:
                setattr(summary, mapped.counter, getattr(summary, mapped.counter) + 1)
            else:
                summary.rejected += 1
                dead_letter.write(path, number, "rejected", mapped.reason, record)
            add((number, 0, None))
        summary.lines += len(chunk)
        ledger.decide_chunk(progress, chunk)
        bytes_before += archive.size or reader.bytes_read
        summary.bytes_read = bytes_before
        ledger.close_file(progress)
    reporter.progress(summary, bytes_total, bytes_total)


def _dead_letter_parts(dead_letter, summary, path, number, call: Call, record: dict) -> None:
    for drop in call.drops:
        summary.fields_dropped += 1
        dead_letter.write(path, number, "dropped field", drop.reason, record, key=drop.key)
    for rejection in call.rejected_objects:
        summary.rejected += 1
        dead_letter.write(path, number, "rejected", rejection.reason, record)


def _json_problem(error: JSONDecodeError) -> str:
    message = str(error)
    if "utf-8" in message.lower() or "surrogate" in message.lower():
        return "invalid UTF-8"
    return f"invalid JSON: {message}"


def _reject_line(dead_letter, summary, path, number, reason, raw: bytes) -> None:
    summary.invalid += 1
    record = raw[:10_000].decode("utf-8", "backslashreplace")
    dead_letter.write(path, number, "invalid", reason, record)


@dataclass
class _StateSession:
    state: State
    close: Callable[[], None]


def open_state(config: RunConfig) -> _StateSession:
    """The state a run works on. A dry run works on a private copy, then drops it, so
    it sees everything earlier runs delivered and never changes the real file."""
    if not config.dry_run:
        lock = StateLock(config.state_path)
        lock.__enter__()
        try:
            state = State(config.state_path)
        except BaseException:
            lock.__exit__()
            raise

        def close() -> None:
            state.close()
            lock.__exit__()

        return _StateSession(state, close)
    folder = tempfile.mkdtemp(prefix="segreplay-dry-run-")
    scratch = os.path.join(folder, "state.sqlite")
    if os.path.exists(config.state_path):
        State.snapshot(config.state_path, scratch)
    state = State(scratch, durable=False)

    def close_scratch() -> None:
        state.close()
        shutil.rmtree(folder, ignore_errors=True)

    return _StateSession(state, close_scratch)
