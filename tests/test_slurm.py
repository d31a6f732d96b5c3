"""The workflow against a real SLURM scheduler: the single-node cluster of
../shared/tools/slurm-local/setup-slurm.sh (root; CI sets IGSM_REQUIRE_SLURM=1 so that it cannot
be skipped there), driven through profiles/slurm-test.

* The tiny demo DAG goes through sbatch (sacct lists every job, the finetunes with a GPU), one
  finetune is signalled mid-run as SLURM's ``--signal=USR1@…`` would and resubmitted by Snakemake,
  and every deterministic output equals the local run's (test_workflow.py's demo_run).
* A request larger than any node fails at submission with SLURM's message, in seconds
  (EnforcePartLimits=ALL), instead of pending forever.
* Training resources map to SLURM options (GPUs per node, nodes, srun launch) as documented.
"""

import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO, SHARED, metrics_without_wall_clock, snakemake_executable, snakemake_in, tiny_demo_config

pytestmark = pytest.mark.slow

SETUP = SHARED / "tools" / "slurm-local" / "setup-slurm.sh"
IGSM_FINETUNE = "results/finetune/digits_unet/diff-pruning-cr0.3/igsm"
# The SLURM run takes 7–8 minutes on a 2-core machine; it once ran past 15 on CI's, beside the other
# test process (before the FID and table jobs ran locally): a limit for a hung run, not a benchmark.
SLURM_RUN_LIMIT_S = 1500


def _unavailable(reason):
    if os.environ.get("IGSM_REQUIRE_SLURM") == "1":
        pytest.fail(f"IGSM_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm_cluster():
    """Starts the local cluster (idempotent: ~1 s when it is up, ~15–60 s from a bare machine)."""
    if not SETUP.exists():
        _unavailable(f"{SETUP} is absent (../shared beside the checkout)")
    if os.geteuid() != 0:
        _unavailable("starting the local SLURM cluster needs root")
    proc = subprocess.run(["bash", str(SETUP)], text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout


def sacct(job_ids):
    """{job id: (state, AllocTRES)} of whole jobs (not their steps)."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(job_ids), "-o", "JobID,State,AllocTRES"],
                         check=True, text=True, capture_output=True).stdout
    return {job: (state, tres) for job, state, tres in (line.split("|") for line in out.splitlines())}


def slurm_job_of(workdir, rule, wildcards):
    """Id of the newest SLURM job of a rule (from the plugin's per-job log names), or None."""
    logs = sorted((Path(workdir) / ".snakemake" / "slurm_logs" / f"rule_{rule}" / wildcards).glob("*.log"),
                  key=lambda p: int(p.stem))
    return logs[-1].stem if logs else None


def _signal_once_running(proc, workdir, deadline, signalled):
    """Once the IGSM finetune's loop runs (it writes training_options.json after setting its signal
    handler), send SIGUSR1 to the job's steps, as SLURM does ahead of the time limit with the
    profile's --signal=USR1@<s>; the job id goes to ``signalled["job"]``."""
    marker = workdir / IGSM_FINETUNE / "checkpoints" / "training_options.json"
    while proc.poll() is None and time.monotonic() < deadline:
        job = slurm_job_of(workdir, "finetune", "digits_unet_diff-pruning_0.3_igsm")
        if job and marker.exists():
            subprocess.run(["scancel", "--signal=USR1", job], check=True)
            signalled["job"] = job
            return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory, request):
    """The tiny demo DAG through profiles/slurm-test, the IGSM finetune preempted once."""
    workdir = tmp_path_factory.mktemp("slurm_demo")
    config = tiny_demo_config()
    # Without the demo's block-reuse variants: every SLURM job starts its own Snakemake and Python,
    # and their ~23 jobs more than doubled this run's time; test_workflow.py runs them locally.
    config["experiments"]["digits_unet"].pop("reuse")
    config["experiments"]["digits_unet"].pop("compare_samplers")  # its sampler variants too, for the same reason
    config["experiments"]["digits_unet"].pop("consistency")  # and its SSIM/PSNR jobs (one per model but the dense)
    # The finetunes ask for a (fake) GPU: --gpus=1, CUDA_VISIBLE_DEVICES set, and they still run
    # on the CPU, so their weights stay comparable with the local run.
    # 1 GB per job (requested, not enforced: the cluster has no cgroups), so that the node's
    # CPUs, not a small CI machine's memory, set how many run at once.
    config["resources"] = {stage: {"mem_mb": 1000} for stage in
                           ("download", "dense", "prune", "finetune", "sample", "fid", "tables")}
    config["resources"]["finetune"]["gpu"] = 1
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    command = [snakemake_executable(), "all_tables", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
               "--profile", str(REPO / "profiles" / "slurm-test"), "--configfile", str(workdir / "config.yaml")]
    started = time.monotonic()
    log = workdir / "snakemake.out"  # a file, not a pipe: nothing reads it until the run ends
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, text=True, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    signalled = {}
    watcher = threading.Thread(target=_signal_once_running, daemon=True,
                               args=(proc, workdir, started + SLURM_RUN_LIMIT_S, signalled))
    watcher.start()
    try:
        # The local run of the same DAG (test_outputs_equal_the_local_run compares the two) is made
        # meanwhile: most of this run's time is Snakemake waiting to see a job end (the SLURM
        # executor's status checks back off by 10 s at each check that finds none ended), which
        # leaves the CPUs to it.
        request.getfixturevalue("demo_run")
        watcher.join()
        proc.wait(timeout=max(1, SLURM_RUN_LIMIT_S - (time.monotonic() - started)))
    except BaseException:  # the local run failed, or this one ran past its limit
        proc.kill()
        proc.wait()
        raise
    output = log.read_text()
    assert proc.returncode == 0, output[-8000:]
    return workdir, output, signalled.get("job"), time.monotonic() - started


def job_stats(output):
    """{rule: jobs} of the plan Snakemake prints before it starts ("Job stats:")."""
    table = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)
            if m.group(1) != "total"}


