"""`segreplay reshard`: a state kept in N shards rewritten as M, offline.

Users move to the shard their key hashes to; every delivered messageId digest is copied
into every new shard (the table does not say whose it is: bigger, never wrong); a file
checkpoint survives only where every old shard agrees on the file, at the least
progress any of them made. New files are written beside the old under temporary names,
then renamed; the old ones are removed last.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime

from segreplay.errors import StateError, UsageError
from segreplay.jsonutil import dumps
from segreplay.sharding import existing_counts, in_shards, shard_of, shard_paths
from segreplay.state import FileCheckpoint, State, StateLock
from segreplay.times import format_time

_TEMPORARY = ".resharding"


@dataclass(frozen=True)
class ReshardResult:
    old_count: int
    new_count: int
    paths: list[str]
    users: int
    digests: int  # delivered digests copied into each new shard
    files_kept: int  # checkpoints every old shard agreed on
    files_dropped: int  # read again by the next run


def reshard(state_path: str, count: int) -> ReshardResult:
    """Rewrite the state beside `state_path` as `count` shards (1: the plain file)."""
    if count < 1:
        raise UsageError(f"--shards must be at least 1, not {count}")
    if state_path.startswith(("s3://", "gs://")):
        raise UsageError(
            "reshard works on state files on this machine, not in a bucket",
            "copy the shard objects here (aws s3 cp), reshard them, and copy the new ones back",
        )
    old_count = _source_count(state_path, count)
    old_paths = shard_paths(state_path, old_count)
    new_paths = shard_paths(state_path, count)
    with ExitStack() as stack:
        for path in {*old_paths, *new_paths}:
            stack.enter_context(StateLock(path))  # refused while any shard is in use
        for path in old_paths:
            State(path).close()  # migrated to this version's schema, so columns match
        checkpoints, dropped = _merged_checkpoints(old_paths)
        users = digests = 0
        temporary = [path + _TEMPORARY for path in new_paths]
        for index, path in enumerate(temporary):
            _remove(path)
            State(path, durable=False).close()  # the schema, owner-only
            written = _write_shard(path, old_paths, index, count, old_count, checkpoints)
            users += written[0]
            digests = written[1]
        for path, final in zip(temporary, new_paths, strict=True):
            _remove_side_files(final)
            os.replace(path, final)
        for path in old_paths:
            if path not in new_paths:
                _remove(path)
                _remove_side_files(path)
    for path in old_paths:  # their locks, now let go: nothing is left to lock
        if path not in new_paths:
            _remove(path + ".lock")
    return ReshardResult(old_count, count, new_paths, users, digests, len(checkpoints), dropped)


def _source_count(state_path: str, count: int) -> int:
    """The shard count the state is kept in now: the complete set that is not `count`
    (a reshard that stopped after renaming some new files is done again)."""
    found = existing_counts(state_path)
    if not found:
        raise UsageError(f"{state_path}: no state here, in one file or in shards",
                         "pass the --state the imports use")  # fmt: skip
    complete = [
        n for n, paths in found.items() if len(paths) == n and paths == shard_paths(state_path, n)
    ]  # fmt: skip
    if count in complete and len(found) > 1:
        # Both sets whole: rewriting one over the other would drop what it acknowledged.
        raise StateError(
            f"{state_path} is kept both {in_shards(count)} and "
            f"{' and '.join(in_shards(n) for n in found if n != count)}",
            "only one of them is in use: move the other set of files away, then reshard",
        )
    complete = [n for n in complete if n != count]
    if not complete:
        if count in found and len(found) == 1:
            raise UsageError(f"{state_path} is already kept in {count} shards")
        raise StateError(
            f"{state_path}: the shard files are incomplete ({_describe(found)})",
            "restore the missing shard files from a backup; a shard that has never run has "
            "none yet: run it once (--shard I/N) first",
        )
    if len(complete) > 1:
        raise StateError(
            f"{state_path} is kept in more than one set of shards ({_describe(found)})",
            "remove the set that is not in use",
        )
    return complete[0]


def _describe(found: dict[int, list[str]]) -> str:
    return ", ".join(f"{len(paths)} of {n}" for n, paths in sorted(found.items()))


def _merged_checkpoints(old_paths: list[str]) -> tuple[list[FileCheckpoint], int]:
    """A file every old shard read with the same size, content and options, at the
    least progress any made; other files are left out, to be read again."""
    per_path: dict[str, list[FileCheckpoint]] = {}
    for path in old_paths:
        state = State(path)
        try:
            for checkpoint in state.checkpoints():
                per_path.setdefault(checkpoint.path, []).append(checkpoint)
        finally:
            state.close()
    kept = []
    for path, seen in per_path.items():
        first = seen[0]
        agree = len(seen) == len(old_paths) and all(
            (c.size, c.fingerprint, c.options) == (first.size, first.fingerprint, first.options)
            for c in seen
        )
        if not agree:
            continue
        mtimes = {c.mtime_ns for c in seen}
        kept.append(
            FileCheckpoint(
                path, first.size, first.fingerprint,
                min(c.lines_acked for c in seen), all(c.done for c in seen),
                mtimes.pop() if len(mtimes) == 1 else None,  # None: fingerprint it to check
                first.options,
            )
        )  # fmt: skip
    return kept, len(per_path) - len(kept)


def _write_shard(path: str, old_paths: list[str], index: int, count: int, old_count: int,
                 checkpoints: list[FileCheckpoint]) -> tuple[int, int]:  # fmt: skip
    """Fill the new shard `index` of `count` at `path`: (users, digests) written."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.create_function("shard_of", 1, lambda user: shard_of(user, count), deterministic=True)
        db.execute("BEGIN")
        now = format_time(datetime.now(UTC))
        note = {"resharded_from": old_count, "resharded_to": count, "shard": index}
        run_id = db.execute(
            "INSERT INTO runs (started_at, finished_at, status, summary) "
            "VALUES (?, ?, 'resharded', ?)",
            (now, now, dumps(note)),
        ).lastrowid
        for number, old in enumerate(old_paths):
            db.execute(f"ATTACH DATABASE ? AS old{number}", (old,))
        for number in range(len(old_paths)):
            # Users keep their values; run ids of the old files mean nothing here.
            db.execute(
                f"INSERT INTO users (user, attributes, run_id) SELECT user, attributes, ? "
                f"FROM old{number}.users WHERE shard_of(user) = ?",
                (run_id, index),
            )
            db.execute(f"INSERT OR IGNORE INTO delivered SELECT * FROM old{number}.delivered")
            _copy_everywhere(db, f"old{number}")
        # A profile this shard now holds under an id another shard had linked to a user
        # (it missed the night of the link): its merge was planned nowhere. Plan it here.
        db.execute(
            "INSERT OR IGNORE INTO merges (merge_from, keep) SELECT users.user, "
            "'e:' || links.external_id FROM links JOIN users ON users.user IN "
            "('a:' || links.anonymous_id, 'e:' || links.anonymous_id)"
        )
        db.executemany(
            "INSERT INTO files (path, size, fingerprint, lines_acked, done, run_id, mtime_ns, "
            "options) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(c.path, c.size, c.fingerprint, c.lines_acked, int(c.done), run_id, c.mtime_ns,
              c.options) for c in checkpoints],
        )  # fmt: skip
        db.execute("COMMIT")
        users = db.execute("SELECT count(*) FROM users").fetchone()[0]
        digests = db.execute("SELECT count(*) FROM delivered").fetchone()[0]
        for number in range(len(old_paths)):
            db.execute(f"DETACH DATABASE old{number}")
    finally:
        db.close()
    return users, digests


