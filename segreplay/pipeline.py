"""Wires the stages and owns the commit protocol.

source -> mapping -> dedupe (Ledger) -> batching -> sink (Braze, or a dry run).
When the sink reports a request acknowledged, one SQLite transaction writes what it
carried, the decisions waiting on it and the file checkpoints together.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time as _time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import BinaryIO, Protocol

from segreplay.batching import Batch, Batcher, Origin
from segreplay.config import RunConfig
from segreplay.dedupe import decide_attributes, message_digest
from segreplay.jsonutil import JSONDecodeError, dumps, loads
from segreplay.mapping import Call, Skipped, map_call
from segreplay.source import ArchiveFile, LineReader, ReadProblem, discover
from segreplay.state import FileCheckpoint, State, StateLock
from segreplay.times import format_time

_FINGERPRINT_BYTES = 65536
_COMMIT_EVERY_LINES = 20_000  # checkpoint even when nothing is acknowledged (all duplicates)
_CHUNK_LINES = 2_000  # lines decided together: state is read once per chunk
_IDENTIFIER_KEYS = frozenset({"external_id", "user_alias", "braze_id", "_update_existing_only"})


@dataclass
class Summary:
    """The run's counts; `to_dict` gives the --json object (cli.md names the keys)."""

    lines: int = 0
    skipped_anonymous: int = 0
    skipped_alias: int = 0
    skipped_pages: int = 0
    skipped_screens: int = 0
    outside_window: int = 0
    filtered: int = 0
    duplicates: int = 0
    invalid: int = 0
    rejected: int = 0
    fields_dropped: int = 0
    users: int = 0
    requests: int = 0
    attributes_sent: int = 0
    attributes_unchanged: int = 0
    attributes_outdated: int = 0
    events_sent: int = 0
    purchases_sent: int = 0
    retries: int = 0
    rate_limited: int = 0
    files: int = 0
    files_skipped: int = 0
    files_truncated: int = 0
    files_already_done: int = 0
    lines_already_done: int = 0
    bytes_read: int = 0
    elapsed_s: float = 0.0
    dry_run: bool = False

    @property
    def data_points(self) -> int:
        return self.attributes_sent + self.events_sent + self.purchases_sent

    @property
    def had_problems(self) -> bool:
        return bool(self.invalid or self.rejected or self.files_skipped or self.files_truncated)

    def to_dict(self) -> dict:
        summary = asdict(self)
        summary["elapsed_s"] = round(self.elapsed_s, 3)
        summary["data_points"] = self.data_points
        return summary


@dataclass(frozen=True, slots=True)
class Change:
    """One line of a dry-run diff: `old` is None for a value never sent."""

    user: str
    what: str  # "attribute", "event", "purchase"
    key: str
    old: object = None
    new: object = None
    known: bool = False  # whether an old value exists (None can be a value)


class Reporter(Protocol):
    """How the pipeline talks to a person. The CLI supplies one; tests may use Silent."""

    def problem(self, record: dict) -> None: ...
    def progress(self, summary: Summary, bytes_done: int, bytes_total: int) -> None: ...
    def changes(self, changes: list[Change]) -> None: ...


class SilentReporter:
    def problem(self, record: dict) -> None:
        pass

    def progress(self, summary: Summary, bytes_done: int, bytes_total: int) -> None:
        pass

    def changes(self, changes: list[Change]) -> None:
        pass


@dataclass(slots=True)
class Refusal:
    """Braze refused one object of a request (or the whole request: index None)."""

    array: str | None
    index: int | None
    reason: str


class Sink(Protocol):
    """Takes sealed batches; reports each one's outcome through the `settle` callback
    it was built with, always on the pipeline's thread."""

    def submit(self, batch: Batch) -> None: ...
    def finish(self) -> None: ...
    def close(self) -> None: ...


Settle = Callable[[list[tuple["Batch", list[Refusal]]]], None]


