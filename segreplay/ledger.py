"""Dedupe decisions against state, and the commit protocol that advances state only on
Braze's acknowledgement: what each request carries, and what waits on it."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from segreplay.batching import Batch, Batcher, Origin
from segreplay.config import MappingOptions
from segreplay.dedupe import decide_attributes, message_digest
from segreplay.mapping import Call
from segreplay.privacy import user_tag
from segreplay.reporting import Summary
from segreplay.source import ArchiveFile
from segreplay.state import FileCheckpoint, State

_COMMIT_EVERY_LINES = 20_000  # checkpoint even when nothing is acknowledged (all duplicates)
DECIDE_SLICE = 200  # lines decided between two chances to send what sealed

_KEEP_ORIGIN = ("(a profile to merge into)", 0)  # where a refused one says it came from
# An object Braze refused: ("attributes", user) or (array, index).
RefusedKey = tuple[str, object]


@dataclass(slots=True, eq=False)
class _Pending:
    """What a batch carries for the state, written when Braze acknowledges it."""

    effects: dict[str, dict] = field(default_factory=dict)  # user -> {key: [value, time]}
    keeps: list[str] = field(default_factory=list)  # profiles made for merges into them
    settled: bool = False


@dataclass(slots=True, eq=False)
class _FileProgress:
    archive: ArchiveFile
    fingerprint: str
    options: str  # the fingerprint of the options that decide its lines
    last_line: int = 0  # last line handed to the ledger
    read_all: bool = False
    # (first line of this file a batch holds, the batch's pending record), in line order:
    # a line is settled once every batch holding it or an earlier line of the file is.
    held: deque[tuple[int, _Pending]] = field(default_factory=deque)
    holders: set[int] = field(default_factory=set)  # ids of the pending records in `held`
    written: tuple[int, bool] | None = None  # (lines_acked, done) as last committed

    def hold(self, pending: _Pending, line: int) -> None:
        """`line`'s decisions wait on `pending` (lines are decided in increasing order)."""
        if id(pending) not in self.holders:
            self.holders.add(id(pending))
            self.held.append((line, pending))

    def watermark(self) -> int:
        held = self.held
        while held and held[0][1].settled:
            self.holders.discard(id(held.popleft()[1]))
        return held[0][0] - 1 if held else self.last_line

    def checkpoint(self) -> FileCheckpoint | None:
        lines_acked = self.watermark()
        done = self.read_all and not self.held
        if (lines_acked, done) == self.written or self.archive.size is None:
            return None  # unchanged, or standard input (nothing to resume from)
        self.written = (lines_acked, done)
        archive = self.archive
        return FileCheckpoint(archive.path, archive.size, self.fingerprint, lines_acked, done,
                              archive.mtime_ns, self.options)  # fmt: skip


