"""Lays what a lease needs out into calls of the device tool (README "What the next run needs").

A call carries at most 64 MiB, the working tree included, and the tree grows with every committed
run (17.6 MB at run 18, 20 MB at run 19, 31 MB at run 25), so fixed part sizes stop fitting. This
script packs the whole folders (wheels, data) into calls
first-fit by size, then cuts the streams (the teacher as a tar, the Inception weights, the shared
inputs, a snapshot) into numbered parts that fill each call's space left, and new calls for the
rest. (The teacher, 36 MB, travelled whole until run 25's tree left less than that beside it.)

    python docs/experiments/fashion_mnist/device/calls.py [.device]

It writes DIR/teacher.tar (DIR/teacher/model's files) and its parts DIR/teacher-parts/part.NN,
DIR/inception/part.NN and DIR/shared/part.NN (from DIR/inception.xz and DIR/shared.xz; `ladder.sh
launch` joins each in name order), DIR/snapshot/part.NN where DIR/snapshot.pt is there (a finetune's
snapshot to resume, `LADDER_SNAPSHOT`), and prints each call's carry list, the last one for
`ladder.sh launch`, all the others for `ladder.sh stage`. The tree's size and the carry paths are
the checkout's, relative to its root, from wherever the script runs (DIR may be relative or absolute).
Under the list it says how much of the tree the committed runs' folders are: no lease reads them,
so moved out of the checkout for the lease they leave each call that much more to carry.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from pathlib import Path

LIMIT = 64 << 20             # what one call carries, the working tree included
MARGIN = 2_000_000           # the tool counts more than the files' bytes: 66.7 MB failed, 65.6 passed
WHOLE = ("wheels", "data")
STREAMS = (("teacher.tar", "teacher-parts"), ("inception.xz", "inception"), ("shared.xz", "shared"),
           ("snapshot.pt", "snapshot"))
OPTIONAL = ("snapshot.pt",)
RUNS = "docs/experiments/fashion_mnist"
RUN_FOLDER = re.compile(re.escape(RUNS) + r"/run[0-9]+/")


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def plan(capacity: int, whole: dict[str, int], streams: dict[str, int]) -> list[list[tuple[str, int, int]]]:
    """Calls, each a list of (name, offset, length): whole items first-fit by size (offset 0, their
    whole length), then each stream in order, cut to fill the calls' space left, then new calls."""
    calls: list[list[tuple[str, int, int]]] = []
    free: list[int] = []
    for name, length in sorted(whole.items(), key=lambda item: -item[1]):
        if length > capacity:
            sys.exit(f"{name}: {length:,} bytes, more than one call carries beside the tree ({capacity:,})")
        slot = next((i for i, space in enumerate(free) if space >= length), len(calls))
        if slot == len(calls):
            calls.append([])
            free.append(capacity)
        calls[slot].append((name, 0, length))
        free[slot] -= length
    for name, length in streams.items():
        offset, slot = 0, 0
        while offset < length:
            if slot == len(calls):
                calls.append([])
                free.append(capacity)
            piece = min(free[slot], length - offset)
            if piece > 0:
                calls[slot].append((name, offset, piece))
                free[slot] -= piece
                offset += piece
            slot += 1
    return calls


def repository_root(folder: Path) -> Path:
    """The checkout FOLDER is in: the device tool copies its whole tree and takes carry paths from its root."""
    if not folder.is_dir():
        sys.exit(f"{folder}: no such folder (README 'What the next run needs' says how to make it)")
    found = subprocess.run(["git", "-C", str(folder), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if found.returncode != 0:
        sys.exit(f"{folder}: not inside a git checkout (a call carries paths of the checkout the device tool copies)")
    return Path(found.stdout.strip()).resolve()


def tree_files(root: Path) -> dict[str, int]:
    """The working tree that travels with every call, path → bytes: ROOT's tracked and
    untracked-not-ignored files there now (all of them, not only those under the folder this script
    runs from; a tracked file moved out of the checkout does not travel)."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.split(b"\0")
    return {name.decode(): (root / name.decode()).stat().st_size
            for name in listed if name and (root / name.decode()).is_file()}


def runs_bytes(files: dict[str, int]) -> int:
    """What of the tree the committed runs' folders (RUNS/runN/) are: no lease reads them."""
    return sum(length for name, length in files.items() if RUN_FOLDER.match(name))


def pack_teacher(folder: Path) -> None:
    """DIR/teacher/model's files, flat, as DIR/teacher.tar (`ladder.sh teacher-in` unpacks it)."""
    model = folder / "teacher" / "model"
    if not (model / "model.safetensors").is_file():
        sys.exit(f"{model}: no model.safetensors (README 'What the next run needs' says how to make it)")
    with tarfile.open(folder / "teacher.tar", "w") as tar:
        for path in sorted(p for p in model.iterdir() if p.is_file()):
            tar.add(path, arcname=path.name)


def main(folder: Path) -> None:
    root = repository_root(folder)  # git resolves FOLDER's links: its real path is under ROOT
    pack_teacher(folder)
    whole = {name: size(folder / name) for name in WHOLE if (folder / name).exists()}
    streams = {source: size(folder / source) for source, _ in STREAMS if (folder / source).exists()}
    missing = [name for name in (*WHOLE, *(s for s, _ in STREAMS))
               if name not in whole and name not in streams and name not in OPTIONAL]
    if missing:
        sys.exit(f"{folder}: no {', '.join(missing)} (README 'What the next run needs' says how to make them)")
    files = tree_files(root)
    tree = sum(files.values())
    calls = plan(LIMIT - tree - MARGIN, whole, streams)
    parts = {source: 0 for source, _ in STREAMS}
    carries = [[] for _ in calls]
    for source, target in STREAMS:
        for old in (folder / target).glob("part.*"):
            old.unlink()
        (folder / target).mkdir(exist_ok=True)
    with_parts = dict(STREAMS)
    for index, call in enumerate(calls):
        for name, offset, length in call:
            if name in with_parts:
                parts[name] += 1
                part = folder / with_parts[name] / f"part.{parts[name]:02d}"
                with open(folder / name, "rb") as f:
                    f.seek(offset)
                    part.write_bytes(f.read(length))
                carries[index].append(part.resolve().relative_to(root).as_posix())
            else:
                carries[index].append((folder / name).resolve().relative_to(root).as_posix())
    for index, carry in enumerate(carries):
        command = "launch" if index == len(carries) - 1 else "stage"
        total = tree + sum(length for _, _, length in calls[index])
        print(f"call {index + 1} ({command}, {total / 1e6:.1f} MB with the {tree / 1e6:.1f} MB tree): "
              f"carry {carry}")
    runs = runs_bytes(files)
    if runs > 1e6:  # each call carries the tree: at 33 MB, 8 calls; without the runs 4
        print(f"(the committed runs, {RUNS}/run*/, are {runs / 1e6:.1f} MB of the tree and no lease reads "
              f"them: `mkdir -p /tmp/runs-aside && mv {RUNS}/run[0-9]* /tmp/runs-aside/` and run this "
              f"again for fewer calls; `mv /tmp/runs-aside/run* {RUNS}/` once the lease is over)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".device"))
