"""The forward processes shared by training, pruning and sampling (paper Sec. 3.2, 5.1; App. B).

Two processes with one small interface, chosen by the experiment's ``diffusion.process``:

* ``ddpm`` (:class:`NoiseSchedule`): the U-Nets' discrete process, x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε
  with linear betas 1e-4..2e-2 over 1000 steps (Table 6); integer t ∈ {0..T−1}, which is also
  what the network sees. ``beta_schedule: scaled_linear`` is Stable Diffusion's (and DiT's VAE-era
  LDMs'): √β linear from √β_start to √β_end (SD 1.5: 0.00085..0.012).
* ``vpsde`` (:class:`VPSDE`): U-ViT's continuous VP-SDE (Table 7; U-ViT's ``sde.py``), linear
  β(t) from β_min 0.1 to β_max 20 on t ∈ [0, 1], x_t = α(t)·x_0 + σ(t)·ε with
  log α(t) = −¼t²(β_max − β_min) − ½t·β_min and σ² = 1 − α²; the network sees t·999.

The interface the training loop and the objectives use:

* ``sample_times(batch_size, generator, device)``: antithetic times for one batch (t for the first
  half, its mirror for the second: T−1−t, resp. 1−t);
* ``add_noise(x0, noise, t)``: x_t;
* ``network_time(t)``: the time input of the network;
* ``identity()``: bytes that name the process and its parameters (training fingerprints);
* ``integer_steps()``: the process as a DDPM schedule over the network's integer times, for code
  that walks t = 0, 1, …, T−1 (Diff-Pruning's gradient loop, DDIM).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from igsm.schema import section_defaults

PROCESSES = ("ddpm", "vpsde")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype).view(-1, *[1] * (like.ndim - 1))


@dataclass(frozen=True)
class NoiseSchedule:
    """The DDPM process: discrete-time VP schedule, ``alphas_cumprod[t]`` is ᾱ_t for t = 0..T−1."""

    alphas_cumprod: torch.Tensor
    kind = "ddpm"

    @classmethod
    def linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2,
               beta_schedule: str = "linear"):
        """β linear from β_start to β_end, or (``scaled_linear``) √β linear between their roots."""
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        else:
            raise ValueError(f"diffusion.beta_schedule: unknown {beta_schedule!r}; choose linear or scaled_linear")
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_steps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = _per_sample(self.alphas_cumprod.to(x0.device)[t], x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def sample_times(self, batch_size: int, generator: torch.Generator, device=None) -> torch.Tensor:
        return antithetic_timesteps(batch_size, self.num_steps, generator, device)

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def identity(self) -> bytes:
        # ᾱ alone, as fingerprints hashed it before the VP-SDE existed: DDPM snapshots stay resumable.
        return self.alphas_cumprod.double().numpy().tobytes()

    def integer_steps(self) -> "NoiseSchedule":
        return self


def vp_log_alpha(t, beta_min: float = 0.1, beta_max: float = 20.0):
    """log α(t) of the VP-SDE with linear β(t): x_t = α(t)·x_0 + σ(t)·ε, σ² = 1 − α²
    (−½∫₀ᵗβ; U-ViT's ``cum_alpha`` is α²)."""
    return -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min


# U-ViT's network input is t·999 (sde.py ScoreModel.predict), the DDPM step index scale.
VPSDE_TIME_SCALE = 999


@dataclass(frozen=True)
class VPSDE:
    """U-ViT's continuous VP-SDE with linear β(t) ∈ [β_min, β_max] on t ∈ [0, 1].

    Training times are t ~ U(0, 1) with no lower bound, as U-ViT's ``SDE.sample`` (``t_init=0``):
    the noise-prediction loss stays finite at t = 0 (σ = 0 only makes ε unpredictable there), and
    its sampler's grid stops at 1e-3 anyway, so a t_min would only move training away from the
    reference.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    kind = "vpsde"

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α(t), σ(t)) in float64."""
        log_alpha = vp_log_alpha(t.double(), self.beta_min, self.beta_max)
        # σ² = 1 − α² = −expm1(2 log α): exact near t = 0, where 1 − α² cancels.
        return log_alpha.exp(), (-torch.expm1(2 * log_alpha)).sqrt()

    def log_snr_half(self, t: torch.Tensor) -> torch.Tensor:
        """λ(t) = log α(t) − log σ(t), half the log signal-to-noise ratio (DPM-Solver's λ), float64."""
        alpha, sigma = self.alpha_sigma(t)
        return alpha.log() - sigma.log()

    def time_at(self, lam: torch.Tensor) -> torch.Tensor:
        """The t of λ(t) = ``lam`` (the inverse of :meth:`log_snr_half`; DPM-Solver's
        ``NoiseScheduleVP.inverse_lambda`` for the linear schedule): log α = −½ log(1 + e^{−2λ}),
        then the positive root of ¼(β_max − β_min)t² + ½β_min·t + log α = 0, written without
        cancellation."""
        lam = lam.double()
        c = 2 * (self.beta_max - self.beta_min) * torch.logaddexp(-2 * lam, torch.zeros_like(lam))
        return c / ((self.beta_min**2 + c).sqrt() + self.beta_min) / (self.beta_max - self.beta_min)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t.to(x0.device))
        return _per_sample(alpha, x0) * x0 + _per_sample(sigma, x0) * noise

    def sample_times(self, batch_size: int, generator: torch.Generator, device=None) -> torch.Tensor:
        """u ~ U(0, 1) for the first half of the batch and 1 − u for the second (antithetic)."""
        half = (batch_size + 1) // 2
        u = torch.rand((half,), generator=generator, device=generator.device, dtype=torch.float64)
        return torch.cat([u, 1 - u])[:batch_size].to(device)

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        return (t * VPSDE_TIME_SCALE).float()

    def identity(self) -> bytes:
        return json.dumps({"process": self.kind, "beta_min": self.beta_min, "beta_max": self.beta_max},
                          sort_keys=True).encode()

    def integer_steps(self) -> NoiseSchedule:
        """ᾱ_k = α(k/999)² for k = 0..999: at integer network inputs k the network was trained at
        t = k/999, so code walking integer steps (Diff-Pruning's loop, DDIM) noises as it learned."""
        k = torch.arange(VPSDE_TIME_SCALE + 1, dtype=torch.float64)
        return NoiseSchedule(torch.exp(2 * vp_log_alpha(k / VPSDE_TIME_SCALE, self.beta_min, self.beta_max)))


def process_from_settings(diffusion: dict):
    """The process of an experiment's ``diffusion`` config section, the schema's defaults (of its
    process) where a key is unset."""
    settings = {**section_defaults("diffusion", diffusion), **diffusion}
    kind = settings["process"]
    if kind == "ddpm":
        return NoiseSchedule.linear(settings["num_steps"], settings["beta_start"], settings["beta_end"],
                                    settings["beta_schedule"])
    if kind == "vpsde":
        return VPSDE(settings["beta_min"], settings["beta_max"])
    raise ValueError(f"diffusion.process: unknown {kind!r}; choose one of {PROCESSES}")


def antithetic_timesteps(batch_size: int, num_steps: int, generator: torch.Generator,
                         device=None) -> torch.Tensor:
    """t for the first half of the batch and T−1−t for the second, as the authors train.

    Pairing t with its mirror lowers the variance of the batch loss across noise levels.
    """
    half = (batch_size + 1) // 2
    t = torch.randint(0, num_steps, (half,), generator=generator, device=generator.device)
    return torch.cat([t, num_steps - 1 - t])[:batch_size].to(device)
