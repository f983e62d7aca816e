"""Reading straight from the bucket, against moto's S3 server on 127.0.0.1:

(n) a dry run reading the archive from s3:// against the same dry run from local files,
    taken in turn in the same run (target >= 0.8: the store must not be the bottleneck)
(o) listing 5,000 objects in 1,000 day folders: segreplay's parallel listing, against
    one flat paginated listing of the same prefix

  python -m benchmarks.objstore_bench [--lines 200000] [--users 20000] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.__main__ import ROOT, archive, run_measured

_DAYS = 1_000
_PER_DAY = 5


def _server():
    sys.path.insert(0, str(ROOT / "tests"))
    from s3server import LocalS3

    return LocalS3()


def s3_dry_run(folder: Path, work: Path, repeat: int) -> None:
    s3 = _server()
    try:
        print("\nuploading the archive to moto's S3 server on 127.0.0.1 ...", flush=True)
        s3.upload_tree("bench", folder, "segment-logs")
        common = ["--dry-run", "--dead-letter", str(work / "dl.jsonl"), "--anonymous", "alias"]
        local_s = remote_s = float("inf")
        for attempt in range(repeat):  # in turn, so a busy minute hits both sides
            state = ["--state", str(work / f"dry-{attempt}.sqlite")]
            local, seconds, _ = run_measured(["import", str(folder), *common, *state])
            local_s = min(local_s, seconds)
            remote, seconds, rss = run_measured(
                ["import", "s3://bench/segment-logs", *common, *state], env=s3.env()
            )
            remote_s = min(remote_s, seconds)
        assert remote["lines"] == local["lines"], (remote["lines"], local["lines"])
        local_rate, remote_rate = local["lines"] / local_s, remote["lines"] / remote_s
        print(f"(n) dry run from s3:// (moto, 127.0.0.1)   {remote_rate:>11,.0f} lines/s")
        print(f"    the same from local files             {local_rate:>12,.0f} lines/s")
        print(
            f"    s3 / local                            {remote_rate / local_rate:>12.2f}  (target >= 0.8)"
        )
        print(f"    peak RSS reading from s3://           {rss / 2**20:>12,.0f} MB")
    finally:
        s3.stop()


def listing(repeat: int) -> None:
    import obstore

    from segreplay.objstore import ObjectSource, ObjectURL

    s3 = _server()
    try:
        s3.client.create_bucket(Bucket="listing")
        keys = [
            f"segment-logs/src/{1_600_000_000_000 + day * 86_400_000}/part-{n}.gz"
            for day in range(_DAYS)
            for n in range(_PER_DAY)
        ]
        print(f"\nputting {len(keys):,} objects in {_DAYS:,} day folders ...", flush=True)
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda k: s3.client.put_object(Bucket="listing", Key=k, Body=b"{}\n"), keys
                )
            )
        saved = dict(os.environ)
        os.environ.update(s3.env())
        try:
            objects = ObjectSource()
            store = objects.store(ObjectURL.parse("s3://listing"))
            parallel_s = flat_s = float("inf")
            for _ in range(repeat):
                started = time.perf_counter()
                found = objects.discover("s3://listing/segment-logs")
                parallel_s = min(parallel_s, time.perf_counter() - started)
                started = time.perf_counter()
                flat = obstore.list(store, "segment-logs").collect()
                flat_s = min(flat_s, time.perf_counter() - started)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        assert len(found) == len(flat) == len(keys)
        print(f"(o) listing {len(keys):,} objects, ranges in parallel     {parallel_s:>6.2f} s")
        print(f"    one flat paginated listing (1,000 a page)      {flat_s:>6.2f} s")
    finally:
        s3.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=2)
    options = parser.parse_args()
    folder = archive(options.lines, options.users)
    work = Path(tempfile.mkdtemp(prefix="segreplay-bench-s3-"))
    try:
        s3_dry_run(folder, work, options.repeat)
        listing(options.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
