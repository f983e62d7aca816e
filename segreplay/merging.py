"""Joins the profiles Braze already holds once the archive says they are one person:
/users/identify (an anonymous visitor's alias profile into the known user, the first
time that user gets such an alias) or /users/merge (every other case), 50 a request,
each once, and only after Braze acknowledged both profiles (identity.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from segreplay.identity import Link
from segreplay.jsonutil import dumps, loads
from segreplay.mapping import alias_identifier
from segreplay.reporting import Change, DeadLetter, Reporter, Summary
from segreplay.retry import Delivered
from segreplay.state import State

IDENTIFY_PATH = "/users/identify"
MERGE_PATH = "/users/merge"
MAX_ITEMS = 50  # per request, for both endpoints

PERMISSIONS = {IDENTIFY_PATH: "users.identify", MERGE_PATH: "users.merge"}

# post(path, body, permission) -> what Braze answered (userops.UserOps.deliver); a dry
# run acknowledges everything.
Post = Callable[[str, bytes, str], Delivered]


def dry_post(path: str, body: bytes, permission: str) -> Delivered:
    return Delivered(bodies=[body])


@dataclass(frozen=True, slots=True)
class _Merge:
    gone: str  # 'a:<anonymousId>' or 'e:<userId>'
    keep: str  # 'e:<userId>'
    identify: bool

    def item(self) -> dict:
        keep = {"external_id": self.keep[2:]}
        if self.identify:
            return {**keep, **alias_identifier(self.gone[2:])}
        gone = (
            alias_identifier(self.gone[2:])
            if self.gone.startswith("a:")
            else {"external_id": self.gone[2:]}
        )
        return {"identifier_to_merge": gone, "identifier_to_keep": keep}


def plan_merges(state: State, new_links: Iterable[Link]) -> None:
    """Record the merges the run's new links call for: a profile that Braze holds under
    the old id (an alias profile from an earlier run, or a previous userId) joins the
    user. Lines still to come are sent as the user directly and need none; a profile
    Braze acknowledges later under a linked id gets its merge then (State.commit)."""
    merges = []
    for link in new_links:
        keep = "e:" + link.external_id
        for gone in ("a:" + link.anonymous_id, "e:" + link.anonymous_id):
            if state.is_known(gone):
                merges.append((gone, keep))
    if merges:
        state.add_merges(merges)


def send_merges(state: State, post: Post, summary: Summary, reporter: Reporter,
                dead_letter: DeadLetter, output, diff: bool,
                forgotten: Callable[[str], object] = lambda user: None,
                owns: Callable[[str], bool] = lambda user: True) -> None:  # fmt: skip
    """Send every pending merge whose profiles Braze acknowledged; record each answer.
    A merge naming a user `forgotten` says so of (--suppress) waits: it is not sent.

    /users/identify only into a user this shard `owns`: Braze identifies one alias of a
    label into a user and silently ignores the next, and only the user's own shard knows
    whether an alias went to them before. Into another shard's user, /users/merge."""
    pending = [
        (gone, keep)
        for gone, keep in state.pending_merges()
        if not (forgotten(gone) or forgotten(keep))
    ]
    if not pending:
        return
    merges = []
    identified: set[str] = set()
    for gone, keep in pending:
        identify = (
            gone.startswith("a:")
            and owns(keep)
            and keep not in identified
            and not state.is_aliased(keep[2:])
        )
        if identify:
            identified.add(keep)
        merges.append(_Merge(gone, keep, identify))
    for path, kind in ((IDENTIFY_PATH, True), (MERGE_PATH, False)):
        chosen = [merge for merge in merges if merge.identify is kind]
        for start in range(0, len(chosen), MAX_ITEMS):
            part = chosen[start : start + MAX_ITEMS]
            items = [merge.item() for merge in part]
            body = (
                {"aliases_to_identify": items, "merge_behavior": "merge"}
                if kind
                else {"merge_updates": items}
            )
            answered = post(path, dumps(body), PERMISSIONS[path])
            refused = _refused(answered, len(part))
            done = [merge for index, merge in enumerate(part) if index not in refused]
            for index in sorted(refused):
                summary.rejected += 1
                dead_letter.write(path, 0, "refused by Braze", refused[index], items[index])
            # A refused merge is settled too: dead-lettered once, as a refused /users/track
            # object is, rather than sent (and counted) again by every later run.
            state.merges_done(
                ((merge.gone, merge.keep) for merge in part),
                (merge.keep[2:] for merge in done if merge.identify),
                (merge.gone for merge in done if not merge.identify),
            )
            summary.merges_sent += len(done)
            if output is not None:  # beside /users/track's bodies: a line with its path
                output.writelines(
                    dumps({"path": path, "body": loads(sent)}) + b"\n" for sent in answered.bodies
                )
            if diff:
                reporter.changes([
                    Change(merge.keep, "merge", merge.gone, new="identify" if kind else "merge")
                    for merge in done
                ])  # fmt: skip


def _refused(answered: Delivered, count: int) -> dict[int, str]:
    refused: dict[int, str] = {}
    for refusal in answered.refusals:
        indexes = range(count) if refusal.index is None else [refusal.index]
        for index in indexes:
            if 0 <= index < count:
                refused.setdefault(index, refusal.reason)
    return refused
