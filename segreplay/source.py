"""Finds archive files and streams their lines with their position.

A file is read by its content, never its name: gzip by its magic bytes, else JSON lines.
Problems (unreadable files, truncated gzip, over-long lines) go to a callback, not raised.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from segreplay.config import MAX_LINE_BYTES
from segreplay.errors import UsageError

try:  # python-isal's igzip inflates 2-3x faster than zlib; same interface.
    from isal import igzip as _gzip_impl
    from isal.isal_zlib import error as _IsalError

    _DECODE_ERRORS: tuple[type[BaseException], ...] = (
        EOFError,
        OSError,
        zlib.error,
        _IsalError,
    )
except ImportError:  # pragma: no cover - isal is a dependency, this is a safety net
    _gzip_impl = gzip
    _DECODE_ERRORS = (EOFError, OSError, zlib.error)

GZIP_MAGIC = b"\x1f\x8b"
STDIN = "-"
_SNIFF_BYTES = 512


@dataclass(frozen=True, slots=True)
class ArchiveFile:
    path: str  # as found; "-" is standard input
    size: int | None  # None for standard input
    mtime_ns: int | None = None


@dataclass(frozen=True, slots=True)
class ReadProblem:
    """Something wrong with a file or one of its lines. `line` is 0 for the whole file."""

    path: str
    line: int
    reason: str
    raw: bytes | None = None
    skipped_file: bool = False
    truncated: bool = False


OnProblem = Callable[[ReadProblem], None]


def discover(sources: Iterable[str]) -> list[ArchiveFile]:
    """Expand files, directories (recursive, sorted), globs and `-` into archive files.

    A path that does not exist, or a glob that matches nothing, is a usage error: the
    user almost certainly mistyped it, and replaying less than they meant is worse.
    """
    found: list[ArchiveFile] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        if path not in seen:
            seen.add(path)
            stat = os.stat(path)
            found.append(ArchiveFile(path, stat.st_size, stat.st_mtime_ns))

    for source in sources:
        if source == STDIN:
            found.append(ArchiveFile(STDIN, None))
        elif os.path.isdir(source):
            for path in _walk_sorted(source):
                add(path)
        elif os.path.isfile(source):
            add(source)
        elif glob.has_magic(source):
            matches = sorted(glob.glob(source, recursive=True))
            if not matches:
                raise UsageError(f"{source}: the pattern matches no file")
            for match in matches:
                if os.path.isdir(match):
                    for path in _walk_sorted(match):
                        add(path)
                else:
                    add(match)
        else:
            raise UsageError(f"{source}: no such file or directory")
    return found


def _walk_sorted(root: str) -> list[str]:
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        paths.extend(os.path.join(folder, name) for name in files)
    return sorted(paths)


class LineReader:
    """Streams one archive file as (line number, raw bytes), 1-based, newline stripped.

    Memory stays flat whatever the file's size: lines are read one at a time and a line
    over MAX_LINE_BYTES is reported and skipped without holding it whole.
    """

    def __init__(self, archive: ArchiveFile, on_problem: OnProblem) -> None:
        self.archive = archive
        self._on_problem = on_problem
        self._raw: BinaryIO | None = None

    @property
    def bytes_read(self) -> int:
        """Bytes of the file (compressed, if it is) consumed so far: for progress."""
        if self._raw is None or self._raw.closed:
            return self.archive.size or 0
        try:
            return self._raw.tell()
        except (OSError, ValueError):
            return 0

    def lines(self, skip: int = 0) -> Iterator[tuple[int, bytes]]:
        """Every line after the first `skip` ones (already acknowledged in an earlier run)."""
        path = self.archive.path
        if path == STDIN:
            raw = sys.stdin.buffer
            if not hasattr(raw, "peek"):  # e.g. the BytesIO a test runner puts there
                raw = io.BufferedReader(raw)
        else:
            raw = open(path, "rb")  # noqa: SIM115
        self._raw = raw
        try:
            head = raw.peek(_SNIFF_BYTES)[:_SNIFF_BYTES]
            kind = _sniff(head)
            if kind != "jsonl" and kind != "gzip":
                self._on_problem(ReadProblem(path, 0, kind, skipped_file=True))
                return
            stream = _gzip_impl.open(raw, "rb") if kind == "gzip" else raw
            yield from self._split(stream, skip)
        finally:
            if path != STDIN:
                raw.close()
            elif raw is not sys.stdin.buffer:
                self._raw = raw.detach()  # closing the wrapper would close standard input

    def _split(self, stream: BinaryIO, skip: int) -> Iterator[tuple[int, bytes]]:
        path = self.archive.path
        readline = stream.readline
        number = 0
        try:
            while number < skip:
                line = readline(MAX_LINE_BYTES)
                if not line:
                    return
                if line[-1:] == b"\n" or len(line) < MAX_LINE_BYTES:
                    number += 1
            while True:
                line = readline(MAX_LINE_BYTES)
                if not line:
                    return
                number += 1
                if line[-1:] == b"\n":
                    line = line[:-1]
                elif len(line) == MAX_LINE_BYTES:
                    size = len(line) + _discard_rest_of_line(readline)
                    self._on_problem(
                        ReadProblem(
                            path,
                            number,
                            f"line too long ({size:,} bytes; the limit is {MAX_LINE_BYTES:,})",
                            raw=line[:1000],
                        )
                    )
                    continue
                if line.strip():
                    yield number, line
        except _DECODE_ERRORS as error:
            self._on_problem(
                ReadProblem(
                    path,
                    number + 1,
                    f"gzip data is truncated or corrupt after line {number:,} ({error}); "
                    "the lines before it were read",
                    truncated=True,
                )
            )


def _discard_rest_of_line(readline: Callable[[int], bytes]) -> int:
    discarded = 0
    while True:
        chunk = readline(MAX_LINE_BYTES)
        discarded += len(chunk)
        if not chunk or chunk[-1:] == b"\n":
            return discarded


def _sniff(head: bytes) -> str:
    """'gzip', 'jsonl', or the reason the file is skipped."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not text:
        return "empty file" if not head else "file holds only blank lines"
    if text[:1] in (b"{", b"["):
        return "jsonl"
    return "not gzip and not JSON lines: skipped"
