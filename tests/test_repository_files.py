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
from igsm.paper.tables import table_names


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


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation but '-' and '_' dropped,
    spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_contents_links_reach_headings():
    """The README's contents list links by anchor: a heading renamed without its link (or a link
    mistyped) is a dead link on GitHub; and every Snakemake target rule the targets table names exists."""
    readme = (REPO / "README.md").read_text()
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", readme, flags=re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", readme)
    assert len(links) >= 10 and not [link for link in links if link not in anchors]
    assert github_anchor("Sampling and FID (paper Sec. 5.1)") == "sampling-and-fid-paper-sec-51"
    workflow = [REPO / "Snakefile", *(REPO / "rules").glob("*.smk")]
    rules = set(re.findall(r"^rule (\w+):", "".join(p.read_text() for p in workflow), re.M)) | set(table_names())
    table = readme.split("### Targets", 1)[1].split("\n### ", 1)[0]
    for target in re.findall(r"^\| `(\w+)`", table, flags=re.M):
        assert target in rules, f"README's targets table names `{target}`, which no rule in rules/ defines"
