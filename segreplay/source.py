"""Finds archive files and streams their lines with their position.

Local paths are read here; `s3://` and `gs://` URLs are listed and fetched by objstore.py.

A file is read by its content, never its name: gzip by its magic bytes, else JSON lines.
Problems (unreadable files, truncated gzip, over-long lines) go to a callback, not raised.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import stat
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import BinaryIO

from segreplay.config import MAX_LINE_BYTES
from segreplay.errors import ObjectUnreadable, UsageError

try:  # python-isal inflates 2-3x faster than zlib; same interface.
    from isal import isal_zlib as _zlib
    from isal.isal_zlib import error as _IsalError

    _DECODE_ERRORS: tuple[type[BaseException], ...] = (
        EOFError,
        OSError,
        zlib.error,
        _IsalError,
    )
except ImportError:  # pragma: no cover - isal is a dependency, this is a safety net
    _zlib = zlib
    _DECODE_ERRORS = (EOFError, OSError, zlib.error)

GZIP_MAGIC = b"\x1f\x8b"
STDIN = "-"
_SNIFF_BYTES = 512
# Bytes split into lines at a time (inflated, for gzip): enough lines to make the cost
# of a read small per line, little enough to stay in the CPU cache.
BLOCK_BYTES = 1 << 16
_INPUT_BYTES = 1 << 14  # gzip bytes read at a time; JSON lines inflate 5-10x, to a block
_GZIP_WBITS = 31  # zlib's code for a deflate stream in a gzip header and trailer


class FileKind(Enum):
    """What a file's first bytes say it is; the value is why a non-archive is skipped."""

    GZIP = "gzip"
    JSON_LINES = "JSON lines"
    EMPTY = "empty file"
    BLANK = "the file holds only blank lines"
    OTHER = "neither gzip nor JSON lines"
    UNREADABLE = "could not be read"  # an object rewritten or deleted as it was opened

    @property
    def is_archive(self) -> bool:
        return self is FileKind.GZIP or self is FileKind.JSON_LINES


@dataclass(frozen=True, slots=True)
class ArchiveFile:
    path: str  # as found; "-" is standard input; s3://bucket/key or gs://... for an object
    size: int | None  # None for a stream: standard input or a pipe
    mtime_ns: int | None = None
    # Known without reading the file: an object's ETag (or size and last-modified), so a
    # done object is never fetched. None for a local file (its first bytes are hashed).
    fingerprint: str | None = None


_FINGERPRINT_BYTES = 65536


def fingerprint(archive: ArchiveFile) -> str:
    """A digest of the file's first bytes: with its size, how a file is recognised again
    (a rotated or rewritten file at the same path is not). An object's comes from its
    listing, so a done object is never fetched."""
    if archive.fingerprint is not None:
        return archive.fingerprint
    if archive.size is None:
        return ""
    with open(archive.path, "rb") as file:
        return hashlib.blake2b(file.read(_FINGERPRINT_BYTES), digest_size=16).hexdigest()


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
    """Expand files, directories (recursive, sorted), globs, pipes and `-` into files.

    A path that does not exist, a glob that matches nothing, and a directory (or a glob's
    matches) holding no archive file are usage errors: the user almost certainly mistyped
    it, or the disk is not mounted, and replaying less than they meant is worse. A file
    named on its own is read whatever it holds (an empty day is not an error).
    """
    found: list[ArchiveFile] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        if path not in seen:
            seen.add(path)
            info = os.stat(path)
            found.append(ArchiveFile(path, info.st_size, info.st_mtime_ns))

    for source in sources:
        if source == STDIN:
            found.append(ArchiveFile(STDIN, None))
        elif _is_object_url(source):
            for listed in _objects().discover(source):
                if listed.url not in seen:
                    seen.add(listed.url)
                    found.append(
                        ArchiveFile(listed.url, listed.size, listed.mtime_ns, listed.fingerprint)
                    )
        elif os.path.isdir(source):
            paths = _walk_sorted(source)
            _check_holds_an_archive(source, paths, "the folder")
            for path in paths:
                add(path)
        elif os.path.isfile(source):
            add(source)
        elif os.path.exists(source):
            if not stat.S_ISFIFO(os.stat(source).st_mode):
                raise UsageError(
                    f"{source}: not a file, a folder or a pipe",
                    "name the archive's folder, a file in it, or - for standard input",
                )
            found.append(ArchiveFile(source, None))  # e.g. <(aws s3 cp ... -): a stream
        elif glob.has_magic(source):
            matches = sorted(glob.glob(source, recursive=True))
            if not matches:
                raise UsageError(f"{source}: the pattern matches no file")
            paths = []
            for match in matches:
                paths.extend(_walk_sorted(match) if os.path.isdir(match) else [match])
            _check_holds_an_archive(source, paths, "the pattern")
            for path in paths:
                add(path)
        else:
            raise UsageError(f"{source}: no such file or directory")
    return found


