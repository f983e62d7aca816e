"""`segreplay delete`: ask Braze's /users/delete to forget people, then forget them in the
state too (privacy.md). Each acknowledged request is recorded at once, so a killed run
resumes where it stopped and a second run sends nothing.
"""

from __future__ import annotations

import time as _time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field

from segreplay.bucket_state import is_bucket_path
from segreplay.config import MAX_IDS_PER_REQUEST, DeleteConfig
from segreplay.jsonutil import dumps
from segreplay.privacy import IdKind, IdList, PersonId, user_digest
from segreplay.reporting import DeadLetter, Reporter
from segreplay.retry import Abandoned
from segreplay.runfiles import check_folder, now, open_whole_state, recorded_run
from segreplay.state import State
from segreplay.stopping import StopRequest
from segreplay.userops import UserOps

DELETE_PATH = "/users/delete"
PERMISSION = "users.delete"
_ARRAY = {IdKind.USER: "external_ids", IdKind.ANONYMOUS: "user_aliases"}


@dataclass
class DeleteSummary:
    """The counts of one `segreplay delete`; `to_dict` is its --json object."""

    ids_read: int = 0
    duplicates: int = 0  # ids given more than once
    already_deleted: int = 0  # deleted by an earlier run: not sent again
    deleted: int = 0  # acknowledged by Braze in this run (or, dry run: would be sent)
    braze_deleted: int = 0  # profiles Braze said it found and deleted
    requests: int = 0
    rejected: int = 0  # ids in requests Braze refused (see the dead letter)
    retries: int = 0
    rate_limited: int = 0
    erased_messages: int = 0  # delivered messageId digests dropped from the state
    elapsed_s: float = 0.0
    dry_run: bool = False
    interrupted: bool = False  # stopped by SIGINT or SIGTERM before the end

    @property
    def had_problems(self) -> bool:
        return bool(self.rejected)

    def to_dict(self) -> dict:
        summary = asdict(self)
        summary["command"] = "delete"
        summary["elapsed_s"] = round(self.elapsed_s, 3)
        return summary


@dataclass
class DeletePlan:
    """What a run sends: the ids not deleted before, in request-sized groups."""

    requests: list[list[PersonId]] = field(default_factory=list)

    @property
    def ids(self) -> list[PersonId]:
        return [person for group in self.requests for person in group]


def plan_requests(pending: list[PersonId]) -> DeletePlan:
    """At most 50 ids a request, one kind of id a request (Braze's page: only one of
    external_ids, user_aliases, ... may be given in a single request). anonymousIds go
    first: recording a userId's deletion drops its links, so a run killed between the two
    would otherwise never find the anonymousIds linked to it again."""
    plan = DeletePlan()
    for kind in (IdKind.ANONYMOUS, IdKind.USER):
        same = [person for person in pending if person.kind is kind]
        for start in range(0, len(same), MAX_IDS_PER_REQUEST):
            plan.requests.append(same[start : start + MAX_IDS_PER_REQUEST])
    return plan


def request_body(group: list[PersonId]) -> bytes:
    kind = group[0].kind
    return dumps({_ARRAY[kind]: [kind.identifier(person.value) for person in group]})


