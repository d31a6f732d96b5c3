"""Preemption-safe training: a run stopped at an arbitrary step (SIGTERM, SIGUSR1 or SIGKILL) and
rerun ends with bitwise the weights and metrics of an uninterrupted run; a snapshot of another run
is never resumed. CPU, one thread, `python -m igsm train` in subprocesses as SLURM would run it."""

import json
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from conftest import command_env, metric_records, run_training, train_command
from igsm.data import file_digest
from igsm.diffusion import NoiseSchedule
from igsm.training import TrainingOptions, run_fingerprint

pytestmark = pytest.mark.slow

# Dropout on, flips on, IGSM objective: every source of randomness the loop has.
TRAINING = {"num_steps": 16, "batch_size": 8, "lr": 1e-3, "ema_decay": 0.9, "hflip": True,
            "log_every": 1, "checkpoint_every": 5}


def run(inputs, out, training=TRAINING, *extra):
    return run_training(inputs, out, training, *extra, student="student_dropout")


def interrupt(inputs, out, sig, after_step, training=TRAINING):
    """Start a run, send ``sig`` once its metrics show ``after_step``; (exit code, output)."""
    proc = subprocess.Popen(train_command(inputs, out, training, student="student_dropout"),
                            env=command_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(line)["step"] >= after_step
                                    for line in metrics.read_text().splitlines()):
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    output, _ = proc.communicate(timeout=240)
    return proc.returncode, output