def submitted(output):
    """[(SLURM job id, rule)] of every submission, from Snakemake's log."""
    return re.findall(r"has been submitted with SLURM jobid (\d+) \(log: \S+/slurm_logs/rule_(\w+)/", output)


def test_every_job_went_through_sbatch(slurm_run):
    workdir, output, signalled, _ = slurm_run
    jobs = dict(submitted(output))
    # Every job of the plan went to sbatch, the signalled finetune twice, but the target rule,
    # which has no command, and the local rules: each model's metadata file, the tables. (With the
    # demo's PRDC each model's FID job also writes PRDC, fid_prdc: a cluster job, PRDC's memory.)
    plan = job_stats(output)
    assert plan.pop("all_tables") == 1 and plan.pop("variant_metadata") >= 4 and plan["fid_prdc"] >= 4
    assert "fid" not in plan and "prdc" not in plan
    assert plan.pop("tables") == 1 and plan.pop("combined_table") == 1 and sum(plan.values()) > 20
    plan["finetune"] += 1
    assert Counter(jobs.values()) == plan
    states = sacct(list(jobs))
    assert sorted(states) == sorted(jobs)
    for job, (state, tres) in states.items():
        assert state == ("FAILED" if job == signalled else "COMPLETED"), (job, jobs[job], state)
        # GPUs exactly where the config asks for them (resources.finetune.gpu: 1).
        assert ("gres/gpu=1" in tres) == (jobs[job] == "finetune"), (job, jobs[job], tres)


def test_signalled_finetune_was_resumed_by_the_retry(slurm_run):
    workdir, output, signalled, _ = slurm_run
    assert signalled, "the IGSM finetune job was never seen running"
    retry = slurm_job_of(workdir, "finetune", "digits_unet_diff-pruning_0.3_igsm")
    assert retry != signalled
    log = (workdir / "results/logs/finetune/digits_unet/diff-pruning-cr0.3/igsm.log").read_text()
    assert re.search(r"resuming from \S+/step-\d{7}\.pt \(step [1-9]", log), log[-3000:]


VOLATILE_COLUMNS = ("sec_per_step", "train_minutes", "peak_memory_GiB")


# What an experiment with block reuse adds to every model's efficiency file and table row (the
# SLURM run has no reuse section): the sampler's MACs and speed beside the network's.
SAMPLER_KEYS = ("sampler_steps", "reuse_mac_fraction", "network_calls_per_step", "sampling_macs",
                "sampling_images_per_s")
SAMPLER_COLUMNS = ("base_model", "reuse", "target_mac_fraction", "sampler", "sampler_steps", "mac_fraction",
                   "sampling_images_per_s", "sampling_speedup")
# SSIM/PSNR to the dense model: consistency is left out of the SLURM run (slurm_run).
CONSISTENCY_COLUMNS = ("ssim_to_dense", "psnr_to_dense")


