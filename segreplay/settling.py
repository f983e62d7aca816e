"""The settle step: turns Braze's answers into the run's record (--output bodies, dead
letters for refused objects, summary counts, the dry-run diff), then has the ledger
commit what was acknowledged, in one transaction per group of answers."""

from __future__ import annotations

from collections import Counter
from typing import BinaryIO

from segreplay.batching import Batch
from segreplay.ledger import Ledger, RefusedKey
from segreplay.reporting import Change, DeadLetter, Reporter, Summary
from segreplay.sink import Answer, Refusal
from segreplay.state import State

IDENTIFIER_KEYS = frozenset({"external_id", "user_alias", "braze_id", "_update_existing_only"})
_NONE: Counter = Counter()


class Settler:
    def __init__(self, ledger: Ledger, summary: Summary, dead_letter: DeadLetter,
                 reporter: Reporter, output: BinaryIO | None,
                 diff_state: State | None) -> None:  # fmt: skip
        """`diff_state`, for --diff: the state to read each user's values before."""
        self._ledger = ledger
        self._summary = summary
        self._dead_letter = dead_letter
        self._reporter = reporter
        self._output = output
        self._diff_state = diff_state

    def settle(self, answers: list[Answer]) -> None:
        if not answers:
            return
        summary = self._summary
        acknowledged = []
        changes: list[Change] = []
        for answer in answers:
            batch = answer.batch
            summary.requests_acknowledged += 1
            summary.retries += answer.retries
            summary.rate_limited += answer.rate_limited
            refused = self._refused(batch, answer.refusals)
            for user, obj in batch.attributes.items():
                if ("attributes", user) not in refused:
                    summary.attributes_sent += len(obj) - len(IDENTIFIER_KEYS.intersection(obj))
            refused_in = Counter(array for array, _ in refused) if refused else _NONE
            summary.events_sent += len(batch.events) - refused_in["events"]
            summary.purchases_sent += len(batch.purchases) - refused_in["purchases"]
            if self._diff_state is not None:
                changes += self._changes(batch, refused)
            if self._output is not None:
                self._output.writelines(body + b"\n" for body in answer.bodies)
            acknowledged.append((batch, refused))
        self._ledger.settle(acknowledged)
        if changes:
            self._reporter.changes(changes)

    def _refused(self, batch: Batch, refusals: list[Refusal]) -> set[RefusedKey]:
        """The objects Braze refused, each dead-lettered and counted once."""
        refused: set[RefusedKey] = set()
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

    def _changes(self, batch: Batch, refused: set[RefusedKey]) -> list[Change]:
        changes = []
        for user, obj in batch.attributes.items():
            if ("attributes", user) in refused:
                continue
            before = self._diff_state.user_attributes(user) or {}
            for key, value in obj.items():
                if key in IDENTIFIER_KEYS:
                    continue
                prior = before.get(key)
                old = prior[0] if prior else None
                changes.append(Change(user, "attribute", key, old, value, prior is not None))
        for array, what, name_key in (
            ("events", "event", "name"),
            ("purchases", "purchase", "product_id"),
        ):
            for index, obj in enumerate(getattr(batch, array)):
                if (array, index) not in refused:
                    changes.append(Change(_user_key(obj), what, obj[name_key], new=obj))
        return changes


def _user_key(obj: dict) -> str:
    if "external_id" in obj:
        return "e:" + obj["external_id"]
    return "a:" + obj["user_alias"]["alias_name"]
