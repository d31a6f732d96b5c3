"""Per-rule software environments (issue 32): every rule's `conda:` environment provides every
third-party module its command imports — found from the code, not from a hand list.

A rule's command is `python -m igsm <command>` (igsm.cli's COMMANDS name the stage module it runs)
or a `script:`; what it imports is the static closure of its entry modules over igsm's own modules
(module- and function-level imports alike: a lazy import still runs on some path), keeping the
top-level names that are neither igsm's nor the standard library's. What an environment provides:
the modules of each distribution its pip list names and of everything those require, as installed
here (`importlib.metadata`). A new import without an environment entry fails here, naming the rule,
its environment and the module; so does a rule that runs code without an environment.
"""

import ast
import re
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from conftest import REPO

STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def module_file(name: str) -> Path | None:
    path = REPO / Path(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def imported_names(path: Path, package: str) -> set[str]:
    """Every module name an import statement of ``path`` (module ``package``) names, relative imports
    resolved, ``from a import b`` also as ``a.b`` (b may be a module); and igsm modules named by a
    string (a registry's members, imported by name on first use: igsm.families.MEMBER_MODULES)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"igsm(\.\w+)+", node.value):
            names.add(node.value)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts if path.name == "__init__.py" else parts[:-1]
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


@lru_cache(maxsize=None)
def third_party_imports(entry: str, path: Path | None = None) -> frozenset[str]:
    """Top-level third-party modules of the closure of module ``entry`` (or the file ``path``)."""
    seen, found, todo = set(), set(), [(entry, path)]
    while todo:
        name, file = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        file = file or module_file(name)
        if file is None:
            continue
        for imported in imported_names(file, name):
            top = imported.split(".")[0]
            if top == "igsm":
                parts = imported.split(".")
                todo += [(".".join(parts[:i]), None) for i in range(1, len(parts) + 1)
                         if module_file(".".join(parts[:i]))]
            elif top and top not in STDLIB:
                found.add(top)
    return frozenset(found)


@lru_cache(maxsize=None)
def provided_modules(env_file: Path) -> frozenset[str]:
    """Top-level modules of the environment's pip distributions and of all they require."""
    spec = yaml.safe_load(env_file.read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
    todo = [re.split(r"[=<>!~\[ ;]", requirement, maxsplit=1)[0] for requirement in pip]
    distributions, modules = set(), set()
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in distributions:
            continue
        distributions.add(name)
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here (an optional extra's): provides nothing we can see
        top_level = distribution.read_text("top_level.txt")
        files = distribution.files or []
        modules.update(top_level.split() if top_level else
                       {Path(str(f)).parts[0].removesuffix(".py") for f in files
                        if not str(f).startswith(("..", "/")) and ".dist-info" not in str(f)})
        for requirement in distribution.requires or []:
            if "extra ==" not in requirement:
                todo.append(re.split(r"[=<>!~\[ ;(]", requirement, maxsplit=1)[0])
    return frozenset(modules)


def rules():
    """(rule, smk file, its conda env file or None, entry modules [(name, path)]) of every rule that
    runs code (a shell command or a script; `run:` blocks run in Snakemake's own process)."""
    from igsm.cli import COMMANDS

    stages = {command.name: "igsm.stages." + command.stage.split(":")[0] for command in COMMANDS}
    found = []
    for smk in sorted((REPO / "rules").glob("*.smk")):
        text = smk.read_text()
        for match in re.finditer(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", text, re.S | re.M):
            name, body = match.groups()
            conda = re.search(r'conda:\s*\n\s*"\.\./(envs/[\w.-]+\.yaml)"', body)
            commands = re.findall(r"python -m igsm ([\w-]+)", body)
            script = re.search(r'script:\s*\n\s*"\.\./(scripts/[\w.-]+\.py)"', body)
            entries = [("igsm.__main__", None)] if commands else []
            entries += [(stages[command], None) for command in commands]
            entries += [(script.group(1), REPO / script.group(1))] if script else []
            if entries:
                found.append((name, smk.name, REPO / conda.group(1) if conda else None, entries))
    return found


RULES = rules()


def test_every_rule_that_runs_code_is_found():
    names = {rule for rule, *_ in RULES}
    assert {"download", "finetune", "sample", "fid", "tables", "paper_table", "clip_score", "consistency",
            "reuse_plan", "efficiency"} <= names


@pytest.mark.parametrize("rule, smk, env, entries", RULES, ids=[rule for rule, *_ in RULES])
def test_rule_environment_provides_what_its_command_imports(rule, smk, env, entries):
    assert env is not None, f"rule {rule} ({smk}) runs code but names no conda: environment"
    needed = set().union(*(third_party_imports(name, path) for name, path in entries))
    missing = sorted(needed - provided_modules(env))
    assert not missing, (f"rule {rule} ({smk}): {env.relative_to(REPO)} provides no {', '.join(missing)}, "
                         f"which its command imports")