class DrySink:
    """A dry run: every request is acknowledged, nothing leaves the machine. Answers are
    settled in groups, as a live run does with answers that arrive together."""

    GROUP = 32

    def __init__(self, settle: Settle) -> None:
        self._settle = settle
        self._answers: list[tuple[Batch, list[Refusal]]] = []

    def submit(self, batch: Batch) -> None:
        self._answers.append((batch, []))
        if len(self._answers) >= self.GROUP:
            self.finish()

    def finish(self) -> None:
        answers, self._answers = self._answers, []
        if answers:
            self._settle(answers)

    def close(self) -> None:
        pass


@dataclass(slots=True, eq=False)
class _Ticket:
    """A line whose decisions wait on `waiting` unacknowledged batches."""

    line: int
    waiting: int = 0


@dataclass(slots=True, eq=False)
class _FileProgress:
    archive: ArchiveFile
    fingerprint: str
    last_line: int = 0  # last line handed to the ledger
    read_all: bool = False
    open_tickets: deque = field(default_factory=deque)
    written: tuple[int, bool] | None = None  # (lines_acked, done) as last committed

    def watermark(self) -> int:
        tickets = self.open_tickets
        while tickets and tickets[0].waiting == 0:
            tickets.popleft()
        return tickets[0].line - 1 if tickets else self.last_line

    def checkpoint(self) -> FileCheckpoint | None:
        lines_acked = self.watermark()
        done = self.read_all and not self.open_tickets
        if (lines_acked, done) == self.written or self.archive.size is None:
            return None  # unchanged, or standard input (nothing to resume from)
        self.written = (lines_acked, done)
        archive = self.archive
        return FileCheckpoint(
            archive.path, archive.size, self.fingerprint, lines_acked, done, archive.mtime_ns
        )


