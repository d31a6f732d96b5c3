"""Plugins: members of the registries (model families, pruning methods, block-reuse methods, …)
added from outside the package (issue 30: a new family or method is one module).

The config's top-level ``plugins:`` lists Python files (relative to the working directory, where
Snakemake runs and ``results/`` lives) or importable module names; each registers its members when
imported (``igsm.families.register``, ``igsm.pruning.register``, ``igsm.reuse_methods.register``).
They are imported

* when a config is validated (igsm.config.validate_schema: the Snakefile's parse, ``igsm
  check-config``), before the schema, whose enums the registries fill, and the checks that ask the
  registries; then the Snakefile exports them (:func:`export`) in :data:`ENVIRONMENT_VARIABLE`,
* in every job process (``python -m igsm``, igsm/__main__.py: :func:`load_from_environment`, before
  the commands are built), which inherits that variable from Snakemake, torchrun and SLURM alike
  (a SLURM job's Snakemake also reads the config again).

A file that does not exist or fails to import, and a member registered under a name that is taken,
is an error naming the key (``plugins[i]``) and the file, before any job.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

PLUGINS_KEY = "plugins"
ENVIRONMENT_VARIABLE = "IGSM_PLUGINS"  # a JSON list: absolute file paths and module names
# A module name: dotted identifiers not ending in ".py" (anything else, e.g. with a '/', is a file).
MODULE_NAME = re.compile(r"^(?!.*\.py$)[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class PluginError(ValueError):
    """A plugin that cannot be loaded: one line naming the key, the file and the cause."""


def resolve(entries, key: str = PLUGINS_KEY, base: str | os.PathLike | None = None) -> list[str]:
    """The config's ``plugins`` entries as :func:`load` takes them: files as absolute paths (relative
    ones from ``base``, default the working directory), checked to exist; module names as given."""
    if entries is None:
        return []
    if not isinstance(entries, list) or not all(isinstance(entry, str) and entry.strip() for entry in entries):
        raise PluginError(f"{key}: {entries!r} is not a list of Python files or module names")
    base = Path(base) if base is not None else Path.cwd()
    resolved = []
    for i, entry in enumerate(entries):
        if MODULE_NAME.match(entry):
            resolved.append(entry)
            continue
        path = (base / Path(entry).expanduser()).resolve()
        if path.suffix != ".py" or not path.is_file():
            what = "is not a .py file" if path.exists() else "does not exist"
            raise PluginError(f"{key}[{i}]: plugin file {entry} {what} (looked for {path}); give a Python "
                              f"file relative to the working directory {base}, or a module name")
        resolved.append(str(path))
    return resolved


def load(entries, key: str = PLUGINS_KEY, base: str | os.PathLike | None = None) -> list[str]:
    """Import every plugin of ``entries`` (see :func:`resolve`) once per process; returns the
    resolved entries. :class:`PluginError` naming ``key[i]`` and the entry if one fails."""
    resolved = resolve(entries, key, base)
    for i, (entry, spec) in enumerate(zip(entries or [], resolved)):
        try:
            _import(spec)
        except PluginError:
            raise
        except Exception as err:  # a plugin runs arbitrary code: any failure is "does not load"
            raise PluginError(f"{key}[{i}]: plugin {entry} failed to import: {type(err).__name__}: "
                              f"{_first_line(err)}") from err
    return resolved


def export(resolved: list[str]) -> None:
    """Make the processes started from this one (the workflow's jobs) load ``resolved`` too."""
    if resolved:
        os.environ[ENVIRONMENT_VARIABLE] = json.dumps(resolved)
    else:
        os.environ.pop(ENVIRONMENT_VARIABLE, None)


def load_from_environment() -> None:
    """Import the plugins that :func:`export` named (a job process; nothing if none)."""
    value = os.environ.get(ENVIRONMENT_VARIABLE, "")
    if not value:
        return
    try:
        entries = json.loads(value)
    except json.JSONDecodeError:
        raise PluginError(f"{ENVIRONMENT_VARIABLE}: {value[:80]!r} is not a JSON list of plugins "
                          f"(the workflow sets it from the config's {PLUGINS_KEY})") from None
    load(entries, key=f"{PLUGINS_KEY} (from {ENVIRONMENT_VARIABLE})")


def module_name(path: str) -> str:
    """The module name a plugin file is imported under: its stem and a digest of its path, so two
    files of one name stay two modules and a second load of one file finds the first."""
    digest = hashlib.sha1(path.encode()).hexdigest()[:8]
    stem = re.sub(r"\W", "_", Path(path).stem)
    return f"igsm_plugin_{stem}_{digest}"


def _import(spec: str) -> None:
    if MODULE_NAME.match(spec):
        importlib.import_module(spec)
        return
    name = module_name(spec)
    if name in sys.modules:
        return
    module_spec = importlib.util.spec_from_file_location(name, spec)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before running it: dataclasses and pickling look it up by name
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # a failed plugin is not half-registered as loaded
        raise


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"
