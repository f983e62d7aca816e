"""Wires the stages of a replay: source -> mapping -> dedupe (ledger.py) -> batching ->
sink (Braze, or a dry run), and settles the answers, over the state a run works on.

One loop owns the batcher, the sink and the output: it decides a chunk of lines, submits
the batches that sealed, and settles the answers that arrived, in that order, so nothing
is ever settled while a line is half decided.
"""

from __future__ import annotations

import time as _time
from collections import deque
from contextlib import ExitStack

from segreplay.batching import Batch, Batcher
from segreplay.bucket_state import BucketState, duplicate_bound, is_bucket_path
from segreplay.config import DEFAULT_STOP_GRACE_S, RunConfig
from segreplay.deletion import DELETE_PATH, plan_requests, request_body
from segreplay.deletion import PERMISSION as DELETE_PERMISSION
from segreplay.identity import Links, scan
from segreplay.ledger import Ledger
from segreplay.mapping import Call, Rejected, Skipped, SkipReason
from segreplay.merging import Post, dry_post, plan_merges, send_merges
from segreplay.privacy import Forgotten, IdKind, PersonId
from segreplay.reading import Elsewhere, Invalid, invalid_record, mapped_lines
from segreplay.reporting import DeadLetter, Reporter, Summary
from segreplay.runfiles import check_folder, now, open_kept_state, recorded_run
from segreplay.settling import Settler
from segreplay.sharding import Shard
from segreplay.sink import DrySink, Sink
from segreplay.source import ArchiveFile, LineReader, ReadProblem, discover, fingerprint
from segreplay.state import ResumePoint, State
from segreplay.stopping import StopRequest

CHUNK_LINES = 2_000  # lines decided together: state is read once per chunk
_POLL_S = 0.2  # a wait for answers looks at stop requests this often
_QUEUE_BATCHES = 16  # sealed batches that may wait for the sink before deciding waits too


def run_import(
    config: RunConfig,
    reporter: Reporter,
    sink: Sink | None = None,
    stop: StopRequest | None = None,
    stop_grace_s: float = DEFAULT_STOP_GRACE_S,
    chunk_lines: int = CHUNK_LINES,
    user_ops: Post | None = None,
) -> Summary:
    """Replay `config.sources` into `sink` (a dry run when None; closed here). Returns
    the summary, with `interrupted` set when `stop` was requested; raises
    SegreplayError when the run cannot go on. Answers are settled between chunks of
    `chunk_lines` lines. `user_ops` posts merges (/users/identify, /users/merge); a dry
    run's acknowledges them."""
    started = _time.monotonic()
    archives = discover(config.sources)
    check_folder("--output", config.output_path)
    check_folder("--dead-letter", config.dead_letter_path)
    if not config.dry_run and not is_bucket_path(config.state_path):
        check_folder("--state", config.state_path)
    summary = Summary(dry_run=config.dry_run, files=len(archives))
    with ExitStack() as stack:
        sink = sink or DrySink()
        stack.callback(sink.close)
        kept = open_kept_state(config.state_path, config.dry_run, stack,
                               config.state_upload_every_s)  # fmt: skip
        state, bucket = kept.state, kept.bucket
        if bucket is not None and not config.dry_run:
            delivery = config.delivery
            reporter.notice(duplicate_bound(
                config.state_path, config.state_upload_every_s,
                delivery.rate_requests if delivery else None,
                delivery.rate_seconds if delivery else None,
            ))  # fmt: skip
        dead_letter = DeadLetter(config.dead_letter_path, reporter)
        stack.callback(dead_letter.close)
        output = stack.enter_context(open(config.output_path, "wb")) if config.output_path else None
        with recorded_run(state, summary, started,
                          lambda run_id: setattr(summary, "users", state.users_in_run(run_id))
                          ) as run_id:  # fmt: skip
            replay = _Replay(config, state, run_id, summary, reporter, dead_letter, sink, output,
                             stop or StopRequest(), stop_grace_s, chunk_lines,
                             user_ops or dry_post,
                             bucket if not config.dry_run else None)  # fmt: skip
            replay.run(archives)
    return summary


def replay_into_braze(config: RunConfig, reporter: Reporter, stop: StopRequest,
                      stop_grace_s: float = DEFAULT_STOP_GRACE_S,
                      shared_pauses: tuple = (None, None)) -> Summary:  # fmt: skip
    """`run_import` with Braze's clients built from `config` (a dry run when it has no
    delivery options): the /users/track sink, and the user-management endpoints for
    merges under their own budget. `shared_pauses` (`--workers`): one shared 429 pause
    for each of the two budgets (retry.RequestBudget)."""
    if config.delivery is None:
        return run_import(config, reporter, None, stop, stop_grace_s)
    from segreplay.delivery import BrazeSink
    from segreplay.userops import UserOps

    track_pause, user_ops_pause = shared_pauses
    sink = BrazeSink(config.delivery, shared_pause=track_pause)
    user_ops = UserOps(config.user_ops or config.delivery, stopping=lambda: stop.requested,
                       shared_pause=user_ops_pause)  # fmt: skip
    try:
        return run_import(config, reporter, sink, stop, stop_grace_s, user_ops=user_ops.deliver)
    finally:
        user_ops.close()


