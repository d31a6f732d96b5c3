"""The forward processes (igsm.diffusion): the VP-SDE against its closed form and U-ViT's
conventions, the DDPM process unchanged, the process in training fingerprints, and a tiny U-ViT
trained and resumed through `python -m igsm train` on the VP-SDE with NP + KD + JM2."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import command_env, metric_records
from igsm.diffusion import VPSDE, NoiseSchedule, antithetic_timesteps, process_from_settings, vp_log_alpha


def closed_form(t: float, beta_min=0.1, beta_max=20.0):
    """α(t) = exp(−½∫₀ᵗβ), β(s) = β_min + s(β_max − β_min), written out independently."""
    integral = beta_min * t + 0.5 * (beta_max - beta_min) * t * t
    alpha = math.exp(-0.5 * integral)
    return alpha, math.sqrt(1 - alpha * alpha)


@pytest.mark.parametrize("beta_min, beta_max", [(0.1, 20.0), (0.5, 10.0)])
def test_vpsde_noising_is_the_closed_form(beta_min, beta_max):
    """x_t = α(t)x_0 + σ(t)ε per sample, α² + σ² = 1 (a σ of √(1−α) or swapped coefficients fail)."""
    process = VPSDE(beta_min, beta_max)
    t = torch.tensor([0.0, 1e-3, 0.25, 0.5, 1.0], dtype=torch.float64)
    x0 = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_t = process.add_noise(x0, noise, t)
    for i, ti in enumerate(t.tolist()):
        alpha, sigma = closed_form(ti, beta_min, beta_max)
        torch.testing.assert_close(x_t[i], alpha * x0[i] + sigma * noise[i], rtol=1e-12, atol=1e-12)
    alpha, sigma = process.alpha_sigma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t), rtol=0, atol=1e-15)
    assert sigma[0] == 0 and alpha[0] == 1 and alpha[-1] < 0.08  # clean at 0, mostly noise at 1


def test_vp_log_alpha_has_one_definition():
    """The sampler and the training process use the same log α (one function, in igsm.diffusion)."""
    from igsm.sampling import samplers

    assert samplers.vp_log_alpha is vp_log_alpha
    assert vp_log_alpha(0.3) == pytest.approx(math.log(closed_form(0.3)[0]), rel=1e-14)


def test_vpsde_network_time_is_t_times_999():
    """U-ViT's sde.py feeds the network t·999 (not t, not t·1000)."""
    t = torch.tensor([0.0, 0.5, 1.0, 1 / 999], dtype=torch.float64)
    torch.testing.assert_close(VPSDE().network_time(t), torch.tensor([0.0, 499.5, 999.0, 1.0]))
    ddpm_t = torch.tensor([0, 7, 999])
    assert torch.equal(NoiseSchedule.linear().network_time(ddpm_t), ddpm_t)


def test_vpsde_times_are_antithetic_uniform_and_seeded():
    """t ~ U(0, 1) for the first half, 1 − t for the second; the same seed draws the same times."""
    process = VPSDE()
    t = process.sample_times(4001, torch.Generator().manual_seed(3))
    assert t.dtype == torch.float64 and t.shape == (4001,)
    assert 0 <= t.min() and t.max() <= 1
    half = 2001
    torch.testing.assert_close(t[half:], 1 - t[: 4001 - half], rtol=0, atol=0)
    assert abs(t[:half].mean().item() - 0.5) < 0.02 and abs(t[:half].var().item() - 1 / 12) < 0.01
    again = process.sample_times(4001, torch.Generator().manual_seed(3))
    assert torch.equal(t, again)


