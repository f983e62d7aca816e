"""SQLite state: last-sent attribute values, delivered messageIds, file progress, runs,
and the people deleted (as digests: see privacy.py).

Written only by `commit`, one transaction per acknowledged request, so state and
checkpoint always advance together. WAL mode: a killed process loses nothing committed.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from segreplay.config import MappingOptions
from segreplay.errors import StateError
from segreplay.jsonutil import dumps, loads
from segreplay.privacy import user_digest, user_tag

SCHEMA_VERSION = 6
_USER_CACHE_SIZE = 10_000  # committed attribute rows kept in memory: bounded, not per user

# Each entry upgrades the schema from the version before it to its own.
_MIGRATIONS: dict[int, str] = {
    1: """
        CREATE TABLE users (
            user TEXT PRIMARY KEY,      -- 'e:<external_id>' or 'a:<anonymousId>'
            attributes BLOB NOT NULL,   -- JSON {key: [last value sent, its event time]}
            run_id INTEGER              -- last run that delivered anything for the user
        ) WITHOUT ROWID;
        CREATE TABLE delivered (hash INTEGER PRIMARY KEY);  -- 64-bit digests of messageIds
        CREATE TABLE files (
            path TEXT PRIMARY KEY,
            size INTEGER NOT NULL,
            fingerprint TEXT NOT NULL,
            lines_acked INTEGER NOT NULL,  -- every line up to here is delivered or settled
            done INTEGER NOT NULL,
            run_id INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            started_at TEXT NOT NULL,
            finished_at TEXT,
            status TEXT NOT NULL,        -- running, finished, failed, interrupted (killed)
            summary BLOB
        );
    """,
    # A file whose size and modification time are unchanged is not read again just to
    # fingerprint it: a cron run over years of files stays cheap.
    2: "ALTER TABLE files ADD COLUMN mtime_ns INTEGER",
    # The options that decided a file's lines (MappingOptions.decides_lines): a run with
    # other options reads the file again. NULL: read by a version that did not record
    # them, taken as the defaults.
    3: "ALTER TABLE files ADD COLUMN options TEXT",
    # Deletion (privacy.md): a person is remembered by a digest of their key, and each
    # delivered digest carries its user's tag so an erasure finds their rows. Rows
    # delivered before this version have no tag (NULL): they cannot be told apart.
    4: """
        ALTER TABLE delivered ADD COLUMN user INTEGER;  -- privacy.user_tag of its user
        CREATE TABLE deletions (
            digest BLOB PRIMARY KEY,     -- privacy.user_digest of 'e:<userId>' / 'a:<anonymousId>'
            tag INTEGER NOT NULL,        -- privacy.user_tag of the same key
            deleted_at TEXT NOT NULL,    -- when Braze acknowledged the deletion
            erased INTEGER NOT NULL      -- 1 once their delivered rows are gone
        ) WITHOUT ROWID
    """,
    # Identity (identity.md): who an anonymousId turned out to be, the merges that joins
    # profiles Braze already holds, and the users that hold a segment_anonymous_id alias.
    5: """
        CREATE TABLE links (
            anonymous_id TEXT PRIMARY KEY,  -- an anonymousId, or an alias call's previousId
            external_id TEXT NOT NULL,
            time TEXT NOT NULL              -- event time of the line that made the link
        ) WITHOUT ROWID;
        CREATE TABLE merges (
            merge_from TEXT PRIMARY KEY,    -- 'a:<anonymousId>' or 'e:<previous userId>'
            keep TEXT NOT NULL,             -- 'e:<userId>'
            done INTEGER NOT NULL DEFAULT 0 -- 1 once Braze acknowledged it
        ) WITHOUT ROWID;
        CREATE TABLE aliased (external_id TEXT PRIMARY KEY) WITHOUT ROWID;
    """,
    # Shards (docs/scale.md). A merge's profile to keep may be another shard's user,
    # whose acknowledgements this state never sees: keep_made is 1 once this shard's own
    # `{external_id}` object for it was acknowledged, and the merge may go then. A link
    # applies across shards only to files that arrived no earlier than the first file
    # holding it: arrived_ns is that file's modification time (NULL: recorded before this
    # version, applies to all).
    # The index: `delete` finds the anonymousIds linked to each userId it deletes.
    6: """
        ALTER TABLE merges ADD COLUMN keep_made INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE links ADD COLUMN arrived_ns INTEGER;
        CREATE INDEX links_by_user ON links (external_id)
    """,
}
_DEFAULT_OPTIONS = MappingOptions().decides_lines()


_QUERY_KEYS = 500  # bound parameters per IN (...) query


def _slices(keys: list) -> Iterable[list]:
    return (keys[i : i + _QUERY_KEYS] for i in range(0, len(keys), _QUERY_KEYS))


def _marks(keys: list) -> str:
    return ",".join("?" * len(keys))


_FILE_COLUMNS = "path, size, fingerprint, lines_acked, done, mtime_ns, options"


def _checkpoint(row) -> FileCheckpoint:
    return FileCheckpoint(row[0], row[1], row[2], row[3], bool(row[4]), row[5], row[6])


@dataclass(frozen=True, slots=True)
class FileCheckpoint:
    path: str
    size: int
    fingerprint: str
    lines_acked: int
    done: bool
    mtime_ns: int | None = None
    options: str | None = None


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where a run starts in a file: `skip` lines already settled, or all of it `done`."""

    fingerprint: str
    skip: int = 0
    done: bool = False