def _same(local, remote):
    """Whether two result files hold the same content (volatile fields aside); None: not compared."""
    suffix = local.suffix
    if suffix == ".npz":
        a, b = np.load(local), np.load(remote)
        return a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    if suffix == ".safetensors":
        a, b = load_file(local), load_file(remote)
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if suffix == ".png":
        return np.array_equal(np.asarray(Image.open(local)), np.asarray(Image.open(remote)))
    if suffix == ".jsonl":
        return metrics_without_wall_clock(local) == metrics_without_wall_clock(remote)
    if suffix == ".json":  # training summaries time their runs: wall-clock values differ
        def content(path):
            return {k: v for k, v in json.loads(path.read_text()).items() if k not in ("timing", *SAMPLER_KEYS)}
        return content(local) == content(remote)
    if suffix == ".csv":  # the tables' training-cost columns are those wall-clock values
        def table(path):
            frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
            if "reuse" in frame:
                frame = frame[frame.reuse.isna()]  # the models both runs have
            if "sampler" in frame:
                frame = frame[frame.sampler.isna()]
            return frame.drop(columns=[*VOLATILE_COLUMNS, *SAMPLER_COLUMNS, *CONSISTENCY_COLUMNS], errors="ignore").reset_index(drop=True)
        return table(local).equals(table(remote))
    return None  # .md/.tex: the same tables as the .csv, with the volatile columns in them


def test_outputs_equal_the_local_run(slurm_run, demo_run):
    workdir, _, _, _ = slurm_run
    local_dir, local_config = demo_run
    from igsm.plan import sampler_variant

    sampler_variants = {sampler_variant("", entry).lstrip("/") for entry in
                        local_config["experiments"]["digits_unet"]["compare_samplers"]["settings"]}
    compared, different = [], []
    for local in sorted((local_dir / "results").rglob("*")):
        relative = local.relative_to(local_dir)
        if not local.is_file() or relative.parts[1] in ("logs", "benchmarks") or "checkpoints" in relative.parts:
            continue
        if "exploding" in relative.parts:  # test_workflow.py's deliberately failed run
            continue
        if local.name in ("verified.json", ".config"):  # the store's stat record, results/ owner: per folder
            continue
        if relative.parts[1] == "reuse" or any(part.startswith("reuse-") for part in relative.parts):
            continue  # block-reuse variants: not in the SLURM run
        if any(part.removesuffix(".json").removesuffix(".npz") in sampler_variants for part in relative.parts):
            continue  # nor sampler variants (compare_samplers)
        if relative.parts[1] == "consistency":
            continue  # nor SSIM/PSNR to the dense model
        remote = workdir / relative
        assert remote.exists(), relative
        same = _same(local, remote)
        if same is not None:
            compared.append(str(relative))
            if not same:
                different.append(str(relative))
    assert not different, different
    # Data, every model (dense, pruned, both finetunes), samples, FIDs, tables.
    for part in ("data/", "dense/", "prune/", "finetune/", "samples/", "fid/", "tables/"):
        assert any(path.startswith(f"results/{part}") for path in compared), part


@pytest.mark.parametrize("resources, message", [
    ({"download": {"threads": 64}}, "More processors requested than permitted"),
    ({"download": {"mem_mb": 100_000_000}}, "Memory specification can not be satisfied"),
    ({"download": {"gpu": 64}}, "Requested node configuration is not available"),
], ids=["cpus", "memory", "gpus"])
def test_request_larger_than_any_node_fails_at_submission(slurm_cluster, tmp_path, resources, message):
    config = {**tiny_demo_config(), "resources": resources}
    started = time.monotonic()
    proc = snakemake_in(tmp_path, config, "results/data/digits/train", profile="slurm-test", timeout=300)
    assert proc.returncode != 0
    assert time.monotonic() - started < 120
    assert "SLURM sbatch failed" in proc.stdout and message in proc.stdout, proc.stdout[-5000:]
    assert not re.findall(r"has been submitted with SLURM jobid", proc.stdout)


