"""Who must never be sent: id lists read from files (deletion requests, suppressions), the
digests that stand for a deleted id in the state, and `Forgotten`, the check imports make.

A deleted person is remembered only as a digest of their state key (`e:<userId>` or
`a:<anonymousId>`), never as the id itself: the state must hold nothing of theirs.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from hashlib import blake2b

from segreplay.errors import UsageError
from segreplay.mapping import ALIAS_LABEL, MAX_EXTERNAL_ID_BYTES, Call, Rejected, SkipReason

# Column names a CSV header may use (privacy.md, "segreplay delete").
USER_ID_COLUMNS = ("userId", "user_id", "external_id")
ANONYMOUS_ID_COLUMNS = ("anonymousId", "anonymous_id")
_PERSON = b"segreplay-forget"  # a digest of an id here is not one of any other use
_CACHE_USERS = 100_000  # verdicts kept per import: users repeat, hashing each line costs


class IdKind(Enum):
    """Which Segment id a list names, and how Braze's /users/delete takes it."""

    USER = "e"  # userId: Braze external_id
    ANONYMOUS = "a"  # anonymousId: Braze user alias with label segment_anonymous_id

    @property
    def columns(self) -> tuple[str, ...]:
        return USER_ID_COLUMNS if self is IdKind.USER else ANONYMOUS_ID_COLUMNS

    def key(self, value: str) -> str:
        """The state's key for this id: `e:<userId>` or `a:<anonymousId>`."""
        return f"{self.value}:{value}"

    def identifier(self, value: str) -> str | dict:
        """The id as /users/delete takes it in `external_ids` or `user_aliases`."""
        if self is IdKind.USER:
            return value
        return {"alias_name": value, "alias_label": ALIAS_LABEL}


def user_digest(user: str) -> bytes:
    """16 bytes standing for a state key (`e:...`, `a:...`) in the deletions table."""
    return blake2b(user.encode(), digest_size=16, person=_PERSON).digest()


@lru_cache(maxsize=65_536)
def user_tag(user: str) -> int:
    """The first 8 bytes of `user_digest`, as a signed integer: stored with each delivered
    messageId digest so an erasure finds a person's rows without naming them."""
    return int.from_bytes(user_digest(user)[:8], "little", signed=True)


# reading id lists ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PersonId:
    kind: IdKind
    value: str
    source: str  # the file it came from ("-" for standard input)
    line: int

    @property
    def key(self) -> str:
        return self.kind.key(self.value)


@dataclass(slots=True)
class IdList:
    """Distinct ids in the order first read, and how many were read in all."""

    ids: list[PersonId] = field(default_factory=list)
    read: int = 0
    duplicates: int = 0
    _seen: set[str] = field(default_factory=set)

    def add(self, person: PersonId) -> None:
        self.read += 1
        if person.key in self._seen:
            self.duplicates += 1
            return
        self._seen.add(person.key)
        self.ids.append(person)


def read_ids(sources: Iterable[tuple[str, IdKind | None]], stdin=None) -> IdList:
    """Read id files. Each source is (path or `-`, the kind of id it holds); kind None
    accepts a CSV with a userId column, an anonymousId column or both (`--suppress`),
    and reads a plain list as userIds. Raises UsageError naming the file and line."""
    found = IdList()
    for path, kind in sources:
        before = found.read
        for person in _read_file(path, kind, stdin):
            found.add(person)
        if found.read == before:
            raise UsageError(
                f"{'standard input' if path == '-' else path}: no ids in it",
                "give one id a line, or a CSV with a userId or anonymousId column",
            )
    return found


def _read_file(path: str, kind: IdKind | None, stdin) -> Iterable[PersonId]:
    name = "standard input" if path == "-" else path
    if path == "-":
        text = (stdin or sys.stdin.buffer).read()
    else:
        try:
            with open(path, "rb") as file:
                text = file.read()
        except FileNotFoundError:
            raise UsageError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise UsageError(f"{path}: is a folder, not a file of ids") from None
        except OSError as error:
            raise UsageError(f"{path}: cannot read it ({error.strerror})") from None
    try:
        lines = text.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"{name}: not UTF-8 text", "save the id list as UTF-8") from None
    content = [(n, line) for n, line in enumerate(lines, 1) if _is_content(line)]
    if not content:
        return
    columns = _header(name, content[0][1], kind)
    if columns is None:
        for number, line in content:
            yield _person(name, number, kind or IdKind.USER, line.strip())
        return
    for number, line in content[1:]:
        row = next(csv.reader([line]), [])
        for column, column_kind in columns:
            value = row[column].strip() if column < len(row) else ""
            if value:
                yield _person(name, number, column_kind, value)


