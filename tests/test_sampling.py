"""Samplers and the sharded sample stage, on CPU with tiny networks.

* Image k is bitwise identical at any batch size and shard split (fp32, fixed network batch).
* DDIM with η = 1 over all 1000 steps is ancestral DDPM sampling: the same paths from the same
  noise, and the moments of a Gaussian target whose exact noise prediction is known.
* Euler–Maruyama on the VP-SDE reproduces the mean and variance of such a target.
* The CLI: shards + gather = one job; a deleted shard or a job killed mid-way, rerun, gives the
  same images; stale partial batches are discarded; gather refuses holes; metadata reaches the
  FID JSON; PNG export; efficiency on CPU (eager and compiled) and the network its jobs time
  (config efficiency.network, dry run); two processes (torchrun) share a shard; the sharded DAG
  (dry run).
"""

import copy
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from conftest import REPO, modules_loaded_by_command, run_snakemake, TINY_GRAY_UNET as TINY_UNET
from igsm import sampling
from igsm.stages import sample as sample_stage
from igsm.cli import main as cli
from igsm.data import to_uint8
from igsm.diffusion import NoiseSchedule, vp_log_alpha
from igsm.models import build_unet, save_model

SHAPE = (1, 8, 8)
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class Killed(Exception):
    """A job's death at a chosen moment."""


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet(TINY_UNET).eval()


