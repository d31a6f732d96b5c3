"""Training with several processes (torchrun, DDP on CPU through gloo): the same loss curve and
weights as one process with the same global batch, to float-reduction tolerance; a signal to one
process stops all of them after the same step, and the rerun continues bitwise."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import command_env, metric_records, run_training, train_command

pytestmark = pytest.mark.slow

# No dropout: its masks are drawn per process (igsm/training.py), the rest is split-invariant.
TRAINING = {"num_steps": 12, "batch_size": 8, "lr": 1e-3, "ema_decay": 0.9, "hflip": True,
            "log_every": 1, "checkpoint_every": 5}


def run(inputs, out, *extra):
    return run_training(inputs, out, TRAINING, *extra)


@pytest.fixture(scope="module")
def one_process(tiny_training, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    proc = run(tiny_training, out)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return out


@pytest.fixture(scope="module")
def two_processes(tiny_training, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_processes")
    proc = run(tiny_training, out, "--nproc-per-node", "2")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "torch.distributed.run" in proc.stdout and "--nproc_per_node=2" in proc.stdout
    return out


def test_two_processes_follow_the_loss_curve_of_one(one_process, two_processes):
    one, two = metric_records(one_process), metric_records(two_processes)
    assert [r["step"] for r in two] == list(range(1, TRAINING["num_steps"] + 1))
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in ("loss", "np", "kd", "jm2", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), (a["step"], key)
    weights_one = load_file(one_process / "model" / "model.safetensors")
    weights_two = load_file(two_processes / "model" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=0, atol=1e-4)
    assert json.loads((two_processes / "summary.json").read_text())["num_processes"] == 2
    assert len(list((two_processes / "checkpoints").glob("step-*.pt"))) == 2  # rank 0 alone writes


def test_batch_must_split_evenly(tiny_training, tmp_path):
    proc = run(tiny_training, tmp_path, "--nproc-per-node", "3")
    assert proc.returncode != 0
    assert "batch_size 8 is not divisible by the 3 processes" in proc.stdout, proc.stdout[-3000:]
    assert "torch.distributed.run" not in proc.stdout  # refused before any process starts


def _workers(launcher_pid):
    """{rank: pid} of the processes torchrun started."""
    workers = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher_pid:
            env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
            if b"RANK" in env:
                workers[int(env[b"RANK"])] = int(stat.parent.name)
    return workers


def test_signal_to_one_process_stops_all_after_the_same_step(tiny_training, two_processes, tmp_path):
    command = train_command(tiny_training, tmp_path, TRAINING, "--nproc-per-node", "2")
    proc = subprocess.Popen(command, env=command_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    metrics, deadline = tmp_path / "metrics.jsonl", time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            workers = _workers(proc.pid)
            assert sorted(workers) == [0, 1], workers
            # Rank 1 alone: rank 0 learns of it through the step's all-reduce.
            os.kill(workers[1], signal.SIGUSR1)
            break
        time.sleep(0.02)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0, output[-3000:]
    # Both ranks stop after the same step, rank 0 without having been signalled itself.
    assert "stopped by SIGUSR1 after step" in output, output[-3000:]
    assert "stopped by another process's signal after step" in output, output[-3000:]
    steps = {line.rsplit("after step ", 1)[1].split(";")[0] for line in output.splitlines()
             if "stopped by" in line}
    assert len(steps) == 1 and 3 <= int(steps.pop()) < TRAINING["num_steps"]

    proc = run(tiny_training, tmp_path, "--nproc-per-node", "2")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "resuming from" in proc.stdout
    from igsm.data import file_digest  # digests: a failure reports at once, not after a 200 KB diff

    assert file_digest(tmp_path / "model" / "model.safetensors") == \
        file_digest(two_processes / "model" / "model.safetensors"), \
        "resumed weights differ from the uninterrupted two-process run's"
    assert metric_records(tmp_path) == metric_records(two_processes)


def test_launch_commands(tmp_path, monkeypatch):
    """One process: none; one node: torchrun --standalone; several: srun + torchrun per node."""
    import sys

    from igsm.distributed import launch_command

    for var in ("LOCAL_RANK", "WORLD_SIZE", "SLURM_JOB_ID", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(var, raising=False)
    argv = ["train", "--model", "m"]
    assert launch_command(argv, 1) is None
    assert launch_command(argv, 4) == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4",
                                       "--standalone", "--nnodes=1", "-m", "igsm", *argv]
    with pytest.raises(RuntimeError, match="inside a SLURM allocation"):
        launch_command(argv, 4, nnodes=2)
    # Inside an allocation of two nodes (srun and scontrol stand-ins on PATH).
    for tool, script in (("srun", "exit 0"), ("scontrol", 'echo "gpu-a17"; echo "gpu-a18"')):
        (tmp_path / tool).write_text(f"#!/bin/sh\n{script}\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu-a[17-18]")
    command = launch_command(argv, 4, nnodes=2)
    assert command[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert command[command.index("torch.distributed.run") + 1:] == [
        "--nproc_per_node=4", "--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=gpu-a17:29500",
        "--rdzv_id=123", "-m", "igsm", *argv]
    # Inside the processes torchrun started, nothing is launched again.
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert launch_command(argv, 4, nnodes=2) is None
