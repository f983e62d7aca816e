"""source.py: finding archive files and streaming their lines with their position."""

from __future__ import annotations

import gzip
import io
import random
import sys
import tracemalloc
from pathlib import Path

import pytest
from isal import igzip

from segreplay.config import MAX_LINE_BYTES
from segreplay.errors import UsageError
from segreplay.source import ArchiveFile, LineReader, ReadProblem, discover

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "segment-logs"


def _jsonl(count: int, start: int = 1) -> bytes:
    return b"".join(b'{"type":"track","n":%d}\n' % n for n in range(start, start + count))


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _read(path: Path | str, skip: int = 0) -> tuple[list[tuple[int, bytes]], list[ReadProblem]]:
    problems: list[ReadProblem] = []
    size = None if path == "-" else Path(path).stat().st_size
    lines = list(LineReader(ArchiveFile(str(path), size), problems.append).lines(skip))
    return lines, problems


# discover ------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """logs/ with files at several depths, created out of order."""
    for name in ("src-b/1709683200000/2.gz", "src-a/1709596800000/1.gz", "src-a/0.gz"):
        _write(tmp_path / "logs" / name, gzip.compress(_jsonl(1)))
    _write(tmp_path / "logs" / "src-a" / "1709596800000" / "manifest.txt", b"not json\n")
    return tmp_path / "logs"


def test_discover_a_file(tree: Path) -> None:
    path = tree / "src-a" / "0.gz"
    stat = path.stat()
    assert discover([str(path)]) == [ArchiveFile(str(path), stat.st_size, stat.st_mtime_ns)]


def test_discover_a_directory_recursively_in_sorted_path_order(tree: Path) -> None:
    found = discover([str(tree)])
    assert [Path(a.path).relative_to(tree).as_posix() for a in found] == [
        "src-a/0.gz",
        "src-a/1709596800000/1.gz",
        "src-a/1709596800000/manifest.txt",
        "src-b/1709683200000/2.gz",
    ]
    assert [a.size for a in found] == [Path(a.path).stat().st_size for a in found]


def test_discover_a_glob_sorted_and_without_repeats(tree: Path) -> None:
    pattern = str(tree / "*" / "17*" / "*.gz")
    again = str(tree / "src-b" / "1709683200000" / "2.gz")
    found = discover([pattern, again])
    assert [Path(a.path).relative_to(tree).as_posix() for a in found] == [
        "src-a/1709596800000/1.gz",
        "src-b/1709683200000/2.gz",
    ]


def test_discover_a_glob_matching_a_directory_walks_it(tree: Path) -> None:
    found = discover([str(tree / "src-*")])
    assert len(found) == 4


def test_discover_stdin() -> None:
    assert discover(["-"]) == [ArchiveFile("-", None)]


def test_discover_refuses_a_missing_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(UsageError) as raised:
        discover([missing])
    assert raised.value.message == f"{missing}: no such file or directory"


def test_discover_refuses_a_glob_matching_nothing(tmp_path: Path) -> None:
    pattern = str(tmp_path / "*.gz")
    with pytest.raises(UsageError) as raised:
        discover([pattern])
    assert raised.value.message == f"{pattern}: the pattern matches no file"


# LineReader: content, not names -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "compress"),
    [
        pytest.param("part.gz", True, id="gzip-named-gz"),
        pytest.param("part.gz", False, id="plain-named-gz"),
        pytest.param("part.json", True, id="gzip-named-json"),
        pytest.param("part", False, id="plain-no-suffix"),
    ],
)
def test_reads_by_content_not_name(tmp_path: Path, name: str, compress: bool) -> None:
    data = _jsonl(3)
    path = _write(tmp_path / name, gzip.compress(data) if compress else data)
    lines, problems = _read(path)
    assert lines == [
        (1, b'{"type":"track","n":1}'),
        (2, b'{"type":"track","n":2}'),
        (3, b'{"type":"track","n":3}'),
    ]
    assert problems == []


def test_concatenated_gzip_members_are_one_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.gz", gzip.compress(_jsonl(2)) + gzip.compress(_jsonl(2, 3)))
    lines, problems = _read(path)
    assert [n for n, _ in lines] == [1, 2, 3, 4]
    assert lines[3] == (4, b'{"type":"track","n":4}')
    assert problems == []


def test_blank_lines_are_skipped_but_numbered(tmp_path: Path) -> None:
    data = b'{"n":1}\n\n   \n\t\n{"n":5}\n\n{"n":7}'  # the last line has no newline
    lines, problems = _read(_write(tmp_path / "a.gz", gzip.compress(data)))
    assert lines == [(1, b'{"n":1}'), (5, b'{"n":5}'), (7, b'{"n":7}')]
    assert problems == []


@pytest.mark.parametrize(
    ("skip", "numbers"),
    [
        pytest.param(0, [1, 2, 4, 5], id="none"),
        pytest.param(2, [4, 5], id="two"),
        pytest.param(3, [4, 5], id="blank-line-counts"),
        pytest.param(4, [5], id="four"),
        pytest.param(5, [], id="all"),
        pytest.param(99, [], id="past-the-end"),
    ],
)
def test_skip_resumes_after_n_lines(tmp_path: Path, skip: int, numbers: list[int]) -> None:
    data = b'{"n":1}\n{"n":2}\n\n{"n":4}\n{"n":5}\n'
    lines, problems = _read(_write(tmp_path / "a.gz", gzip.compress(data)), skip=skip)
    assert [n for n, _ in lines] == numbers
    assert [raw for _, raw in lines] == [b'{"n":%d}' % n for n in numbers]
    assert problems == []