@pytest.fixture(scope="module")
def uninterrupted(tiny_training, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = run(tiny_training, out)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return out


def weights(out):
    """sha256 of a run's saved weights: compared as digests, a failure reports at once (pytest's
    diff of two ~200 KB byte strings ran for over 10 minutes)."""
    return file_digest(out / "model" / "model.safetensors")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signalled_run_resumes_to_the_same_weights(tiny_training, uninterrupted, tmp_path, sig):
    code, output = interrupt(tiny_training, tmp_path, sig, after_step=3)
    assert code == 75, output[-3000:]
    snapshots = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*.pt"))
    stopped = int(snapshots[-1][5:12])
    assert 3 <= stopped < TRAINING["num_steps"], snapshots  # a snapshot at the step it stopped
    assert not (tmp_path / "model").exists()

    proc = run(tiny_training, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"resuming from {tmp_path / 'checkpoints' / snapshots[-1]} (step {stopped})" in proc.stdout
    assert weights(tmp_path) == weights(uninterrupted), "resumed weights differ from the uninterrupted run's"
    assert metric_records(tmp_path) == metric_records(uninterrupted)


def test_killed_run_resumes_from_its_last_periodic_snapshot(tiny_training, uninterrupted, tmp_path):
    code, output = interrupt(tiny_training, tmp_path, signal.SIGKILL, after_step=6)
    assert code == -signal.SIGKILL, output[-3000:]
    snapshots = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*.pt"))
    assert snapshots and snapshots[-1] < f"step-{TRAINING['num_steps']:07d}.pt", snapshots

    proc = run(tiny_training, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "resuming from" in proc.stdout
    assert weights(tmp_path) == weights(uninterrupted), "resumed weights differ from the uninterrupted run's"
    assert metric_records(tmp_path) == metric_records(uninterrupted)


def test_snapshot_of_another_run_is_discarded(tiny_training, uninterrupted, tmp_path):
    # The finished run's folder, then a changed setting (as when Snakemake reruns the job).
    changed = {**TRAINING, "lr": 5e-4}
    proc = run(tiny_training, tmp_path, changed)
    assert proc.returncode == 0 and "resuming" not in proc.stdout
    reference = weights(tmp_path)
    for path in (tmp_path / "checkpoints").iterdir():
        path.unlink()
    for path in (uninterrupted / "checkpoints").glob("step-*.pt"):
        (tmp_path / "checkpoints" / path.name).write_bytes(path.read_bytes())

    proc = run(tiny_training, tmp_path, changed)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "resuming" not in proc.stdout
    assert proc.stdout.count("written by a different run") == 2, proc.stdout[-3000:]
    assert weights(tmp_path) == reference, "weights differ from the fresh run's: a stale snapshot was resumed?"
    assert [r["step"] for r in metric_records(tmp_path)] == list(range(1, changed["num_steps"] + 1))


def test_fingerprint_covers_what_the_weights_depend_on(tiny_training, tmp_path):
    from igsm.data import load_images, write_store
    from igsm.models import load_model

    net, teacher = load_model(tiny_training / "student"), load_model(tiny_training / "teacher")
    images = load_images(tiny_training / "data")
    options = TrainingOptions.from_dict({**TRAINING, "objective": {"weights": {"np": 1.0}}})
    schedule = NoiseSchedule.linear()

    def fingerprint(net=net, images=images, teacher=teacher, schedule=schedule, **changes):
        return run_fingerprint(net, images, TrainingOptions(**{**options.__dict__, **changes}),
                               teacher, schedule)

    base = fingerprint()
    assert fingerprint() == base
    # Bookkeeping does not change the weights: a run stays resumable across it.
    assert fingerprint(log_every=7, checkpoint_every=3, keep_checkpoints=5) == base
    other_net = load_model(tiny_training / "student")
    with torch.no_grad():
        next(other_net.parameters())[0].add_(1e-6)
    # A store is identified by the digests its index records: the same images written again (other
    # folder, other shard size) are the same data; one flipped bit is not.
    same_images = write_store(tmp_path / "same", [(images[:], images.labels)], shard_bytes=1 << 20)
    assert fingerprint(images=same_images) != base  # other shards: a new identity, never a false match
    rewritten = write_store(tmp_path / "again", [(images[:], images.labels)], shard_bytes=7 * 16 * 16)
    assert fingerprint(images=rewritten) == base
    flipped = images[:]
    flipped[0, 0, 0, 0] ^= 1
    changed_images = write_store(tmp_path / "changed", [(flipped, images.labels)], shard_bytes=7 * 16 * 16)
    # So does num_steps: step s is the same in any run of at least s steps (a run can be extended).
    assert fingerprint(num_steps=17) == base
    assert len({base, fingerprint(lr=2e-3), fingerprint(warmup_steps=3), fingerprint(seed=1),
                fingerprint(objective={"weights": {"np": 1.0, "kd": 1.0}}),
                fingerprint(net=other_net), fingerprint(teacher=None), fingerprint(teacher=other_net),
                fingerprint(images=changed_images),
                fingerprint(schedule=NoiseSchedule.linear(beta_end=0.03))}) == 10


def test_rerun_of_a_finished_run_only_writes_the_outputs(tiny_training, uninterrupted, tmp_path):
    # The job died after its last snapshot but before its outputs (or Snakemake deleted them).
    (tmp_path / "checkpoints").mkdir()
    last = f"step-{TRAINING['num_steps']:07d}.pt"
    (tmp_path / "checkpoints" / last).write_bytes((uninterrupted / "checkpoints" / last).read_bytes())
    proc = run(tiny_training, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert weights(tmp_path) == weights(uninterrupted), "resumed weights differ from the uninterrupted run's"
    assert metric_records(tmp_path) == metric_records(uninterrupted)
    assert json.loads((tmp_path / "summary.json").read_text())["num_steps"] == TRAINING["num_steps"]
    assert np.isfinite([r["loss"] for r in metric_records(tmp_path)]).all()


def test_raising_num_steps_continues_a_finished_run(tiny_training, uninterrupted, tmp_path):
    """A finished 10-step run, then num_steps 16: it resumes at step 10 and ends bitwise as the
    uninterrupted 16-step run; the summary counts both attempts' wall time."""
    short = {**TRAINING, "num_steps": 10}
    assert run(tiny_training, tmp_path, short).returncode == 0
    first = json.loads((tmp_path / "summary.json").read_text())["timing"]
    assert first["attempts"] == 1 and first["steps_timed"] == 10
    proc = run(tiny_training, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "(step 10)" in proc.stdout
    assert weights(tmp_path) == weights(uninterrupted), "resumed weights differ from the uninterrupted run's"
    assert metric_records(tmp_path) == metric_records(uninterrupted)
    timing = json.loads((tmp_path / "summary.json").read_text())["timing"]
    assert timing["attempts"] == 2 and timing["steps_timed"] == 16
    assert timing["wall_time_s"] > first["wall_time_s"]
    # Lowered again: the step-16 snapshot is past it and not resumed; training restarts from step 0.
    proc = run(tiny_training, tmp_path, {**TRAINING, "num_steps": 4})
    assert proc.returncode == 0 and "resuming" not in proc.stdout, proc.stdout[-3000:]
    assert [r["step"] for r in metric_records(tmp_path)] == [1, 2, 3, 4]


def test_jacobian_every_resumes_bitwise(tiny_training, tmp_path):
    """The Jacobian terms on every 3rd step follow the step count, so a stop between them resumes
    to the same weights (the snapshot lands on a step that skips them)."""
    training = {**TRAINING, "num_steps": 9,
                "objective": {"weights": {"np": 1.0, "kd": 1.0, "jm2": 0.1}, "jacobian_every": 3}}
    whole = tmp_path / "whole"
    assert run(tiny_training, whole, training).returncode == 0
    records = metric_records(whole)
    assert [r["jm2"] > 0 for r in records] == [True, False, False] * 3  # steps 1, 4, 7 carry it
    stopped = tmp_path / "stopped"
    code, output = interrupt(tiny_training, stopped, signal.SIGTERM, after_step=2, training=training)
    assert code == 75, output[-3000:]
    proc = run(tiny_training, stopped, training)
    assert proc.returncode == 0 and "resuming" in proc.stdout, proc.stdout[-3000:]
    assert weights(stopped) == weights(whole), "resumed weights differ from the uninterrupted run's"
    assert metric_records(stopped) == records
