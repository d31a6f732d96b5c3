"""The files the Snakemake workflow catalog and citation tools read (issue 32): they stay in step
with the repository (a version bumped in pyproject.toml alone, a config file or profile added
without its line in the READMEs, a catalog flag naming a profile that is gone), and the workflow's
files are formatted as the catalog checks them (snakefmt, pyproject's [tool.snakefmt])."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from conftest import REPO


def test_citation_names_the_package_version():
    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert citation["cff-version"] == "1.2.0" and citation["version"] == version
    assert citation["license"] == "MIT" and "MIT License" in (REPO / "LICENSE").read_text()


def test_catalog_flags_and_readmes_name_what_exists():
    catalog = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    for profile in re.findall(r"--profile (\S+)", catalog["usage"]["mandatory-flags"]["flags"]):
        assert (REPO / profile / "config.yaml").is_file(), profile
    config_readme = (REPO / "config" / "README.md").read_text()
    assert all(f"`{path.name}`" in config_readme for path in (REPO / "config").glob("*.yaml"))
    profiles_readme = (REPO / "profiles" / "README.md").read_text()
    assert all(f"`{path.name}/`" in profiles_readme for path in (REPO / "profiles").iterdir() if path.is_dir())


def test_workflow_files_are_snakefmt_formatted():
    snakefmt = Path(sys.executable).with_name("snakefmt")
    proc = subprocess.run([str(snakefmt), "--check", "Snakefile", "rules"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, f"run `.venv/bin/snakefmt Snakefile rules`:\n{proc.stdout}{proc.stderr}"
