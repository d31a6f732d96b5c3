"""Nothing lost (issue 29): runs of different configs never overwrite or delete each other's
results. A results folder records its config (results/.config, igsm.results_owner); `make demo`
runs in demo/ and `make clean-demo` deletes only that."""

import hashlib
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, command_env, run_snakemake, snakemake_executable
from igsm.results_owner import STAMP, ResultsOwnerError, claim_results_folder, config_name, recorded_configs

# ---- the record and its check ------------------------------------------------------------------


def test_a_folder_belongs_to_the_config_that_first_ran_in_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    config = tmp_path / "config" / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(8)))
    claim_results_folder(".", ["config/config.yaml"])
    assert recorded_configs(tmp_path / "results" / STAMP) == ["config/config.yaml"]
    # The same config, however it was named (the default's relative path, --configfile's absolute
    # one): the folder is its own, and an edited config is still the same config.
    config.write_text(yaml.safe_dump(tiny_config(16)))
    claim_results_folder(".", [config])
    stamp = (tmp_path / "results" / STAMP).read_bytes()
    with pytest.raises(ResultsOwnerError) as refused:
        claim_results_folder(".", [tmp_path / "config" / "demo.yaml"])
    message = str(refused.value)
    assert "config config/config.yaml" in message and "not of config/demo.yaml" in message
    assert "snakemake -d DIR" in message and "\n" not in message
    assert (tmp_path / "results" / STAMP).read_bytes() == stamp  # a refused run records nothing
    # Several files make one config: the paper's with a quick-look file is not the paper's.
    with pytest.raises(ResultsOwnerError):
        claim_results_folder(".", ["config/config.yaml", "quick.yaml"])


def test_config_names_are_relative_to_the_working_directory(tmp_path):
    demo = tmp_path / "demo"
    assert config_name([tmp_path / "config" / "demo.yaml"], demo) == "../config/demo.yaml"
    assert config_name([str(demo / "my config.yaml"), demo / "quick.yaml"], demo) == "'my config.yaml' quick.yaml"


def test_a_folder_shared_on_purpose_lists_each_config(tmp_path, monkeypatch):
    """`python -m igsm.results_owner share` (as docs/experiments/*/run.sh runs it): each config
    it adds may run in the folder, listed once however often it is added; no other may."""
    monkeypatch.chdir(tmp_path)
    claim_results_folder(".", ["config/config.yaml"])
    for _ in range(2):
        subprocess.run([sys.executable, "-m", "igsm.results_owner", "share", str(tmp_path),
                        str(tmp_path / "my config.yaml"), "quick.yaml"], env=command_env(), check=True)
    assert recorded_configs(tmp_path / "results" / STAMP) == ["config/config.yaml", "'my config.yaml' quick.yaml"]
    claim_results_folder(".", ["config/config.yaml"])
    claim_results_folder(".", ["my config.yaml", "quick.yaml"])
    with pytest.raises(ResultsOwnerError):
        claim_results_folder(".", ["quick.yaml"])


def test_results_without_a_record_are_nobody_s_to_take(tmp_path, monkeypatch):
    """Results from before the check: refused, with a command that records them as this config's
    (the advice is run here, as a user would paste it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "tables").mkdir(parents=True)
    (tmp_path / "results" / "tables" / "all.md").write_text("a paper run's table")
    with pytest.raises(ResultsOwnerError) as refused:
        claim_results_folder(".", ["my config.yaml"])
    advice = str(refused.value).split("`")[1]
    subprocess.run(["sh", "-c", advice], cwd=tmp_path, check=True)
    claim_results_folder(".", ["my config.yaml"])
    with pytest.raises(ResultsOwnerError):
        claim_results_folder(".", ["config/demo.yaml"])
    # An empty folder holds nothing to lose: it is claimed.
    (tmp_path / "empty" / "results").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "empty")
    claim_results_folder(".", ["config/demo.yaml"])


# ---- the demo beside a run of another config, as a user meets it -------------------------------

TINY_DATA = "results/data/digits/train"  # one job, seconds: enough to write into results/


def tiny_config(image_size):
    """Digits only, no experiment: its data job is the whole run."""
    return {"datasets": {"digits": {"source": "sklearn-digits", "image_size": image_size}},
            "objectives": {"np": {"weights": {"np": 1.0}}}, "experiments": {}}


def checkout_in(root):
    """A checkout of this repository in ``root`` (its files linked) whose config/ holds two tiny
    configs: config.yaml, the default (the paper's), and demo.yaml (the demo's). Their digits
    differ in size, so a run of one where the other ran would remake the data."""
    for entry in REPO.iterdir():
        if entry.name not in ("config", "results", "demo", ".snakemake", ".git", ".venv"):
            (root / entry.name).symlink_to(entry)
    (root / "config").mkdir()
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(tiny_config(8)))
    (root / "config" / "demo.yaml").write_text(yaml.safe_dump(tiny_config(16)))


def make(root, *args):
    """make in ``root`` with the Makefile's install step taken as done (the venv running these tests)."""
    venv = Path(snakemake_executable()).parent.parent
    return subprocess.run(["make", "--no-print-directory", "-C", str(root), *args, f"VENV={venv}",
                           "-o", f"{venv}/.installed"], text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=120)


def digests(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_the_demo_and_its_cleaning_leave_another_config_s_results_alone(tmp_path):
    checkout_in(tmp_path)
    # A run of the default config where it runs: the repository's root.
    run_snakemake(TINY_DATA, "--profile", "profiles/local", cwd=tmp_path, timeout=300)
    paper = digests(tmp_path / "results")
    assert TINY_DATA + "/index.json" in {f"results/{p}" for p in paper}
    assert recorded_configs(tmp_path / "results" / STAMP) == ["config/config.yaml"]

    # The demo, run by the command `make demo` runs (make -n prints it), with a target of its own.
    plan = make(tmp_path, "-n", "demo")
    assert plan.returncode == 0, plan.stdout
    demo_command = shlex.split(next(line for line in plan.stdout.splitlines() if "snakemake" in line))
    run_snakemake(TINY_DATA, *demo_command[1:], cwd=tmp_path, timeout=300)
    assert digests(tmp_path / "results") == paper
    demo_results = [p for p in tmp_path.rglob("index.json") if not p.is_relative_to(tmp_path / "results")]
    assert len(demo_results) == 1, demo_results  # the demo made its own data, elsewhere

    # The demo's config where the default's results are: refused before any job, in a line.
    proc = run_snakemake(TINY_DATA, "--profile", "profiles/local", "--configfile", "config/demo.yaml",
                         cwd=tmp_path, check=False, timeout=300)
    assert proc.returncode != 0
    assert "holds the results of config config/config.yaml" in proc.stdout
    assert "not of config/demo.yaml" in proc.stdout and "Traceback" not in proc.stdout
    assert digests(tmp_path / "results") == paper

    clean = make(tmp_path, "clean-demo")
    assert clean.returncode == 0, clean.stdout
    assert digests(tmp_path / "results") == paper
    assert not demo_results[0].exists()


def test_clean_demo_keeps_a_demo_folder_that_another_config_shares(tmp_path):
    checkout_in(tmp_path)
    stamp = tmp_path / "demo" / "results" / STAMP
    stamp.parent.mkdir(parents=True)
    stamp.write_text("../config/demo.yaml\nmine.yaml\n")
    clean = make(tmp_path, "clean-demo")
    assert clean.returncode != 0 and "nothing was deleted" in clean.stdout
    assert stamp.exists()