# LineReader: problems -----------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
def test_an_overlong_line_is_reported_and_the_next_lines_still_read(
    tmp_path: Path, compress: bool
) -> None:
    huge = b'{"type":"track","pad":"' + b"x" * (2_000_000 - 25) + b'"}'
    assert len(huge) == 2_000_000
    data = b'{"n":1}\n' + huge + b'\n{"n":3}\n{"n":4}\n'
    path = _write(tmp_path / "a.gz", gzip.compress(data) if compress else data)
    lines, problems = _read(path)
    assert lines == [(1, b'{"n":1}'), (3, b'{"n":3}'), (4, b'{"n":4}')]
    assert problems == [
        ReadProblem(
            str(path),
            2,
            f"line too long (2,000,001 bytes; the limit is {MAX_LINE_BYTES:,})",
            raw=huge[:1000],
        )
    ]


def test_skip_counts_an_overlong_line_once(tmp_path: Path) -> None:
    data = b'{"pad":"' + b"x" * (3 * MAX_LINE_BYTES) + b'"}\n{"n":2}\n{"n":3}\n'
    lines, problems = _read(_write(tmp_path / "a", data), skip=1)
    assert lines == [(2, b'{"n":2}'), (3, b'{"n":3}')]
    assert problems == []


def test_truncated_gzip_yields_the_lines_before_the_cut(tmp_path: Path) -> None:
    data = _jsonl(5000)
    whole = gzip.compress(data)
    path = _write(tmp_path / "cut.gz", whole[: len(whole) // 2])
    lines, problems = _read(path)
    read = len(lines)
    assert 0 < read < 5000
    assert lines == list(enumerate(data.splitlines()[:read], start=1))
    assert len(problems) == 1
    problem = problems[0]
    assert (problem.path, problem.line, problem.truncated, problem.skipped_file) == (
        str(path),
        read + 1,
        True,
        False,
    )
    assert problem.reason.startswith(f"gzip data is truncated or corrupt after line {read:,} (")
    assert problem.reason.endswith("); the lines before it were read")


def test_corrupt_gzip_is_reported_as_truncated(tmp_path: Path) -> None:
    whole = bytearray(gzip.compress(_jsonl(5000)))
    middle = len(whole) // 2
    whole[middle : middle + 64] = bytes(64)
    lines, problems = _read(_write(tmp_path / "bad.gz", bytes(whole)))
    assert len(lines) < 5000
    assert [(p.line, p.truncated) for p in problems] == [(len(lines) + 1, True)]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"", "empty file", id="empty"),
        pytest.param(b"\n\n  \n", "file holds only blank lines", id="blank"),
        pytest.param(
            b"\x89PNG\r\n\x1a\n\x00\x00", "not gzip and not JSON lines: skipped", id="png"
        ),
        pytest.param(b"files: 3\nok\n", "not gzip and not JSON lines: skipped", id="text"),
    ],
)
def test_files_that_are_not_archives_are_skipped(tmp_path: Path, data: bytes, reason: str) -> None:
    path = _write(tmp_path / "x.gz", data)
    lines, problems = _read(path)
    assert lines == []
    assert problems == [ReadProblem(str(path), 0, reason, skipped_file=True)]


def test_bytes_read_reaches_the_file_size(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.gz", gzip.compress(_jsonl(100)))
    reader = LineReader(ArchiveFile(str(path), path.stat().st_size), print)
    assert sum(1 for _ in reader.lines()) == 100
    assert reader.bytes_read == path.stat().st_size


def test_the_committed_sample_reads_as_its_readme_says() -> None:
    problems: list[ReadProblem] = []
    count = 0
    for archive in discover([str(SAMPLE)]):
        count += sum(1 for _ in LineReader(archive, problems.append).lines())
    assert count == 400
    assert [(Path(p.path).name, p.reason) for p in problems] == [
        ("manifest.txt", "not gzip and not JSON lines: skipped")
    ]


# standard input -----------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize("peekable", [True, False], ids=["buffered", "bytesio"])
def test_stdin(monkeypatch, compress: bool, peekable: bool) -> None:
    data = gzip.compress(_jsonl(3)) if compress else _jsonl(3)
    # A real stdin.buffer is a BufferedReader; test runners (click's CliRunner) put a BytesIO.
    raw = io.BufferedReader(io.BytesIO(data)) if peekable else io.BytesIO(data)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(raw))
    reader = LineReader(ArchiveFile("-", None), pytest.fail)
    assert [n for n, _ in reader.lines()] == [1, 2, 3]
    assert not sys.stdin.buffer.closed
    assert reader.bytes_read == len(data)


# memory -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_gzip(tmp_path_factory) -> Path:
    """About 50 MB of gzip (95 MB of JSON lines): incompressible hex padding."""
    path = tmp_path_factory.mktemp("big") / "big.gz"
    rng = random.Random(7)
    with igzip.open(path, "wb", compresslevel=1) as out:
        for _ in range(190):
            pad = rng.randbytes(250_000).hex().encode()
            out.write(
                b"".join(b'{"pad":"%s"}\n' % pad[i : i + 1000] for i in range(0, 500_000, 1000))
            )
    return path


def test_streaming_a_50_mb_gzip_keeps_memory_flat(big_gzip: Path) -> None:
    size = big_gzip.stat().st_size
    assert size > 45_000_000
    reader = LineReader(ArchiveFile(str(big_gzip), size), pytest.fail)
    tracemalloc.start()
    try:
        count = sum(1 for _ in reader.lines())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 95_000
    assert peak < 4_000_000, f"peak {peak:,} bytes while streaming {size:,}"