class Ledger:
    """Dedupe decisions and the commit protocol.

    Decisions not yet acknowledged live in `_overlay` (the user's attribute view as
    decided) and `_pending_digests`; each batch carries the effects to write when Braze
    acknowledges it. Decisions that send nothing (a repeated value moving its time
    forward) ride on the user's latest unacknowledged batch with attribute effects, or,
    when there is none, on the next transaction, which also carries the checkpoints
    that cover them. Batches with attribute effects for a user are `ordered` for it: the
    sink never has two of them in flight, so they are acknowledged in decision order.
    """

    def __init__(self, state: State, run_id: int, config: RunConfig, summary: Summary,
                 reporter: Reporter, dead_letter: DeadLetter) -> None:  # fmt: skip
        self._state = state
        self._run_id = run_id
        self._options = config.mapping
        self._diff = config.diff
        self._summary = summary
        self._reporter = reporter
        self._dead_letter = dead_letter
        self._overlay: dict[str, dict] = {}
        self._pending_digests: set[int] = set()
        self._attribute_batch: dict[str, Batch] = {}  # latest unsettled, per user
        self._unsettled: dict[str, int] = {}  # unsettled batches carrying anything, per user
        self._unbatched_effects: dict[str, dict] = {}
        self._files: list[_FileProgress] = []
        self._lines_since_commit = 0
        self._delivered: set[int] = set()  # digests of the current chunk already delivered
        self.batcher = Batcher(self._seal, config.batch_limit)
        self.sink: Sink = DrySink(self.settle)
        self.output: BinaryIO | None = None  # --output: every request body, one per line

    def _seal(self, batch: Batch) -> None:
        self._summary.requests += 1
        if self.output is not None:
            self.output.write(batch.body + b"\n")
        self.sink.submit(batch)

    # files ---------------------------------------------------------------------------

    def open_file(self, archive: ArchiveFile, fingerprint: str, first_line: int) -> _FileProgress:
        progress = _FileProgress(archive, fingerprint, last_line=first_line)
        self._files.append(progress)
        return progress

    def close_file(self, progress: _FileProgress) -> None:
        progress.read_all = True
        self.commit()

    # decisions -----------------------------------------------------------------------

    def decide_chunk(self, progress: _FileProgress, entries: list) -> None:
        """Decide a chunk of lines, in order: (line, size, Call or None for a line that
        needs nothing from Braze). State is read for the whole chunk in two queries."""
        all_digests: list[int] = []
        per_call: list = []
        users = set()
        for _line, _size, call in entries:
            if call is None:
                per_call.append(None)
                continue
            users.add(call.user)
            count = len(call.events) + len(call.purchases)
            if count and call.message_id:
                message_id = call.message_id
                digests = [message_digest(message_id, i) for i in range(count)]
                all_digests += digests
                per_call.append(digests)
            else:
                per_call.append(None)
        users.difference_update(self._overlay)
        self._delivered = self._state.prefetch(users, all_digests)
        decide = self._decide
        for (line, size, call), digests in zip(entries, per_call, strict=True):
            if call is not None:
                decide(call, digests, progress, line, size)
            progress.last_line = line  # settled, or held by a ticket until acknowledged
        self._lines_since_commit += len(entries)
        if self._lines_since_commit >= _COMMIT_EVERY_LINES:
            self.commit()

    def _decide(self, call: Call, digests, progress: _FileProgress, line: int, size: int) -> None:
        origin: Origin = (progress.archive.path, line)
        ticket = _Ticket(line)
        user = call.user
        view = self._overlay.get(user)
        if view is None:
            committed = self._state.user_attributes(user)
            known = committed is not None
        else:
            committed, known = view, True
        sent_objects = (
            self._decide_events(call, digests, ticket, origin, size)
            if call.events or call.purchases
            else 0
        )

        effects = None
        if call.attributes is not None:
            decision = decide_attributes(committed, call.attributes, call.time)
            self._summary.attributes_unchanged += decision.unchanged
            self._summary.attributes_outdated += decision.outdated
            effects = decision.effects
            if decision.send or not (known or sent_objects):
                # A first identify with nothing left to send still creates the profile.
                obj = {**call.identifier, **decision.send, **self._flags(call)}
                batch = self.batcher.add_attributes(user, obj, origin, size)
                self._attach(batch, user, effects, ticket)
                sent_objects += 1
            elif effects:
                batch = self._attribute_batch.get(user)
                if batch is None:
                    self._unbatched_effects.setdefault(user, {}).update(effects)
                else:
                    self._attach(batch, user, effects, ticket)
        if view is None and (sent_objects or effects):
            view = self._overlay[user] = dict(committed or {})
        if effects:
            view.update(effects)
        if ticket.waiting:
            progress.open_tickets.append(ticket)

    def _decide_events(
        self, call: Call, digests, ticket: _Ticket, origin: Origin, size: int
    ) -> int:
        sent = 0
        pending = self._pending_digests
        delivered = self._delivered
        user = call.user
        index = 0
        attached_to = None
        for objects, add in (
            (call.events, self.batcher.add_event),
            (call.purchases, self.batcher.add_purchase),
        ):
            for obj in objects:
                digest = digests[index] if digests else None
                index += 1
                if digest is not None:
                    if digest in pending or digest in delivered:
                        continue
                    pending.add(digest)
                batch = add(obj, origin, digest, size)
                if batch is not attached_to:
                    self._attach(batch, user, None, ticket)
                    attached_to = batch
                    if call.is_alias:
                        # Only the alias's attributes object creates its profile: its
                        # events must not overtake it.
                        batch.ordered_users.add(user)
                sent += 1
        if not sent:
            self._summary.duplicates += 1
        return sent

    def _attach(self, batch: Batch, user: str, effects: dict | None, ticket: _Ticket) -> None:
        """Make `batch` carry the user's attribute `effects` (None for events only) and
        hold `ticket`'s line until the batch is acknowledged."""
        user_effects = batch.effects.get(user)
        if user_effects is None:
            user_effects = batch.effects[user] = {}  # even empty: the user becomes known
            self._unsettled[user] = self._unsettled.get(user, 0) + 1
        if effects is not None:
            user_effects.update(effects)
            self._attribute_batch[user] = batch
            batch.ordered_users.add(user)
        if not batch.tickets or batch.tickets[-1] is not ticket:
            batch.tickets.append(ticket)
            ticket.waiting += 1

    def _flags(self, call: Call) -> dict:
        if self._options.update_existing_only:
            return {"_update_existing_only": True}
        if call.is_alias:
            return {"_update_existing_only": False}  # Braze creates alias-only profiles only so
        return {}

    # acknowledgements ----------------------------------------------------------------

    def settle(self, answers: list[tuple[Batch, list[Refusal]]]) -> None:
        """Braze answered these batches: in one transaction, write what they carried and
        Braze accepted; dead-letter what it refused."""
        effects: dict[str, dict] = {}
        digests: list[int] = []
        for batch, refusals in answers:
            self._settle_one(batch, refusals, effects, digests)
        self.commit(effects, digests)
        # The chunk being decided prefetched its delivered digests before these answers
        # came: without this, a repeat later in the chunk is in neither set and resent.
        self._delivered.update(digests)
        for batch, _refusals in answers:
            self._pending_digests.difference_update(batch.event_digests)
            self._pending_digests.difference_update(batch.purchase_digests)
            for user in batch.effects:
                if self._attribute_batch.get(user) is batch:
                    del self._attribute_batch[user]
                left = self._unsettled[user] - 1
                if left:
                    self._unsettled[user] = left
                else:
                    del self._unsettled[user]
                    self._overlay.pop(user, None)

    def _settle_one(
        self, batch: Batch, refusals: list[Refusal], effects: dict, digests: list
    ) -> None:
        refused = self._record_refusals(batch, refusals)
        summary = self._summary
        if self._diff:
            self._report_changes(batch, refused)
        for user, obj in batch.attributes.items():
            if ("attributes", user) not in refused:
                summary.attributes_sent += len(obj) - len(_IDENTIFIER_KEYS.intersection(obj))
        for user, user_effects in batch.effects.items():
            if ("attributes", user) not in refused:
                effects.setdefault(user, {}).update(user_effects)
        # Whole arrays at once: refusals are rare, a per-object loop is not.
        for array, digest_list in (
            ("events", batch.event_digests),
            ("purchases", batch.purchase_digests),
        ):
            refused_here = {index for name, index in refused if name == array}
            if refused_here:
                kept = [d for i, d in enumerate(digest_list) if i not in refused_here]
            else:
                kept = digest_list
            digests += [digest for digest in kept if digest is not None]
            if array == "events":
                summary.events_sent += len(kept)
            else:
                summary.purchases_sent += len(kept)
        for ticket in batch.tickets:
            ticket.waiting -= 1

    def _record_refusals(self, batch: Batch, refusals: list[Refusal]) -> set:
        refused: set = set()
        if not refusals:
            return refused
        arrays = batch.arrays()
        for refusal in refusals:
            if refusal.index is None:  # the whole request
                targets = [(name, i) for name, objs in arrays.items() for i in range(len(objs))]
            else:
                targets = [(refusal.array, refusal.index)]
            for array, index in targets:
                objects = arrays.get(array, [])
                if index >= len(objects):
                    continue
                key = (
                    ("attributes", list(batch.attributes)[index])
                    if array == "attributes"
                    else (array, index)
                )
                if key in refused:
                    continue
                refused.add(key)
                self._summary.rejected += 1
                path, line = batch.origin(array, index) or ("?", 0)
                self._dead_letter.write(
                    {
                        "source": path,
                        "line": line,
                        "kind": "refused by Braze",
                        "reason": refusal.reason,
                        "record": objects[index],
                    }  # fmt: skip
                )
        return refused

    def commit(self, effects: dict | None = None, digests: list[int] | None = None) -> None:
        """One transaction: a batch's effects, decisions waiting for one, checkpoints."""
        merged = self._unbatched_effects
        self._unbatched_effects = {}
        if not merged:
            merged = effects or {}
        else:
            for user, user_effects in (effects or {}).items():
                # Unbatched decisions for a user are always older than its batched ones.
                merged.setdefault(user, {}).update(user_effects)
        checkpoints = [c for c in (p.checkpoint() for p in self._files) if c is not None]
        self._files = [p for p in self._files if not (p.read_all and not p.open_tickets)]
        if merged or digests or checkpoints:
            self._state.commit(self._run_id, merged, digests or (), checkpoints)
        for user in merged:
            if user not in self._unsettled:
                self._overlay.pop(user, None)
        self._lines_since_commit = 0

    def _report_changes(self, batch: Batch, refused: set) -> None:
        changes = []
        for user, obj in batch.attributes.items():
            if ("attributes", user) in refused:
                continue
            before = self._state.user_attributes(user) or {}
            for key, value in obj.items():
                if key in _IDENTIFIER_KEYS:
                    continue
                prior = before.get(key)
                changes.append(
                    Change(
                        user,
                        "attribute",
                        key,
                        prior[0] if prior else None,
                        value,
                        prior is not None,
                    )
                )
        for array, what, name_key in (
            ("events", "event", "name"),
            ("purchases", "purchase", "product_id"),
        ):
            for index, obj in enumerate(getattr(batch, array)):
                if (array, index) not in refused:
                    user = _user_key(obj)
                    changes.append(Change(user, what, obj[name_key], new=obj))
        if changes:
            self._reporter.changes(changes)


