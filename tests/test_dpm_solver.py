"""DPM-Solver (igsm.sampling.samplers.DPMSolver) against references, on CPU with tiny networks.

* DDPM schedule: our DPM-Solver++(2M) and DPM-Solver(2M) equal diffusers'
  ``DPMSolverMultistepScheduler`` loop at its defaults (same network, same noise, same timesteps)
  to float32 tolerance, at 10 and 25 steps (below and above diffusers' 15-step switch of the last
  step's order).
* VP-SDE (continuous time): on a Gaussian target, whose probability-flow ODE has a closed-form
  solution, both variants converge to the exact x(t_min) at second order, where DDIM-like first
  order steps on the same grid converge at first order.
* Image k does not depend on the batch or its companions; DiP-GO's SuperNet chain with every gate
  kept is the plain loop, bitwise, on a U-Net and a U-ViT (gradients through the checkpoints).
"""

import numpy as np
import pytest
import torch

from conftest import TINY_GRAY_UNET
from igsm import reuse, sampling
from igsm.diffusion import VPSDE, NoiseSchedule
from igsm.models import build_unet
from igsm.sampling.samplers import DPMSolver, dpm_solver_step
from igsm.uvit import UViT

SHAPE = (1, 8, 8)
MU, STD = 0.3, 0.5  # the toy data: every pixel i.i.d. N(MU, STD²)
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet(TINY_GRAY_UNET).eval()


@pytest.fixture(scope="module")
def uvit():
    torch.manual_seed(0)
    return UViT(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=4, num_heads=2).eval()


# ---------------------------------------------------------------------------------------------
# DDPM schedule: diffusers' scheduler
# ---------------------------------------------------------------------------------------------

def diffusers_loop(denoiser, noise, num_steps, algorithm):
    """diffusers' own sampling loop with DPMSolverMultistepScheduler at its defaults (linear β
    1e-4..2e-2 over 1000 steps, order 2, midpoint, linspace spacing, lower_order_final); it
    refuses final_sigmas_type "zero" for dpmsolver, so that one ends at σ_min."""
    from diffusers import DPMSolverMultistepScheduler

    final = "zero" if algorithm == "dpmsolver++" else "sigma_min"
    with pytest.warns(FutureWarning) if algorithm == "dpmsolver" else _nothing():
        scheduler = DPMSolverMultistepScheduler(algorithm_type=algorithm, final_sigmas_type=final)
    scheduler.set_timesteps(num_steps)
    x, seen = noise.clone(), []
    for t in scheduler.timesteps:
        seen.append(int(t))
        eps = denoiser(x, torch.full((len(x),), int(t)))
        x = scheduler.step(eps, t, x).prev_sample
    return x, seen


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("num_steps", [10, 25])
def test_ddpm_dpm_solver_is_diffusers_scheduler(unet, algorithm, num_steps):
    """Catches: another timestep spacing or an off-by-one in it (the timesteps are compared), a
    wrong λ, r or midpoint coefficient, the order of the first or last step (diffusers: first order
    at the first step, and at the last one for dpmsolver++ always and for dpmsolver below 15
    steps: 10 and 25 steps see both), the wrong final noise level (x̂₀ vs ᾱ₀), the ε/x̂₀ mix-up
    of the two algorithms. Observed: |ours − diffusers| ≤ 6e-7 of the images' scale (diffusers
    runs in float32, we in float64)."""
    denoiser = sampling.Denoiser(unet)
    noise = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    reference, seen = diffusers_loop(denoiser, noise, num_steps, algorithm)
    chain = sampling.make_sampler("dpm-solver", NoiseSchedule.linear(), num_steps=num_steps, algorithm=algorithm)
    assert chain.timesteps == seen and chain.num_steps == num_steps
    ours = sampling.run_sampler(chain, denoiser, noise)
    scale = reference.abs().max()
    torch.testing.assert_close(ours, reference, rtol=0, atol=5e-6 * scale)