def test_ddpm_process_draws_as_before():
    """The DDPM process's times are antithetic_timesteps' (runs made before the VP-SDE repeat)."""
    schedule = NoiseSchedule.linear()
    a = schedule.sample_times(9, torch.Generator().manual_seed(5))
    b = antithetic_timesteps(9, 1000, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.dtype == torch.int64


def test_vpsde_integer_steps_are_the_sde_at_k_over_999():
    """Diff-Pruning's loop and DDIM walk integer steps k, which the network reads as t = k/999."""
    schedule = VPSDE().integer_steps()
    assert schedule.num_steps == 1000
    for k in (0, 1, 500, 999):
        assert schedule.alphas_cumprod[k].item() == pytest.approx(closed_form(k / 999)[0] ** 2, rel=1e-12)
    x0, noise, k = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.tensor([300])
    torch.testing.assert_close(schedule.add_noise(x0, noise, k), VPSDE().add_noise(x0, noise, k / 999.0))


def test_process_from_settings():
    assert isinstance(process_from_settings({}), NoiseSchedule)
    custom = process_from_settings({"process": "ddpm", "num_steps": 10, "beta_start": 1e-3, "beta_end": 0.1})
    torch.testing.assert_close(custom.alphas_cumprod, NoiseSchedule.linear(10, 1e-3, 0.1).alphas_cumprod)
    assert process_from_settings({"process": "vpsde", "beta_min": 0.2, "beta_max": 10.0}) == VPSDE(0.2, 10.0)
    with pytest.raises(ValueError, match="diffusion.process: unknown 'vp'"):
        process_from_settings({"process": "vp"})


def test_fingerprint_changes_with_the_process():
    """A snapshot of a DDPM run is never resumed by a VP-SDE run (or one with other β bounds), and
    DDPM fingerprints are what they were before the VP-SDE existed (ᾱ's bytes)."""
    import hashlib
    from dataclasses import asdict

    from igsm.training import BOOKKEEPING_OPTIONS, TrainingOptions, _hash_tensors, run_fingerprint

    net = torch.nn.Linear(2, 2)
    images = np.zeros((4, 8, 8, 1), dtype=np.uint8)
    options = TrainingOptions.from_dict({"num_steps": 5, "objective": {"weights": {"np": 1.0}}})
    prints = {name: run_fingerprint(net, images, options, None, process) for name, process in {
        "ddpm": NoiseSchedule.linear(), "vpsde": VPSDE(), "vpsde_other": VPSDE(0.1, 19.0)}.items()}
    assert len(set(prints.values())) == 3
    assert run_fingerprint(net, images, options, None, VPSDE()) == prints["vpsde"]
    # The DDPM fingerprint, computed as the loop computed it before.
    digest = hashlib.sha256()
    settings = {k: v for k, v in asdict(options).items() if k not in BOOKKEEPING_OPTIONS}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(NoiseSchedule.linear().alphas_cumprod.double().numpy().tobytes())
    digest.update(f"images:{images.dtype}:{images.shape};".encode())
    digest.update(np.ascontiguousarray(images).data)
    _hash_tensors(digest, net.state_dict())
    digest.update(b"teacher;")
    assert prints["ddpm"] == digest.hexdigest()


def test_euler_maruyama_refuses_a_ddpm_process():
    from igsm.sampling import generate

    net = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="euler-maruyama integrates the VP-SDE.*'ddpm'"):
        generate(net, sampler="euler-maruyama", seeds=[0], image_shape=(1, 4, 4),
                 schedule=NoiseSchedule.linear(), num_steps=2)


def test_euler_maruyama_takes_the_process_betas():
    """sample with process vpsde (β 0.5..10) integrates that SDE, not the default one."""
    from igsm.sampling import euler_maruyama_sample, generate, ImageGenerators

    net = lambda x, t: 0.1 * x  # noqa: E731
    images = generate(net, sampler="euler-maruyama", seeds=[0, 1], image_shape=(1, 4, 4),
                      schedule=VPSDE(0.5, 10.0), num_steps=5)

    def run(**betas):  # as generate draws: the initial noise, then each step's, per image
        generators = ImageGenerators([0, 1])
        noise = generators.randn((1, 4, 4))
        return euler_maruyama_sample(net, noise, num_steps=5, generators=generators, **betas)

    expected, default = run(beta_min=0.5, beta_max=10.0), run()
    assert torch.equal(images, expected) and not torch.equal(images, default)


