"""Guards on quantities that reach every published number but that no output checks by itself
(issue 19): the training loop's EMA and gradient clipping. Each test names the bug it catches."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY_ARCHITECTURE
from igsm import training
from igsm.models import build_unet

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ---- EMA --------------------------------------------------------------------------------------

def test_update_ema_is_decay_times_ema_plus_one_minus_decay_times_param():
    """Catches the weight inverted (ema ← (1−d)·ema + d·param: the "EMA" is nearly the last iterate)
    and an update that ignores one of the two."""
    torch.manual_seed(0)
    ema, net = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    for decay in (0.9, 0.25):
        old = [p.detach().clone() for p in ema.parameters()]
        training._update_ema(ema, net, decay)
        for e, o, p in zip(ema.parameters(), old, net.parameters()):
            torch.testing.assert_close(e, decay * o + (1 - decay) * p.detach(), rtol=0, atol=1e-7)
    assert not torch.equal(before[0], next(ema.parameters()))  # it moved: not 0 == 0


def _tiny_run(tmp_path, **settings):
    """In-process training of the tiny U-Net, a snapshot after every step: (initial, ema, snapshots)."""
    torch.manual_seed(0)
    net = build_unet(TINY_ARCHITECTURE)
    initial = copy.deepcopy(net.state_dict())
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 1), dtype=np.uint8)
    options = training.TrainingOptions.from_dict({
        "objective": {"weights": {"np": 1.0}}, "num_steps": 4, "batch_size": 4, "log_every": 1,
        "checkpoint_every": 1, "keep_checkpoints": 10, "lr": 1e-2, **settings})
    ema, _ = training.train(net, images, options, tmp_path / "ck", tmp_path / "metrics.jsonl")
    snapshots = [torch.load(tmp_path / "ck" / f"step-{s:07d}.pt", weights_only=False) for s in range(1, 5)]
    return initial, ema, snapshots


def test_training_returns_the_ema_of_the_per_step_weights(tmp_path):
    """Through a real training loop: the returned (saved) model is the by-hand EMA of the weights
    after each step, with the warm-up decay min(ema_decay, (1+s)/(10+s)). Catches the inverted
    weight, a wrong warm-up (or none), the EMA updated before the optimizer step or from the wrong
    network, and a loop returning the raw network instead of the EMA. ema_decay 0.2 makes the
    minimum switch sides within four steps: (1+s)/(10+s) is 0.1, 0.18, then 0.25 > 0.2."""
    ema_decay = 0.2
    initial, ema, snapshots = _tiny_run(tmp_path, ema_decay=ema_decay)
    expected = {k: v.double() for k, v in initial.items()}
    for step, snap in enumerate(snapshots):
        decay = min(ema_decay, (1 + step) / (10 + step))
        for name, value in snap["net"].items():
            if value.is_floating_point():
                expected[name] = decay * expected[name] + (1 - decay) * value.double()
        for name, value in snap["ema"].items():  # the snapshot's EMA too (what a resume continues)
            if value.is_floating_point():
                torch.testing.assert_close(value.double(), expected[name], rtol=1e-5, atol=1e-6)
    final = ema.state_dict()
    moved = 0.0
    for name, value in final.items():
        if value.is_floating_point():
            torch.testing.assert_close(value.double(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
            moved = max(moved, (value.double() - snapshots[-1]["net"][name].double()).abs().max().item())
    assert moved > 1e-3, "EMA and last iterate coincide: the test could not tell them apart"


def test_gradient_clipping_limits_the_step(tmp_path):
    """Catches clipping switched off (or given another bound): gradients clipped to norm 1e-9 sit
    far below Adam's eps (1e-8), so the clipped run's weights barely move; unclipped ones move by
    ~lr per step (Adam normalises the gradient's scale away)."""
    _, ema_clip, snaps_clip = _tiny_run(tmp_path / "a", grad_clip=1e-9, ema_decay=0.0)
    _, ema_free, snaps_free = _tiny_run(tmp_path / "b", grad_clip=1e9, ema_decay=0.0)
    # Gradients clipped to norm 1e-9 are far below Adam's eps 1e-8: the update nearly vanishes.
    first = "conv_in.weight"
    start = snaps_clip[0]["net"][first]
    clipped_move = (snaps_clip[-1]["net"][first] - start).abs().max().item()
    free_move = (snaps_free[-1]["net"][first] - snaps_free[0]["net"][first]).abs().max().item()
    assert free_move > 1e-5
    assert clipped_move < 0.2 * free_move


# ---- forward process: schedule and timestep pairing --------------------------------------------

def test_ddpm_schedule_is_the_papers_linear_betas():
    """Catches another beta schedule (scaled-linear √β, cosine), other end points (Table 6: 1e-4 …
    0.02 over 1000 steps) or ᾱ as a product that starts one step late: ᾱ recomputed here in
    numpy, and two values pinned (ᾱ_0 = 1 − 1e-4, ᾱ_999 ≈ 4.04e-5, DDPM's CIFAR-10 schedule)."""
    from igsm.diffusion import NoiseSchedule

    abar = NoiseSchedule.linear().alphas_cumprod
    expected = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    assert abar.dtype == torch.float64 and abar.shape == (1000,)
    np.testing.assert_allclose(abar.numpy(), expected, rtol=1e-12)
    assert abar[0].item() == pytest.approx(0.9999, rel=1e-12)
    assert abar[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)


def test_antithetic_timesteps_pair_t_with_its_mirror():
    """Catches the pairing lost or shifted (T − t, t, a second independent draw): the second half
    is T−1−t of the first, and the first half covers 0 … T−1 uniformly."""
    from igsm.diffusion import antithetic_timesteps

    t = antithetic_timesteps(9, 1000, torch.Generator().manual_seed(5))
    assert t.dtype == torch.int64 and t.shape == (9,)
    assert torch.equal(t[5:], 999 - t[:4])
    many = antithetic_timesteps(20000, 10, torch.Generator().manual_seed(0))
    first, second = many[:10000], many[10000:]
    assert torch.equal(second, 9 - first)
    counts = torch.bincount(first, minlength=10)
    assert counts.min() > 900 and counts.max() < 1100  # uniform over 0..9 (±~3σ)


# ---- sampling: the per-image seeds --------------------------------------------------------------

def test_image_k_draws_its_noise_from_a_generator_seeded_with_its_seed():
    """Catches a seed offset (seed + 1, first_seed ignored, the batch index instead of the seed),
    which the shift test of test_sampling (seeds + 1 gives the images shifted by one) cannot see:
    image k's initial noise is exactly torch.Generator().manual_seed(seed_k)'s first draw."""
    from igsm.sampling import ImageGenerators

    seeds = [0, 7, 123456]
    noise = ImageGenerators(seeds).randn((3, 4, 4))
    for k, seed in enumerate(seeds):
        expected = torch.randn((3, 4, 4), generator=torch.Generator("cpu").manual_seed(seed))
        assert torch.equal(noise[k], expected), seed


# ---- training data as the loop feeds it ----------------------------------------------------------

def test_training_batches_are_the_images_or_their_left_right_mirror(tmp_path):
    """Catches flips along the wrong axis (upside-down images), flips applied to every image or to
    none, and a wrong scaling to the model range: the clean images x0 the loop noises (recorded
    by a schedule that remembers them) are exactly the training image in [−1, 1] or its mirror."""
    from igsm.diffusion import NoiseSchedule

    seen = []

    class Recording(NoiseSchedule):
        def add_noise(self, x0, noise, t):
            seen.append(x0.detach().clone())
            return super().add_noise(x0, noise, t)

    image = np.arange(16 * 16, dtype=np.uint8).reshape(1, 16, 16, 1)  # no symmetry at all
    torch.manual_seed(0)
    net = build_unet(TINY_ARCHITECTURE)
    options = training.TrainingOptions.from_dict(dict(objective={"weights": {"np": 1.0}}, num_steps=3, batch_size=8, hflip=True, checkpoint_every=10))
    training.train(net, image, options, tmp_path / "ck", tmp_path / "m.jsonl",
                   schedule=Recording(NoiseSchedule.linear().alphas_cumprod))
    x = torch.from_numpy(image).permute(0, 3, 1, 2).double() / 127.5 - 1
    flips = 0
    for x0 in torch.cat(seen).double():
        same = torch.allclose(x0, x[0], rtol=0, atol=1e-6)  # float32 in the loop
        mirrored = torch.allclose(x0, x[0].flip(-1), rtol=0, atol=1e-6)
        assert same or mirrored
        flips += mirrored
    assert 0 < flips < len(seen) * 8  # both occur (24 draws)