def test_the_default_process_is_ddpm_and_a_bad_algorithm_names_the_key():
    """Catches: a VP-SDE grid on a DDPM model by default, an unchecked algorithm silently run as
    another one."""
    chain = sampling.make_sampler("dpm-solver", num_steps=10)
    assert chain.timesteps == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    with pytest.raises(ValueError, match="sample.algorithm: unknown 'dpm'"):
        sampling.make_sampler("dpm-solver", num_steps=10, algorithm="dpm")


# ---------------------------------------------------------------------------------------------
# VP-SDE (continuous time): the exact solution of a Gaussian target
# ---------------------------------------------------------------------------------------------

def gaussian_vp_noise(x, t_in):
    """The exact ε̂(x_t, t) = E[ε | x_t] for data N(MU, STD²) under the VP-SDE, network time t·999,
    in float64 (so that only the solver's error is left)."""
    alpha, sigma = VPSDE().alpha_sigma(t_in.double().view(-1, 1, 1, 1) / 999)
    return sigma * (x.double() - alpha * MU) / (alpha**2 * STD**2 + sigma**2)


def exact_flow(x1, t):
    """The probability-flow ODE from t = 1 to ``t`` for Gaussian data: it keeps each pixel's
    standardised value, x_t = α_t·MU + √(α_t²STD² + σ_t²)·(x_1 − α_1·MU)/√(α_1²STD² + σ_1²)."""
    (a1, s1), (a, s) = (VPSDE().alpha_sigma(torch.tensor(v, dtype=torch.float64)) for v in (1.0, t))
    return a * MU + (a**2 * STD**2 + s**2).sqrt() * (x1.double() - a1 * MU) / (a1**2 * STD**2 + s1**2).sqrt()


def first_order_error(chain, noise, exact):
    """The same grid walked by first-order steps only (DDIM in λ): the baseline the order is seen against."""
    x = noise.double()
    for i in range(chain.num_steps):
        eps = gaussian_vp_noise(x, torch.full((len(x),), chain.network_time(i)))
        model = (x - chain.sigmas[i] * eps) / chain.alphas[i]
        x = dpm_solver_step(x, model, None, (chain.alphas[i + 1], chain.alphas[i]),
                            (chain.sigmas[i + 1], chain.sigmas[i]), (chain.lambdas[i + 1], chain.lambdas[i]), True)
    return float((x - exact).abs().max())


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
def test_vpsde_dpm_solver_converges_at_second_order_to_the_exact_flow(algorithm):
    """Catches: a wrong λ(t) or α/σ of the VP-SDE (no convergence to the exact x(t_min)), an
    off-by-one between the grid and the network's time input (first order at best), a wrong r or
    midpoint coefficient (first order), another end time. Observed errors (max over 1024 pixels):
    dpmsolver++ 0.067 / 0.027 / 0.0072 / 0.0018 at 10 / 20 / 40 / 80 steps."""
    noise = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = exact_flow(noise, 1e-3)
    errors, first = {}, {}
    for num_steps in (10, 20, 40, 80):
        chain = sampling.make_sampler("dpm-solver", VPSDE(), num_steps=num_steps, algorithm=algorithm)
        assert chain.network_time(0) == 999.0 and abs(chain.times[-1] / 999 - 1e-3) > 1e-4  # t_min is not visited
        errors[num_steps] = float((sampling.run_sampler(chain, gaussian_vp_noise, noise) - exact).abs().max())
        first[num_steps] = first_order_error(chain, noise, exact)
    assert errors[10] < 0.15 and errors[80] < 3e-3, errors
    assert errors[40] / errors[80] > 3.5, errors  # second order: 4× per halving
    assert first[40] / first[80] < 2.5 and errors[80] < first[80] / 10, (errors, first)


