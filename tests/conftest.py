import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny in-process networks: on a shared CPU, more threads
    only add contention (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def cifar_subset():
    if not CIFAR_SUBSET.exists():
        skip_or_fail_in_ci(f"{CIFAR_SUBSET} not present (../shared beside the checkout)")
    return CIFAR_SUBSET


# ---- the tiny demo DAG (test_workflow.py, test_slurm.py) ------------------------------------


def demo_config() -> dict:
    """config/demo.yaml as written (the schema has not filled its defaults)."""
    return yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


def config_errors(config: dict) -> str:
    """What the workflow would refuse ``config`` for before its first job (the schema, then
    igsm.config's cross-field checks), one error a line; '' for a config it accepts."""
    from igsm.config import ConfigError, check_config, validate_schema

    try:
        validate_schema(config)
        check_config(config)
    except ConfigError as err:
        return str(err)
    return ""


def tiny_demo_config():
    """config/demo.yaml with tiny settings: every stage for real, in a few minutes on a CPU."""
    config = demo_config()
    exp = config["experiments"]["digits_unet"]
    exp["dense"]["training"].update(num_steps=150, log_every=25, checkpoint_every=50)
    exp["prune"].update(num_images=16)
    exp["finetune"]["training"].update(num_steps=10, log_every=5, checkpoint_every=5)
    # Inception features on the CPU are most of this DAG's time (~0.1 s an image): few images.
    exp["sample"].update(num_images=32, num_steps=10, batch_size=32)
    exp["fid"].update(num_reference=64)
    # One sampler variant that samples (DPM-Solver) and one that is the dense model's own sampler
    # (DDIM at its 10 steps: the dense model's samples, no job of its own).
    exp["compare_samplers"]["settings"] = [{"sampler": "ddim", "num_steps": 10},
                                           {"sampler": "dpm-solver", "num_steps": 10}]
    return config


def modules_loaded_by_command(*args, modules=("torch", "torchvision", "cleanfid")):
    """Run ``igsm <args>`` in a fresh interpreter; the top-level packages of ``modules`` it loaded
    (a job's start-up: torch alone is ~2 s of CPU, with torchvision and clean-fid ~4 s)."""
    code = (f"import sys; from igsm.cli import main; main({[str(a) for a in args]!r}, standalone_mode=False); "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(modules)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def snakemake_in(workdir, config, *args, profile="local", timeout=1800):
    """Snakemake on the repository's Snakefile in ``workdir`` with ``config`` (targets in args)."""
    path = Path(workdir) / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return run_snakemake(*args, "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                         "--profile", str(REPO / "profiles" / profile), "--configfile", str(path),
                         check=False, timeout=timeout)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The tiny demo DAG run locally once per session: (workdir, config)."""
    workdir = tmp_path_factory.mktemp("demo")
    config = tiny_demo_config()
    proc = snakemake_in(workdir, config, "all_tables")
    assert proc.returncode == 0, proc.stdout[-8000:]
    return workdir, config


# ---- tiny training runs through `python -m igsm train` (test_resume.py, test_ddp.py) ----------

# Tiny U-Nets with the paper's block types (plain and attention down/up blocks), kilobytes each:
# an RGB one for the pruning tests (widths 32/64, GroupNorm 8) and a one-channel one for the
# sampling and block-reuse tests (16/32, GroupNorm 4).
TINY_RGB_UNET = dict(
    sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)
TINY_GRAY_UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[16, 32], layers_per_block=1,
                      down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                      up_block_types=["AttnUpBlock2D", "UpBlock2D"], norm_num_groups=4, attention_head_dim=None)
TINY_ARCHITECTURE = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=[8, 16],
                         layers_per_block=1, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                         up_block_types=["AttnUpBlock2D", "UpBlock2D"], norm_num_groups=4,
                         attention_head_dim=None)


@pytest.fixture(scope="session")
def tiny_training(tmp_path_factory):
    """Folder with a teacher, students with and without dropout, and 40 random 16×16 images."""
    import numpy as np
    import torch

    from igsm.data import write_store
    from igsm.models import build_unet, save_model

    folder = tmp_path_factory.mktemp("tiny_training")
    torch.manual_seed(0)
    save_model(build_unet(TINY_ARCHITECTURE), folder / "student")
    torch.manual_seed(0)
    save_model(build_unet({**TINY_ARCHITECTURE, "dropout": 0.1}), folder / "student_dropout")
    torch.manual_seed(1)
    save_model(build_unet(TINY_ARCHITECTURE), folder / "teacher")
    images = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 1), dtype=np.uint8)
    # Shards of 7 images: batches and resumed runs read across shard boundaries.
    write_store(folder / "data", [(images, np.zeros(len(images), np.int64))], shard_bytes=7 * 16 * 16)
    return folder


def train_command(inputs, out, training, *extra, student="student"):
    """argv of `python -m igsm train` on the tiny_training inputs, IGSM objective, outputs in out."""
    settings = {"training": {"objective": {"weights": {"np": 1.0, "kd": 1.0, "jm2": 0.1}}, **training}}
    return [sys.executable, "-m", "igsm", "train", "--model", str(inputs / student),
            "--teacher", str(inputs / "teacher"), "--data", str(inputs / "data"),
            "--out", str(out / "model"), "--checkpoint-dir", str(out / "checkpoints"),
            "--metrics", str(out / "metrics.jsonl"), "--summary", str(out / "summary.json"),
            "--settings", json.dumps(settings), "--device", "cpu", "--threads", "1", *extra]


def run_training(inputs, out, training, *extra, student="student"):
    """`python -m igsm train` (train_command) to completion; the CompletedProcess, output merged."""
    return subprocess.run(train_command(inputs, out, training, *extra, student=student), env=command_env(),
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)


def command_env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


WALL_CLOCK_METRICS = ("sec_per_step", "diagnostics_s")  # metrics-line fields that time the run


def metrics_without_wall_clock(path):
    """A metrics JSONL file's records without the fields that time the run."""
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK_METRICS}
            for line in Path(path).read_text().splitlines()]