@pytest.fixture(scope="module")
def model_dir(unet, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "model"
    save_model(unet, folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------

SAMPLERS = {
    "ddim": dict(sampler="ddim", num_steps=6, eta=0.5, spacing="quad", schedule=NoiseSchedule.linear()),
    "euler-maruyama": dict(sampler="euler-maruyama", num_steps=6),
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_image_k_is_bitwise_identical_at_any_batch_size_and_shard_split(unet, name):
    kwargs = SAMPLERS[name]
    seeds = np.arange(100, 111)  # 11 images
    net = sampling.Denoiser(unet, micro_batch=4)
    whole = sampling.generate(net, seeds=seeds, image_shape=SHAPE, **kwargs)
    assert whole.shape == (11, *SHAPE) and torch.isfinite(whole).all()
    for batch_size in (1, 3, 5, 8):
        batched = torch.cat([sampling.generate(net, seeds=seeds[i:i + batch_size], image_shape=SHAPE, **kwargs)
                             for i in range(0, len(seeds), batch_size)])
        assert torch.equal(batched, whole), f"batch size {batch_size}"
    # Shards of uneven sizes, each its own batch: the same images again.
    for num_shards in (2, 3):
        parts = []
        for index in range(num_shards):
            start, stop = sample_stage.shard_range(len(seeds), num_shards, index)
            parts.append(sampling.generate(net, seeds=seeds[start:stop], image_shape=SHAPE, **kwargs))
        assert torch.equal(torch.cat(parts), whole), f"{num_shards} shards"
    # Another seed gives another image (the seeds are used at all).
    other = sampling.generate(net, seeds=seeds + 1, image_shape=SHAPE, **kwargs)
    assert torch.equal(other[:-1], whole[1:]) and not torch.equal(other, whole)


def test_noise_drawn_in_threads_equals_sequential():
    seeds = np.arange(37)
    one = sampling.ImageGenerators(seeds, num_threads=1)
    three = sampling.ImageGenerators(seeds, num_threads=3)
    for _ in range(3):
        assert torch.equal(one.randn((2, 5, 5)), three.randn((2, 5, 5)))


def test_shard_ranges_cover_every_image_once():
    for num_images, num_shards in ((10, 3), (50000, 7), (5, 5)):
        ranges = [sample_stage.shard_range(num_images, num_shards, i) for i in range(num_shards)]
        assert ranges[0][0] == 0 and ranges[-1][1] == num_images
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(ValueError, match="at most one shard per image"):
        sample_stage.shard_range(3, 4, 0)


def test_bf16_fast_path_is_close_to_fp32_but_not_equal(unet):
    kwargs = dict(SAMPLERS["ddim"], eta=0.0)
    seeds = np.arange(8)
    fp32 = sampling.generate(sampling.Denoiser(unet, micro_batch=8), seeds=seeds, image_shape=SHAPE, **kwargs)
    bf16_net = sampling.Denoiser(unet, micro_batch=8, precision="bf16")
    bf16 = sampling.generate(bf16_net, seeds=seeds, image_shape=SHAPE, **kwargs)
    assert bf16_net.metadata["precision"] == "bf16"
    assert not torch.equal(bf16, fp32)
    # In uint8 levels: a few levels at most, on a random network amplifying its own rounding.
    levels = np.abs(to_uint8(bf16).astype(int) - to_uint8(fp32).astype(int))
    assert levels.mean() < 2 and levels.max() <= 16, (levels.mean(), levels.max())


@pytest.mark.parametrize("shape,groups,affine", [((3, 64, 5, 7), 16, True), ((2, 48, 11), 4, True),
                                                 ((2, 12, 4, 4), 12, False)])
def test_channel_stats_group_norm_is_group_norm(shape, groups, affine):
    torch.manual_seed(0)
    reference = torch.nn.GroupNorm(groups, shape[1], eps=1e-6, affine=affine).double()
    if affine:
        torch.nn.init.normal_(reference.weight)
        torch.nn.init.normal_(reference.bias)
    ours = sampling.ChannelStatsGroupNorm(groups, shape[1], eps=1e-6, affine=affine).double()
    ours.load_state_dict(reference.state_dict())
    # Channel means far apart and far from 0: the group variance is mostly between-channel spread.
    x = torch.randn(shape, dtype=torch.float64) * 3 + torch.randn(1, shape[1], *[1] * (len(shape) - 2)) * 40
    torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-12)
    if x.ndim == 4:  # float32 in channels_last memory, the fast path's layout
        x32 = x.float().contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(ours.float()(x32), reference(x).float(), rtol=0, atol=2e-5)


def test_channels_last_denoiser_uses_channel_stats_group_norm(unet):
    net = copy.deepcopy(unet)
    keys = list(net.state_dict())
    x, t = torch.randn(4, *SHAPE), torch.full((4,), 300)
    expected = sampling.Denoiser(copy.deepcopy(unet))(x, t)
    denoiser = sampling.Denoiser(net, channels_last=True)
    norms = [type(m) for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and set(norms) == {sampling.ChannelStatsGroupNorm}
    assert list(net.state_dict()) == keys  # checkpoints load into it unchanged
    assert denoiser.metadata["group_norm"] == "channel-stats"  # part of what makes the bits
    torch.testing.assert_close(denoiser(x, t), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Samplers against exact answers
# ---------------------------------------------------------------------------------------------

MU, STD = 0.3, 0.5  # the toy data: every pixel i.i.d. N(MU, STD²)


class GaussianDDPMNoise(torch.nn.Module):
    """The exact ε̂(x_t, t) = E[ε | x_t] for data N(MU, STD²) under x_t = √ᾱ x₀ + √(1−ᾱ) ε."""

    def __init__(self, schedule):
        super().__init__()
        self.abar = schedule.alphas_cumprod

    def forward(self, x, t):
        a = self.abar[t].view(-1, 1, 1, 1)
        return ((1 - a).sqrt() * (x.double() - a.sqrt() * MU) / (a * STD**2 + 1 - a)).float()


class GaussianVPNoise(torch.nn.Module):
    """The same for the VP-SDE: x_t = α(t) x₀ + σ(t) ε, network time input t·999."""

    def forward(self, x, t_in):
        t = t_in.double().view(-1, 1, 1, 1) / 999
        alpha = torch.exp(vp_log_alpha(t))
        sigma = (1 - alpha**2).sqrt()
        return (sigma * (x.double() - alpha * MU) / (alpha**2 * STD**2 + sigma**2)).float()


def ancestral_ddpm(net, noise, schedule, generators):
    """Ho et al. 2020, Algorithm 2 with σ_t² = β̃_t, float64 updates as our samplers."""
    abar = schedule.alphas_cumprod
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    beta = 1 - abar / abar_prev
    x = noise
    for t in reversed(range(schedule.num_steps)):
        eps = net(x, torch.full((len(x),), t)).double()
        mean = (x.double() - beta[t] / (1 - abar[t]).sqrt() * eps) / (1 - beta[t]).sqrt()
        if t > 0:
            var = beta[t] * (1 - abar_prev[t]) / (1 - abar[t])
            mean = mean + var.sqrt() * generators.randn(x.shape[1:], dtype=torch.float64)
        x = mean.float()
    return x


def test_ddim_eta1_over_all_steps_is_ancestral_ddpm():
    schedule = NoiseSchedule.linear()
    net = GaussianDDPMNoise(schedule)
    seeds = np.arange(256)
    gens = sampling.ImageGenerators(seeds)
    ddim = sampling.ddim_sample(net, gens.randn((1, 4, 4)), schedule, num_steps=1000, eta=1.0, generators=gens)
    gens = sampling.ImageGenerators(seeds)
    ddpm = ancestral_ddpm(net, gens.randn((1, 4, 4)), schedule, gens)
    # Same noise, same update algebra: the same paths up to rounding.
    torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=0)
    values = ddim.double().flatten()  # 4096 i.i.d. draws
    assert abs(values.mean() - MU) < 5 * STD / len(values) ** 0.5
    assert abs(values.std() / STD - 1) < 0.07
    # η = 0 is deterministic given x_T and lands on the same distribution.
    gens = sampling.ImageGenerators(seeds)
    det = sampling.ddim_sample(net, gens.randn((1, 4, 4)), schedule, num_steps=100, eta=0.0).double().flatten()
    assert abs(det.mean() - MU) < 5 * STD / len(det) ** 0.5 and abs(det.std() / STD - 1) < 0.07


def test_euler_maruyama_reproduces_a_gaussian_target():
    seeds = np.arange(256)
    x = sampling.generate(GaussianVPNoise(), sampler="euler-maruyama", seeds=seeds, image_shape=(1, 4, 4),
                          num_steps=1000)
    values = x.double().flatten()
    assert abs(values.mean() - MU) < 5 * STD / len(values) ** 0.5
    assert abs(values.std() / STD - 1) < 0.07


# ---------------------------------------------------------------------------------------------
# The sample stage through its CLI
# ---------------------------------------------------------------------------------------------

SETTINGS = {"sampler": "ddim", "num_steps": 4, "eta": 0.5, "spacing": "uniform", "clip_x0": False,
            "batch_size": 3, "micro_batch": 2,
            "diffusion": {"num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02}}
NUM_IMAGES = 10


def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def sample_shard(model_dir, out, shard, settings=SETTINGS, **flags):
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    return run_cli("sample", "--model", model_dir, "--out", out, "--num-images", NUM_IMAGES, "--first-seed", 7,
                   "--shard", shard, "--settings", json.dumps(settings), "--device", "cpu", "--threads", 1, *extra)


def gather(out, shards, **kwargs):
    return run_cli("gather-samples", "--out", out, "--first-seed", 7, "--num-images", NUM_IMAGES, *shards)


@pytest.fixture(scope="module")
def uninterrupted(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("one-job")
    sample_shard(model_dir, folder / "shard-0-of-1.npz", "0/1")
    gather(folder / "samples.npz", [folder / "shard-0-of-1.npz"])
    return sampling.load_samples(folder / "samples.npz")


def test_sharded_and_resumed_runs_give_the_images_of_one_job(model_dir, uninterrupted, tmp_path, monkeypatch):
    images, seeds, metadata = uninterrupted
    assert images.shape == (NUM_IMAGES, 8, 8, 1) and images.dtype == np.uint8
    assert list(seeds) == list(range(7, 17)) and metadata["precision"] == "fp32"
    assert metadata["num_shards"] == 1 and metadata["sampler_kwargs"]["eta"] == 0.5
    shards = [tmp_path / f"shard-{i}-of-3.npz" for i in range(3)]
    for i, path in enumerate(shards):
        sample_shard(model_dir, path, f"{i}/3")
    gather(tmp_path / "samples.npz", shards)
    sharded, sharded_seeds, sharded_meta = sampling.load_samples(tmp_path / "samples.npz")
    assert np.array_equal(sharded, images) and np.array_equal(sharded_seeds, seeds)
    assert sharded_meta["num_shards"] == 3

    # A shard deleted (a lost job) and redone: the same images.
    shards[1].unlink()
    sample_shard(model_dir, shards[1], "1/3")
    gather(tmp_path / "again.npz", shards)
    assert np.array_equal(sampling.load_samples(tmp_path / "again.npz")[0], images)

    # A job killed after its first batch leaves only partial batches; its rerun does the rest.
    calls = []
    real_generate = sample_stage.generate  # sample_images (igsm.stages.sample) calls it by this name

    def dying_generate(*args, **kwargs):
        calls.append(len(kwargs["seeds"]))
        if len(calls) == 2:
            raise Killed
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(sample_stage, "generate", dying_generate)
    out = tmp_path / "killed" / "shard-0-of-1.npz"
    with pytest.raises(Killed):
        sample_shard(model_dir, out, "0/1")
    assert not out.exists()
    assert sorted(p.name for p in out.with_name(out.name + ".partial").glob("batch-*.npy")) == ["batch-000000.npy"]
    calls.clear()
    monkeypatch.setattr(sample_stage, "generate",
                        lambda *a, **k: calls.append(len(k["seeds"])) or real_generate(*a, **k))
    sample_shard(model_dir, out, "0/1")
    assert calls == [3, 3, 1]  # batches 1, 2, 3 of 0..3: batch 0 was kept
    assert np.array_equal(sampling.load_samples(out)[0], images)
    assert not out.with_name(out.name + ".partial").exists()


def test_stale_partial_batches_are_discarded(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "shard-0-of-1.npz"
    real_generate = sample_stage.generate  # sample_images (igsm.stages.sample) calls it by this name
    calls = []

    def dying_generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(sample_stage, "generate", dying_generate)
    with pytest.raises(Killed):
        sample_shard(model_dir, out, "0/1")
    monkeypatch.setattr(sample_stage, "generate", real_generate)
    changed = {**SETTINGS, "num_steps": 5}
    sample_shard(model_dir, out, "0/1", settings=changed)
    fresh = tmp_path / "fresh.npz"
    sample_shard(model_dir, fresh, "0/1", settings=changed)
    assert np.array_equal(sampling.load_samples(out)[0], sampling.load_samples(fresh)[0])


def test_gather_starts_without_torch_and_draws_torchvisions_grid(model_dir, uninterrupted, tmp_path):
    """The gather job (one per scored model, most of them one shard long) reads and writes sample
    files and draws the grid without torch: it loads none of torch, torchvision, clean-fid, and its
    grid is, pixel for pixel, torchvision's save_image of the same images (make_grid's layout, one
    channel as RGB, the 16×16 demo's images enlarged). Bugs caught: a torch import back on the
    gather's path (igsm.sampling's package, igsm.plots, the stage module: ~2-4 s of CPU per job
    again, BENCHMARKS.md), a grid with another padding, row length or channel count."""
    import math

    from torchvision.utils import save_image

    from igsm.plots import save_grid

    shard = tmp_path / "shard-0-of-1.npz"
    sample_shard(model_dir, shard, "0/1")
    loaded = modules_loaded_by_command("gather-samples", "--out", tmp_path / "samples.npz", "--grid",
                                       tmp_path / "grid.png", "--first-seed", 7, "--num-images", NUM_IMAGES, shard)
    assert loaded == "[]", loaded
    images, seeds, _ = sampling.load_samples(tmp_path / "samples.npz")
    assert np.array_equal(images, uninterrupted[0]) and np.array_equal(seeds, uninterrupted[1])
    rng = np.random.default_rng(0)
    for count, side, channels, nrow in ((NUM_IMAGES, 8, 1, None), (1, 16, 1, None), (5, 16, 3, 3), (7, 100, 3, 10)):
        batch = images if count == NUM_IMAGES else rng.integers(0, 256, (count, side, side, channels), dtype=np.uint8)
        save_grid(batch, tmp_path / "ours.png", nrow)
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
        scale = max(1, 64 // side)
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        save_image(x, tmp_path / "torchvision.png", nrow=nrow or math.ceil(math.sqrt(count)), padding=1)
        ours, theirs = (np.asarray(Image.open(tmp_path / name)) for name in ("ours.png", "torchvision.png"))
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs), (count, side, channels, nrow)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    save_grid(images, tmp_path / "ours.png")
    assert np.array_equal(grid, np.asarray(Image.open(tmp_path / "ours.png")))


def test_gather_refuses_missing_duplicate_or_mismatched_shards(model_dir, tmp_path):
    shards = [tmp_path / f"shard-{i}-of-3.npz" for i in range(3)]
    for i in (0, 2):
        sample_shard(model_dir, shards[i], f"{i}/3")
    with pytest.raises(ValueError, match="not contiguous"):
        sampling.gather_shards([shards[0], shards[2]], 7, NUM_IMAGES)
    with pytest.raises(ValueError, match="expected 10 images"):
        sampling.gather_shards([shards[0], shards[0], shards[2]], 7, NUM_IMAGES)
    sample_shard(model_dir, shards[1], "1/3", precision="bf16")
    with pytest.raises(ValueError, match="precision"):
        sampling.gather_shards(shards, 7, NUM_IMAGES)
    result = CliRunner().invoke(cli, ["gather-samples", "--out", str(tmp_path / "x.npz"), "--first-seed", "7",
                                      "--num-images", "10", str(shards[0]), str(shards[2])])
    assert result.exit_code != 0 and "seeds" in result.output and not (tmp_path / "x.npz").exists()


def test_cli_flags_override_settings_and_are_recorded(model_dir, tmp_path):
    out = tmp_path / "bf16.npz"
    sample_shard(model_dir, out, "0/1", precision="bf16", micro_batch=5)
    _, _, metadata = sampling.load_samples(out)
    assert metadata["precision"] == "bf16" and metadata["micro_batch"] == 5 and metadata["batch_size"] == 3
    assert metadata["compile_mode"] is None and metadata["device"] == "cpu"


def test_fid_json_states_the_image_precision(model_dir, uninterrupted, tmp_path, monkeypatch):
    from igsm import fid
    from igsm.stages import fid as fid_stage

    images, seeds, metadata = uninterrupted
    samples = tmp_path / "samples.npz"
    sampling.save_samples(samples, images, seeds, {**metadata, "precision": "bf16"})
    rng = np.random.default_rng(0)
    reference = tmp_path / "reference.npz"
    fid.save_statistics(reference, rng.normal(size=(50, 8)), mode="clean")
    # Inception itself is tested in test_fid.py; here only what the command writes.
    monkeypatch.setattr(fid_stage, "features", lambda images, *a: (rng.normal(size=(len(images), 8)),
                                                                      {"mode": "clean", "precision": "fp32"}))
    out, stats = tmp_path / "fid.json", tmp_path / "stats.npz"
    run_cli("fid-statistics", "--samples", samples, "--out", stats, "--settings", '{"mode": "clean"}',
            "--device", "cpu")
    run_cli("fid", "--statistics", stats, "--reference", reference, "--out", out, "--settings", '{"mode": "clean"}')
    score = json.loads(out.read_text())
    assert score["image_precision"] == "bf16" and score["precision"] == "fp32" and score["num_images"] == 10
    assert score["sampler"] == "ddim" and score["sampler_kwargs"]["num_steps"] == 4


def test_png_export_is_lossless_and_named_by_seed(uninterrupted, tmp_path):
    images, seeds, metadata = uninterrupted
    samples = tmp_path / "samples.npz"
    sampling.save_samples(samples, images, seeds, metadata)
    run_cli("export-png", "--samples", samples, "--out", tmp_path / "png")
    files = sorted((tmp_path / "png").iterdir())
    assert [f.name for f in files] == [f"{s:06d}.png" for s in seeds]
    for file, image in zip(files, images):
        assert np.array_equal(np.asarray(Image.open(file)), image[..., 0])


def test_efficiency_on_cpu_records_null_speed_unless_asked(model_dir, tmp_path):
    out = tmp_path / "eff.json"
    run_cli("efficiency", "--model", model_dir, "--out", out, "--device", "cpu")
    info = json.loads(out.read_text())
    assert info["params"] > 0 and info["macs"] > 0 and info["images_per_s"] is None
    assert "no GPU" in info["images_per_s_note"]
    run_cli("efficiency", "--model", model_dir, "--out", out, "--device", "cpu", "--throughput", "--batch-size", 4,
            "--settings", '{"precision": "bf16"}')
    info = json.loads(out.read_text())
    assert info["images_per_s"] > 0 and info["precision"] == "bf16" and info["compile_mode"] is None
    assert "eager" in info["images_per_s_note"]


def test_efficiency_times_the_network_as_sampling_compiles_it(model_dir, tmp_path):
    out = tmp_path / "eff.json"
    run_cli("efficiency", "--model", model_dir, "--out", out, "--device", "cpu", "--throughput", "--batch-size", 4,
            "--settings", '{"precision": "fp32", "compile": true, "compile_mode": "default"}')
    info = json.loads(out.read_text())
    assert info["images_per_s"] > 0 and info["compile_mode"] == "default"
    assert "torch.compile default" in info["images_per_s_note"]
    with pytest.raises(AssertionError, match="compile_mode"):
        run_cli("efficiency", "--model", model_dir, "--out", out, "--device", "cpu", "--throughput",
                "--settings", '{"compile": true, "compile_mode": "fastest"}')


def test_torchrun_processes_share_a_shard(model_dir, uninterrupted, tmp_path):
    out = tmp_path / "shard-0-of-1.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "igsm", "sample", "--nproc-per-node", "2", "--model", str(model_dir), "--out", str(out),
         "--num-images", str(NUM_IMAGES), "--first-seed", "7", "--settings", json.dumps(SETTINGS), "--device", "cpu",
         "--threads", "2"],
        env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    images, _, metadata = sampling.load_samples(out)
    assert metadata["world_size"] == 2 and np.array_equal(images, uninterrupted[0])


@pytest.mark.parametrize("network, expected", [
    ("eager", {"precision": "tf32"}),
    ("as-sampled", {"precision": "bf16", "channels_last": True, "compile": True, "compile_mode": "default"}),
])
def test_efficiency_jobs_time_the_network_the_config_names(network, expected, tmp_path):
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    experiment = config["experiments"]["digits_unet"]
    experiment["sample"].update(precision="bf16", channels_last=True, compile=True)
    experiment["efficiency"] = {"network": network, "batch_size": 64}
    experiment["reuse"] = {}  # block reuse samples eagerly: not with compile (tests/test_config.py)
    experiment["compare_samplers"] = {}  # the four models alone
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_snakemake("-n", "-p", "--configfile", str(path), "-d", str(tmp_path), "-s", str(REPO / "Snakefile"),
                         "all_tables")
    commands = [line for line in proc.stdout.splitlines() if "-m igsm efficiency" in line]
    assert len(commands) == 4  # dense, untrained, np, igsm
    for command in commands:
        settings = json.loads(re.search(r"--settings '([^']*)'", command).group(1))
        assert settings == expected and "--batch-size 64" in command


def test_dag_has_one_job_per_shard_a_gather_and_optional_pngs(tmp_path):
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config["experiments"]["digits_unet"]["sample"].update(num_shards=3, png_export=True)
    config["resources"] = {"sample": {"gpu": 2}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_snakemake("-n", "-p", "--configfile", str(path), "-d", str(tmp_path), "-s", str(REPO / "Snakefile"),
                         "all_tables", "all_sample_pngs")
    table = proc.stdout.split("Job stats:")[1]
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}
    # dense, untrained, np, igsm; the demo's four block-reuse variants of dense and its five sampler
    # variants that sample (compare_samplers: its DDIM-20 entry is the dense model's own sampler)
    variants = 4 + 4 + 5
    assert counts["sample"] == 3 * variants and counts["sample_gather"] == variants
    assert counts["sample_png"] == variants
    assert "--nproc-per-node 2" in proc.stdout
    assert "--shard 2/3" in proc.stdout and "shard-2-of-3.npz" in proc.stdout
    # A sampler variant's jobs get its entry over the sample settings; DPM-Solver's algorithm
    # reaches only DPM-Solver's jobs (the others' settings, and so their finished images, unchanged).
    settings = {re.search(r"--out '?results/samples/digits_unet/(\S+?)/shard-0", line).group(1):
                json.loads(re.search(r"--settings '([^']*)'", line).group(1))
                for line in proc.stdout.splitlines() if "-m igsm sample " in line and "shard-0-of-3" in line}
    assert settings["dense"]["sampler"] == "ddim" and "algorithm" not in settings["dense"]
    assert {k: settings["dense/dpm-solver-25"][k] for k in ("sampler", "num_steps", "algorithm")} == \
        {"sampler": "dpm-solver", "num_steps": 25, "algorithm": "dpmsolver++"}
    assert settings["dense/ddim-10"]["num_steps"] == 10 and "dense/ddim-20" not in settings  # the dense model's


def test_euler_maruyama_walks_u_vits_time_grid():
    """U-ViT's sde.py: grid [0] + linspace(1e-3, 1, N) from 1 down, the network at 999·t of each
    interval's upper end, Euler–Maruyama steps, the last one (1e-3 → 0) without noise."""
    seen = []

    def zero_noise_net(x, t):  # ε̂ = 0: each step is x + h·½β(t)·x (+ noise)
        seen.append(t[0].item())
        return torch.zeros_like(x)

    seeds, shape = np.array([5, 6]), (1, 2, 2)
    gens = sampling.ImageGenerators(seeds)
    noise = gens.randn(shape)
    x = sampling.euler_maruyama_sample(zero_noise_net, noise, num_steps=3, generators=gens)
    grid = [1.0, 0.5005, 1e-3, 0.0]  # linspace(1e-3, 1, 3) reversed, then 0
    np.testing.assert_allclose(seen, [999 * t for t in grid[:-1]], rtol=1e-7)  # float32 inputs
    check = sampling.ImageGenerators(seeds)
    expected = check.randn(shape).double()
    for i, (t, s) in enumerate(zip(grid, grid[1:])):
        beta, h = 0.1 + t * 19.9, t - s
        expected = expected + h * 0.5 * beta * expected
        if s != 0:
            expected = expected + (beta * h) ** 0.5 * check.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(x.double(), expected, rtol=1e-6, atol=1e-6)


def test_u_vit_images_do_not_depend_on_the_batch():
    from igsm.uvit import UViT

    torch.manual_seed(0)
    net = sampling.Denoiser(UViT(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2).eval(),
                            micro_batch=4)
    seeds = np.arange(7)
    kwargs = dict(sampler="euler-maruyama", num_steps=5, image_shape=(1, 8, 8))
    whole = sampling.generate(net, seeds=seeds, **kwargs)
    parts = torch.cat([sampling.generate(net, seeds=seeds[i:i + 3], **kwargs) for i in range(0, 7, 3)])
    assert torch.equal(parts, whole) and torch.isfinite(whole).all()


def test_sampler_settings_have_no_defaults_of_their_own():
    """The schema alone holds the sample defaults (an Euler–Maruyama config without num_steps once ran
    DDIM's 100 steps because two places disagreed): a key it would fill is an error naming it."""
    assert sampling.sampler_kwargs({"sampler": "euler-maruyama", "num_steps": 1000}) == {"num_steps": 1000}
    with pytest.raises(ValueError, match="sample.num_steps: missing .* euler-maruyama"):
        sampling.sampler_kwargs({"sampler": "euler-maruyama"})
    with pytest.raises(ValueError, match="sample.spacing: missing"):
        sampling.sampler_kwargs({"sampler": "ddim", "num_steps": 10, "eta": 0.0, "clip_x0": False})
    with pytest.raises(ValueError, match="sample.sampler: unknown None"):
        sampling.sampler_kwargs({"num_steps": 10})


def test_every_registered_sampler_is_in_the_schema():
    """The schema's sample.sampler enum is the registry, and each sampler reads only keys the
    schema knows (a sampler added to one but not the other fails here, not in a job)."""
    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())
    pending, sections = [schema], []
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            sample = node.get("sample")
            if isinstance(sample, dict) and "sampler" in sample.get("properties", {}):
                sections.append(sample["properties"])
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    assert len(sections) == 1
    assert sections[0]["sampler"]["enum"] == list(sampling.SAMPLERS) == list(sampling.REGISTRY)
    for name, cls in sampling.REGISTRY.items():
        assert cls.name == name and set(cls.config_keys) <= set(sections[0]), name
