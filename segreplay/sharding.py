"""The partition of a replay by user: which shard owns a line, how `--shard I/N` and
`--workers N` are spelled, and where each shard keeps its state.

A line belongs to shard `stable_hash(user) % N`, where `user` is the state key mapping
gives it (`e:<external_id>`, else `a:<anonymousId>`); a line with no user (invalid JSON,
no usable id) belongs to shard 0, so every line has exactly one owner.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from segreplay.config import MappingOptions, RunConfig
from segreplay.errors import UsageError
from segreplay.mapping import resolve_identity

# Whichever of these the job engine sets says which shard this process is.
INDEX_VARIABLES = ("JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX", "CLOUD_RUN_TASK_INDEX")
MAX_SHARDS = 1024
_OWNER_CACHE_USERS = 200_000  # users whose shard is remembered: about 25 MB at most


def stable_hash(user: str) -> int:
    """The same 64-bit number for a user on every machine and Python version (Python's
    own hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(user.encode(), digest_size=8).digest(), "big")


def shard_of(user: str, count: int) -> int:
    return stable_hash(user) % count


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard `index` of `count`."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS:
            raise UsageError(f"the number of shards must be 1 to {MAX_SHARDS}, not {self.count}")
        if not 0 <= self.index < self.count:
            raise UsageError(
                f"shard {self.index} of {self.count} does not exist",
                f"shards are numbered 0 to {self.count - 1}",
            )

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, record: dict, options: MappingOptions, links=None) -> bool:
        """Whether this shard decides a parsed line: its user's shard, or shard 0 for a
        line that names no user (it is counted and dead-lettered once, there). `links`
        (identity.Links) resolves an anonymous line to its user, as mapping does."""
        return self.line_filter(options, links)(record)

    def line_filter(self, options: MappingOptions, links=None) -> Callable[[dict], bool]:
        """`owns` for many lines: each user's shard is hashed once (a bounded cache
        saves 0.6 µs a line, a tenth of what passing over a line costs)."""
        index, count = self.index, self.count
        cache: dict[str, bool] = {}

        def owns(record: dict) -> bool:
            identity = resolve_identity(record, options, links)
            if type(identity) is not tuple:
                return index == 0
            user = identity[0]
            owned = cache.get(user)
            if owned is None:
                if len(cache) >= _OWNER_CACHE_USERS:
                    cache.clear()
                owned = cache[user] = stable_hash(user) % count == index
            return owned

        return owns

    def holds(self, user: str) -> bool:
        """Whether `user` (a state key, `e:...` or `a:...`) is this shard's."""
        return stable_hash(user) % self.count == self.index

    def owns_unparsed(self) -> bool:
        """Lines that are not JSON objects name no user: shard 0 reports them."""
        return self.index == 0


def parse_shard(text: str, environ: Mapping[str, str] = os.environ) -> Shard:
    """`I/N`, or `auto/N` with I from the job engine's index variable."""
    match = re.fullmatch(r"\s*(\d+|auto)\s*/\s*(\d+)\s*", text)
    if not match:
        raise UsageError(f"--shard must look like I/N or auto/N, e.g. 0/4, not {text!r}")
    index_text, count = match[1], int(match[2])
    if index_text == "auto":
        found = [(name, environ[name]) for name in INDEX_VARIABLES if environ.get(name)]
        if not found:
            raise UsageError(
                "--shard auto/N: no job index in the environment",
                f"set one of {', '.join(INDEX_VARIABLES)}, or pass --shard I/N",
            )
        name, value = found[0]
        if not value.strip().isdigit():
            raise UsageError(f"--shard auto/N: {name}={value!r} is not a shard number")
        index_text = value.strip()
    return Shard(int(index_text), count)


def parse_workers(text: str, cpu_count: int | None = None) -> int:
    """`N` or `auto` (the cores of this machine)."""
    if text.strip() == "auto":
        return max(1, cpu_count or os.cpu_count() or 1)
    if not text.strip().isdigit() or not 1 <= int(text) <= MAX_SHARDS:
        raise UsageError(f"--workers must be a number from 1 to {MAX_SHARDS} or auto, not {text!r}")
    return int(text)