class _Replay:
    """The loop: files -> chunks of decided lines -> batches submitted -> answers settled."""

    def __init__(self, config: RunConfig, state: State, run_id: int, summary: Summary,
                 reporter: Reporter, dead_letter: DeadLetter, sink: Sink, output,
                 stop: StopRequest, stop_grace_s: float, chunk_lines: int,
                 user_ops: Post, bucket: BucketState | None = None) -> None:  # fmt: skip
        self._config = config
        self._state = state
        self._summary = summary
        self._reporter = reporter
        self._dead_letter = dead_letter
        self._sink = sink
        self._stop = stop
        self._stop_grace_s = stop_grace_s
        self._chunk_lines = chunk_lines
        self._bucket = bucket  # state kept in a bucket: uploaded between chunks when due
        self._batcher = Batcher(config.batch_limit)
        self._shard = Shard(*config.shard) if config.shard else None
        # Whole-file problems name no user: shard 0 reports them, so each is said once.
        self._reports_files = self._shard is None or self._shard.index == 0
        self._ledger = Ledger(state, run_id, config.mapping, self._batcher, summary)
        self._settler = Settler(self._ledger, summary, dead_letter, reporter, output,
                                state if config.diff else None)  # fmt: skip
        self._bytes_before = 0
        self._bytes_total = 0
        self._reader: LineReader | None = None  # the file being read
        self._queue: deque[Batch] = deque()  # sealed, waiting for room in the sink
        self._output = output
        self._user_ops = user_ops
        self._links = Links(state.link) if config.mapping.anonymous == "alias" else None
        # Users never to send (privacy.md); None when there are none, as is usual.
        self._forgotten = Forgotten(state.deleted_digests(), config.suppressed) or None

    def _halted(self) -> bool:
        return self._stop.requested or self._sink.error is not None

    def run(self, archives: list[ArchiveFile]) -> None:
        self._bytes_total = sum(a.size or 0 for a in archives)
        options = self._config.decides_lines()
        points = [
            (archive, self._state.resume_point(archive.path, archive.size, archive.mtime_ns,
                                               lambda a=archive: fingerprint(a), options))
            for archive in archives
        ]  # fmt: skip
        if self._links is not None:
            self._resolve(points)
        for archive, point in points:
            if self._halted():
                break
            self._replay_file(archive, point, options)
        self._finish_sending()
        if self._links is not None and not self._halted():
            self._merge()
        self._report_progress(final=not self._halted())
        self._summary.interrupted = self._stop.requested

    def _finish_sending(self) -> None:
        """Send what is decided (unless halted), settle every answer, commit."""
        if not self._halted():
            self._batcher.flush()
            self._send(until_empty=True)
        self._drain()
        self._summary.requests -= self._sink.unsent  # a stop came before they went out
        self._ledger.commit()
        if self._sink.error is not None:
            raise self._sink.error

    def _merge(self) -> None:
        """After the replay: make the profiles to keep that this shard holds nothing for,
        then send every merge whose two profiles Braze acknowledged (identity.md; across
        shards: docs/scale.md). Merges are planned when a link is recorded for a profile
        Braze holds (`_resolve`), and when Braze acknowledges a profile under an id
        already linked (State.commit)."""
        state = self._state
        forgotten = self._forgotten.reason if self._forgotten is not None else (lambda user: None)
        keeps = [user for user in state.keeps_to_make() if not forgotten(user)]
        if keeps:
            self._ledger.make_keeps(keeps)
            self._finish_sending()
            if self._halted():
                return  # the merges wait for the next run
        shard = self._shard
        send_merges(state, self._user_ops, self._summary, self._reporter, self._dead_letter,
                    self._output, self._config.diff, forgotten,
                    shard.holds if shard is not None else (lambda user: True))  # fmt: skip

    def _resolve(self, points: list) -> None:
        """The first pass, with --anonymous alias: find who anonymous visitors are in the
        lines this run will read, record it, and plan the merges of profiles Braze holds."""
        links = self._links
        forgotten = self._forgotten
        if forgotten is not None:
            # A deleted person's links are never recorded (the state keeps nothing of
            # theirs): their anonymousIds are deleted with them below. A suppressed
            # person's are, so that their anonymous lines are skipped as theirs.
            links.ignore(
                lambda anonymous_id: forgotten.reason("a:" + anonymous_id) is not None,
                lambda external_id: forgotten.reason("e:" + external_id) is SkipReason.DELETED,
            )
            forgotten.follow(links.get)
        for archive, point in points:
            if self._halted():
                break  # stopped: what was found is recorded, the replay does not start
            if not point.done:
                scan(LineReader(archive, lambda problem: None), point.skip, links)
        new, conflicts = links.settle()
        # Every shard finds every conflict: shard 0 reports them, so each is said once.
        for conflict in conflicts if self._reports_files else ():
            link = conflict.link
            self._summary.identity_conflicts += 1
            self._dead_letter.write(
                link.path, link.line, "identity conflict",
                f"anonymousId {link.anonymous_id} is already {conflict.kept}; this line links "
                f"it to {link.external_id} (the first link by event time keeps)",
                {"anonymousId": link.anonymous_id, "userId": link.external_id,
                 "kept": conflict.kept, "time": link.time},
            )  # fmt: skip
        self._state.record_links((n.anonymous_id, n.external_id, n.time, n.arrived_ns) for n in new)
        plan_merges(self._state, new)
        if links.passed_over:
            self._forget_linked(links.passed_over)

    def _forget_linked(self, passed_over: list[tuple[str, str]]) -> None:
        """anonymousIds the archive links to a deleted person are theirs: deleted with
        them (privacy.md). Braze is asked to delete the alias profiles it holds of them;
        the state records them as deleted, so that no line of theirs is sent again."""
        anonymous_ids = sorted({anonymous_id for anonymous_id, _ in passed_over})
        state = self._state
        # Only a profile that is still alias-only: one an identify gave to a user is that
        # user's profile now, and a merged one is gone.
        held = [PersonId(IdKind.ANONYMOUS, a, DELETE_PATH, 0) for a in anonymous_ids
                if state.is_known("a:" + a) and not state.merged("a:" + a)]  # fmt: skip
        for group in plan_requests(held).requests:
            answered = self._user_ops(DELETE_PATH, request_body(group), DELETE_PERMISSION)
            for refusal in answered.refusals:  # recorded as deleted all the same: never sent
                self._summary.rejected += 1
                # Their ids stay out of segreplay's outputs (privacy.md): a count only.
                self._dead_letter.write(DELETE_PATH, 0, "refused by Braze", refusal.reason,
                                        {"anonymousIds": len(group)})  # fmt: skip
        state.record_deletions(["a:" + a for a in anonymous_ids], now())
        state.erase_deleted()
        self._forgotten = Forgotten(state.deleted_digests(), self._config.suppressed)
        self._forgotten.follow(self._links.get)
        were = "would be" if self._config.dry_run else "were"
        self._reporter.notice(
            f"{len(anonymous_ids)} anonymousIds the archive links to deleted users {were} "
            f"deleted with them ({len(held)} alias profiles in Braze)"
        )

    def _replay_file(self, archive: ArchiveFile, point: ResumePoint, options: str) -> None:
        summary = self._summary
        if point.done:
            summary.files_already_done += 1
            summary.lines_already_done += point.skip
            self._bytes_before += archive.size or 0
            return
        summary.lines_already_done += point.skip
        reader = LineReader(archive, self._on_problem)
        if not reader.is_archive():  # reported, and never checkpointed: every run says so
            self._bytes_before += archive.size or 0
            return
        progress = self._ledger.open_file(archive, point.fingerprint, options, point.skip)
        self._reader = reader
        dead_letter = self._dead_letter
        path = archive.path
        chunk: list = []
        add = chunk.append
        forgotten = self._forgotten
        # Lines another shard owns are settled here without an entry of their own: the
        # next entry moves the file's progress past them, or one entry for the last.
        elsewhere = 0
        passed_over = None  # the last line read, when another shard owns it
        links = self._links
        if links is not None and self._shard is not None:
            links = links.arrived_by(archive.mtime_ns)  # as every shard resolves this file
        lines = mapped_lines(reader, self._config.mapping, point.skip, links, self._shard)
        for number, raw, record, mapped in lines:
            kind = type(mapped)
            if kind is Elsewhere:
                elsewhere += 1
                passed_over = number
                continue
            if len(chunk) >= self._chunk_lines:
                self._decide(progress, chunk, elsewhere)
                if self._halted():
                    return  # the rest of the file is read again by the next run
                chunk = []
                add = chunk.append
                elsewhere = 0
            passed_over = None
            if forgotten is not None and (reason := forgotten.reason_for(mapped, record)):
                summary.skip(reason)  # deleted or suppressed: nothing of theirs goes anywhere
                add((number, 0, None))
                continue
            if kind is Call:
                if mapped.resolved_from:
                    summary.anonymous_resolved += 1
                if mapped.drops or mapped.rejected_objects:
                    self._dead_letter_parts(path, number, mapped, record)
                add((number, len(raw), mapped))
                continue
            if kind is Skipped:
                summary.skip(mapped.reason)
            elif kind is Rejected:
                summary.rejected += 1
                dead_letter.write(path, number, "rejected", mapped.reason, record)
            else:
                assert kind is Invalid
                summary.invalid += 1
                dead_letter.write(path, number, "invalid", mapped.reason, invalid_record(raw))
            add((number, 0, None))
        if passed_over is not None:  # the file's last lines are another shard's
            add((passed_over, 0, None))
        self._decide(progress, chunk, elsewhere, passed_over is not None)
        if self._halted():
            return
        self._bytes_before += archive.size or reader.bytes_read
        summary.bytes_read = self._bytes_before
        self._ledger.close_file(progress)

    def _decide(self, progress, chunk: list, elsewhere: int, passed_over: bool = False) -> None:
        """Decide a chunk of lines; between slices of it, send what sealed.
        `passed_over`: the last entry only marks the file's last line as settled."""
        self._summary.lines += len(chunk) - passed_over
        self._summary.lines_elsewhere += elsewhere
        for _ in self._ledger.decide_chunk(progress, chunk):
            self._send()
            if self._halted():
                break  # the lines not decided yet are read again by the next run
        self._settle(self._sink.answers(0))
        self._report_progress()

    def _send(self, until_empty: bool = False) -> None:
        """Submit sealed batches in order while the sink has room, settling the answers
        that free it. Waits only when more than a window's worth is queued (or, at the
        end, until every batch is sent), so deciding and sending overlap."""
        queue = self._queue
        queue.extend(self._batcher.take_sealed())
        if self._halted():
            # Never sent: their lines stay unacknowledged. Nothing after them may go
            # either, or a user's later update would overtake an earlier one.
            queue.clear()
            return
        sink = self._sink
        while queue:
            batch = queue[0]
            if not sink.has_room(batch):
                answers = sink.answers(0)
                if not answers:
                    if not until_empty and len(queue) <= _QUEUE_BATCHES:
                        return  # keep deciding; try again after the next slice
                    answers = sink.answers(_POLL_S)
                    self._report_progress()
                self._settle(answers)
                if self._halted():
                    queue.clear()  # as above
                    return
                continue
            sink.submit(queue.popleft())
            self._summary.requests += 1

    def _drain(self) -> None:
        """Settle every answer still to come; once stopping, wait at most the grace
        period for requests already on the wire."""
        sink = self._sink
        deadline = None
        while sink.in_flight:
            if self._halted() and deadline is None:
                sink.stop()  # no new attempts; what is on the wire may still answer
                grace = float("inf")
                if self._stop.requested:
                    grace = self._stop_grace_s
                    self._reporter.notice(
                        f"stopping: waiting up to {grace:g} s for {sink.in_flight} requests in "
                        "flight; a second signal stops at once"
                    )
                deadline = _time.monotonic() + grace
            wait_s = _POLL_S
            if deadline is not None:
                wait_s = min(wait_s, deadline - _time.monotonic())
                if wait_s <= 0:
                    self._summary.requests_abandoned = sink.in_flight
                    break
            self._settle(sink.answers(wait_s))
            self._report_progress()

    def _settle(self, answers: list) -> None:
        for notice in self._sink.notices():
            self._reporter.notice(f"warning: Braze: {notice}")
        self._settler.settle(answers)

    def _report_progress(self, final: bool = False) -> None:
        if self._bucket is not None and self._bucket.due():
            self._bucket.upload()
        self._summary.budget_waits = self._sink.budget_waits
        reader = self._reader
        done = (
            self._bytes_total
            if final
            else self._bytes_before + (reader.bytes_read if reader is not None else 0)
        )
        self._reporter.progress(self._summary, done, self._bytes_total)

    def _on_problem(self, problem: ReadProblem) -> None:
        if not self._reports_files:
            return
        summary = self._summary
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
        self._dead_letter.write(problem.path, problem.line, kind, problem.reason, record)

    def _dead_letter_parts(self, path: str, number: int, call: Call, record: dict) -> None:
        summary = self._summary
        for drop in call.drops:
            summary.fields_dropped += 1
            self._dead_letter.write(path, number, "dropped field", drop.reason, record,
                                    key=drop.key)  # fmt: skip
        for rejection in call.rejected_objects:
            summary.rejected += 1
            self._dead_letter.write(path, number, "rejected", rejection.reason, record)
