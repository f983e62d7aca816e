"""`segreplay inspect`: what an archive holds and what replaying it would cost, with no
state and no network. Memory grows with the number of users and messageIds (it counts
them exactly), unlike `import`, which keeps them in SQLite."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace

from segreplay.config import RunConfig
from segreplay.dedupe import message_digest
from segreplay.jsonutil import dumps_canonical
from segreplay.mapping import (
    UNMAPPED_ADDRESS_KEYS,
    Call,
    Rejected,
    Skipped,
    SkipReason,
    anonymous_id_of,
    external_id_of,
)
from segreplay.pipeline import run_import
from segreplay.reading import Invalid, mapped_lines
from segreplay.reporting import Reporter
from segreplay.source import LineReader, ReadProblem, discover


@dataclass
class Survey:
    files: int = 0
    files_skipped: int = 0
    files_truncated: int = 0
    lines: int = 0
    invalid: int = 0
    rejected: int = 0
    anonymous: int = 0
    anonymous_resolvable: int = 0  # anonymous lines whose anonymousId the archive links
    visitors_linked: int = 0  # anonymousIds of anonymous lines the archive links to a user
    visitors_anonymous: int = 0  # ... and those it never links: alias-only profiles
    skipped: Counter = field(default_factory=Counter)  # Summary counter -> lines the options skip
    by_type: Counter = field(default_factory=Counter)
    event_names: Counter = field(default_factory=Counter)
    users: int = 0
    duplicate_message_ids: int = 0
    first_time: str | None = None
    last_time: str | None = None
    trait_seen: Counter = field(default_factory=Counter)  # identify lines carrying the key
    trait_changes: Counter = field(default_factory=Counter)  # value differed from the user's last
    unmapped: Counter = field(default_factory=Counter)  # field -> lines carrying it, not sent
    dropped: Counter = field(default_factory=Counter)  # "key: reason" -> count
    problems: Counter = field(default_factory=Counter)  # reason -> count
    data_points_without_dedupe: int = 0
    data_points_with_dedupe: int = 0

    def to_dict(self) -> dict:
        return {
            "files": self.files,
            "files_skipped": self.files_skipped,
            "files_truncated": self.files_truncated,
            "lines": self.lines,
            "invalid": self.invalid,
            "rejected": self.rejected,
            "anonymous": self.anonymous,
            "anonymous_share": round(self.anonymous / self.lines, 4) if self.lines else 0.0,
            "anonymous_resolvable": self.anonymous_resolvable,
            "visitors_linked": self.visitors_linked,
            "visitors_anonymous": self.visitors_anonymous,
            "by_type": dict(self.by_type.most_common()),
            "skipped": dict(self.skipped.most_common()),
            "event_names": dict(self.event_names.most_common()),
            "users": self.users,
            "duplicate_message_ids": self.duplicate_message_ids,
            "time_range": [self.first_time, self.last_time],
            "traits": {
                key: {"lines": seen, "changes": self.trait_changes[key]}
                for key, seen in self.trait_seen.most_common()
            },
            "unmapped_fields": dict(self.unmapped.most_common()),
            "dropped_fields": dict(self.dropped.most_common()),
            "problems": dict(self.problems.most_common()),
            "data_points_without_dedupe": self.data_points_without_dedupe,
            "data_points_with_dedupe": self.data_points_with_dedupe,
        }


def survey(config: RunConfig, reporter: Reporter) -> Survey:
    """Read the archive once to count, then dry-run it against an empty state to price
    the deduplicated replay exactly as `import` would send it."""
    result = Survey()
    archives = discover(config.sources)
    result.files = len(archives)
    options = config.mapping
    users: set[str] = set()
    seen_messages: set[int] = set()
    last_values: dict[tuple[str, str], bytes] = {}
    anonymous_lines: Counter = Counter()  # anonymousId -> lines without a userId
    linked: set[str] = set()  # anonymousIds (and alias previousIds) linked to a userId

    def on_problem(problem: ReadProblem) -> None:
        if problem.skipped_file:
            result.files_skipped += 1
        elif problem.truncated:
            result.files_truncated += 1
        else:
            result.invalid += 1
        result.problems[problem.reason.split(" (")[0]] += 1

    for archive in archives:
        for _number, _raw, record, mapped in mapped_lines(LineReader(archive, on_problem), options):
            result.lines += 1
            if type(mapped) is Invalid:
                result.invalid += 1
                result.problems[mapped.reason.split(":")[0]] += 1
                continue
            result.by_type[str(record.get("type") or "(missing)")] += 1
            message_id = record.get("messageId")
            if isinstance(message_id, str) and message_id:
                digest = message_digest(message_id, 0)
                if digest in seen_messages:
                    result.duplicate_message_ids += 1
                seen_messages.add(digest)
            _count_unmapped(result, record)
            _count_identity(record, anonymous_lines, linked)
            if type(mapped) is Rejected:
                result.rejected += 1
                result.problems[mapped.reason] += 1
                continue
            if type(mapped) is Skipped:
                result.skipped[mapped.reason.value] += 1
                if mapped.reason is SkipReason.ANONYMOUS:
                    result.anonymous += 1
                continue
            _count_call(result, mapped, record, users, last_values)
    result.users = len(users)
    for anonymous_id, count in anonymous_lines.items():
        if anonymous_id in linked:
            result.visitors_linked += 1
            result.anonymous_resolvable += count
        else:
            result.visitors_anonymous += 1
    result.data_points_with_dedupe = _deduplicated_data_points(config, reporter)
    return result


def _count_call(result: Survey, call: Call, record: dict, users: set, last_values: dict) -> None:
    if call.is_alias:
        result.anonymous += 1
    else:
        users.add(call.user)
    if result.first_time is None or call.time < result.first_time:
        result.first_time = call.time
    if result.last_time is None or call.time > result.last_time:
        result.last_time = call.time
    for event in call.events:
        result.event_names[event["name"]] += 1
    if call.purchases:
        result.event_names[str(record.get("event"))] += 1
    for drop in call.drops:
        result.dropped[f"{drop.key}: {drop.reason}"] += 1
    result.data_points_without_dedupe += len(call.events) + len(call.purchases)
    if call.attributes is None:
        return
    result.data_points_without_dedupe += len(call.attributes)
    for key, value in call.attributes.items():
        result.trait_seen[key] += 1
        encoded = dumps_canonical(value)
        previous = last_values.get((call.user, key))
        if previous is not None and previous != encoded:
            result.trait_changes[key] += 1
        last_values[(call.user, key)] = encoded


def _count_identity(record: dict, anonymous_lines: Counter, linked: set) -> None:
    """What identity resolution (--anonymous alias) would find: see identity.scan."""
    external_id = external_id_of(record)
    known = bool(external_id) and type(external_id) is not Rejected
    if record.get("type") == "alias":
        previous = anonymous_id_of(record, "previousId")
        if previous and known:
            linked.add(previous)
        return
    anonymous_id = anonymous_id_of(record)
    if not anonymous_id:
        return
    if known:
        linked.add(anonymous_id)
    elif external_id == "":
        anonymous_lines[anonymous_id] += 1


def _count_unmapped(result: Survey, record: dict) -> None:
    kind = record.get("type")
    traits = record.get("traits")
    if kind == "identify" and isinstance(traits, dict):
        address = traits.get("address")
        if isinstance(address, dict):
            for key in UNMAPPED_ADDRESS_KEYS:
                if key in address:
                    result.unmapped[f"traits.address.{key}"] += 1
    elif kind == "group" and isinstance(traits, dict) and traits:
        result.unmapped["group traits"] += 1
    elif kind == "track":
        context = record.get("context")
        if isinstance(context, dict) and context.get("traits"):
            result.unmapped["context.traits on track calls"] += 1


def _deduplicated_data_points(config: RunConfig, reporter: Reporter) -> int:
    with tempfile.TemporaryDirectory(prefix="segreplay-inspect-") as folder:
        dry_run = replace(
            config,
            dry_run=True,
            diff=False,
            output_path=None,
            dead_letter_path=os.path.join(folder, "dead-letter.jsonl"),
            state_path=os.path.join(folder, "absent.sqlite"),
            delivery=None,
        )
        return run_import(dry_run, reporter).data_points
