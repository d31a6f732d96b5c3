"""Which config a results folder belongs to, so that runs of different configs never overwrite
each other's results (issue 29, "Nothing lost"; not a part of the paper).

Every path the workflow writes is fixed by names (``results/tables/all.md``,
``results/data/<dataset>/…``), so two configs run in one working directory would overwrite each
other. The first run that executes jobs in a folder writes ``results/.config``: the config's files,
as given, relative to the working directory. A later run of another config is refused before its
first job; the same config, edited, runs as before (a changed setting reruns the jobs it feeds).
A folder meant to be shared by several configs lists each of them, one per line
(``python -m igsm.results_owner share WORKDIR CONFIG...`` adds one: scripts that run derived
configs in one folder on purpose, docs/experiments/*/run.sh).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from igsm.data import write_text_atomically

STAMP = ".config"
HEADER = ("# The configs whose runs write into this folder, one per line (a config's files separated by "
          "spaces): the workflow refuses to run any other here (README: Nothing lost).\n")
NO_CONFIG_FILE = "(--config only, no config file)"


class ResultsOwnerError(RuntimeError):
    """A run of one config in a results folder that belongs to another."""


def config_name(config_files, workdir: str | os.PathLike = ".") -> str:
    """The name under which a results folder records a config: its files, relative to ``workdir``
    (the folder moves with its configs without changing its name), as one shell-quoted line."""
    files = [os.path.relpath(os.path.abspath(f), os.path.abspath(workdir)) for f in config_files]
    return shlex.join(files) if files else NO_CONFIG_FILE


def recorded_configs(stamp: Path) -> list[str]:
    """The config names a stamp file lists (comments and blank lines skipped)."""
    lines = (line.strip() for line in stamp.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def claim_results_folder(workdir: str | os.PathLike, config_files) -> None:
    """Let a run of the config made of ``config_files`` write into ``workdir``/results, or raise
    ResultsOwnerError saying whose that folder is.

    Raised when the folder's stamp names other configs only, or when the folder holds files but
    no stamp (results of a run made before this check: which config made them is unknown). An
    empty or missing folder is claimed for this config."""
    results = Path(workdir) / "results"
    stamp = results / STAMP
    name = config_name(config_files, workdir)
    if stamp.is_file():
        owners = recorded_configs(stamp)
        if name in owners:
            return
        raise ResultsOwnerError(
            f"{results}/ holds the results of config {' and '.join(owners) or '(none)'} ({stamp}), not of {name}: "
            f"run this config in a folder of its own (snakemake -d DIR; `make demo` uses demo/), "
            f"or remove {results}/ first (or add {name} to {stamp} to share the folder on purpose).")
    if results.is_dir() and any(results.iterdir()):
        raise ResultsOwnerError(
            f"{results}/ holds results but no {stamp} saying which config made them (a run from before "
            f"this check): if they are {name}'s, record it with `echo {shlex.quote(name)} > {stamp}`; "
            f"else run this config in a folder of its own (snakemake -d DIR).")
    write_text_atomically(stamp, HEADER + name + "\n")


def share_results_folder(workdir: str | os.PathLike, config_files) -> None:
    """Add a config to the record of ``workdir``/results: its runs may write there too."""
    stamp = Path(workdir) / "results" / STAMP
    name = config_name(config_files, workdir)
    if not stamp.is_file():
        write_text_atomically(stamp, HEADER + name + "\n")
    elif name not in recorded_configs(stamp):
        text = stamp.read_text()
        write_text_atomically(stamp, text + ("" if text.endswith("\n") else "\n") + name + "\n")


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] != "share":
        sys.exit("usage: python -m igsm.results_owner share WORKDIR CONFIG...  (README: Nothing lost)")
    share_results_folder(sys.argv[2], sys.argv[3:])
