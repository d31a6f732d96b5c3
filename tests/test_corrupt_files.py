"""Every file the package reads fails with a message that names the file, says what is wrong and
what to do (issue 12): model checkpoints, pretrained folders, training snapshots, statistics,
sample files and partial sample batches. A corrupt newest training snapshot falls back to the
previous one and is renamed out of the way, so reruns do not fail the same way forever."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO, TINY_ARCHITECTURE, metric_records, run_training
from igsm import fid, sampling
from igsm.stages import sample as sample_stage
from igsm.hub import looks_like_local_path
from igsm.models import ARCHITECTURE_FILE, WEIGHTS_FILE, build_unet, load_model, load_pretrained, save_model
from igsm.training import SNAPSHOT_KEYS, _newest_snapshot_of_run

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ---- model checkpoints --------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "model"
    save_model(build_unet(TINY_ARCHITECTURE), folder)
    return folder


def test_intact_checkpoint_loads(checkpoint):
    net = load_model(checkpoint)
    assert sum(p.numel() for p in net.parameters()) > 0


@pytest.mark.parametrize("damage", ["half", "header", "empty", "last byte"])
def test_truncated_weights_name_the_file(checkpoint, damage):
    weights = checkpoint / WEIGHTS_FILE
    keep = {"half": 0.5, "header": 0.001, "empty": 0.0, "last byte": 1 - 1 / weights.stat().st_size}[damage]
    truncate(weights, keep)
    with pytest.raises(ValueError) as err:
        load_model(checkpoint)
    message = str(err.value)
    assert str(weights) in message and "unreadable" in message
    assert f"delete {checkpoint} and rerun" in message


def test_missing_weights_name_the_file(checkpoint):
    (checkpoint / WEIGHTS_FILE).unlink()
    with pytest.raises(ValueError, match=f"{checkpoint / WEIGHTS_FILE} is missing"):
        load_model(checkpoint)


@pytest.mark.parametrize("damage", ["not json", "list", "no widths", "no class", "bad config"])
def test_malformed_architecture_names_the_file(checkpoint, damage):
    path = checkpoint / ARCHITECTURE_FILE
    spec = json.loads(path.read_text())
    if damage == "not json":
        truncate(path)  # cut mid-document
    elif damage == "list":
        path.write_text("[1, 2]")
    elif damage == "no widths":
        path.write_text(json.dumps({k: v for k, v in spec.items() if k != "widths"}))
    elif damage == "no class":
        path.write_text(json.dumps({k: v for k, v in spec.items() if k != "class"}))
    else:
        path.write_text(json.dumps({**spec, "config": {**spec["config"], "no_such_option": 3}}))
    with pytest.raises(ValueError) as err:
        load_model(checkpoint)
    message = str(err.value)
    assert str(path) in message, message
    assert f"delete {checkpoint} and rerun" in message
    expected = {"not json": "not valid JSON", "list": "JSON list", "no widths": "'widths'",
                "no class": "'class'", "bad config": "does not build"}[damage]
    assert expected in message, message


def test_missing_folder_or_architecture_names_it(checkpoint, tmp_path):
    with pytest.raises(ValueError, match=f"model folder {tmp_path / 'nowhere'} does not exist"):
        load_model(tmp_path / "nowhere")
    (checkpoint / ARCHITECTURE_FILE).unlink()  # written last: the save did not finish
    with pytest.raises(ValueError) as err:
        load_model(checkpoint)
    assert f"{checkpoint / ARCHITECTURE_FILE} is missing" in str(err.value)
    assert "did not finish" in str(err.value) and f"delete {checkpoint}" in str(err.value)


def test_weights_of_another_architecture_are_refused(checkpoint, tmp_path):
    # Same layer names, other widths: only the shapes tell them apart.
    other = tmp_path / "other"
    save_model(build_unet({**TINY_ARCHITECTURE, "block_out_channels": [12, 16]}), other)
    shutil.copy(other / WEIGHTS_FILE, checkpoint / WEIGHTS_FILE)
    with pytest.raises(ValueError) as err:
        load_model(checkpoint)
    message = str(err.value)
    assert str(checkpoint / WEIGHTS_FILE) in message and str(checkpoint / ARCHITECTURE_FILE) in message
    assert "has shape" in message
    # Other layer names: the key sets differ.
    save_model(build_unet({**TINY_ARCHITECTURE, "layers_per_block": 2}), other)
    shutil.copy(other / WEIGHTS_FILE, checkpoint / WEIGHTS_FILE)
    with pytest.raises(ValueError, match="do not match"):
        load_model(checkpoint)


# ---- pretrained models --------------------------------------------------------------------------

def test_missing_local_pretrained_folder_is_not_a_hub_failure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for model_id in ("./no/such/dir", str(tmp_path / "absent"), "models/absent", "~/igsm-no-such-dir"):
        with pytest.raises(ValueError) as err:
            load_pretrained(model_id)
        message = str(err.value)
        assert message.startswith(f"dense.pretrained: local folder {model_id} does not exist"), message
        assert "hub" not in message.split(";")[0]
    assert not looks_like_local_path("google/ddpm-cifar10-32")  # no folder "google" here: a hub id


def test_local_pretrained_folder_without_a_unet(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"dense.pretrained: local folder {tmp_path / 'empty'} holds no"):
        load_pretrained(str(tmp_path / "empty"))


def test_local_pretrained_folder_with_truncated_weights(tmp_path):
    folder = tmp_path / "unet"
    build_unet(TINY_ARCHITECTURE).save_pretrained(folder)
    assert isinstance(load_pretrained(str(folder)), nn.Module)
    (weights,) = folder.glob("*.safetensors")
    truncate(weights)
    with pytest.raises(ValueError, match=f"local folder {folder}"):
        load_pretrained(str(folder))


def test_local_pretrained_folder_written_by_the_workflow(tmp_path):
    """A teacher trained by another run of the workflow (architecture.json + model.safetensors)
    serves as dense.pretrained; a damaged one is reported under that key."""
    net = build_unet(TINY_ARCHITECTURE)
    save_model(net, tmp_path / "teacher")
    loaded = load_pretrained(str(tmp_path / "teacher"))
    for name, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    truncate(tmp_path / "teacher" / "model.safetensors")
    with pytest.raises(ValueError, match="^dense.pretrained: "):
        load_pretrained(str(tmp_path / "teacher"))


# ---- training snapshots -------------------------------------------------------------------------

def fake_snapshot(step, fingerprint="run", **changes):
    state = {"step": step, "fingerprint": fingerprint, "net": {"w": torch.zeros(2)}, "ema": {"w": torch.zeros(2)},
             "optimizer": {"state": {}, "param_groups": []}, "metrics": [], "running": {},
             "running_steps": 0, "world_size": 1, "timing": {}}
    state.update(changes)
    return {k: v for k, v in state.items() if v is not None}


def test_newest_readable_snapshot_of_the_run_is_resumed(tmp_path, capsys):
    snapshot = {step: tmp_path / f"step-{step:07d}.pt" for step in (5, 10, 11, 12, 13, 14, 15, 16)}
    for step in (5, 10):
        torch.save(fake_snapshot(step), snapshot[step])
    torch.save(fake_snapshot(11, optimizer=None), snapshot[11])      # lacks a key
    snapshot[12].write_bytes(b"")                                    # empty
    torch.save(fake_snapshot(13, fingerprint="another run"), snapshot[13])
    torch.save(fake_snapshot(14), snapshot[14])
    truncate(snapshot[14])                                           # cut short
    snapshot[15].write_bytes(b"not a snapshot at all" * 10)          # garbage
    torch.save(fake_snapshot(16), snapshot[16])                      # past num_steps: kept

    state = _newest_snapshot_of_run(tmp_path, "run", num_steps=15)
    out = capsys.readouterr().out
    assert state["step"] == 10 and f"resuming from {snapshot[10]} (step 10)" in out
    for step in (11, 12, 14, 15):
        assert f"snapshot {snapshot[step]} is unreadable: " in out
        assert not snapshot[step].exists() and snapshot[step].with_name(snapshot[step].name + ".corrupt").exists()
    assert "missing or malformed: optimizer" in out and "(0 bytes)" in out
    assert out.count("trying the previous snapshot") == 4
    assert "discarding" in out and not snapshot[13].exists()
    assert snapshot[5].exists() and snapshot[10].exists() and snapshot[16].exists()

    # The rerun does not trip on them again.
    state = _newest_snapshot_of_run(tmp_path, "run", num_steps=15)
    out = capsys.readouterr().out
    assert state["step"] == 10 and "unreadable" not in out and "discarding" not in out


def test_no_readable_snapshot_starts_over(tmp_path, capsys):
    (tmp_path / "step-0000005.pt").write_bytes(b"\0" * 100)
    assert _newest_snapshot_of_run(tmp_path, "run", num_steps=10) is None
    out = capsys.readouterr().out
    assert "unreadable" in out and "training starts from step 0" in out
    assert (tmp_path / "step-0000005.pt.corrupt").exists()


def test_snapshot_keys_are_what_training_writes():
    # The keys train() reads on resume; a snapshot without one of them is refused, not crashed on.
    assert set(SNAPSHOT_KEYS) == {"step", "fingerprint", "net", "ema", "optimizer", "metrics", "running",
                                  "running_steps"}


TRAINING = {"num_steps": 10, "batch_size": 8, "lr": 1e-3, "ema_decay": 0.9, "log_every": 1,
            "checkpoint_every": 5, "keep_checkpoints": 2}


@pytest.mark.slow
def test_corrupt_newest_snapshot_falls_back_to_the_previous_one(tiny_training, tmp_path):
    """10 steps (snapshots at 5 and 10), the step-10 snapshot cut short, num_steps raised to 12: the
    rerun resumes from step 5, renames the corrupt file, and ends bitwise as a 12-step run."""
    longer = {**TRAINING, "num_steps": 12}
    whole = tmp_path / "whole"
    proc = run_training(tiny_training, whole, longer)
    assert proc.returncode == 0, proc.stdout[-3000:]

    run = tmp_path / "run"
    proc = run_training(tiny_training, run, TRAINING)
    assert proc.returncode == 0, proc.stdout[-3000:]
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*.pt")) == ["step-0000005.pt", "step-0000010.pt"]
    newest = checkpoints / "step-0000010.pt"
    truncate(newest)

    proc = run_training(tiny_training, run, longer)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"snapshot {newest} is unreadable" in proc.stdout, proc.stdout[-3000:]
    assert f"resuming from {checkpoints / 'step-0000005.pt'} (step 5)" in proc.stdout
    assert (checkpoints / "step-0000010.pt.corrupt").exists()
    assert sorted(p.name for p in checkpoints.glob("step-*.pt")) == ["step-0000010.pt", "step-0000012.pt"]
    from igsm.data import file_digest  # digests: a failure reports at once, not after a 200 KB diff

    assert file_digest(run / "model" / WEIGHTS_FILE) == file_digest(whole / "model" / WEIGHTS_FILE), \
        "weights resumed past the corrupt snapshot differ from the uninterrupted run's"
    assert metric_records(run) == metric_records(whole)


# ---- FID statistics -----------------------------------------------------------------------------

@pytest.fixture
def stats_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "stats.npz"
    fid.save_statistics(path, rng.standard_normal((10, 4)), mode="clean")
    return path


def test_intact_statistics_load(stats_file):
    stats = fid.load_statistics(stats_file)
    assert stats.mu.shape == (4,) and stats.sigma.shape == (4, 4) and stats.num_images == 10


@pytest.mark.parametrize("damage", ["half", "empty", "garbage", "npy", "no sigma", "mu 2-D", "sigma not square",
                                    "sigma of another size", "nan", "bad metadata"])
def test_malformed_statistics_name_the_file(stats_file, damage):
    mu, sigma = np.zeros(4), np.eye(4)
    if damage == "half":
        truncate(stats_file)
    elif damage == "garbage":
        stats_file.write_bytes(b"<html>not found</html>")
    elif damage == "empty":
        stats_file.write_bytes(b"")
    elif damage == "npy":
        with open(stats_file, "wb") as f:
            np.save(f, mu)
    else:
        arrays = {"no sigma": {"mu": mu}, "mu 2-D": {"mu": mu[:, None], "sigma": sigma},
                  "sigma not square": {"mu": mu, "sigma": sigma[:3]},
                  "sigma of another size": {"mu": mu, "sigma": np.eye(5)},
                  "nan": {"mu": mu, "sigma": np.full((4, 4), np.nan)},
                  "bad metadata": {"mu": mu, "sigma": sigma, "metadata": np.array("{not json")}}[damage]
        with open(stats_file, "wb") as f:
            np.savez(f, **arrays)
    with pytest.raises(ValueError) as err:
        fid.load_statistics(stats_file)
    message = str(err.value)
    assert message.startswith(str(stats_file)), message
    assert "delete it and rerun" in message and "reference file" in message
    if damage == "garbage":
        assert "not a numpy file" in message and "pickle" not in message


def test_missing_statistics_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=f"statistics file {tmp_path / 'none.npz'} does not exist"):
        fid.load_statistics(tmp_path / "none.npz")


# ---- sample files and partial batches -----------------------------------------------------------

def images_of(seeds):
    rng = np.random.default_rng(int(seeds[0]))
    return rng.integers(0, 256, (len(seeds), 4, 4, 1), dtype=np.uint8)


@pytest.mark.parametrize("damage", ["half", "empty", "garbage", "no images", "float images",
                                    "seeds of another length"])
def test_malformed_samples_name_the_file(tmp_path, damage):
    path = tmp_path / "samples.npz"
    seeds = np.arange(5)
    sampling.save_samples(path, images_of(seeds), seeds, {"precision": "fp32"})
    assert sampling.load_samples(path)[2] == {"precision": "fp32"}
    if damage in ("half", "empty"):
        truncate(path, 0.5 if damage == "half" else 0.0)
    elif damage == "garbage":
        path.write_bytes(b"<html>not found</html>")
    else:
        arrays = {"no images": {"seeds": seeds},
                  "float images": {"images": images_of(seeds).astype(np.float32), "seeds": seeds},
                  "seeds of another length": {"images": images_of(seeds), "seeds": seeds[:3]}}[damage]
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    with pytest.raises(ValueError) as err:
        sampling.load_samples(path)
    assert str(err.value).startswith(str(path)) and "delete it and rerun" in str(err.value), str(err.value)


def test_gather_names_the_truncated_shard(tmp_path):
    shards = []
    for i, seeds in enumerate((np.arange(0, 3), np.arange(3, 6))):
        shards.append(tmp_path / f"shard-{i}.npz")
        sampling.save_samples(shards[-1], images_of(seeds), seeds, {"precision": "fp32"})
    images, seeds, _ = sampling.gather_shards(shards, 0, 6)
    assert list(seeds) == list(range(6))
    truncate(shards[1])
    with pytest.raises(ValueError, match=f"{shards[1]} is unreadable"):
        sampling.gather_shards(shards, 0, 6)


class Halve(nn.Module):
    def forward(self, x, t):
        return 0.5 * x


def make(partial, seeds, batch_size=3):
    return sample_stage.sample_images(Halve(), seeds=seeds, image_shape=(1, 4, 4), batch_size=batch_size,
                                  num_steps=2, partial=partial)


def test_unreadable_partial_batch_is_redone(tmp_path, capsys):
    seeds = np.arange(7)
    expected = make(None, seeds)
    partial = sampling.PartialBatches(tmp_path / "out.npz.partial", {"run": 1})
    for b, start in enumerate(range(0, 7, 3)):
        partial.save(b, expected[start:start + 3])
    truncate(partial.path(1))
    partial.path(2).write_bytes(b"")
    assert partial.done(0) and not partial.done(1) and not partial.done(2)
    out = capsys.readouterr().out
    assert f"{partial.path(1)} is unreadable" in out and "batch 1 is redone" in out

    partial = sampling.PartialBatches(tmp_path / "out.npz.partial", {"run": 1})  # a rerun: kept
    assert partial.done(0)
    assert np.array_equal(make(partial, seeds), expected)
    assert "batch 2 is redone" in capsys.readouterr().out
    assert partial.done(1) and partial.done(2)


def test_batch_found_unreadable_when_gathered_is_removed(tmp_path):
    seeds = np.arange(6)
    expected = make(None, seeds)
    partial = sampling.PartialBatches(tmp_path / "out.npz.partial", {"run": 1})
    partial.save(0, expected[:3])
    partial.save(1, expected[3:])
    data = partial.path(1).read_bytes()
    partial.path(1).write_bytes(data[:-5])  # header intact, data short
    with pytest.raises(ValueError) as err:
        partial.load(2)
    assert str(partial.path(1)) in str(err.value) and "rerun the job" in str(err.value)
    assert not partial.path(1).exists() and partial.done(0)
    assert np.array_equal(make(partial, seeds), expected)  # the rerun redoes batch 1 only


def test_cli_names_a_corrupt_input_without_a_traceback(tmp_path):
    """Every command that reads a results file turns its loader's error into one clean line."""
    import subprocess
    import sys

    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "architecture.json").write_text("{not json")
    data = tmp_path / "train"  # an image store whose index is cut short
    data.mkdir()
    (data / "index.json").write_text('{"format": "igsm-image-store/1", "num_im')
    samples = tmp_path / "samples.npz"
    samples.write_bytes(b"PK\x03\x04 truncated")
    commands = {
        "efficiency": ["efficiency", "--model", str(bad), "--out", str(tmp_path / "e.json")],
        "prune": ["prune", "--model", str(bad), "--data", str(data), "--criterion", "magnitude",
                  "--channel-ratio", "0.3", "--out", str(tmp_path / "p"), "--report", str(tmp_path / "r.json")],
        "fid-reference": ["fid-reference", "--data", str(data), "--out", str(tmp_path / "s.npz")],
        "fid-statistics": ["fid-statistics", "--samples", str(samples), "--out", str(tmp_path / "s.npz")],
    }
    for name, args in commands.items():
        proc = subprocess.run([sys.executable, "-m", "igsm", *args], text=True, capture_output=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 1, (name, proc.stderr)
        assert "Traceback" not in proc.stderr and "Error: " in proc.stderr, (name, proc.stderr)
        assert any(str(p) in proc.stderr for p in (bad, data, samples)), (name, proc.stderr)
