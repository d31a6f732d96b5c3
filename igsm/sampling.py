"""Samplers as pure functions of (network, initial noise, schedule, per-image generators).

* DDIM (Song et al. 2021, Eq. 12) for the U-Nets: 100 steps, η = 0 in the paper (Sec. 5.1),
  "uniform" or "quad" timestep spacing as in the DDIM reference code (Diff-Pruning's numbers use
  "quad").
* Euler–Maruyama on the VP-SDE for U-ViT (Song et al. 2021b; β ∈ [0.1, 20], t ∈ [1e-3, 1],
  network time input t·999), 1000 steps.

Image k draws all its randomness from its own generator seeded with ``seed + k`` (edm's
StackedRandomGenerator), so it is the same image at any batch size, shard split or GPU count.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from igsm.diffusion import NoiseSchedule
from igsm.models import predict_noise


class ImageGenerators:
    """One torch.Generator per image; ``randn`` stacks one draw from each."""

    def __init__(self, seeds, device="cpu"):
        self.generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]

    def randn(self, shape, device="cpu", dtype=torch.float32):
        return torch.stack([
            torch.randn(shape, generator=g, device=g.device, dtype=dtype) for g in self.generators
        ]).to(device)


def ddim_timesteps(num_train_steps: int, num_steps: int, spacing: str = "uniform") -> list[int]:
    """Increasing timesteps visited by DDIM, as in the DDIM reference implementation."""
    if spacing == "uniform":
        skip = num_train_steps // num_steps
        return list(range(0, num_train_steps, skip))[:num_steps]
    if spacing == "quad":
        return [int(s) for s in np.linspace(0, math.sqrt(num_train_steps * 0.8), num_steps) ** 2]
    raise ValueError(f"unknown DDIM spacing {spacing!r}; choose 'uniform' or 'quad'")


@torch.no_grad()
def ddim_sample(net, noise: torch.Tensor, schedule: NoiseSchedule, num_steps: int = 100,
                eta: float = 0.0, spacing: str = "uniform", generators: ImageGenerators | None = None,
                clip_x0: bool = False) -> torch.Tensor:
    """x_T = ``noise`` → x_0 in [−1, 1] (unclamped unless ``clip_x0``)."""
    abar = schedule.alphas_cumprod.to(noise.device)
    seq = ddim_timesteps(schedule.num_steps, num_steps, spacing)
    x = noise
    for i, j in zip(reversed(seq), reversed([-1] + seq[:-1])):
        a_t, a_next = abar[i], (abar[j] if j >= 0 else abar.new_tensor(1.0))
        t = torch.full((len(x),), i, device=x.device, dtype=torch.long)
        eps = predict_noise(net, x, t).to(torch.float64)
        x0 = (x.double() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x.double() - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        # Eq. 12 of DDIM: σ_t = η·sqrt((1−ᾱ_{t−1})/(1−ᾱ_t))·sqrt(1−ᾱ_t/ᾱ_{t−1}).
        sigma = eta * ((1 - a_t / a_next) * (1 - a_next) / (1 - a_t)).sqrt()
        x_next = a_next.sqrt() * x0 + (1 - a_next - sigma**2).sqrt() * eps
        if eta > 0 and j >= 0:
            x_next = x_next + sigma * generators.randn(x.shape[1:], device=x.device, dtype=torch.float64)
        x = x_next.to(noise.dtype)
    return x


@torch.no_grad()
def euler_maruyama_sample(net, noise: torch.Tensor, num_steps: int = 1000,
                          beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3,
                          generators: ImageGenerators | None = None) -> torch.Tensor:
    """Reverse VP-SDE dx = [−½β(t)x − β(t)∇log p_t(x)]dt + √β(t) dw̄, integrated from t=1 to t_min."""
    ts = torch.linspace(1.0, t_min, num_steps + 1, dtype=torch.float64)
    x = noise.double()
    for step in range(num_steps):
        t, h = ts[step], ts[step] - ts[step + 1]
        beta = beta_min + t * (beta_max - beta_min)
        log_alpha = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
        sigma = (1 - torch.exp(2 * log_alpha)).sqrt()
        t_in = torch.full((len(x),), float(t * 999), device=x.device)
        score = -predict_noise(net, x.to(noise.dtype), t_in).double() / sigma
        x = x + h * (0.5 * beta * x + beta * score)
        if step < num_steps - 1:  # the last step returns the mean, as U-ViT does
            x = x + (beta * h).sqrt() * generators.randn(x.shape[1:], device=x.device, dtype=torch.float64)
    return x.to(noise.dtype)


def generate(net, *, sampler: str, seeds, image_shape, schedule: NoiseSchedule | None = None,
             device="cpu", **sampler_kwargs) -> torch.Tensor:
    """One batch: image k of the batch from seed ``seeds[k]``, whatever the batch composition."""
    generators = ImageGenerators(seeds)
    noise = generators.randn(image_shape, device=device)
    if sampler == "ddim":
        return ddim_sample(net, noise, schedule or NoiseSchedule.linear(), generators=generators,
                           **sampler_kwargs)
    if sampler == "euler-maruyama":
        return euler_maruyama_sample(net, noise, generators=generators, **sampler_kwargs)
    raise ValueError(f"unknown sampler {sampler!r}; choose 'ddim' or 'euler-maruyama'")
