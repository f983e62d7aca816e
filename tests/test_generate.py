"""samples/generate.py: same arguments, same bytes; the committed sample is its output."""

from __future__ import annotations

import collections
import gzip
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from samples import generate as sample_generator

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "segment-logs"


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _content(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _lines(root: Path) -> list[bytes]:
    lines = []
    for name, data in sorted(_files(root).items()):
        if name.endswith(".gz"):
            lines.extend(_content(data).splitlines())
    return lines


def test_same_arguments_write_the_same_bytes(tmp_path: Path) -> None:
    first = sample_generator.generate(tmp_path / "a")
    second = sample_generator.generate(tmp_path / "b")
    assert [p.relative_to(tmp_path / "a") for p in first] == [
        p.relative_to(tmp_path / "b") for p in second
    ]
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_another_seed_writes_other_lines(tmp_path: Path) -> None:
    sample_generator.generate(tmp_path / "a", 200, bad=False)
    sample_generator.generate(tmp_path / "b", 200, bad=False, seed=7)
    assert _lines(tmp_path / "a") != _lines(tmp_path / "b")


def test_committed_sample_is_the_generators_output(tmp_path: Path) -> None:
    """Nobody edits the sample by hand: regenerate it (see samples/README.md) instead."""
    sample_generator.generate(tmp_path)
    fresh, committed = _files(tmp_path), _files(SAMPLE)
    assert sorted(committed) == sorted(fresh)
    # Compare what the files hold, not gzip's bytes, which another zlib may encode differently.
    for name, data in fresh.items():
        assert _content(committed[name]) == _content(data), name


def test_large_mode_writes_exactly_the_lines_asked_all_valid(tmp_path: Path) -> None:
    paths = sample_generator.generate(tmp_path, 10_000, 1_000, bad=False, days=2, files_per_day=2)
    assert len(paths) == 2 * 2 * 2  # sources x days x files per day; nothing else
    assert all(p.read_bytes()[:2] == b"\x1f\x8b" for p in paths)
    lines = _lines(tmp_path)
    assert len(lines) == 10_000
    calls = [orjson.loads(line) for line in lines]
    assert all(isinstance(call, dict) and call["type"] for call in calls)
    types = collections.Counter(call["type"] for call in calls)
    assert set(types) == {"identify", "track", "page", "screen", "group", "alias"}


def test_cli_writes_the_files(tmp_path: Path) -> None:
    options = "--lines 300 --no-bad --days 1 --sources 3".split()
    result = subprocess.run(
        [sys.executable, str(ROOT / "samples" / "generate.py"), "--out", str(tmp_path), *options],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "wrote 300 lines in 9 files" in result.stderr
    assert len(_lines(tmp_path)) == 300


def test_every_placed_line_is_placed(tmp_path: Path) -> None:
    catalog: list[tuple[str, int, str]] = []
    sample_generator.generate(tmp_path, catalog=catalog)
    labels = [label for _, _, label in catalog]
    assert len(labels) == len(set(labels)) == 49
    for path, number, _ in catalog:
        assert number <= len(_content((tmp_path / path).read_bytes()).splitlines())


def test_sample_counts_match_the_readme() -> None:
    """samples/README.md quotes these; change both together."""
    types: collections.Counter[str] = collections.Counter()
    for line in _lines(SAMPLE):
        try:
            call = orjson.loads(line)
        except orjson.JSONDecodeError:
            types["(not JSON)"] += 1
            continue
        types[call.get("type", "(no type)") if isinstance(call, dict) else "(array)"] += 1
    assert types == {
        "track": 206,
        "identify": 92,
        "page": 53,
        "screen": 35,
        "alias": 6,
        "group": 3,
        "flush": 1,
        "(no type)": 1,
        "(array)": 1,
        "(not JSON)": 2,
    }


@pytest.mark.parametrize("bad", [{"lines": -1}, {"days": 0}, {"users": 0}])
def test_rejects_impossible_arguments(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError):
        sample_generator.generate(tmp_path, **bad)
