"""Dedupe decisions against state, and the commit protocol that advances state only on
Braze's acknowledgement: what each request carries, and what waits on it."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from segreplay.batching import Batch, Batcher, Origin
from segreplay.config import RunConfig
from segreplay.dedupe import decide_attributes, message_digest
from segreplay.mapping import Call
from segreplay.reporting import Change, DeadLetter, Reporter, Summary
from segreplay.source import ArchiveFile
from segreplay.state import FileCheckpoint, State

_COMMIT_EVERY_LINES = 20_000  # checkpoint even when nothing is acknowledged (all duplicates)
_IDENTIFIER_KEYS = frozenset({"external_id", "user_alias", "braze_id", "_update_existing_only"})


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
        batch.answered_bodies.append(batch.body)
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
class _FileProgress:
    archive: ArchiveFile
    fingerprint: str
    last_line: int = 0  # last line handed to the ledger
    read_all: bool = False
    # (first line of this file a batch holds, the batch), in line order: a line is
    # settled once every batch holding it or an earlier line of the file is.
    held: deque[tuple[int, Batch]] = field(default_factory=deque)
    written: tuple[int, bool] | None = None  # (lines_acked, done) as last committed

    def hold(self, batch: Batch, line: int) -> None:
        """`line`'s decisions wait on `batch` (lines are decided in increasing order)."""
        if self not in batch.holds:
            batch.holds.append(self)
            self.held.append((line, batch))

    def watermark(self) -> int:
        held = self.held
        while held and held[0][1].settled:
            held.popleft()
        return held[0][0] - 1 if held else self.last_line

    def checkpoint(self) -> FileCheckpoint | None:
        lines_acked = self.watermark()
        done = self.read_all and not self.held
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
        self.output: BinaryIO | None = None  # --output: every body Braze answered, one per line

    def _seal(self, batch: Batch) -> None:
        self._summary.requests += 1
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
                call_digests = [message_digest(message_id, i) for i in range(count)]
                all_digests += call_digests
                per_call.append(call_digests)
            else:
                per_call.append(None)
        users.difference_update(self._overlay)
        self._delivered = self._state.prefetch(users, all_digests)
        decide = self._decide
        for (line, size, call), digests in zip(entries, per_call, strict=True):
            if call is not None:
                decide(call, digests, progress, line, size)
            progress.last_line = line  # settled, or held by a batch until acknowledged
        self._lines_since_commit += len(entries)
        if self._lines_since_commit >= _COMMIT_EVERY_LINES:
            self.commit()

    def _decide(self, call: Call, digests, progress: _FileProgress, line: int, size: int) -> None:
        origin: Origin = (progress.archive.path, line)
        user = call.user
        view = self._overlay.get(user)
        if view is None:
            committed = self._state.user_attributes(user)
            known = committed is not None
        else:
            committed, known = view, True
        sent_objects = (
            self._decide_events(call, digests, progress, origin, size)
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
                self._attach(batch, user, effects, progress, line)
                sent_objects += 1
            elif effects:
                batch = self._attribute_batch.get(user)
                if batch is None:
                    self._unbatched_effects.setdefault(user, {}).update(effects)
                else:
                    self._attach(batch, user, effects, progress, line)
        if view is None and (sent_objects or effects):
            view = self._overlay[user] = dict(committed or {})
        if effects:
            view.update(effects)

    def _decide_events(
        self, call: Call, digests, progress: _FileProgress, origin: Origin, size: int
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
                    self._attach(batch, user, None, progress, origin[1])
                    attached_to = batch
                    if call.is_alias:
                        # Only the alias's attributes object creates its profile: its
                        # events must not overtake it.
                        batch.ordered_users.add(user)
                sent += 1
        if not sent:
            self._summary.duplicates += 1
        return sent

    def _attach(self, batch: Batch, user: str, effects: dict | None,
                progress: _FileProgress, line: int) -> None:  # fmt: skip
        """Make `batch` carry the user's attribute `effects` (None for events only) and
        hold `line` of `progress` until the batch is acknowledged."""
        user_effects = batch.effects.get(user)
        if user_effects is None:
            user_effects = batch.effects[user] = {}  # even empty: the user becomes known
            self._unsettled[user] = self._unsettled.get(user, 0) + 1
        if effects is not None:
            user_effects.update(effects)
            self._attribute_batch[user] = batch
            batch.ordered_users.add(user)
        progress.hold(batch, line)

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
            if self.output is not None:
                self.output.writelines(body + b"\n" for body in batch.answered_bodies)
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
        batch.settled = True

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
                    path, line, "refused by Braze", refusal.reason, objects[index]
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
        self._files = [p for p in self._files if not (p.read_all and not p.held)]
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