def _is_content(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def _header(name: str, first: str, kind: IdKind | None) -> list[tuple[int, IdKind]] | None:
    """The id columns of a CSV header: [(index, kind)], or None for a plain list."""
    cells = next(csv.reader([first]))
    kinds = [kind] if kind is not None else [IdKind.USER, IdKind.ANONYMOUS]
    columns = [
        (index, column_kind)
        for column_kind in kinds
        for index, cell in enumerate(cells)
        if cell.strip() in column_kind.columns
    ]
    if columns:
        return columns[:1] if kind is not None else columns
    if len(cells) > 1:
        wanted = " or ".join(c for k in kinds for c in k.columns)
        raise UsageError(
            f"{name}: a CSV without a column named {wanted}",
            "rename the id column, or give one id a line",
        )
    return None


def _person(name: str, number: int, kind: IdKind, value: str) -> PersonId:
    if len(value.encode()) > MAX_EXTERNAL_ID_BYTES:
        raise UsageError(
            f"{name}:{number}: an id longer than {MAX_EXTERNAL_ID_BYTES} bytes "
            "(Braze's limit; no such id can exist there)",
            "check that the file holds one id a line",
        )
    return PersonId(kind, value, name, number)


# the check imports make ----------------------------------------------------------------


class Forgotten:
    """Users an import must not send: deleted ones (by digest, from the state) and
    suppressed ones (by key, from --suppress files, kept in memory only). False when
    there are none: an import without any does not build one, and pays nothing a line."""

    def __init__(self, deleted: Iterable[bytes] = (), suppressed: Iterable[str] = ()) -> None:
        self._deleted = frozenset(deleted)
        self._suppressed = frozenset(suppressed)
        self._verdicts: dict[str, SkipReason | None] = {}
        self._linked: Callable[[str], str | None] = lambda anonymous_id: None

    def follow(self, linked: Callable[[str], str | None]) -> None:
        """anonymousId -> the userId the archive links it to (identity.Links.get): an
        anonymous line of a suppressed user is theirs too, even when it goes to its alias
        profile (with shards, a file that arrived before the link)."""
        self._linked = linked

    def __bool__(self) -> bool:
        return bool(self._deleted or self._suppressed)

    def reason(self, user: str) -> SkipReason | None:
        """Why this user's lines are skipped (DELETED, SUPPRESSED), or None: send them."""
        verdicts = self._verdicts
        try:
            return verdicts[user]
        except KeyError:
            pass
        if user_digest(user) in self._deleted:
            verdict: SkipReason | None = SkipReason.DELETED
        elif user in self._suppressed:
            verdict = SkipReason.SUPPRESSED
        else:
            verdict = None
        if len(verdicts) >= _CACHE_USERS:
            verdicts.clear()
        verdicts[user] = verdict
        return verdict

    def reason_for(self, mapped: object, record: dict | None) -> SkipReason | None:
        """The same for a line as mapped: a Call by its user, a Rejected line by the ids
        in its record (so a rejected line of theirs is not dead-lettered). Lines skipped
        anyway, and lines that are not JSON, are left as they are."""
        kind = type(mapped)
        if kind is Call:
            user = mapped.user
            verdict = self.reason(user)
            if verdict is None and user.startswith("a:"):
                external_id = self._linked(user[2:])
                if external_id is not None:
                    return self.reason("e:" + external_id)
            return verdict
        if kind is Rejected and record is not None:
            return self.reason_for_record(record)
        return None

    def reason_for_record(self, record: dict) -> SkipReason | None:
        """The same for a Segment line that could not be mapped: its userId and its
        anonymousId are both checked, so a rejected line of theirs is not dead-lettered."""
        for kind, name in ((IdKind.USER, "userId"), (IdKind.ANONYMOUS, "anonymousId")):
            value = record.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                value = str(int(value)) if float(value).is_integer() else repr(value)
            if isinstance(value, str) and value.strip():
                verdict = self.reason(kind.key(value.strip()))
                if verdict is not None:
                    return verdict
        return None