# ---- a tiny U-ViT through `python -m igsm train` on the VP-SDE ---------------------------------

TINY_UVIT = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def tiny_uvit(tmp_path_factory):
    from igsm.data import write_store
    from igsm.models import save_model
    from igsm.uvit import UViT

    folder = tmp_path_factory.mktemp("tiny_uvit")
    torch.manual_seed(0)
    save_model(UViT(**TINY_UVIT), folder / "student")
    torch.manual_seed(1)
    save_model(UViT(**{**TINY_UVIT, "embed_dim": 32}), folder / "teacher")
    # Smooth images (a blob at a random place): something a network can learn in a few steps.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:8, :8]
    centres = rng.uniform(1, 6, (32, 2))
    blobs = np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 4)
    write_store(folder / "data", [((255 * blobs[..., None]).astype(np.uint8), np.zeros(len(blobs), np.int64))])
    return folder


def uvit_train(inputs, out, num_steps, process="vpsde"):
    settings = {"diffusion": {"process": process},
                "training": {"num_steps": num_steps, "batch_size": 8, "lr": 2e-3, "optimizer": "adamw",
                             "weight_decay": 0.03, "betas": [0.99, 0.999], "warmup_steps": 2,
                             "log_every": 5, "checkpoint_every": 5, "ema_decay": 0.9,
                             "objective": {"weights": {"np": 1.0, "kd": 1.0, "jm2": 0.1}}}}
    command = [sys.executable, "-m", "igsm", "train", "--model", str(inputs / "student"),
               "--teacher", str(inputs / "teacher"), "--data", str(inputs / "data"),
               "--out", str(out / "model"), "--checkpoint-dir", str(out / "checkpoints"),
               "--metrics", str(out / "metrics.jsonl"), "--summary", str(out / "summary.json"),
               "--settings", json.dumps(settings), "--device", "cpu", "--threads", "1"]
    proc = subprocess.run(command, env=command_env(), text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


def test_uvit_trains_on_the_vpsde_and_resumes(tiny_uvit, tmp_path):
    """NP + KD + JM2 on a tiny U-ViT: finite terms, a falling loss, and a run stopped at step 10 and
    continued to 20 ends where an uninterrupted 20-step run ends; a DDPM run does not resume it."""
    from igsm.models import load_model

    whole, split = tmp_path / "whole", tmp_path / "split"
    uvit_train(tiny_uvit, whole, 20)
    records = metric_records(whole)
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    for record in records:
        assert all(math.isfinite(record[k]) for k in ("loss", "np", "kd", "jm2")), record
        assert record["jm2"] > 0
    assert records[-1]["loss"] < records[0]["loss"], records

    uvit_train(tiny_uvit, split, 10)
    log = uvit_train(tiny_uvit, split, 20)
    assert "resuming from" in log and "step-0000010.pt" in log
    assert metric_records(split) == records
    a, b = load_model(whole / "model"), load_model(split / "model")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name

    # The same run on the DDPM process: another fingerprint, so the VP-SDE snapshots are discarded.
    log = uvit_train(tiny_uvit, split, 25, process="ddpm")
    assert "written by a different run" in log and "resuming from" not in log


def test_scaled_linear_is_stable_diffusions_schedule():
    """diffusion.beta_schedule: scaled_linear with SD 1.5's β range gives diffusers' own ᾱ for it
    (catches β linear instead of √β, or the roots taken twice); the default stays the paper's."""
    from diffusers import DDPMScheduler

    from igsm.diffusion import process_from_settings

    sd = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    ours = process_from_settings({"process": "ddpm", "beta_start": 0.00085, "beta_end": 0.012,
                                  "beta_schedule": "scaled_linear"})
    torch.testing.assert_close(ours.alphas_cumprod.float(), sd.alphas_cumprod, rtol=1e-6, atol=1e-7)
    paper = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)
    torch.testing.assert_close(process_from_settings({}).alphas_cumprod.float(), paper.alphas_cumprod,
                               rtol=1e-6, atol=1e-7)
