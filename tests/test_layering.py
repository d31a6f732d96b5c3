"""The package's layers (issue 30, item 7), enforced by import-linter's contracts in pyproject.toml
(``[tool.importlinter]``): cli → stages → workflow → algorithms → networks → io, no import cycle
between any two modules (imports inside functions count), and the pure samplers never import block
reuse. These tests run the contracts on the package, and on copies of it with an import planted that
each contract must refuse, naming the offending import.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO

pytest.importorskip("importlinter", reason="import-linter is in the test extra: pip install -e '.[test]'")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on ``root``'s igsm package, with ``root``'s pyproject.toml.

    ``python -S``: an editable install (``pip install -e``) adds its checkout's igsm/ to the
    ``igsm`` namespace package through a .pth file in site-packages, so a copy of the package (or
    a second checkout) would be read together with the installed one; without site processing
    only ``root`` and the libraries' own folders are on the path."""
    libraries = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *libraries])}
    code = ("import sys; from importlinter.cli import lint_imports_command; "
            "sys.argv[0] = 'lint-imports'; sys.exit(lint_imports_command())")
    return subprocess.run([sys.executable, "-S", "-c", code, "--no-cache", "--no-logo", "pyproject.toml"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_package_keeps_its_layers():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Contracts: [1-9]\d* kept, 0 broken", result.stdout), result.stdout


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory) -> Path:
    """The package's modules and the contracts, in a folder of their own."""
    root = tmp_path_factory.mktemp("layers")
    shutil.copytree(REPO / "igsm", root / "igsm", ignore=shutil.ignore_patterns("__pycache__", "*.csv", "*.yaml"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


# (module file, import planted, the contract that refuses it, how lint-imports names the import)
PLANTED = [
    # an upward import at module level: the diffusion process needing the command line
    ("igsm/diffusion.py", "import igsm.cli\n", "igsm's layers", "igsm.diffusion -> igsm.cli"),
    # a cycle inside one layer, through an import inside a function: the network code asking the
    # family registry, whose U-ViT member imports it (a cycle is named by the dependency that breaks it)
    ("igsm/uvit.py", "def _late():\n    from igsm.families import family_of\n",
     "no import cycle", "- .uvit -> .families (1 import)"),
    # the samplers applying a block-reuse plan themselves (the cycle issue 30 removed)
    ("igsm/sampling/samplers.py", "def _late():\n    from igsm.reuse import apply_plan\n",
     "the samplers are pure", "igsm.sampling.samplers -> igsm.reuse"),
]


@pytest.mark.parametrize("module, planted, contract, named", PLANTED, ids=["upward", "cycle", "samplers"])
def test_a_planted_import_breaks_its_contract_naming_the_import(package_copy, module, planted, contract, named):
    path = package_copy / module
    original = path.read_text()
    path.write_text(original + "\n\n" + planted)
    try:
        result = lint_imports(package_copy)
    finally:
        path.write_text(original)
    assert result.returncode == 1, result.stdout + result.stderr
    broken = [line for line in result.stdout.splitlines() if line.endswith(" BROKEN")]
    assert any(line.startswith(contract) for line in broken), result.stdout
    assert named in result.stdout, result.stdout


def test_a_new_top_level_module_must_be_given_a_layer(package_copy):
    """The layers contract is exhaustive: a module nobody placed is an error, not a free pass."""
    stray = package_copy / "igsm" / "stray.py"
    stray.write_text("import igsm.cli\n")
    try:
        result = lint_imports(package_copy)
    finally:
        stray.unlink()
    assert result.returncode == 1 and "igsm.stray" in result.stdout, result.stdout


@pytest.mark.parametrize("config", ["config.yaml", "demo.yaml"])
def test_the_workflow_builds_its_dag_without_torch(config, tmp_path):
    # Bug caught: a module the Snakefile imports at parse time (igsm.config, a registry, the plan)
    # importing torch, diffusers or torch-pruning at module level: seconds added to every dry run
    # and every job's own Snakemake start, and the DAG tied to the training stack.
    heavy = ("torch", "diffusers", "timm", "torch_pruning", "cleanfid")
    code = ("import atexit, sys\n"
            f"atexit.register(lambda: print('HEAVY', sorted({{m.split('.')[0] for m in sys.modules}} & {set(heavy)!r})))\n"
            "from snakemake.cli import main\n"
            f"sys.argv = ['snakemake', 'all_tables', '-n', '--quiet', '--directory', {str(tmp_path)!r}, "
            f"'--configfile', {str(REPO / 'config' / config)!r}]\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]