def _user_key(obj: dict) -> str:
    if "external_id" in obj:
        return "e:" + obj["external_id"]
    return "a:" + obj["user_alias"]["alias_name"]


class DeadLetter:
    """Rejected lines and dropped fields, as JSON lines; the file is made on first use."""

    def __init__(self, path: str | None, reporter: Reporter) -> None:
        self.path = path
        self.count = 0
        self._reporter = reporter
        self._file = None

    def write(self, record: dict) -> None:
        self.count += 1
        self._reporter.problem(record)
        if self.path is None:
            return
        if self._file is None:
            self._file = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        self._file.write(dumps(record) + b"\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _fingerprint(archive: ArchiveFile) -> str:
    if archive.size is None:
        return ""
    with open(archive.path, "rb") as file:
        return hashlib.blake2b(file.read(_FINGERPRINT_BYTES), digest_size=16).hexdigest()


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
        dead_letter.write(
            {
                "source": problem.path,
                "line": problem.line,
                "kind": kind,
                "reason": problem.reason,
                "record": record,
            }  # fmt: skip
        )

    for archive in archives:
        skip = 0
        checkpoint = state.checkpoint(archive.path) if archive.size is not None else None
        if (
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
                dead_letter.write(
                    {
                        "source": path,
                        "line": number,
                        "kind": "rejected",
                        "reason": mapped.reason,
                        "record": record,
                    }  # fmt: skip
                )
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
        dead_letter.write(
            {
                "source": path,
                "line": number,
                "kind": "dropped field",
                "key": drop.key,
                "reason": drop.reason,
                "record": record,
            }  # fmt: skip
        )
    for rejection in call.rejected_objects:
        summary.rejected += 1
        dead_letter.write(
            {
                "source": path,
                "line": number,
                "kind": "rejected",
                "reason": rejection.reason,
                "record": record,
            }  # fmt: skip
        )


def _json_problem(error: JSONDecodeError) -> str:
    message = str(error)
    if "utf-8" in message.lower() or "surrogate" in message.lower():
        return "invalid UTF-8"
    return f"invalid JSON: {message}"


def _reject_line(dead_letter, summary, path, number, reason, raw: bytes) -> None:
    summary.invalid += 1
    dead_letter.write(
        {
            "source": path,
            "line": number,
            "kind": "invalid",
            "reason": reason,
            "record": raw[:10_000].decode("utf-8", "backslashreplace"),
        }  # fmt: skip
    )


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