def _check_holds_an_archive(source: str, paths: list[str], what: str) -> None:
    """An empty file counts: a quiet day's empty export is not a missing archive."""
    if not paths:
        raise UsageError(
            f"{source}: {what} holds no file",
            "check the path, and that the disk or bucket sync holding it is mounted",
        )
    if all(sniff_path(path) is FileKind.OTHER for path in paths):
        raise UsageError(
            f"{source}: {what} holds no archive file, only files that are neither gzip "
            f"nor JSON lines (such as {os.path.basename(paths[0])})",
            "check the path, and that the disk or bucket sync holding it is mounted",
        )


def sniff_path(path: str) -> FileKind | None:
    """The kind of a regular file from its first bytes; None when it cannot be opened
    (reading it later says why, with the file's name)."""
    try:
        with open(path, "rb") as file:
            return sniff(file.read(_SNIFF_BYTES))
    except OSError:
        return None


def _is_object_url(source: str) -> bool:
    return source.startswith(("s3://", "gs://"))


_object_source = None


def _objects():
    """The object store client, made on first use: local runs never import obstore."""
    global _object_source
    if _object_source is None:
        from segreplay.objstore import ObjectSource

        _object_source = ObjectSource()
    return _object_source


def _walk_sorted(root: str) -> list[str]:
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        paths.extend(os.path.join(folder, name) for name in files)
    return sorted(paths)


