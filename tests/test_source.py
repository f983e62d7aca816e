"""source.py: finding archive files and streaming their lines with their position."""

from __future__ import annotations

import gzip
import io
import random
import sys
import tracemalloc
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from isal import igzip

from segreplay import source
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


def _read(
    path: Path | str, skip: int = 0, size: int | None = -1
) -> tuple[list[tuple[int, bytes]], list[ReadProblem]]:
    problems: list[ReadProblem] = []
    if size == -1:
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


HINT_MOUNTED = "check the path, and that the disk or bucket sync holding it is mounted"


def test_discover_refuses_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty" / "day").mkdir(parents=True)
    with pytest.raises(UsageError) as raised:
        discover([str(tmp_path / "empty")])
    assert raised.value.message == f"{tmp_path / 'empty'}: the folder holds no file"
    assert raised.value.hint == HINT_MOUNTED


def test_discover_refuses_a_folder_of_stray_files(tmp_path: Path) -> None:
    _write(tmp_path / "logs" / ".DS_Store", b"\x00\x00\x00\x01Bud1")
    _write(tmp_path / "logs" / "manifest.txt", b"files: 3\n")
    with pytest.raises(UsageError) as raised:
        discover([str(tmp_path / "logs")])
    assert raised.value.message == (
        f"{tmp_path / 'logs'}: the folder holds no archive file, only files that are "
        "neither gzip nor JSON lines (such as .DS_Store)"
    )


def test_discover_refuses_a_glob_matching_only_empty_folders(tmp_path: Path) -> None:
    (tmp_path / "logs" / "day-1").mkdir(parents=True)
    pattern = str(tmp_path / "logs" / "day-*")
    with pytest.raises(UsageError) as raised:
        discover([pattern])
    assert raised.value.message == f"{pattern}: the pattern holds no file"


def test_discover_takes_a_folder_with_an_empty_file(tmp_path: Path) -> None:
    """A quiet day's empty export is not a missing archive."""
    path = _write(tmp_path / "logs" / "part-1", b"")
    assert [a.path for a in discover([str(tmp_path / "logs")])] == [str(path)]


def test_discover_refuses_a_device_with_what_it_is(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as raised:
        discover(["/dev/null"])
    assert raised.value.message == "/dev/null: not a file, a folder or a pipe"


def test_discover_reads_a_named_pipe_as_a_stream(tmp_path: Path) -> None:
    import os
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert discover([str(fifo)]) == [ArchiveFile(str(fifo), None)]
    writer = threading.Thread(target=fifo.write_bytes, args=(gzip.compress(_jsonl(2)),))
    writer.start()
    lines, problems = _read(str(fifo), size=None)
    writer.join()
    assert [number for number, _ in lines] == [1, 2] and problems == []


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
        pytest.param(b"\n\n  \n", "the file holds only blank lines", id="blank"),
        pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00", "neither gzip nor JSON lines", id="png"),
        pytest.param(b"files: 3\nok\n", "neither gzip nor JSON lines", id="text"),
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
        ("manifest.txt", "neither gzip nor JSON lines")
    ]


# LineReader: block edges --------------------------------------------------------------
# Lines are cut out of blocks of BLOCK_BYTES (of inflated data, for gzip). These tests
# shrink the blocks so that small files put a block boundary where each case needs one.