def test_multi_node_finetune_is_submitted_as_documented(slurm_cluster, demo_run, tmp_path):
    """resources.finetune.nodes > 1: per-node GPUs, one task per node, the command in the batch
    step; the one-node test cluster rejects it at submission, which shows the sbatch call."""
    local_dir, config = demo_run
    for stage in ("data", "untrained", "dense", "prune"):
        shutil.copytree(local_dir / "results" / stage, tmp_path / "results" / stage)  # mtimes kept
    shutil.copy(local_dir / "results" / ".config", tmp_path / "results" / ".config")  # the same config's
    config = {**config, "resources": {"finetune": {"gpu": 2, "nodes": 2, "threads": 1}}}
    target = "results/finetune/digits_unet/diff-pruning-cr0.3/np/model"
    proc = snakemake_in(tmp_path, config, target, profile="slurm-test", timeout=300)
    assert proc.returncode != 0
    assert "Node count specification invalid" in proc.stdout, proc.stdout[-5000:]
    call = re.search(r"sbatch call:\s*(sbatch .*)", proc.stdout).group(1)
    for option in ("--nodes=2", "--ntasks=2", "--gres=gpu:2", "--cpus-per-task=1", "--signal=USR1@600"):
        assert option in call, call
    assert "--gpus=" not in call and "--ntasks-per-gpu" not in call, call
    assert set(re.findall(r"^(?:local)?rule (\w+):", proc.stdout, re.M)) == {"finetune"}  # and its retry


def dry_run_jobs(output):
    """{rule: text of its (last) job block} of `snakemake -n -p` output."""
    return {m.group(1): m.group(0) for m in re.finditer(r"^rule (\w+):\n.*?(?=\n\n|\Z)", output, re.M | re.S)}


def test_training_resources_without_a_scheduler(tmp_path):
    """What Snakemake hands the SLURM plugin and the rule's command, per experiment (dry run)."""
    config = tiny_demo_config()
    config["resources"] = {"finetune": {"gpu": 4, "cpus_per_gpu": 3, "mem_mb": 9000, "gpu_mem_mb": 7000},
                           "dense": {"gpu": 0, "gpu_mem_mb": 5000}, "sample": {"gpu": 1, "gpu_mem_mb": 3000}}
    config["experiments"]["digits_unet"]["resources"] = {"finetune": {"gpu": 2, "runtime": 5}}
    # As many GPU slots as the jobs ask for (profiles/local limits them to one).
    proc = snakemake_in(tmp_path, config, "-n", "-p", "all_tables", "--resources", "gpu=8", timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:]
    jobs = dry_run_jobs(proc.stdout)

    def resources(rule):
        return re.search(r"resources: (.*)", jobs[rule]).group(1).split(", ")

    # The experiment's gpu and runtime over the global cpus_per_gpu and mem_mb; GPU memory per GPU
    # times the experiment's GPUs (what a run's `--resources gpu_mem_mb=` counts).
    for item in ("gpu=2", "cpus_per_gpu=3", "runtime=5", "mem_mb=9000", "nproc_per_node=2", "nnodes=1",
                 "gpu_mem_mb=14000"):
        assert item in resources("finetune"), resources("finetune")
    assert not any(r.split("=")[0] in ("nodes", "mpi", "tasks", "gres") for r in resources("finetune"))
    assert "--nproc-per-node 2 --nnodes 1" in jobs["finetune"]
    # A CPU job asks for no GPU and runs one process.
    assert not any(r.startswith(("gpu=", "cpus_per_gpu=")) for r in resources("dense_trained"))
    assert "gpu_mem_mb=0" in resources("dense_trained")
    assert "gpu_mem_mb=3000" in resources("sample")
    assert "--nproc-per-node 1 --nnodes 1" in jobs["dense_trained"]


def test_plugins_reach_the_jobs_that_sbatch_runs(slurm_cluster, tmp_path):
    """The toy plugins' family, pruning method and its report picture, in jobs SLURM runs. Bug
    caught: a job's own Snakemake and Python not importing the config's plugin files (their paths
    are relative to -d, not to the job's directory), so the dense job cannot build 'toy-conv'."""
    from test_plugins import toy_config

    shutil.copytree(REPO / "tests" / "plugins", tmp_path / "plugins")
    config = toy_config()
    config["resources"] = {stage: {"mem_mb": 1000} for stage in ("download", "dense", "prune", "tables")}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    target = "results/prune/toy/fpgm-cr0.5/params.png"
    proc = subprocess.run([snakemake_executable(), target, "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           "--profile", str(REPO / "profiles" / "slurm-test"),
                           "--configfile", str(tmp_path / "config.yaml")],
                          cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-8000:]
    rules = set(dict(submitted(proc.stdout)).values())
    assert {"dense_trained", "prune", "prune_report_picture"} <= rules, proc.stdout[-4000:]
    assert (tmp_path / target).read_bytes()[:4] == b"\x89PNG"
