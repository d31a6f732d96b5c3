#!/usr/bin/env python3
"""A small mutation check (issue 19): apply plausible one-line bugs to igsm/ one at a time and run
the tests that should catch each; print which tests caught which mutant and the score.

    .venv/bin/python tools/mutation_check.py                  # every mutant of tools/mutants.yaml
    .venv/bin/python tools/mutation_check.py ema-weight-inverted table-difference-sign
    .venv/bin/python tools/mutation_check.py --list

The checkout is never modified: the repository (without .git, .venv, results) is copied to a
temporary folder, with ../shared linked beside it as the tests expect; each mutant edits the copy
(the file is restored before the next one) and pytest runs there with PYTHONPATH pointing at the
copy, so `import igsm` and the tests' subprocesses (conftest.command_env) use the mutated package.
Before the mutants, each distinct test selection runs once unmutated: a test that already fails
there is reported and cannot count as a catch. Not part of CI (minutes: each mutant runs its tests).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
IGNORED = {".git", ".venv", "results", ".snakemake", ".pytest_cache", "__pycache__", ".device",
           "benchmarks", "docs", "igsm.egg-info"}


def load_mutants(path: Path) -> list[dict]:
    mutants = yaml.safe_load(path.read_text())
    for m in mutants:
        missing = {"id", "file", "find", "replace", "tests"} - set(m)
        if missing:
            raise SystemExit(f"{path}: mutant {m.get('id')!r} lacks {sorted(missing)}")
    return mutants


def copy_repo(root: Path) -> Path:
    copy = root / "repo"
    shutil.copytree(REPO, copy, ignore=lambda d, names: [n for n in names if n in IGNORED])
    shared = REPO.parent / "shared"
    if shared.exists():
        (root / "shared").symlink_to(shared)
    return copy


def run_tests(copy: Path, args: list[str], timeout: int, tag: str) -> tuple[str, list[str], float]:
    """('passed' | 'failed' | 'timeout' | 'error', failing test ids, seconds)."""
    report = copy / f".junit-{tag}.xml"
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *args]
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=copy, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", [], time.perf_counter() - started
    seconds = time.perf_counter() - started
    failing = []
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failing.append(f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}")
        report.unlink()
    if proc.returncode == 0:
        return "passed", failing, seconds
    if proc.returncode in (1,) and failing:
        return "failed", failing, seconds
    return "error", failing or [proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "?"], seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ids", nargs="*", help="mutant ids (default: all)")
    parser.add_argument("--mutants", type=Path, default=REPO / "tools" / "mutants.yaml")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant's tests")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    options = parser.parse_args()

    mutants = load_mutants(options.mutants)
    if options.list:
        for m in mutants:
            print(f"{m['id']:40s} {m['file']}: {' '.join(m['tests'])}")
        return 0
    if options.ids:
        unknown = set(options.ids) - {m["id"] for m in mutants}
        if unknown:
            raise SystemExit(f"unknown mutant(s) {sorted(unknown)}; see --list")
        mutants = [m for m in mutants if m["id"] in options.ids]

    # The checkout's files must hold each text once, so a mutant that no longer applies is named.
    for m in mutants:
        count = (REPO / m["file"]).read_text().count(m["find"])
        if count != 1:
            raise SystemExit(f"mutant {m['id']}: {m['file']} holds its text {count} times (expected 1); "
                             "update tools/mutants.yaml")

    results = []
    with tempfile.TemporaryDirectory(prefix="igsm-mutants-") as tmp:
        copy = copy_repo(Path(tmp))
        check = subprocess.run([sys.executable, "-c", "import igsm.training; print(igsm.training.__file__)"], cwd=copy,
                               env={**os.environ, "PYTHONPATH": str(copy)}, text=True, capture_output=True)
        if not check.stdout.strip().startswith(str(copy)):
            raise SystemExit(f"the copy's igsm is not the one imported ({check.stdout or check.stderr})")
        broken = {}  # per test selection: tests that fail without any mutant
        if not options.no_baseline:
            for selection in dict.fromkeys(tuple(map(str, m["tests"])) for m in mutants):
                status, failing, seconds = run_tests(copy, list(selection), options.timeout, "baseline")
                broken[selection] = set(failing)
                print(f"baseline {' '.join(selection)}: {status} in {seconds:.0f} s"
                      + (f"; failing without a mutant: {failing}" if failing else ""), flush=True)
        for m in mutants:
            path = copy / m["file"]
            original = path.read_text()
            try:
                path.write_text(original.replace(m["find"], m["replace"], 1))
                status, failing, seconds = run_tests(copy, [str(a) for a in m["tests"]], options.timeout, m["id"])
            finally:
                path.write_text(original)
            catchers = [f for f in failing if f not in broken.get(tuple(map(str, m["tests"])), set())]
            caught = status in ("failed", "error", "timeout") and (bool(catchers) or status != "failed")
            results.append((m, caught, status, catchers, seconds))
            print(f"{'CAUGHT ' if caught else 'SURVIVED'} {m['id']:40s} {seconds:5.0f} s  "
                  f"{', '.join(catchers) if catchers else status}", flush=True)

    caught = sum(r[1] for r in results)
    print(f"\nscore: {caught}/{len(results)} mutants caught ({100 * caught / max(1, len(results)):.0f}%)\n")
    print("| mutant | file | caught by |\n|---|---|---|")
    for m, was_caught, status, catchers, _ in results:
        shown = ", ".join(catchers[:4]) + (f" (+{len(catchers) - 4} more)" if len(catchers) > 4 else "")
        print(f"| {m['id']} | {m['file']} | {shown if was_caught else '**survived**'}"
              f"{'' if catchers or not was_caught else ' (' + status + ')'} |")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
