"""The DDPM forward process shared by training, pruning and sampling (paper Sec. 3.2, App. B).

x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε with linear betas 1e-4..2e-2 over 1000 steps (Table 6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseSchedule:
    """Discrete-time VP schedule; ``alphas_cumprod[t]`` is ᾱ_t for t = 0..T−1."""

    alphas_cumprod: torch.Tensor

    @classmethod
    def linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2):
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_steps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *[1] * (x0.ndim - 1))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def antithetic_timesteps(batch_size: int, num_steps: int, generator: torch.Generator,
                         device=None) -> torch.Tensor:
    """t for the first half of the batch and T−1−t for the second, as the authors train.

    Pairing t with its mirror lowers the variance of the batch loss across noise levels.
    """
    half = (batch_size + 1) // 2
    t = torch.randint(0, num_steps, (half,), generator=generator, device=generator.device)
    return torch.cat([t, num_steps - 1 - t])[:batch_size].to(device)
