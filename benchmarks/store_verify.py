"""What checking an image store's shards against their recorded sha256 costs when a job opens it
(issue 29; igsm/data/store.py, ``ImageStore._verify``).

Writes a store of random 256-px RGB images holding one full 1 GiB shard (the store's real shard
size), then times opening it: with every file's stat as recorded (the usual case: the writer
recorded it, nothing changed, so nothing is read), and after the shard was touched (its ctime
changes), which makes the open hash it again: from the page cache (warm) and, where the kernel
drops this one file's pages (``posix_fadvise`` DONTNEED, Linux), from disk (cold).

    python benchmarks/store_verify.py --repeats 3 --out store_verify.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from igsm.data import ImageStore, StoreWriter
from igsm.data.store import SHARD_BYTES

SIZE = 256


def write_one_shard_store(directory: Path) -> ImageStore:
    """A store whose first shard is full (1 GiB), plus a one-image second shard."""
    per_shard = SHARD_BYTES // (SIZE * SIZE * 3)
    rng = np.random.default_rng(0)
    with StoreWriter(directory) as writer:
        for start in range(0, per_shard + 1, 1024):
            n = min(1024, per_shard + 1 - start)
            writer.append(rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8), np.zeros(n, np.int64))
    return ImageStore(directory)


def drop_file_from_cache(path: Path) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def time_open(directory: Path) -> float:
    started = time.perf_counter()
    ImageStore(directory)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=None, help="folder for the test store (default: a temporary one)")
    parser.add_argument("--out", default="store_verify.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.work) as work:
        store = write_one_shard_store(Path(work) / "train")
        shard = store.directory / store.index["shards"][0]["file"]
        result = {"shard_gib": round(shard.stat().st_size / 2**30, 3), "cpus": os.cpu_count(),
                  "machine": platform.node(), "repeats": args.repeats,
                  "load_average_1min": os.getloadavg()[0]}  # other processes sharing the CPUs
        result["open_unchanged_ms"] = 1000 * statistics.median(time_open(store.directory)
                                                               for _ in range(args.repeats))
        for kind in ("warm", "cold"):
            times = []
            for _ in range(args.repeats):
                os.utime(shard)  # bytes unchanged, ctime changed: the next open hashes the shard
                if kind == "cold" and not drop_file_from_cache(shard):
                    break
                times.append(time_open(store.directory))
            if times:
                result[f"open_after_touch_{kind}_s"] = statistics.median(times)
                result[f"hash_rate_{kind}_gib_per_s"] = result["shard_gib"] / statistics.median(times)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