# Tables that are facts about the whole archive or workspace, not about one user's
# shard: every new shard gets every row (links: who an anonymousId is; aliased: users
# holding an alias; and any table a later schema adds, until it says otherwise).
_PER_USER_TABLES = {"users", "delivered", "files", "runs", "merges"}


def _copy_everywhere(db: sqlite3.Connection, old: str) -> None:
    tables = [row[0] for row in db.execute(
        f"SELECT name FROM {old}.sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
    )]  # fmt: skip
    mine = {row[0] for row in db.execute("SELECT name FROM main.sqlite_master WHERE type='table'")}
    for table in tables:
        if table in mine and table not in _PER_USER_TABLES:
            db.execute(f'INSERT OR IGNORE INTO main."{table}" SELECT * FROM {old}."{table}"')
    if "merges" in tables and "merges" in mine:
        # A merge done in any old shard is done, and a profile made to keep is made. Only
        # the shard holding the profile to merge sends it (scale.md), wherever it lands.
        db.execute(
            f"INSERT INTO merges SELECT * FROM {old}.merges WHERE true "
            "ON CONFLICT(merge_from) DO UPDATE SET done = max(done, excluded.done), "
            "keep_made = max(keep_made, excluded.keep_made)"
        )


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _remove_side_files(path: str) -> None:
    for suffix in ("-wal", "-shm", "-journal"):
        _remove(path + suffix)