class Ledger:
    """Dedupe decisions and the commit protocol.

    Decisions not yet acknowledged live in `_overlay` (the user's attribute view as
    decided) and `_pending_digests`; each batch's `_Pending` record holds the effects to
    write when Braze acknowledges it. Decisions that send nothing (a repeated value
    moving its time forward) ride on the user's latest unacknowledged batch with
    attribute effects, or, when there is none, on the next transaction, which also
    carries the checkpoints that cover them. Batches with attribute effects for a user
    are `ordered` for it: the sink never has two of them in flight, so they are
    acknowledged in decision order.

    Decisions and settling never interleave: the caller settles answers only while
    `decide_chunk` is paused between two slices of lines, or between chunks.
    """

    def __init__(self, state: State, run_id: int, options: MappingOptions, batcher: Batcher,
                 summary: Summary) -> None:  # fmt: skip
        self._state = state
        self._run_id = run_id
        self._options = options
        self._batcher = batcher
        self._summary = summary
        self._overlay: dict[str, dict] = {}
        self._pending: dict[Batch, _Pending] = {}
        self._pending_digests: set[int] = set()
        self._attribute_batch: dict[str, Batch] = {}  # latest unsettled, per user
        self._unsettled: dict[str, int] = {}  # unsettled batches carrying anything, per user
        self._unbatched_effects: dict[str, dict] = {}
        self._files: list[_FileProgress] = []
        self._lines_since_commit = 0
        self._delivered: set[int] = set()  # digests of the current chunk already delivered

    # files ---------------------------------------------------------------------------

    def open_file(self, archive: ArchiveFile, fingerprint: str, options: str,
                  first_line: int) -> _FileProgress:  # fmt: skip
        progress = _FileProgress(archive, fingerprint, options, last_line=first_line)
        self._files.append(progress)
        return progress

    def close_file(self, progress: _FileProgress) -> None:
        progress.read_all = True
        self.commit()

    # decisions -----------------------------------------------------------------------

    def decide_chunk(self, progress: _FileProgress, entries: list,
                     pause_every: int = DECIDE_SLICE) -> Iterator[None]:  # fmt: skip
        """Decide a chunk of lines, in order: (line, size, Call or None for a line that
        needs nothing from Braze). State is read for the whole chunk in two queries.
        The batches this fills wait in the batcher's `take_sealed()`.

        A generator: it pauses after every `pause_every` lines, with every line so far
        fully decided, so the caller can send what sealed (and settle answers) while the
        rest of the chunk waits."""
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
        for start in range(0, len(entries), pause_every):
            end = start + pause_every
            for (line, size, call), digests in zip(entries[start:end], per_call[start:end],
                                                   strict=True):  # fmt: skip
                if call is not None:
                    decide(call, digests, progress, line, size)
                progress.last_line = line  # settled, or held by a batch until acknowledged
            yield
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
            if not known and call.is_alias and not self._options.update_existing_only:
                # Braze creates an alias-only profile only from an attributes object
                # that says so, and drops events for an alias it does not hold: that
                # object goes first, once per alias across runs.
                obj = {**call.identifier, "_update_existing_only": False}
                batch = self._batcher.add_attributes(user, obj, origin, size)
                self._attach(batch, user, {}, progress, line)
                view = self._overlay[user] = {}
                committed, known = view, True
                self._summary.aliases_created += 1
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
                batch = self._batcher.add_attributes(user, obj, origin, size)
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
        batcher = self._batcher
        for objects, add in (
            (call.events, batcher.add_event),
            (call.purchases, batcher.add_purchase),
        ):
            for obj in objects:
                digest = digests[index] if digests else None
                index += 1
                if digest is not None:
                    if digest in pending or digest in delivered:
                        continue
                    pending.add(digest)
                batch = add(user, obj, origin, digest, size)
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
        pending = self._pending.get(batch)
        if pending is None:
            pending = self._pending[batch] = _Pending()
        user_effects = pending.effects.get(user)
        if user_effects is None:
            user_effects = pending.effects[user] = {}  # even empty: the user becomes known
            self._unsettled[user] = self._unsettled.get(user, 0) + 1
        if effects is not None:
            user_effects.update(effects)
            self._attribute_batch[user] = batch
            batch.ordered_users.add(user)
        progress.hold(pending, line)

    def make_keeps(self, users: list[str]) -> None:
        """A `{external_id}` object for each user a pending merge keeps that this state
        holds nothing for (State.keeps_to_make): Braze then holds the profile, and once it
        says so the merge may go. It sets no attribute, so it cannot reorder the values
        the user's own shard sends."""
        flags = {"_update_existing_only": True} if self._options.update_existing_only else {}
        for user in users:
            obj = {"external_id": user[2:], **flags}
            batch = self._batcher.add_attributes(user, obj, _KEEP_ORIGIN, len(user))
            self._pending.setdefault(batch, _Pending()).keeps.append(user)

    def _flags(self, call: Call) -> dict:
        if self._options.update_existing_only:
            return {"_update_existing_only": True}
        if call.is_alias:
            return {"_update_existing_only": False}  # Braze creates alias-only profiles only so
        return {}

    # acknowledgements ----------------------------------------------------------------

    def settle(self, acknowledged: list[tuple[Batch, set[RefusedKey]]]) -> None:
        """Braze answered these batches, refusing the objects named: in one transaction,
        write what they carried and Braze accepted."""
        effects: dict[str, dict] = {}
        digests: list[tuple[int, int]] = []  # (messageId digest, its user's tag)
        settled = []
        keeps = []
        for batch, refused in acknowledged:
            pending = self._pending.pop(batch, None) or _Pending()
            keeps += [user for user in pending.keeps if ("attributes", user) not in refused]
            for user, user_effects in pending.effects.items():
                if ("attributes", user) not in refused:
                    effects.setdefault(user, {}).update(user_effects)
            for array, digest_list, users in (
                ("events", batch.event_digests, batch.event_users),
                ("purchases", batch.purchase_digests, batch.purchase_users),
            ):
                # Each digest with its user's tag, so a deletion can erase it (privacy.md).
                digests += [
                    (digest, user_tag(user))
                    for index, (digest, user) in enumerate(zip(digest_list, users, strict=True))
                    if digest is not None and (array, index) not in refused
                ]
            pending.settled = True
            settled.append((batch, pending))
        self.commit(effects, digests)
        if keeps:
            self._state.keeps_made(keeps)
        # Settled between two slices of a chunk, whose delivered digests were read before
        # these answers: without this, a repeat later in the chunk would be sent again.
        self._delivered.update(digest for digest, _tag in digests)
        for batch, pending in settled:
            self._pending_digests.difference_update(batch.event_digests)
            self._pending_digests.difference_update(batch.purchase_digests)
            for user in pending.effects:
                if self._attribute_batch.get(user) is batch:
                    del self._attribute_batch[user]
                left = self._unsettled[user] - 1
                if left:
                    self._unsettled[user] = left
                else:
                    del self._unsettled[user]
                    self._overlay.pop(user, None)

    def commit(
        self, effects: dict | None = None, digests: list[tuple[int, int]] | None = None
    ) -> None:
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