def test_vpsde_dpm_solver_walks_log_snr_uniform_times():
    """The grid: t = 1 down to t_min = 1e-3, equal steps in λ; network input t·999 in float32.
    Catches: a grid uniform in t (the λ steps would be far from equal), integer time inputs."""
    chain = sampling.make_sampler("dpm-solver", VPSDE(), num_steps=6)
    lambdas = np.array(chain.lambdas)
    np.testing.assert_allclose(np.diff(lambdas), (lambdas[-1] - lambdas[0]) / 6, rtol=1e-9)
    t = VPSDE().time_at(torch.tensor(chain.lambdas[:-1], dtype=torch.float64))
    np.testing.assert_allclose(chain.timesteps, 999 * t.numpy(), rtol=1e-12)
    seen = []
    sampling.run_sampler(chain, lambda x, t: seen.append(t) or torch.zeros_like(x), torch.zeros(2, *SHAPE))
    assert seen[0].dtype == torch.float32 and seen[0][0] == 999.0


# ---------------------------------------------------------------------------------------------
# Batch invariance and DiP-GO's chain
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["unet", "uvit"])
def test_image_k_is_bitwise_identical_at_any_batch_size(unet, uvit, family):
    """Catches: state shared across images (the stacked [x; previous prediction] mixed up
    between images or batches), a network call whose shape follows the batch."""
    net = sampling.Denoiser(unet if family == "unet" else uvit, micro_batch=4)
    kwargs = dict(sampler="dpm-solver", num_steps=6, algorithm="dpmsolver++", image_shape=SHAPE,
                  schedule=NoiseSchedule.linear() if family == "unet" else VPSDE())
    seeds = np.arange(100, 111)
    whole = sampling.generate(net, seeds=seeds, **kwargs)
    assert whole.shape == (11, *SHAPE) and whole.dtype == torch.float32 and torch.isfinite(whole).all()
    for batch_size in (1, 3, 5):
        batched = torch.cat([sampling.generate(net, seeds=seeds[i:i + batch_size], **kwargs)
                             for i in range(0, len(seeds), batch_size)])
        assert torch.equal(batched, whole), f"batch size {batch_size}"
    other = sampling.generate(net, seeds=seeds + 1, **kwargs)
    assert torch.equal(other[:-1], whole[1:]) and not torch.equal(other, whole)


@pytest.mark.parametrize("family", ["unet", "uvit"])
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
def test_supernet_with_every_gate_kept_is_the_dpm_solver(unet, uvit, family, algorithm):
    """DiP-GO's differentiable chain reruns each step under a checkpoint: with every gate kept its
    x_0 is the plain loop's, bitwise, and the gradient reaches the gates. Catches: per-step state
    kept on the sampler object (the recomputation in the backward pass would see the last step's),
    a previous prediction not carried in the chain's state."""
    net = unet if family == "unet" else uvit
    process = NoiseSchedule.linear() if family == "unet" else VPSDE()
    num_steps, seeds = 5, np.arange(3)
    chain = reuse._make_chain("dpm-solver", num_steps, process, algorithm=algorithm)
    noise = sampling.ImageGenerators(seeds).randn(SHAPE)
    dense = sampling.run_sampler(chain, net, noise)
    gates = torch.zeros(num_steps, 5, 2)
    gates[..., reuse.KEEP] = 1
    gates.requires_grad_()
    images = reuse._supernet_sample(net, reuse.block_graph(net), chain, noise, gates, [None] * num_steps)
    assert torch.equal(images, dense)
    images.square().sum().backward()
    assert gates.grad[0].abs().sum() == 0 and (gates.grad[1:, :, reuse.REUSE].abs().sum(1) > 0).all()


def test_learn_plan_runs_dpm_solver_chains(unet):
    """DiP-GO learns a plan for DPM-Solver from the sample settings (the algorithm reaches its
    chains and is recorded). Catches: learn_plan dropping sample.algorithm."""
    from igsm import reuse_methods

    options = {"sampler": "dpm-solver", "num_steps": 4, "algorithm": "dpmsolver"}
    plan = reuse_methods.METHODS["dipgo"].plan(unet, 0.8, options, NoiseSchedule.linear(),
                                               {"train_steps": 2, "progress": False})
    assert list(plan.timesteps) == sampling.make_sampler("dpm-solver", num_steps=4).timesteps
    assert plan.metadata["settings"]["algorithm"] == "dpmsolver" and plan.mac_fraction() <= 0.8 + 1e-9