def run_delete(
    config: DeleteConfig,
    ids: IdList,
    reporter: Reporter,
    stop: StopRequest | None = None,
    make_userops: Callable[..., UserOps] = UserOps,
) -> tuple[DeleteSummary, DeletePlan]:
    """Delete `ids` in Braze and erase them from every file of the state (one, or each
    shard). Returns the summary (with `interrupted` set when `stop` was requested) and
    the plan (what was, or in a dry run would be, sent). Raises SegreplayError when the
    run cannot go on. `make_userops(delivery_options, stopping=...)` builds the client
    (tests inject)."""
    started = _time.monotonic()
    stop = stop or StopRequest()
    summary = DeleteSummary(ids_read=ids.read, duplicates=ids.duplicates, dry_run=config.dry_run)
    check_folder("--dead-letter", config.dead_letter_path)
    if not config.dry_run and not is_bucket_path(config.state_path):
        check_folder("--state", config.state_path)
    with ExitStack() as stack:
        whole = open_whole_state(config.state_path, config.dry_run, stack)
        states = whole.states
        pending, unfinished, strays = _sort_out(ids, states)
        if strays:
            reporter.notice(
                f"deletions recorded in only some shards of {config.state_path} and not named "
                f"here: {strays:,} (a delete stopped between two shards); run that delete "
                "again with the same ids before the next import, so that every shard has them"
            )
        sending = {person.key for person in pending}
        summary.already_deleted = sum(person.key not in sending for person in ids.ids)
        plan = plan_requests(pending)
        if config.dry_run:
            summary.deleted = len(pending)
            summary.requests = len(plan.requests)
            summary.elapsed_s = _time.monotonic() - started
            return summary, plan
        for path in whole.new_shards:
            reporter.notice(
                f"{path} did not exist: made, to hold the deletions; if that shard runs on "
                "another machine with its own state, run the same delete there too"
            )
        assert config.delivery is not None
        dead_letter = DeadLetter(config.dead_letter_path, reporter)
        stack.callback(dead_letter.close)
        userops = make_userops(config.delivery, stopping=lambda: stop.requested)
        stack.callback(userops.close)
        with ExitStack() as runs:
            for state in states:
                runs.enter_context(recorded_run(state, summary, started))
            # Braze acknowledged these before: a run killed between recording them in
            # one shard and in the next. The other shards learn them now, unsent.
            _record(states, unfinished)
            # A killed run may have left acknowledged deletions not yet erased.
            summary.erased_messages += _erase(states)
            try:
                for group in plan.requests:
                    if stop.requested:
                        break
                    _send(userops, states, group, summary, dead_letter)
            except Abandoned:
                pass  # stopping: that request was not sent again; the next run sends it
            summary.interrupted = stop.requested
            # Also after a stop: what Braze acknowledged leaves the files now, not later.
            summary.erased_messages += _erase(states)
    return summary, plan


def _sort_out(ids: IdList, states: list[State]) -> tuple[list[PersonId], list[str], int]:
    """(ids to send, keys to record without sending, other deletions some files lack).
    Deleted in every file of the state: done. Deleted in some files only: Braze
    acknowledged it (only what it acknowledged is recorded), so the other files are
    told, and nothing is sent; a file holds digests, not ids, so only the ids named here
    can be told. An anonymousId linked to a userId to delete, in any shard, goes with it
    (identity.md): its alias profile, and any later anonymous line of it."""
    recorded = [set(state.deleted_digests()) for state in states]
    everywhere = set.intersection(*recorded)
    somewhere = set.union(*recorded)
    people = list(ids.ids)
    named = {person.key for person in people}
    for person in ids.ids:
        if person.kind is not IdKind.USER or user_digest(person.key) in everywhere:
            continue
        linked_ids = {
            linked for state in states for linked in state.linked_anonymous_ids(person.value)
        }
        for anonymous_id in sorted(linked_ids):
            linked = PersonId(IdKind.ANONYMOUS, anonymous_id, person.source, person.line)
            if linked.key not in named:
                named.add(linked.key)
                people.append(linked)
    pending, unfinished = [], []
    partial = somewhere - everywhere
    for person in people:
        digest = user_digest(person.key)
        if digest not in somewhere:
            pending.append(person)
        elif digest in partial:
            unfinished.append(person.key)
            partial.discard(digest)
    return pending, unfinished, len(partial)


def _record(states: list[State], users: list[str]) -> None:
    """Every file learns the deletions, each in its own transaction: a run killed in
    between leaves some files without them, and the next run completes them."""
    if users:
        deleted_at = now()
        for state in states:
            state.record_deletions(users, deleted_at)


def _erase(states: list[State]) -> int:
    return sum(state.erase_deleted() for state in states)


def _send(userops: UserOps, states: list[State], group: list[PersonId], summary: DeleteSummary,
          dead_letter: DeadLetter) -> None:  # fmt: skip
    posted = userops.post(DELETE_PATH, request_body(group), PERMISSION)
    summary.requests += 1
    summary.retries += posted.retries
    summary.rate_limited += posted.rate_limited
    if not posted.accepted:
        reason = posted.reason or "refused by Braze"
        for person in group:
            summary.rejected += 1
            dead_letter.write(person.source, person.line, "refused by Braze", reason, person.value)
        return
    _record(states, [person.key for person in group])
    summary.deleted += len(group)
    count = posted.answer.get("deleted")
    summary.braze_deleted += count if isinstance(count, int) else 0
