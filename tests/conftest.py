import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR_SUBSET = SHARED / "data" / "cifar-10-python-subset.tar.gz"
CIFAR_SUBSET_SHA256 = "5e9a9645f44e81e5f73344fd5caa88689b68298a3fc0f0017e4124e87cb2a6c4"


def snakemake_executable() -> str:
    found = shutil.which("snakemake") or str(Path(sys.executable).with_name("snakemake"))
    return found


def run_snakemake(*args, cwd=REPO, check=True, timeout=1800):
    """Run snakemake as a user would; returns the CompletedProcess (stdout+stderr merged)."""
    proc = subprocess.run([snakemake_executable(), *args], cwd=cwd, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-8000:]}")
    return proc


@pytest.fixture
def cifar_subset():
    if not CIFAR_SUBSET.exists():
        pytest.skip(f"{CIFAR_SUBSET} not present (../shared beside the checkout)")
    return CIFAR_SUBSET