@dataclass(frozen=True, slots=True)
class RunRecord:
    id: int
    started_at: str
    finished_at: str | None
    status: str
    summary: dict | None


class State:
    """The state database. Not thread-safe: one pipeline thread owns it."""

    def __init__(self, path: str, durable: bool = True) -> None:
        """`durable=False` is for a dry run's throwaway copy: no journal on disk, no
        syncing, so its many small transactions cost next to nothing."""
        self.path = path
        existed = os.path.exists(path)
        if not existed:
            # Created owner-only: it holds customer attribute values.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            if durable:
                self._db.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL: a commit survives the process being killed; only a power
                # loss can take back the last commits (their requests would be resent).
                self._db.execute("PRAGMA synchronous=NORMAL")
                # A checkpoint syncs the file: every 40 MB of WAL, not every 4 MB, halves
                # what a live run's commit (one per acknowledgement) costs.
                self._db.execute("PRAGMA wal_autocheckpoint=10000")
            else:
                self._db.execute("PRAGMA journal_mode=MEMORY")
                self._db.execute("PRAGMA synchronous=OFF")
            self._db.execute("PRAGMA cache_size=-16000")
            self._migrate()
        except sqlite3.DatabaseError as error:
            raise StateError(
                f"{path}: not a usable segreplay state file ({error})",
                "point --state at another file, or move this one away to start over",
            ) from error
        # user -> (attributes or None when not in state, last run that delivered to it)
        self._users: OrderedDict[str, tuple[dict | None, int | None]] = OrderedDict()
        # Whether any link is recorded: without one, a new user needs no merge (commit).
        self._has_links = self._db.execute("SELECT 1 FROM links LIMIT 1").fetchone() is not None

    # schema ----------------------------------------------------------------------------

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(
                f"{self.path} was written by a newer segreplay (schema {version})",
                "upgrade segreplay to use this state file",
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            self._db.execute("BEGIN IMMEDIATE")
            for statement in _MIGRATIONS[target].split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={target}")
            self._db.execute("COMMIT")

    @property
    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    # reads -----------------------------------------------------------------------------

    def user_attributes(self, user: str) -> dict | None:
        """{key: [value, time]} last delivered for the user; None for a user never sent."""
        cached = self._users.get(user)
        if cached is None:
            self._load([user])
            cached = self._users[user]
        return cached[0]

    def prefetch(self, users: Iterable[str], digests: list[int]) -> set[int]:
        """Read many users into the cache at once; return which `digests` are delivered.

        One query per few hundred keys instead of one per line: per-statement overhead,
        not the B-tree, is what a lookup costs from Python."""
        cache = self._users
        missing = []
        for user in users:
            if user in cache:
                # Wanted by this chunk: without the touch, loading the missing ones could
                # evict it before it is used, and it would be read again on its own.
                cache.move_to_end(user)
            else:
                missing.append(user)
        self._load(missing)
        delivered: set[int] = set()
        for part in _slices(digests):
            delivered.update(
                row[0]
                for row in self._db.execute(
                    f"SELECT hash FROM delivered WHERE hash IN ({_marks(part)})", part
                )
            )
        return delivered

    def _load(self, users: list[str]) -> None:
        for part in _slices(users):
            found = {
                user: (loads(blob), run_id)
                for user, blob, run_id in self._db.execute(
                    f"SELECT user, attributes, run_id FROM users WHERE user IN ({_marks(part)})",
                    part,
                )
            }
            for user in part:
                self._remember(user, found.get(user, (None, None)))

    def checkpoint(self, path: str) -> FileCheckpoint | None:
        row = self._db.execute(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE path=?", (path,)
        ).fetchone()
        return _checkpoint(row) if row else None

    def checkpoints(self) -> list[FileCheckpoint]:
        rows = self._db.execute(f"SELECT {_FILE_COLUMNS} FROM files ORDER BY path")
        return [_checkpoint(row) for row in rows]

    def resume_point(self, path: str, size: int | None, mtime_ns: int | None,
                     fingerprint: Callable[[], str], options: str) -> ResumePoint:  # fmt: skip
        """Where to start reading a file: after the lines settled by earlier runs with
        the same `options`, if it is the same file (size and first bytes; a file whose
        size and modification time are unchanged is not read to fingerprint it)."""
        if size is None:
            return ResumePoint("")  # standard input: nothing to resume from
        checkpoint = self.checkpoint(path)
        if checkpoint is None:
            return ResumePoint(fingerprint())
        if checkpoint.size == size and checkpoint.mtime_ns == mtime_ns:
            current = checkpoint.fingerprint  # untouched since
        else:
            current = fingerprint()
        if checkpoint.size != size or checkpoint.fingerprint != current:
            return ResumePoint(current)
        if (checkpoint.options or _DEFAULT_OPTIONS) != options:
            return ResumePoint(current)  # other options: its lines mean something else now
        return ResumePoint(current, checkpoint.lines_acked, checkpoint.done)

    def runs(self, limit: int = 10) -> list[RunRecord]:
        rows = self._db.execute(
            "SELECT id, started_at, finished_at, status, summary FROM runs "
            "ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [RunRecord(r[0], r[1], r[2], r[3], loads(r[4]) if r[4] else None) for r in rows]

    def counts(self) -> dict[str, int]:
        one = self._db.execute
        return {
            "users": one("SELECT count(*) FROM users").fetchone()[0],
            "delivered_messages": one("SELECT count(*) FROM delivered").fetchone()[0],
            "files": one("SELECT count(*) FROM files").fetchone()[0],
            "files_done": one("SELECT count(*) FROM files WHERE done").fetchone()[0],
            "deleted_users": one("SELECT count(*) FROM deletions").fetchone()[0],
            "links": one("SELECT count(*) FROM links").fetchone()[0],
            "merges_pending": one("SELECT count(*) FROM merges WHERE NOT done").fetchone()[0],
        }

    # identity ----------------------------------------------------------------------------

    def link(self, anonymous_id: str) -> tuple[str, int | None] | None:
        """(external_id, arrived_ns) of the link an earlier run recorded for `anonymous_id`."""
        return self._db.execute(
            "SELECT external_id, arrived_ns FROM links WHERE anonymous_id=?", (anonymous_id,)
        ).fetchone()

    def linked_anonymous_ids(self, external_id: str) -> list[str]:
        return [
            row[0]
            for row in self._db.execute(
                "SELECT anonymous_id FROM links WHERE external_id=?", (external_id,)
            )
        ]

    def is_known(self, user: str) -> bool:
        """Whether Braze acknowledged anything for `user` (its profile exists)."""
        return self.user_attributes(user) is not None

    def record_links(self, links: Iterable[tuple[str, str, str, int | None]]) -> None:
        """(anonymous_id, external_id, time, arrived_ns) rows, in one transaction. A link
        already recorded keeps its user; an earlier arrival of the same link is kept."""
        links = list(links)
        self._has_links = self._has_links or bool(links)
        with self._transaction():
            self._db.executemany(
                "INSERT INTO links (anonymous_id, external_id, time, arrived_ns) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(anonymous_id) DO UPDATE SET "
                "arrived_ns = min(arrived_ns, excluded.arrived_ns) "
                "WHERE external_id = excluded.external_id",
                links,
            )

    def add_merges(self, merges: Iterable[tuple[str, str]]) -> None:
        """(merge_from, keep) pairs to send once; one already recorded keeps."""
        with self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO merges (merge_from, keep) VALUES (?, ?)", merges
            )

    def pending_merges(self) -> list[tuple[str, str]]:
        """Merges not yet acknowledged, both of whose profiles Braze acknowledged."""
        rows = self._db.execute(
            "SELECT merge_from, keep, keep_made FROM merges WHERE NOT done ORDER BY merge_from"
        ).fetchall()
        return [
            (gone, keep)
            for gone, keep, keep_made in rows
            if self.is_known(gone) and (keep_made or self.is_known(keep))
        ]

    def keeps_to_make(self) -> list[str]:
        """Users a pending merge keeps that this state holds nothing for (another shard's,
        or users whose own lines all failed), when the profile to merge is acknowledged."""
        rows = self._db.execute(
            "SELECT merge_from, keep FROM merges WHERE NOT done AND NOT keep_made"
        ).fetchall()
        return sorted({keep for gone, keep in rows
                       if self.is_known(gone) and not self.is_known(keep)})  # fmt: skip

    def keeps_made(self, users: Iterable[str]) -> None:
        """Braze acknowledged a profile for these users, made for the merges into them."""
        with self._transaction():
            self._db.executemany(
                "UPDATE merges SET keep_made=1 WHERE keep=? AND NOT done", ((u,) for u in users)
            )

    def merged(self, user: str) -> bool:
        """Whether Braze acknowledged a merge of `user`'s profile into another."""
        row = self._db.execute(
            "SELECT 1 FROM merges WHERE merge_from=? AND done", (user,)
        ).fetchone()
        return row is not None

    def is_aliased(self, external_id: str) -> bool:
        """Whether the user holds a segment_anonymous_id alias (an identify was sent)."""
        row = self._db.execute(
            "SELECT 1 FROM aliased WHERE external_id=?", (external_id,)
        ).fetchone()
        return row is not None

    def merges_done(self, merges: Iterable[tuple[str, str]], aliased: Iterable[str],
                    merged_away: Iterable[str] = ()) -> None:  # fmt: skip
        """Braze answered these merges: `aliased` users now hold a segment_anonymous_id
        alias (/users/identify); `merged_away` profiles are gone from Braze (/users/merge
        deletes the profile it merges), so the state forgets them as profiles: a later
        line under that id makes the profile again, and its merge is planned again."""
        merged_away = list(merged_away)
        with self._transaction():
            self._db.executemany("UPDATE merges SET done=1 WHERE merge_from=? AND keep=?", merges)
            self._db.executemany(
                "INSERT OR IGNORE INTO aliased VALUES (?)", ((user,) for user in aliased)
            )
            self._db.executemany("DELETE FROM users WHERE user=?", ((u,) for u in merged_away))
        for user in merged_away:
            self._users.pop(user, None)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def report(self, runs: int = 10) -> dict:
        """What `segreplay status` shows: counts, partly done files, the options files
        were read with, the last runs. A run still marked running while no process holds
        the state was killed (kill -9, a lost machine): it says so."""
        checkpoints = self.checkpoints()
        in_use = StateLock.held(self.path)
        return {
            "state": self.path,
            "schema_version": self.schema_version,
            **self.counts(),
            "files_in_progress": [
                {"path": c.path, "lines_acked": c.lines_acked}
                for c in checkpoints
                if not c.done
            ],
            "files_by_options": dict(
                Counter(c.options or _DEFAULT_OPTIONS for c in checkpoints).most_common()
            ),
            "runs": [
                {"id": r.id, "started_at": r.started_at, "finished_at": r.finished_at,
                 "status": "killed" if r.status == "running" and not in_use else r.status,
                 "summary": r.summary}
                for r in self.runs(runs)
            ],
        }  # fmt: skip

    def users_in_run(self, run_id: int) -> int:
        return self._db.execute("SELECT count(*) FROM users WHERE run_id=?", (run_id,)).fetchone()[
            0
        ]

    # writes ----------------------------------------------------------------------------

    def start_run(self, started_at: str) -> int:
        """Record a new run. Runs still marked running were killed (the caller holds the
        lock, so none is alive): they become `interrupted`."""
        self._db.execute("UPDATE runs SET status='interrupted' WHERE status='running'")
        cursor = self._db.execute(
            "INSERT INTO runs (started_at, status) VALUES (?, 'running')", (started_at,)
        )
        return cursor.lastrowid

    def finish_run(self, run_id: int, finished_at: str, status: str, summary: dict) -> None:
        self._db.execute(
            "UPDATE runs SET finished_at=?, status=?, summary=? WHERE id=?",
            (finished_at, status, dumps(summary), run_id),
        )

    def commit(
        self,
        run_id: int,
        attributes: dict[str, dict],
        digests: Iterable[tuple[int, int]],
        checkpoints: Iterable[FileCheckpoint],
    ) -> None:
        """One transaction: merge attribute effects per user, add delivered digests,
        advance file checkpoints. `attributes` maps user -> {key: [value, time]}; a user
        with an empty dict is only marked as known (an event created the profile).
        `digests` are (messageId digest, privacy.user_tag of its user)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            cache = self._users
            self._load([user for user in attributes if user not in cache])
            rows = []
            new_users = []
            for user, effects in attributes.items():
                cached = cache.get(user)
                if cached is None:  # evicted by the load above: a commit bigger than the cache
                    self.user_attributes(user)
                    cached = cache[user]
                known, last_run = cached
                if not effects and known is not None and last_run == run_id:
                    continue  # already known and counted in this run: nothing to write
                if known is None:
                    new_users.append((user, user[2:]))
                merged = {} if known is None else dict(known)
                merged.update(effects)
                self._remember(user, (merged, run_id))
                rows.append((user, dumps(merged), run_id))
            db.executemany(
                "INSERT INTO users (user, attributes, run_id) VALUES (?, ?, ?) "
                "ON CONFLICT(user) DO UPDATE SET attributes=excluded.attributes, "
                "run_id=excluded.run_id",
                rows,
            )
            # A profile Braze now holds under an id already linked to a user (an alias
            # sent before its link applied, a userId an alias call renames, one made
            # again after a merge took it away) is merged into that user: planned with
            # the acknowledgement itself, so no stop loses it.
            if self._has_links:
                db.executemany(
                    "INSERT INTO merges (merge_from, keep) "
                    "SELECT ?, 'e:' || external_id FROM links WHERE anonymous_id=? "
                    "ON CONFLICT(merge_from) DO UPDATE SET done=0, keep=excluded.keep",
                    new_users,
                )
            db.executemany("INSERT OR IGNORE INTO delivered (hash, user) VALUES (?, ?)", digests)
            db.executemany(
                "INSERT INTO files (path, size, fingerprint, lines_acked, done, run_id, mtime_ns, "
                "options) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET "
                "size=excluded.size, fingerprint=excluded.fingerprint, "
                "lines_acked=excluded.lines_acked, done=excluded.done, run_id=excluded.run_id, "
                "mtime_ns=excluded.mtime_ns, options=excluded.options",
                (
                    (
                        c.path,
                        c.size,
                        c.fingerprint,
                        c.lines_acked,
                        int(c.done),
                        run_id,
                        c.mtime_ns,
                        c.options,
                    )
                    for c in checkpoints
                ),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._users.clear()  # the cache may hold merges that were rolled back
            raise

    def _remember(self, user: str, row: tuple[dict | None, int | None]) -> None:
        self._users[user] = row
        self._users.move_to_end(user)
        if len(self._users) > _USER_CACHE_SIZE:
            self._users.popitem(last=False)

    @staticmethod
    def snapshot(path: str, copy_path: str) -> None:
        """A consistent copy of the state at `path`, read without writing to it."""
        os.close(os.open(copy_path, os.O_CREAT | os.O_WRONLY, 0o600))
        try:
            source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            target = sqlite3.connect(copy_path)
            try:
                source.backup(target)
            finally:
                target.close()
                source.close()
        except sqlite3.DatabaseError as error:
            raise StateError(f"{path}: cannot read the state file ({error})") from error

    # deletions -------------------------------------------------------------------------

    def deleted_digests(self) -> list[bytes]:
        return [row[0] for row in self._db.execute("SELECT digest FROM deletions")]

    def record_deletions(self, users: list[str], deleted_at: str) -> None:
        """Braze acknowledged deleting these users (`e:...`, `a:...`): in one transaction
        remember each as a digest and drop their stored attribute values. Their delivered
        digests go in `erase_deleted`, which scans that table once for many deletions."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT OR IGNORE INTO deletions (digest, tag, deleted_at, erased) "
                "VALUES (?, ?, ?, 0)",
                ((user_digest(user), user_tag(user), deleted_at) for user in users),
            )
            for part in _slices(users):
                db.execute(f"DELETE FROM users WHERE user IN ({_marks(part)})", part)
                marks = _marks(part)
                db.execute(f"DELETE FROM merges WHERE merge_from IN ({marks}) "
                           f"OR keep IN ({marks})", part + part)  # fmt: skip
            for user in users:  # their links name them too
                kind, _, value = user.partition(":")
                column = "external_id" if kind == "e" else "anonymous_id"
                db.execute(f"DELETE FROM links WHERE {column}=?", (value,))  # noqa: S608
                db.execute("DELETE FROM aliased WHERE external_id=?", (value,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        for user in users:
            self._users.pop(user, None)

    def erasures_pending(self) -> int:
        return self._db.execute("SELECT count(*) FROM deletions WHERE NOT erased").fetchone()[0]

    def erase_deleted(self) -> int:
        """Finish every recorded deletion: drop the deleted users' delivered digests, then
        rewrite the file so no freed page, free space or WAL frame still holds anything of
        theirs. Returns the delivered rows dropped. Costs a VACUUM: one copy of the file."""
        db = self._db
        if not self.erasures_pending():
            return 0
        db.execute("BEGIN IMMEDIATE")
        try:
            dropped = db.execute(
                "DELETE FROM delivered WHERE user IN (SELECT tag FROM deletions WHERE NOT erased)"
            ).rowcount
            db.execute("UPDATE deletions SET erased=1 WHERE NOT erased")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.scrub()
        return dropped

    def scrub(self) -> None:
        """Rewrite the database from its live rows and empty the WAL: SQLite leaves deleted
        rows in free space and old WAL frames until they are overwritten."""
        db = self._db
        db.execute("VACUUM")
        busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        if busy:
            raise StateError(
                f"{self.path}: another process is reading the state, so its journal could "
                "not be emptied of deleted data",
                "run the same command again once no other segreplay reads this state",
            )

    def reset(self) -> None:
        """Forget what was delivered; deletions are kept, or a replay would bring the
        people back."""
        self._db.execute("BEGIN IMMEDIATE")
        for table in ("users", "delivered", "files", "runs", "links", "merges", "aliased"):
            self._db.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed names
        self._db.execute("COMMIT")
        self._users.clear()

    def close(self) -> None:
        self._db.close()


class StateLock:
    """One run per state file. The kernel drops a flock when its process dies, so a
    killed run never leaves a lock behind."""

    def __init__(self, state_path: str) -> None:
        self._path = state_path + ".lock"
        self._fd: int | None = None

    def __enter__(self) -> StateLock:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StateError(
                f"{self._path[:-5]} is in use by another segreplay run (pid {holder})",
                "wait for that run to finish, or give this one its own --state",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def held(state_path: str) -> bool:
        """Whether a running segreplay holds the state now."""
        try:
            fd = os.open(state_path + ".lock", os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False
