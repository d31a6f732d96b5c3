"""Config validation and the workflow's shape: schema errors name the key, lint is clean, and the
paper config plans the full job graph."""

import re

import pytest
import yaml

from conftest import REPO, run_snakemake


def demo_config():
    return yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


def dry_run(config, tmp_path, *targets):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return run_snakemake("-n", "--configfile", str(path), *targets, check=False)


def experiment(config):
    return config["experiments"]["digits_unet"]


def set_unknown_key(c):
    experiment(c)["finetune"]["trainig"] = {"num_steps": 5}


def set_wrong_type(c):
    experiment(c)["sample"]["num_images"] = "many"


def set_ratio_above_range(c):
    experiment(c)["finetune"]["runs"][0]["channel_ratio"] = 1.2


def set_negative_ratio(c):
    experiment(c)["finetune"]["runs"][0]["channel_ratio"] = -0.1


def set_unknown_objective(c):
    experiment(c)["finetune"]["runs"][0]["objectives"] = ["np", "igsmm"]


def set_unknown_loss_term(c):
    c["objectives"]["igsm"]["weights"]["jm3"] = 0.1


def set_unknown_criterion(c):
    experiment(c)["prune"]["criterion"] = "l1"


def set_unknown_efficiency_network(c):
    experiment(c)["efficiency"] = {"network": "fast"}


def set_unknown_dataset(c):
    experiment(c)["dataset"] = "digitz"


@pytest.mark.parametrize("mutate, expected", [
    (set_unknown_key, r"'trainig' was unexpected"),
    (set_wrong_type, r"'many' is not of type 'integer'.*\['sample'\]\['num_images'\]"),
    (set_ratio_above_range, r"1\.2 is greater than or equal to the maximum of 1.*\['channel_ratio'\]"),
    (set_negative_ratio, r"-0\.1 is less than the minimum of 0.*\['channel_ratio'\]"),
    (set_unknown_objective, r"finetune\.runs\[0\]\.objectives: unknown objective 'igsmm'"),
    (set_unknown_loss_term, r"'jm3' was unexpected"),
    (set_unknown_criterion, r"'l1' is not one of.*\['prune'\]\['criterion'\]"),
    (set_unknown_dataset, r"experiments\.digits_unet\.dataset: unknown dataset 'digitz'"),
    (set_unknown_efficiency_network, r"'fast' is not one of.*\['efficiency'\]\['network'\]"),
])
def test_bad_config_is_rejected_naming_the_key(mutate, expected, tmp_path):
    config = demo_config()
    mutate(config)
    proc = dry_run(config, tmp_path)
    assert proc.returncode != 0
    assert re.search(expected, proc.stdout, re.S), proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout


def test_demo_config_is_valid(tmp_path):
    proc = dry_run(demo_config(), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_lint_has_no_findings():
    proc = run_snakemake("--lint", "--configfile", "config/demo.yaml", check=False)
    assert proc.returncode == 0 and "Congratulations" in proc.stdout, proc.stdout[-5000:]


def job_counts(output):
    table = output.split("Job stats:")[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_paper_config_dry_run_lists_the_full_job_graph():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    exp = config["experiments"]["cifar10_unet"]
    runs = exp["finetune"]["runs"]
    finetunes = sum(len(run["objectives"]) for run in runs)
    proc = run_snakemake("-n", "all_tables")  # no --configfile: the paper config is the default
    counts = job_counts(proc.stdout)
    scored = 1 + finetunes  # dense + every finetuned student
    assert counts == {
        "download": 1, "dense_pretrained": 1, "prune": len(runs), "finetune": finetunes,
        "sample": scored, "sample_gather": scored, "fid": scored, "efficiency": scored, "fid_reference": 1,
        "tables": 1, "combined_table": 1, "all_tables": 1, "total": counts["total"],
    }
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_per_dataset_target_exists():
    proc = run_snakemake("-n", "dataset_cifar10")
    assert "tables" in job_counts(proc.stdout)