def metric_records(out):
    """Training metrics of a training folder without the wall-clock columns."""
    return metrics_without_wall_clock(Path(out) / "metrics.jsonl")


def markdown_tables(path) -> dict[str, list[dict]]:
    """{heading: one {column heading: cell} per row} of each Markdown table in the file at ``path``,
    under the '### ' heading above it ('' above the first heading: a file of one table)."""
    tables, heading, header = {}, "", None
    for line in Path(path).read_text().splitlines():
        if line.startswith("### "):
            heading, header = line.removeprefix("### "), None
        elif not line.startswith("|"):
            header = None
        elif header is None:
            header = [cell.strip() for cell in line.strip("|").split("|")]
            tables[heading] = []
        elif not line.startswith("|:") and not line.startswith("|-"):
            tables[heading].append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))))
    return tables


# ---- optional inputs: skipped on a user's subset run, a failure in CI (issue 19) ---------------


def skip_or_fail_in_ci(reason: str):
    """pytest.skip(reason), except where the environment variable CI is set (.ci/run, `make test`
    installs every optional input): there a missing input is a failure, never a silent skip."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: required here)")
    pytest.skip(reason)


# ---- the quick layer (`make test-quick`, pytest -m "not slow"; issue 19) -----------------------

_WORKFLOW_CALLS = ("run_snakemake(", "snakemake_in(", "dry_run(")


def pytest_collection_modifyitems(config, items):
    """Tests that start Snakemake (a few seconds per call: dry runs, lint, the config checks run
    through the Snakefile) are part of the slow layer, wherever they are: `make test` runs them,
    `make test-quick` leaves them out."""
    import inspect

    for item in items:
        function = getattr(item, "function", None)
        try:
            source = inspect.getsource(function) if function else ""
        except (OSError, TypeError):
            continue
        if any(call in source for call in _WORKFLOW_CALLS) and "slow" not in item.keywords:
            item.add_marker(pytest.mark.slow)
    # A module that needs the session's demo run but is scheduled apart from the others would build
    # it a second time in the other process (~5 minutes): the list below must name it.
    strays = {Path(item.nodeid.split("::", 1)[0]).name for item in items if "demo_run" in item.fixturenames} \
        - SHARED_DEMO_MODULES
    if strays:
        raise pytest.UsageError(f"tests/conftest.py: add {sorted(strays)} to SHARED_DEMO_MODULES "
                                "(they use demo_run, built once per test process)")
    # The demo pair first (below: two test processes); a stable sort, the rest keep their order.
    items.sort(key=lambda item: _module_of(item.nodeid) != "demo")


# ---- two test processes (make test: pytest -n 2, pytest-xdist) -------------------------------
# Each module runs whole in one process, so its module fixtures are built once; test_slurm.py and
# test_workflow.py share one, since both use the session's demo_run. That pair, the longest
# (~12 minutes on 2 cores), goes first: started last, the other process would sit idle at the end.
# (A scheduler of our own: xdist's --dist loadgroup ignores xdist_group marks under pytest 9.)
SHARED_DEMO_MODULES = {"test_slurm.py", "test_workflow.py"}


def _module_of(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    return "demo" if Path(module).name in SHARED_DEMO_MODULES else module


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # plain pytest: one process, nothing to schedule
    pass
else:
    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return _module_of(nodeid)

    def pytest_xdist_make_scheduler(config, log):
        # Keep the order of pytest_collection_modifyitems: by default xdist reorders modules by their
        # number of tests, which started the demo pair ninth, its ~15 minutes last on one process.
        config.option.loadscopereorder = False
        return ModuleScheduling(config, log)
