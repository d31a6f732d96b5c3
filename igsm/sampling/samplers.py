"""The samplers as step objects, and the one loop that runs any of them (paper Sec. 5.1).

* DDIM (Song et al. 2021, Eq. 12) for the U-Nets: 100 steps, η = 0 in the paper (Sec. 5.1),
  "uniform" or "quad" timestep spacing as in the DDIM reference code (Diff-Pruning's numbers use
  "quad"). η = 1 with all 1000 steps is ancestral DDPM sampling (tests check it).
* Euler–Maruyama on the VP-SDE for U-ViT (Song et al. 2021b), exactly as U-ViT's ``sde.py``:
  β ∈ [0.1, 20], the time grid [0] + linspace(1e-3, 1, N) walked from 1 down, network time input
  t·``VPSDE_TIME_SCALE`` at the upper end of each interval, the last interval (1e-3 → 0) without
  noise; N = 1000.
* DPM-Solver (Lu et al. 2022a, "DPM-Solver", NeurIPS; 2022b, "DPM-Solver++", arXiv 2211.01095),
  multistep 2nd order for both processes: DPM-Solver++(2M) (2022b Algorithm 2: a first-order
  step, then x̃_{t_i} = σ_{t_i}/σ_{t_{i−1}}·x̃ − α_{t_i}(e^{−h_i} − 1)·D_i with
  D_i = (1 + 1/(2r_i))·x̂₀(t_{i−1}) − 1/(2r_i)·x̂₀(t_{i−2})) on the data prediction by default, or
  the same multistep form on ε̂ (``algorithm: dpmsolver``); on a DDPM schedule exactly diffusers'
  ``DPMSolverMultistepScheduler`` at its defaults (tests compare the two), on the VP-SDE in
  continuous time.

A sampler (:class:`Sampler`) is one chain of ``num_steps`` steps: ``start(noise)`` gives the state,
``network_input(x, i)`` what the network sees at step i, ``update(x, ε̂, i, z)`` the next state (``z``:
the step's standard-normal draw where ``draws_noise(i)``), ``finish`` the image. :func:`run_sampler`
is the loop, without gradients (:func:`generate`: one batch of images from their seeds); DiP-GO's SuperNet chain (``igsm.reuse``) runs the same objects with
gradients, so every update rule exists once. ``REGISTRY`` holds them by the config's name
(``sample.sampler``). The elementwise updates run in float64: correctly rounded IEEE operations,
identical whatever the vector width that computes them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from igsm.diffusion import VPSDE, VPSDE_TIME_SCALE, NoiseSchedule, vp_log_alpha
from igsm.sampling.denoiser import Denoiser, as_denoiser
from igsm.registry import registered_twice
from igsm.sampling.noise import ImageGenerators


# ---------------------------------------------------------------------------------------------
# Update rules
# ---------------------------------------------------------------------------------------------

def ddim_timesteps(num_train_steps: int, num_steps: int, spacing: str = "uniform") -> list[int]:
    """Increasing timesteps visited by DDIM, as in the DDIM reference implementation."""
    if spacing == "uniform":
        skip = num_train_steps // num_steps
        return list(range(0, num_train_steps, skip))[:num_steps]
    if spacing == "quad":
        return [int(s) for s in np.linspace(0, math.sqrt(num_train_steps * 0.8), num_steps) ** 2]
    raise ValueError(f"unknown DDIM spacing {spacing!r}; choose 'uniform' or 'quad'")


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, a_next: torch.Tensor, eta: float = 0.0,
              clip_x0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update (Eq. 12) in float64 from x_t and ε̂: (the mean of x_{t−1}, σ_t); the caller
    adds σ_t·z where it draws noise. Differentiable (igsm.reuse trains through it)."""
    eps = eps.double()
    x0 = (x.double() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = (x.double() - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    # Eq. 12 of DDIM: σ_t = η·sqrt((1−ᾱ_{t−1})/(1−ᾱ_t))·sqrt(1−ᾱ_t/ᾱ_{t−1}).
    sigma = eta * ((1 - a_t / a_next) * (1 - a_next) / (1 - a_t)).sqrt()
    return a_next.sqrt() * x0 + (1 - a_next - sigma**2).sqrt() * eps, sigma


def euler_maruyama_grid(num_steps: int, t_min: float = 1e-3) -> torch.Tensor:
    """U-ViT's time grid [0] + linspace(t_min, 1, N), walked from 1 down (float64)."""
    return torch.cat([torch.zeros(1, dtype=torch.float64),
                      torch.linspace(t_min, 1.0, num_steps, dtype=torch.float64)]).flip(0)


def euler_maruyama_step(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, h: torch.Tensor,
                        beta_min: float = 0.1, beta_max: float = 20.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler–Maruyama step of the reverse VP-SDE from t to t − h, x float64: (the drift step,
    the noise scale √(β(t)h)); the caller adds the noise except on the last step."""
    beta = beta_min + t * (beta_max - beta_min)
    sigma = (1 - torch.exp(2 * vp_log_alpha(t, beta_min, beta_max))).sqrt()
    score = -eps.double() / sigma
    return x + h * (0.5 * beta * x + beta * score), (beta * h).sqrt()



# ---------------------------------------------------------------------------------------------
# Samplers: step objects and their registry
# ---------------------------------------------------------------------------------------------

class Sampler:
    """One sampling chain of ``num_steps`` steps, from x_T = noise to x_0.

    ``name``: the config's ``sample.sampler``; ``config_keys``: the keys of the 'sample' settings it
    takes (:func:`sampler_kwargs`); ``keywords``: its settings besides ``num_steps``, as keyword
    arguments of :meth:`for_process`. A member implements for_process, network_time,
    network_input, draws_noise and update (the base raises NotImplementedError naming them);
    start and finish have defaults.
    """

    name: str
    config_keys: tuple[str, ...]
    keywords: tuple[str, ...]
    num_steps: int

    @classmethod
    def for_process(cls, process: NoiseSchedule | VPSDE | None, num_steps: int, **settings) -> "Sampler":
        """The sampler for a network trained on ``process`` (None: the sampler's default process)."""
        raise NotImplementedError(f"sampler {cls.name!r} does not implement for_process()")

    def network_time(self, i: int) -> float:
        """The network's time input at step i."""
        raise NotImplementedError(f"sampler {self.name!r} does not implement network_time()")

    @property
    def timesteps(self) -> list[float]:
        """The network time inputs in sampling order (what a block-reuse plan is made for)."""
        return [self.network_time(i) for i in range(self.num_steps)]

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        """The chain's state at x_T = ``noise``."""
        return noise

    def network_input(self, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, t) as the network takes them at step i: every image at the same t."""
        raise NotImplementedError(f"sampler {self.name!r} does not implement network_input()")

    def draws_noise(self, i: int) -> bool:
        """Whether step i adds fresh noise (one standard-normal draw per image, float64)."""
        raise NotImplementedError(f"sampler {self.name!r} does not implement draws_noise()")

    def update(self, x: torch.Tensor, eps: torch.Tensor, i: int, z: torch.Tensor | None) -> torch.Tensor:
        """The state after step i from ε̂ = ``eps``; ``z``: the step's draw, None where it draws none."""
        raise NotImplementedError(f"sampler {self.name!r} does not implement update()")

    def finish(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x_0 from the last state, in the noise's ``dtype``."""
        return x.to(dtype)


REGISTRY: dict[str, type[Sampler]] = {}


def register(cls: type[Sampler]) -> type[Sampler]:
    if cls.name in REGISTRY:
        raise registered_twice("sampler", cls.name, f"the name {cls.name!r}", REGISTRY[cls.name], cls)
    REGISTRY[cls.name] = cls
    return cls


@register
class DDIM(Sampler):
    """DDIM (Eq. 12) over ``schedule``'s integer steps; η = ``eta``, x̂_0 clipped to [−1, 1] with ``clip_x0``."""

    name = "ddim"
    config_keys = ("num_steps", "eta", "spacing", "clip_x0")
    keywords = ("eta", "spacing", "clip_x0")

    def __init__(self, schedule: NoiseSchedule, num_steps: int, eta: float = 0.0, spacing: str = "uniform",
                 clip_x0: bool = False):
        seq = ddim_timesteps(schedule.num_steps, num_steps, spacing)
        # (t, t_next) from T down; t_next = −1 is x_0 itself (ᾱ = 1).
        self.pairs = list(zip(reversed(seq), reversed([-1] + seq[:-1])))
        self.num_steps = len(self.pairs)
        self.abar = schedule.alphas_cumprod
        self.eta, self.spacing, self.clip_x0 = eta, spacing, clip_x0

    @classmethod
    def for_process(cls, process, num_steps, **settings):
        """DDIM walks the process's integer network times (a VP-SDE's at t = k/999); default DDPM's."""
        schedule = process.integer_steps() if process is not None else NoiseSchedule.linear()
        return cls(schedule, num_steps, **settings)

    def network_time(self, i):
        return self.pairs[i][0]

    def start(self, noise):
        self.abar = self.abar.to(noise.device)  # once per chain, not once per step
        return noise

    def network_input(self, x, i):
        return x, torch.full((len(x),), self.network_time(i), device=x.device, dtype=torch.long)

    def draws_noise(self, i):
        return self.eta > 0 and self.pairs[i][1] >= 0

    def update(self, x, eps, i, z):
        t, t_next = self.pairs[i]
        a_t, a_next = self.abar[t], (self.abar[t_next] if t_next >= 0 else self.abar.new_tensor(1.0))
        x_next, sigma = ddim_step(x, eps, a_t, a_next, self.eta, self.clip_x0)
        if self.draws_noise(i):
            x_next = x_next + sigma * z
        return x_next.to(x.dtype)


@register
class EulerMaruyama(Sampler):
    """The reverse VP-SDE dx = [−½β(t)x − β(t)∇log p_t(x)]dt + √β(t) dw̄ from t = 1 to 0 on U-ViT's grid
    [0] + linspace(t_min, 1, num_steps); the state is float64, the last step returns the mean."""

    name = "euler-maruyama"
    config_keys = ("num_steps",)
    keywords = ("t_min",)

    def __init__(self, process: VPSDE, num_steps: int, t_min: float = 1e-3):
        self.process, self.num_steps, self.t_min = process, num_steps, t_min
        self.grid = euler_maruyama_grid(num_steps, t_min)

    @classmethod
    def for_process(cls, process, num_steps, **settings):
        if process is not None and not isinstance(process, VPSDE):
            raise ValueError("sampler euler-maruyama integrates the VP-SDE, but the model's process is "
                             f"{process.kind!r}; use diffusion.process vpsde or sampler ddim")
        return cls(process or VPSDE(), num_steps, **settings)

    def network_time(self, i):
        # float64 here; the network gets it rounded to float32 (network_input).
        return float(self.grid[i]) * VPSDE_TIME_SCALE

    def start(self, noise):
        return noise.double()

    def network_input(self, x, i):
        return x.float(), torch.full((len(x),), self.network_time(i), device=x.device)

    def draws_noise(self, i):
        return i < self.num_steps - 1  # the last step returns the mean, as U-ViT does

    def update(self, x, eps, i, z):
        t, h = self.grid[i], self.grid[i] - self.grid[i + 1]
        x, scale = euler_maruyama_step(x, eps, t, h, self.process.beta_min, self.process.beta_max)
        if self.draws_noise(i):
            x = x + scale * z
        return x


def dpm_solver_timesteps(num_train_steps: int, num_steps: int) -> list[int]:
    """Decreasing integer timesteps of diffusers' DPMSolverMultistepScheduler with its default
    ``timestep_spacing="linspace"``: round(linspace(0, T − 1, N + 1)) from T − 1 down, 0 left out."""
    grid = np.linspace(0, num_train_steps - 1, num_steps + 1).round()[::-1][:-1]
    return [int(t) for t in grid]


def dpm_solver_grid(process: VPSDE, num_steps: int, t_min: float = 1e-3) -> torch.Tensor:
    """Times from 1 down to ``t_min``, uniform in λ (DPM-Solver's ``skip_type='logSNR'``), float64."""
    ends = process.log_snr_half(torch.tensor([1.0, t_min], dtype=torch.float64))
    t = process.time_at(torch.linspace(float(ends[0]), float(ends[1]), num_steps + 1, dtype=torch.float64))
    t[0], t[-1] = 1.0, t_min  # the ends exactly, not through the inverse's rounding
    return t


def dpm_solver_step(x: torch.Tensor, model: torch.Tensor, model_prev: torch.Tensor | None, alphas, sigmas,
                    lambdas, data_prediction: bool) -> torch.Tensor:
    """One multistep DPM-Solver(++) update from s₀ to t, float64 (differentiable).

    ``alphas``, ``sigmas``: (α, σ) at (t, s₀), ``lambdas``: λ = log α − log σ at (t, s₀, s₁) (s₁ the
    step before, ignored for a first-order step, ``model_prev`` None). ``model``: x̂₀ at s₀ with
    ``data_prediction`` (DPM-Solver++), else ε̂. First order is DDIM; second order the midpoint
    form, D = m₀ + (m₀ − m₁)/(2r), r = h₋₁/h."""
    (alpha_t, alpha_s), (sigma_t, sigma_s) = alphas, sigmas
    h = lambdas[0] - lambdas[1]
    d = model.double()
    if model_prev is not None:
        r = (lambdas[1] - lambdas[2]) / h
        d = d + (d - model_prev.double()) / (2 * r)
    if data_prediction:
        if sigma_t == 0:  # the last step to σ = 0 (h = ∞): x̂₀ itself
            return d
        return (sigma_t / sigma_s) * x + alpha_t * -math.expm1(-h) * d
    return (alpha_t / alpha_s) * x - sigma_t * math.expm1(h) * d


@register
class DPMSolver(Sampler):
    """Multistep DPM-Solver, 2nd order: ``algorithm`` "dpmsolver++" (data prediction, Lu et al.
    2022b Algorithm 2, DPM-Solver++(2M)) or "dpmsolver" (noise prediction: the same multistep
    midpoint update applied to ε̂, multistep DPM-Solver-2 as diffusers' algorithm_type
    "dpmsolver"). Draws no noise.

    On a DDPM schedule (discrete): exactly diffusers' ``DPMSolverMultistepScheduler`` at its
    defaults (solver_order 2, solver_type "midpoint", timestep_spacing "linspace",
    lower_order_final True, final_sigmas_type "zero"; "dpmsolver" needs "sigma_min" there, so it
    ends at ᾱ₀'s noise level, not at x̂₀): the first step and the last one (dpmsolver++; dpmsolver
    below 15 steps) are first order, the others second order. On the VP-SDE (continuous time):
    λ(t) of DPM-Solver's ``NoiseScheduleVP('linear')``, N steps from t = 1 to ``t_min`` = 1e-3
    uniform in λ (``skip_type='logSNR'``, the default of the DPM-Solver code U-ViT's
    ``eval_ldm.py`` calls; uniform in t left 10–17× larger errors at 10–20 steps on a Gaussian
    target), the network at t·``VPSDE_TIME_SCALE``; the last step first order below 10 steps
    (DPM-Solver's ``lower_order_final``); the image is x at ``t_min``, no final denoising step.

    The state is float64 [x; previous model output] stacked along a new first dimension, so a
    step is a pure function of its inputs (DiP-GO's checkpoints rerun steps)."""

    name = "dpm-solver"
    config_keys = ("num_steps", "algorithm")
    keywords = ("algorithm", "t_min")
    ALGORITHMS = ("dpmsolver++", "dpmsolver")

    def __init__(self, alphas: list[float], sigmas: list[float], times: list[float], algorithm: str = "dpmsolver++",
                 first_order_last: bool = True, integer_times: bool = True):
        """``alphas``, ``sigmas``: (α, σ) at the N + 1 grid points from x_T on; ``times``: the
        network's time input at the first N."""
        if algorithm not in self.ALGORITHMS:
            raise ValueError(f"sample.algorithm: unknown {algorithm!r}; choose one of {self.ALGORITHMS}")
        self.alphas, self.sigmas, self.times = alphas, sigmas, times
        self.lambdas = [math.log(a) - math.log(s) if s > 0 else math.inf for a, s in zip(alphas, sigmas)]
        self.num_steps, self.algorithm = len(times), algorithm
        self.first_order_last, self.integer_times = first_order_last, integer_times

    @classmethod
    def for_process(cls, process, num_steps, algorithm="dpmsolver++", t_min=1e-3):
        if isinstance(process, VPSDE):
            t = dpm_solver_grid(process, num_steps, t_min)
            alpha, sigma = process.alpha_sigma(t)
            return cls(alpha.tolist(), sigma.tolist(), (t[:-1] * VPSDE_TIME_SCALE).tolist(), algorithm,
                       first_order_last=num_steps < 10, integer_times=False)
        schedule = process if process is not None else NoiseSchedule.linear()
        abar = schedule.alphas_cumprod.double()
        steps = dpm_solver_timesteps(schedule.num_steps, num_steps)
        # diffusers' final_sigmas_type: "zero" (x̂₀) for dpmsolver++, "sigma_min" (ᾱ₀) for dpmsolver.
        last = [1.0] if algorithm == "dpmsolver++" else [float(abar[0])]
        abars = [float(abar[t]) for t in steps] + last
        return cls([a ** 0.5 for a in abars], [(1 - a) ** 0.5 for a in abars], steps, algorithm,
                   first_order_last=algorithm == "dpmsolver++" or num_steps < 15)

    def network_time(self, i):
        return self.times[i]

    def start(self, noise):
        x = noise.double()
        return torch.stack([x, torch.zeros_like(x)])

    def network_input(self, x, i):
        dtype = torch.long if self.integer_times else torch.float32
        return x[0].float(), torch.full((x.shape[1],), self.network_time(i), device=x.device, dtype=dtype)

    def draws_noise(self, i):
        return False

    def update(self, x, eps, i, z):
        x, prev = x[0], x[1]
        alpha, sigma = self.alphas[i], self.sigmas[i]
        data_prediction = self.algorithm == "dpmsolver++"
        model = (x - sigma * eps.double()) / alpha if data_prediction else eps.double()
        second_order = i > 0 and not (self.first_order_last and i == self.num_steps - 1)
        x_next = dpm_solver_step(x, model, prev if second_order else None, (self.alphas[i + 1], alpha),
                                 (self.sigmas[i + 1], sigma),
                                 (self.lambdas[i + 1], self.lambdas[i], self.lambdas[i - 1] if i else None),
                                 data_prediction)
        return torch.stack([x_next, model])

    def finish(self, x, dtype):
        return x[0].to(dtype)


SAMPLERS = tuple(REGISTRY)  # the built-in ones, the schema's sample.sampler enum (a test keeps them equal)


def sampler_class(name: str) -> type[Sampler]:
    if name not in REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; choose one of {tuple(REGISTRY)}")
    return REGISTRY[name]


def make_sampler(name: str, process: NoiseSchedule | VPSDE | None = None, **settings) -> Sampler:
    """The sampler ``name`` with ``settings`` (``num_steps`` and its :attr:`Sampler.keywords`) for a
    network trained on ``process`` (None: the sampler's default)."""
    return sampler_class(name).for_process(process, **settings)


def sampler_kwargs(settings: dict) -> dict:
    """The sampler's keyword arguments from the config's 'sample' section, as the schema fills it.

    No defaults here: the schema holds them (``num_steps`` per sampler: 100 for DDIM, 1000 for
    Euler–Maruyama), so a second copy cannot disagree with it; a key it would have filled is an
    error naming it."""
    sampler = settings.get("sampler")
    if sampler not in REGISTRY:
        raise ValueError(f"sample.sampler: unknown {sampler!r}; choose one of {tuple(REGISTRY)}")
    needed = REGISTRY[sampler].config_keys
    missing = [key for key in needed if key not in settings]
    if missing:
        raise ValueError(f"sample.{missing[0]}: missing from the sample settings (the workflow's schema "
                         f"fills {', '.join(missing)} for the {sampler} sampler; give them with --settings)")
    return {key: settings[key] for key in needed}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def run_sampler(sampler: Sampler, net, noise: torch.Tensor, generators=None,
                condition: torch.Tensor | None = None) -> torch.Tensor:
    """x_T = ``noise`` → x_0 (unclamped) through ``sampler``. ``net``: a module, a ``Denoiser`` or any
    (x, t) → ε̂. ``generators``: the images' ``ImageGenerators``, drawn from in step order (needed
    where a step draws noise). ``condition``: each image's condition, for a conditional network
    (the same at every step)."""
    if generators is None and any(sampler.draws_noise(i) for i in range(sampler.num_steps)):
        raise ValueError(f"{sampler.name} with these settings draws noise at its steps: pass generators")
    denoise = as_denoiser(net)
    x = sampler.start(noise)
    for i in range(sampler.num_steps):
        eps = denoise(*sampler.network_input(x, i), **({} if condition is None else {"condition": condition}))
        z = (generators.randn(noise.shape[1:], device=noise.device, dtype=torch.float64)
             if sampler.draws_noise(i) else None)
        x = sampler.update(x, eps, i, z)
    return sampler.finish(x, noise.dtype)


def generate(net, *, sampler: str, seeds, image_shape, schedule: NoiseSchedule | VPSDE | None = None,
             device="cpu", micro_batch: int | None = None, noise_threads: int = 1, conditioning=None,
             **sampler_kwargs) -> torch.Tensor:
    """One batch: image k of the batch from seed ``seeds[k]`` (and, with ``conditioning``
    (igsm.conditioning), under the condition of that seed). ``net``: a module (wrapped in a
    ``Denoiser`` with ``micro_batch``) or a ``Denoiser``. ``schedule``: the process the network
    was trained on (default: DDPM's for DDIM, U-ViT's VP-SDE for Euler–Maruyama). DDIM walks its
    integer steps (a VP-SDE at t = k/999); Euler–Maruyama integrates the VP-SDE and refuses DDPM."""
    chain = make_sampler(sampler, schedule, **sampler_kwargs)
    if not isinstance(net, Denoiser):
        net = Denoiser(net, micro_batch=micro_batch)
    generators = ImageGenerators(seeds, noise_threads)
    noise = generators.randn(image_shape, device=device)
    condition = None if conditioning is None else conditioning.sampling_condition(seeds, device)
    return run_sampler(chain, net, noise, generators, condition)


def ddim_sample(net, noise: torch.Tensor, schedule: NoiseSchedule, num_steps: int = 100, eta: float = 0.0,
                spacing: str = "uniform", generators=None, clip_x0: bool = False) -> torch.Tensor:
    """DDIM on ``schedule`` (integer steps) from x_T = ``noise`` to x_0."""
    return run_sampler(DDIM(schedule, num_steps, eta, spacing, clip_x0), net, noise, generators)


def euler_maruyama_sample(net, noise: torch.Tensor, num_steps: int = 1000, beta_min: float = 0.1,
                          beta_max: float = 20.0, t_min: float = 1e-3, generators=None) -> torch.Tensor:
    """Euler–Maruyama on the VP-SDE with β ∈ [``beta_min``, ``beta_max``] from x_T = ``noise`` to x_0."""
    return run_sampler(EulerMaruyama(VPSDE(beta_min, beta_max), num_steps, t_min), net, noise, generators)