class LineReader:
    """Streams one archive file as (line number, raw bytes), 1-based, newline stripped.

    Memory stays flat whatever the file's size: it is read BLOCK_BYTES at a time, and a
    line over MAX_LINE_BYTES is reported and skipped without holding it whole.
    """

    def __init__(self, archive: ArchiveFile, on_problem: OnProblem) -> None:
        self.archive = archive
        self._on_problem = on_problem
        self._raw: BinaryIO | None = None
        self._kind: FileKind | None = None  # sniffed when the file is opened

    @property
    def bytes_read(self) -> int:
        """Bytes of the file (compressed, if it is) consumed so far: for progress."""
        if self._raw is None or self._raw.closed:
            return self.archive.size or 0
        try:
            return self._raw.tell()
        except (OSError, ValueError):
            return 0

    def is_archive(self) -> bool:
        """Open the file and sniff it. One that is not an archive is reported as a skipped
        file and closed: a caller leaves it out of its checkpoints, so every run says so."""
        kind = self._kind or self._open()
        return kind.is_archive

    def lines(self, skip: int = 0) -> Iterator[tuple[int, bytes]]:
        """Every line after the first `skip` ones (already acknowledged in an earlier run)."""
        kind = self._kind or self._open()
        if not kind.is_archive:
            return
        raw = self._raw
        try:
            blocks = _inflate(raw) if kind is FileKind.GZIP else _read_blocks(raw)
            yield from self._split(blocks, skip)
        except ObjectUnreadable as error:  # rewritten under us: its new ETag is read next run
            self._on_problem(ReadProblem(self.archive.path, 0, str(error), skipped_file=True))
        finally:
            self._close()

    def _open(self) -> FileKind:
        path = self.archive.path
        if path == STDIN:
            raw = sys.stdin.buffer
            if not hasattr(raw, "peek"):  # e.g. the BytesIO a test runner puts there
                raw = io.BufferedReader(raw)
        elif _is_object_url(path):
            try:
                raw = _objects().open(path, self.archive.size, self.archive.fingerprint)
            except ObjectUnreadable as error:
                self._on_problem(ReadProblem(path, 0, str(error), skipped_file=True))
                self._kind = FileKind.UNREADABLE
                return self._kind
        else:
            raw = open(path, "rb")  # noqa: SIM115 - closed in _close()
        self._raw = raw
        try:
            kind = self._kind = sniff(raw.peek(_SNIFF_BYTES)[:_SNIFF_BYTES])
        except ObjectUnreadable as error:
            self._close()
            self._on_problem(ReadProblem(path, 0, str(error), skipped_file=True))
            self._kind = FileKind.UNREADABLE
            return self._kind
        except BaseException:
            self._close()
            raise
        if not kind.is_archive:
            self._close()
            self._on_problem(ReadProblem(path, 0, kind.value, skipped_file=True))
        return kind

    def _close(self) -> None:
        raw = self._raw
        if self.archive.path != STDIN:
            raw.close()
        elif raw is not sys.stdin.buffer:
            self._raw = raw.detach()  # closing the wrapper would close standard input

    def _split(self, blocks: Iterator[bytes], skip: int) -> Iterator[tuple[int, bytes]]:
        number = 0  # lines complete so far, blank and over-long ones included
        partial = b""  # the start of a line whose newline is in a later block
        too_long = 0  # bytes so far of an over-long line being passed over, else 0
        head = b""  # that line's first bytes, for the report
        try:
            for block in blocks:
                # find() scans with memchr; bytes.split and bytes.count test byte by byte,
                # which costs more on lines of about 1 KB.
                find = block.find
                start = 0  # where the block's next line begins
                if number < skip:  # resuming: no bytes object for a skipped line
                    while number < skip and (start := find(b"\n", start) + 1):
                        number += 1
                    if number < skip:
                        continue
                elif too_long:
                    end = find(b"\n")
                    if end < 0:
                        too_long += len(block)
                        continue
                    number += 1
                    self._too_long(number, head, too_long + end + 1)
                    too_long = 0
                    start = end + 1
                while (end := find(b"\n", start)) >= 0:
                    line = block[start:end]
                    start = end + 1
                    number += 1
                    if partial:
                        line = partial + line
                        partial = b""
                    if len(line) >= MAX_LINE_BYTES:
                        self._too_long(number, line, len(line) + 1)
                    elif line.strip():
                        yield number, line
                partial += block[start:]
                if len(partial) >= MAX_LINE_BYTES:
                    # Let go of it: memory must not grow with the line.
                    head, too_long, partial = partial[:1000], len(partial), b""
            # A last line without a newline is a line. A truncated gzip never gets here
            # (_inflate raises instead), so the cut line is never yielded as if whole.
            if too_long:
                self._too_long(number + 1, head, too_long)
            elif partial.strip():
                yield number + 1, partial
        except _DECODE_ERRORS as error:
            if number:
                where = number + 1
                reason = (
                    f"gzip data is truncated or corrupt after line {number:,} ({error}); "
                    "the lines before it were read"
                )
            else:  # nothing came out of it: the whole file is the problem, not a line
                where = 0
                reason = f"gzip data is corrupt or truncated before its first line ({error})"
            self._on_problem(ReadProblem(self.archive.path, where, reason, truncated=True))

    def _too_long(self, number: int, head: bytes, size: int) -> None:
        self._on_problem(
            ReadProblem(
                self.archive.path,
                number,
                f"line too long ({size:,} bytes; the limit is {MAX_LINE_BYTES:,})",
                raw=head[:1000],
            )
        )


def _read_blocks(raw: BinaryIO) -> Iterator[bytes]:
    while block := raw.read1(BLOCK_BYTES):  # read1: a pipe need not fill a block first
        yield block


def _inflate(raw: BinaryIO) -> Iterator[bytes]:
    """A gzip file's data, at most BLOCK_BYTES at a time; concatenated members as one.

    Not GzipFile: a read(n) that meets the cut in a truncated file raises and drops all it
    had inflated, so big reads would lose lines before the cut. Fed by hand, the
    decompressor gives every byte before the cut, and then this raises EOFError.
    """
    inflater = None  # None between members
    data = b""
    while data or (data := raw.read(_INPUT_BYTES)):
        if inflater is None:
            data = data.lstrip(b"\0")  # zero padding after a member is allowed, as in gzip
            if not data:
                continue
            inflater = _zlib.decompressobj(_GZIP_WBITS)
        if block := inflater.decompress(data, BLOCK_BYTES):
            yield block
        if inflater.eof:
            data, inflater = inflater.unused_data, None
        else:
            data = inflater.unconsumed_tail
    if inflater is not None:
        while block := inflater.decompress(b"", BLOCK_BYTES):  # what BLOCK_BYTES held back
            yield block
        if not inflater.eof:
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")


def sniff(head: bytes) -> FileKind:
    """A file's kind from its first bytes."""
    if head.startswith(GZIP_MAGIC):
        return FileKind.GZIP
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not text:
        return FileKind.BLANK if head else FileKind.EMPTY
    if text[:1] in (b"{", b"["):
        return FileKind.JSON_LINES
    return FileKind.OTHER