def shard_state_path(state_path: str, shard: Shard) -> str:
    """`segreplay-state.sqlite` -> `segreplay-state.shard-0-of-4.sqlite`; one shard of
    one is the state itself, so `--workers 1` is a plain run."""
    if shard.count == 1:
        return state_path
    root, ext = _split(state_path)
    return f"{root}.shard-{shard.index}-of-{shard.count}{ext}"


def shard_config(config: RunConfig, shard: Shard) -> RunConfig:
    """`config` for one shard: its users' lines, its own state file. `--rate` is left as
    given (`--shard`: each machine is given its share; `--workers` divides it)."""
    if shard.count == 1:
        return config
    return replace(
        config,
        state_path=shard_state_path(config.state_path, shard),
        shard=(shard.index, shard.count),
    )


def shard_paths(state_path: str, count: int) -> list[str]:
    return [shard_state_path(state_path, Shard(i, count)) for i in range(count)]


def existing_counts(state_path: str) -> dict[int, list[str]]:
    """Shard counts the state files beside `state_path` were written with (1: the plain
    file), each with its files."""
    root, ext = _split(state_path)
    if state_path.startswith(("s3://", "gs://")):
        from segreplay.bucket_state import existing_keys

        candidates = existing_keys(state_path)
    else:
        candidates = glob.glob(f"{glob.escape(root)}.shard-*-of-*{glob.escape(ext)}")
        if os.path.exists(state_path):
            candidates.append(state_path)
    found: dict[int, list[str]] = {}
    shard_file = re.compile(re.escape(root) + r"\.shard-(\d+)-of-(\d+)" + re.escape(ext))
    for path in sorted(candidates):
        if path == state_path:
            found.setdefault(1, []).append(path)
        elif match := shard_file.fullmatch(path):
            found.setdefault(int(match[2]), []).append(path)
    return found


def check_shard_count(state_path: str, count: int, option: str = "--workers") -> None:
    """A state is kept in one number of shards: a run with another is a usage error that
    says how to reshard (`option`: how this run names its shards, --workers or --shard)."""
    found = existing_counts(state_path)
    others = sorted(n for n in found if n != count)
    if not others:
        return
    kept = " and ".join(in_shards(n) for n in others)
    if count in found:
        # Resharding one set over the other would drop what the other acknowledged.
        raise UsageError(
            f"the state {state_path} is kept both {in_shards(count)} and {kept}",
            "only one of them is in use: move the other set of files away (segreplay status "
            "--state on a file shows its last runs), then run again",
        )
    raise UsageError(
        f"the state {state_path} is kept {kept}, not {in_shards(count)}",
        f"run `segreplay reshard --shards {count} --state {state_path}` first, or run with "
        f"{_flag(others[0], option)}",
    )


def kept_in(state_path: str) -> int:
    """The number of shards the state is kept in now (1: one file, or no state yet), for
    a command that works on the whole state. Files of two counts are a usage error."""
    found = existing_counts(state_path)
    if len(found) > 1:
        kept = " and ".join(in_shards(n) for n in sorted(found))
        raise UsageError(
            f"the state {state_path} is kept {kept} at once",
            "keep the files your imports use (`segreplay status --state FILE` shows what "
            "each holds), move the others away, and run the same command again",
        )
    return next(iter(found), 1)


def in_shards(count: int) -> str:
    """How a state kept in `count` shards is said: `in one file`, `in 3 shards`."""
    return "in one file" if count == 1 else f"in {count} shards"


def _flag(count: int, option: str) -> str:
    if count == 1:
        return "neither --workers nor --shard"
    return f"--shard I/{count}" if option == "--shard" else f"--workers {count}"


def _split(state_path: str) -> tuple[str, str]:
    root, ext = os.path.splitext(state_path)
    if "/" in ext:  # a dot in a folder name, none in the file's
        return state_path, ""
    return root, ext