def _file(tmp_path: Path, data: bytes, compress: bool) -> Path:
    return _write(tmp_path / "a.gz", gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
def test_a_line_split_across_two_blocks_is_read_whole(
    tmp_path: Path, monkeypatch, compress: bool
) -> None:
    monkeypatch.setattr(source, "BLOCK_BYTES", 10)
    data = b'{"n":1}\n{"n":22}\n'  # the second line starts in the first block
    lines, problems = _read(_file(tmp_path, data, compress))
    assert lines == [(1, b'{"n":1}'), (2, b'{"n":22}')]
    assert problems == []


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize("block", [7, 8], ids=["newline-opens-a-block", "newline-ends-a-block"])
def test_a_newline_on_a_block_boundary(
    tmp_path: Path, monkeypatch, block: int, compress: bool
) -> None:
    monkeypatch.setattr(source, "BLOCK_BYTES", block)
    data = b'{"n":1}\n{"n":2}\n{"n":3}'  # 8 bytes a line; the last has no newline
    lines, problems = _read(_file(tmp_path, data, compress))
    assert lines == [(1, b'{"n":1}'), (2, b'{"n":2}'), (3, b'{"n":3}')]
    assert problems == []


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize("block", [8, 1 << 16], ids=["crlf-split-by-blocks", "one-block"])
def test_crlf_lines_keep_their_carriage_return(
    tmp_path: Path, monkeypatch, block: int, compress: bool
) -> None:
    """Only \\n ends a line, as it always has: a \\r before it stays (JSON ignores it)."""
    monkeypatch.setattr(source, "BLOCK_BYTES", block)
    # With 8-byte blocks, the first \r ends a block and its \n opens the next one.
    data = b'{"n":1}\r\n\r\n{"a":1,\r"b":2}\r\n'
    lines, problems = _read(_file(tmp_path, data, compress))
    assert lines == [(1, b'{"n":1}\r'), (3, b'{"a":1,\r"b":2}\r')]
    assert problems == []


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
def test_an_overlong_line_across_many_blocks_is_reported_once(
    tmp_path: Path, monkeypatch, compress: bool
) -> None:
    monkeypatch.setattr(source, "BLOCK_BYTES", 256)
    monkeypatch.setattr(source, "MAX_LINE_BYTES", 2000)
    huge = b'{"pad":"' + b"x" * 4990 + b'"}'  # 20 blocks
    fits = b'{"pad":"' + b"x" * 1989 + b'"}'  # one byte under the limit
    at_limit = fits + b" "
    data = b"\n".join([b'{"n":1}', huge, fits, at_limit, b'{"n":5}', huge])  # no newline at the end
    path = _file(tmp_path, data, compress)
    lines, problems = _read(path)
    assert lines == [(1, b'{"n":1}'), (3, fits), (5, b'{"n":5}')]
    assert problems == [
        ReadProblem(
            str(path), 2, "line too long (5,001 bytes; the limit is 2,000)", raw=huge[:1000]
        ),
        ReadProblem(
            str(path), 4, "line too long (2,001 bytes; the limit is 2,000)", raw=at_limit[:1000]
        ),
        ReadProblem(
            str(path), 6, "line too long (5,000 bytes; the limit is 2,000)", raw=huge[:1000]
        ),
    ]


def test_an_overlong_line_is_passed_over_in_flat_memory(tmp_path: Path) -> None:
    huge = b'{"pad":"' + b"x" * (20 * MAX_LINE_BYTES) + b'"}'
    path = _write(tmp_path / "a.gz", gzip.compress(huge + b'\n{"n":2}\n', compresslevel=1))
    tracemalloc.start()
    try:
        lines, problems = _read(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lines == [(2, b'{"n":2}')]
    assert [p.line for p in problems] == [1]
    assert peak < 3 * MAX_LINE_BYTES, f"peak {peak:,} bytes for a {len(huge):,}-byte line"


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize("block", [16, 23], ids=["mid-line", "line-ends-a-block"])
def test_skip_across_block_boundaries(
    tmp_path: Path, monkeypatch, block: int, compress: bool
) -> None:
    monkeypatch.setattr(source, "BLOCK_BYTES", block)
    path = _file(tmp_path, _jsonl(9), compress)  # 23-byte lines
    for skip in range(11):
        lines, problems = _read(path, skip=skip)
        assert lines == [(n, b'{"type":"track","n":%d}' % n) for n in range(skip + 1, 10)]
        assert problems == []


@pytest.mark.parametrize("block", [64, 1 << 16])
def test_truncated_gzip_cut_mid_line_yields_every_whole_line_before_the_cut(
    tmp_path: Path, monkeypatch, block: int
) -> None:
    monkeypatch.setattr(source, "BLOCK_BYTES", block)
    rng = random.Random(3)
    data = b"".join(
        b'{"n":%d,"pad":"%s"}\n' % (n, rng.randbytes(40).hex().encode()) for n in range(1, 2001)
    )
    whole = gzip.compress(data)
    for cut in (len(whole) // 3, len(whole) // 2, len(whole) - 20):
        left = zlib.decompressobj(31).decompress(whole[:cut])  # all the cut file holds
        assert not left.endswith(b"\n"), "the cut should fall mid-line"
        before = left.split(b"\n")[:-1]
        path = _write(tmp_path / "cut.gz", whole[:cut])
        lines, problems = _read(path)
        assert lines == list(enumerate(before, start=1))
        assert [(p.line, p.truncated) for p in problems] == [(len(before) + 1, True)]
        assert problems[0].reason.startswith(
            f"gzip data is truncated or corrupt after line {len(before):,} ("
        )


def test_zero_padding_after_a_gzip_member_is_allowed(tmp_path: Path) -> None:
    data = gzip.compress(_jsonl(2)) + bytes(10) + gzip.compress(_jsonl(1, 3)) + bytes(7)
    lines, problems = _read(_write(tmp_path / "a.gz", data))
    assert [n for n, _ in lines] == [1, 2, 3]
    assert problems == []


def test_bytes_after_the_last_gzip_member_are_reported(tmp_path: Path) -> None:
    lines, problems = _read(_write(tmp_path / "a.gz", gzip.compress(_jsonl(3)) + b"not gzip\n"))
    assert [n for n, _ in lines] == [1, 2, 3]
    assert [(p.line, p.truncated) for p in problems] == [(4, True)]


_LIMIT = 1000  # MAX_LINE_BYTES for the property below: lines cross it with little data
_line_bodies = st.one_of(
    st.binary(max_size=30).map(lambda body: body.replace(b"\n", b"")),
    st.sampled_from([b"", b" ", b"\r", b"\t \r", b'{"a":1}\r']),
    st.sampled_from([_LIMIT - 2, _LIMIT - 1, _LIMIT, _LIMIT + 1, 3 * _LIMIT]).map(
        lambda size: b"y" * size
    ),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    bodies=st.lists(_line_bodies, max_size=25),
    last_newline=st.booleans(),
    block=st.integers(min_value=1, max_value=70),
    skip=st.integers(min_value=0, max_value=30),
    compress=st.booleans(),
)
def test_any_block_size_reads_lines_as_split_on_newlines(
    tmp_path: Path, bodies: list[bytes], last_newline: bool, block: int, skip: int, compress: bool
) -> None:
    bodies = [b"{}", *bodies]  # JSON first, or a plain file is not taken for JSON lines
    data = b"\n".join(bodies) + (b"\n" if last_newline else b"")
    path = _file(tmp_path, data, compress)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(source, "BLOCK_BYTES", block)
        patch.setattr(source, "MAX_LINE_BYTES", _LIMIT)
        lines, problems = _read(path, skip=skip)
    numbered = list(enumerate(bodies, start=1))[skip:]
    assert lines == [(n, body) for n, body in numbered if len(body) < _LIMIT and body.strip()]
    ends = {n: last_newline or n < len(bodies) for n, _ in numbered}  # has its newline
    assert [(p.line, p.reason, p.raw) for p in problems] == [
        (
            n,
            f"line too long ({len(body) + ends[n]:,} bytes; the limit is {_LIMIT:,})",
            body[:1000],
        )
        for n, body in numbered
        if len(body) >= _LIMIT
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


def test_a_gzip_corrupt_from_its_start_is_reported_for_the_whole_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "fakegzip0000.gz", b"\x1f\x8b" + bytes(range(200)))
    lines, problems = _read(path)
    assert lines == []
    [problem] = problems
    assert (problem.line, problem.truncated) == (0, True)
    assert problem.reason.startswith("gzip data is corrupt or truncated before its first line (")
