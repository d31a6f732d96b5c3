"""igsm.objectives against brute force: full Jacobians, finite differences, the authors' code.

All in float64 on tiny networks: a diffusers UNet2DModel with attention and GroupNorm, and a plain
conv net. Runs in about a minute on one CPU thread.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from igsm.diffusion import NoiseSchedule, antithetic_timesteps
from igsm.models import predict_noise
from igsm.objectives import (NAMES, GaussianDirections, OTDDirections, build_objective,
                             jacobian_rows, math_attention, orthonormalize, otd_step)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_unet(widths, seed, channels=2, dropout=0.0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    net = UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels,
                      block_out_channels=widths, layers_per_block=1, norm_num_groups=4,
                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None, dropout=dropout)
    return net.double().eval()


class TinyConvNet(nn.Module):
    """A plain network s(x, t): conv → SiLU (+ time embedding) → conv."""

    def __init__(self, hidden, seed, channels=2):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Conv2d(channels, hidden, 3, padding=1)
        self.time = nn.Linear(1, hidden)
        self.out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x, t):
        h = self.inp(x) + self.time(t.to(x.dtype).view(-1, 1) / 1000)[:, :, None, None]
        return self.out(torch.nn.functional.silu(h))


def make_batch(batch=2, channels=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    schedule = NoiseSchedule.linear()
    x0 = torch.rand(batch, channels, 8, 8, generator=generator, dtype=torch.float64) * 2 - 1
    t = antithetic_timesteps(batch, schedule.num_steps, generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    return schedule.add_noise(x0, noise, t), t, noise


def fixed_directions(x, k, seed=1):
    v = torch.randn((k, *x.shape), generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    return orthonormalize(v)


def per_sample_jacobians(net, x, t):
    """(B, n, n): J[b, i, j] = ∂s_b,i / ∂x_b,j, from torch.autograd.functional.jacobian."""
    batch, n = x.shape[0], x[0].numel()
    full = torch.autograd.functional.jacobian(lambda z: predict_noise(net, z, t), x)
    full = full.reshape(batch, n, batch, n)
    return torch.stack([full[b, :, b, :] for b in range(batch)])


def reference_terms(jac, jac_dense, s, s_dense, noise, directions, projection):
    """Every term from explicit Jacobians, per sample."""
    v = directions.flatten(2)  # (k, B, n)
    pattern = "bij,kbi->kbj" if projection == "vjp" else "bij,kbj->kbi"  # Jᵀv or Jv
    p, p_dense = torch.einsum(pattern, jac, v), torch.einsum(pattern, jac_dense, v)
    a, b = p_dense.square().sum(2), p.square().sum(2)  # the expansions ‖P_D v̂‖², ‖P v̂‖²
    return {"np": (s - noise).square().flatten(1).sum(1),
            "kd": (s - s_dense).square().flatten(1).sum(1),
            "jm1": (p - p_dense).square().sum(2).mean(0),
            "jm2": (a - b).square().mean(0),
            "jm2_log": (torch.log(a) - torch.log(b)).square().mean(0),
            "jm2_rel": ((a - b) / a).square().mean(0)}


def tiny_uvit(embed_dim, seed, channels=2):
    from igsm.uvit import UViT

    torch.manual_seed(seed)
    return UViT(img_size=8, patch_size=4, in_chans=channels, embed_dim=embed_dim, depth=2, num_heads=2).double().eval()


NETS = {
    "unet": lambda: (tiny_unet((4, 8), seed=1), tiny_unet((8, 16), seed=2)),
    "conv": lambda: (TinyConvNet(6, seed=1).double(), TinyConvNet(10, seed=2).double()),
    "uvit": lambda: (tiny_uvit(8, seed=1), tiny_uvit(16, seed=2)),
}
ALL_TERMS = {"np": 1.0, "kd": 0.5, "jm1": 0.3, "jm2": 0.1, "jm2_log": 0.2, "jm2_rel": 0.4}


@pytest.fixture(scope="module")
def brute_force():
    """Per net: student, teacher, batch, outputs and full per-sample Jacobians (computed once)."""
    cache = {}

    def get(net_name):
        if net_name not in cache:
            student, teacher = NETS[net_name]()
            x_t, t, noise = make_batch()
            with torch.no_grad():
                outputs = predict_noise(student, x_t, t), predict_noise(teacher, x_t, t)
            jacobians = per_sample_jacobians(student, x_t, t), per_sample_jacobians(teacher, x_t, t)
            cache[net_name] = (student, teacher, (x_t, t, noise), outputs, jacobians)
        return cache[net_name]

    return get


# --- interface -----------------------------------------------------------------------------


def test_interface_errors():
    with pytest.raises(ValueError, match="'jac'"):
        build_objective({"np": 1.0, "jac": 0.1})
    with pytest.raises(ValueError, match="projection"):
        build_objective({"jm2": 1.0}, projection="fwd")
    with pytest.raises(ValueError, match="directions"):
        build_objective({"jm2": 1.0}, directions="uniform")
    with pytest.raises(ValueError, match="num_directions"):
        build_objective({"jm2": 1.0}, num_directions=0)
    with pytest.raises(ValueError, match="otd"):
        build_objective({"jm2": 1.0}, directions="otd", otd={"dt": 0.1, "step": 2})
    with pytest.raises(ValueError, match="jacobian_method"):
        build_objective({"jm2": 1.0}, jacobian_method="hessian")
    with pytest.raises(ValueError, match="projection='vjp'"):
        build_objective({"jm2": 1.0}, "jvp", jacobian_method="mixed_fd")
    with pytest.raises(ValueError, match="fd_scheme"):
        build_objective({"jm2": 1.0}, jacobian_method="mixed_fd", fd_scheme="backward")
    with pytest.raises(ValueError, match="fd_step"):
        build_objective({"jm2": 1.0}, jacobian_method="mixed_fd", fd_step=0.0)
    assert NAMES == ("np", "kd", "jm1", "jm2", "jm2_log", "jm2_rel")
    assert not build_objective({"np": 1.0, "kd": 0.0}).needs_teacher
    assert build_objective({"np": 1.0, "kd": 1.0}).needs_teacher
    assert build_objective({"jm2": 1.0}).needs_teacher

    student = TinyConvNet(4, seed=0).double()
    x_t, t, noise = make_batch()
    total, terms = build_objective({"np": 1.0, "kd": 0.0})(student, None, x_t, t, noise, None)
    assert total.shape == (2,) and set(terms) == {"np"}
    with pytest.raises(ValueError, match="teacher"):
        build_objective({"np": 1.0, "jm1": 1.0})(student, None, x_t, t, noise, None)
    with pytest.raises(ValueError, match="lose all digits"):  # finite differences in bf16
        half = copy.deepcopy(student).bfloat16()
        build_objective({"jm2": 1.0}, jacobian_method="mixed_fd")(half, half, x_t.bfloat16(), t, noise.bfloat16(), None)


def test_gaussian_directions_are_orthonormal_per_sample():
    x = torch.zeros(4, 2, 8, 8, dtype=torch.float64)
    for k in (1, 3):
        v = GaussianDirections(k)(x, None, torch.Generator().manual_seed(0))
        assert v.shape == (k, *x.shape)
        gram = torch.einsum("ibn,jbn->bij", v.flatten(2), v.flatten(2))
        torch.testing.assert_close(gram, torch.eye(k, dtype=x.dtype).expand(4, k, k), rtol=0, atol=1e-12)
    # k = 1 is the authors' v̂ = v/‖v‖ of one Gaussian draw.
    raw = torch.randn((1, *x.shape), generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    expected = raw / raw.flatten(2).norm(dim=2)[..., None, None, None]
    torch.testing.assert_close(GaussianDirections(1)(x, None, torch.Generator().manual_seed(0)), expected)



def test_directions_for_a_global_batch_are_the_rows_of_one_process_draw():
    """Several processes (igsm.training): each draws the directions of the whole global batch from
    the same seed and keeps its rows, so sample i gets the directions one process would give it.
    Catches a process drawing only its own rows (every process would reuse the first rows' draw:
    the same directions for samples 0 and B/2) or keeping the wrong rows; OTD's initial directions
    and the objective's must follow, and a user's callable is left as it is."""
    from igsm.objectives import CallableDirections

    x = torch.zeros(6, 2, 4, 4, dtype=torch.float64)
    for k in (1, 2):
        whole = GaussianDirections(k)(x, None, torch.Generator().manual_seed(3))
        halves = [GaussianDirections(k).for_global_batch(rows, 6)(x[rows], None, torch.Generator().manual_seed(3))
                  for rows in (slice(0, 3), slice(3, 6))]
        torch.testing.assert_close(torch.cat(halves, dim=1), whole, rtol=0, atol=1e-12)
        assert not torch.allclose(halves[0], halves[1])
    with pytest.raises(ValueError, match="jacobian_fraction"):
        GaussianDirections(1).for_global_batch(slice(0, 3), 6)(x[:2], None, torch.Generator())
    otd = OTDDirections(2).for_global_batch(slice(3, 6), 6)
    assert (otd.initial.rows, otd.initial.global_batch) == (slice(3, 6), 6)
    objective = build_objective({"jm1": 1.0}).for_global_batch(slice(0, 3), 6)
    assert (objective.directions.rows, objective.directions.global_batch) == (slice(0, 3), 6)
    own = CallableDirections(lambda x, t, g: torch.ones_like(x))
    assert own.for_global_batch(slice(0, 3), 6) is own

# --- values against full Jacobians ------------------------------------------------------------


@pytest.mark.parametrize("net_name", list(NETS))
@pytest.mark.parametrize("projection,jvp_method", [("vjp", "forward"), ("jvp", "forward"),
                                                   ("jvp", "double_vjp")])
@pytest.mark.parametrize("k", [1, 3])
def test_terms_equal_full_jacobian(brute_force, net_name, projection, jvp_method, k):
    student, teacher, (x_t, t, noise), (s, s_dense), (jac, jac_dense) = brute_force(net_name)
    v = fixed_directions(x_t, k)
    objective = build_objective(ALL_TERMS, projection, num_directions=k,
                                directions=lambda x, t_, g: v, jvp_method=jvp_method)
    total, terms = objective(student, teacher, x_t, t, noise, None)
    expected = reference_terms(jac, jac_dense, s, s_dense, noise, v, projection)
    assert set(terms) == set(NAMES)
    for name in NAMES:
        torch.testing.assert_close(terms[name], expected[name], rtol=1e-6, atol=1e-12, msg=name)
    torch.testing.assert_close(total.detach(), sum(w * expected[n] for n, w in ALL_TERMS.items()),
                               rtol=1e-6, atol=1e-12)


# --- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("projection", ["vjp", "jvp"])
def test_gradients_equal_finite_differences(projection):
    student, teacher = tiny_unet((4, 8), seed=1), tiny_unet((8, 16), seed=2)
    x_t, t, noise = make_batch()
    v = fixed_directions(x_t, 2)
    objective = build_objective(ALL_TERMS, projection, num_directions=2, directions=lambda x, t_, g: v)
    loss = lambda: objective(student, teacher, x_t, t, noise, None)[0].mean()  # noqa: E731
    loss().backward()
    params = dict(student.named_parameters())
    # One entry in each kind of layer: convolutions, time embedding, GroupNorm, attention.
    picks = [("conv_in.weight", (1, 0, 1, 1)), ("time_embedding.linear_1.weight", (3, 2)),
             ("down_blocks.1.resnets.0.norm1.weight", (2,)),
             ("down_blocks.1.attentions.0.to_q.weight", (1, 3)),
             ("mid_block.attentions.0.to_out.0.bias", (5,)), ("conv_out.weight", (0, 1, 2, 0))]
    h = 1e-5
    for name, index in picks:
        p = params[name]
        analytic = p.grad[index].item()
        with torch.no_grad():
            p[index] += h
            plus = loss().item()
            p[index] -= 2 * h
            minus = loss().item()
            p[index] += h
        # Central differences: O(h²) truncation ~1e-10 and ~1e-16/h roundoff, both far below 1e-6.
        assert analytic == pytest.approx((plus - minus) / (2 * h), rel=1e-6, abs=1e-9), name


# --- the authors' formulation -----------------------------------------------------------------


def load_benchmark():
    spec = importlib.util.spec_from_file_location("objective_step", ROOT / "benchmarks" / "objective_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_equals_authors_formulation():
    authors_loss = load_benchmark().authors_loss
    student, teacher = tiny_unet((4, 8), seed=1), tiny_unet((8, 16), seed=2)
    x_t, t, noise = make_batch(batch=4)
    v = fixed_directions(x_t, 1)
    weights = {"np": 1.0, "kd": 1.0, "jm2": 0.1}

    total, terms = build_objective(weights, "vjp", directions=lambda x, t_, g: v)(
        student, teacher, x_t, t, noise, None)
    total.mean().backward()
    ours = {n: p.grad.clone() for n, p in student.named_parameters()}
    assert all(p.grad is None for p in teacher.parameters())  # teacher params required grad
    student.zero_grad(set_to_none=True)

    loss, their_terms = authors_loss(student, teacher, x_t, t, noise, v[0], weights)
    loss.backward()
    torch.testing.assert_close(total.mean(), loss, rtol=1e-10, atol=0)
    for name in weights:
        torch.testing.assert_close(terms[name].mean(), their_terms[name], rtol=1e-10, atol=0)
    for name, p in student.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-8, atol=1e-12, msg=name)
    # Their defect, for the record: the teacher's parameters collect gradients.
    assert any(p.grad is not None for p in teacher.parameters())


# --- the teacher keeps no graph ----------------------------------------------------------------


@pytest.mark.parametrize("projection,jvp_method,directions,jacobian_method", [
    ("vjp", "forward", "gaussian", "double_backward"), ("jvp", "forward", "gaussian", "double_backward"),
    ("jvp", "double_vjp", "gaussian", "double_backward"), ("vjp", "forward", "otd", "double_backward"),
    ("vjp", "forward", "gaussian", "mixed_fd"), ("vjp", "forward", "otd", "mixed_jvp")])
def test_teacher_gets_no_gradients_and_keeps_no_graph(projection, jvp_method, directions, jacobian_method):
    student, teacher = tiny_unet((4, 8), seed=1), tiny_unet((8, 16), seed=2)
    assert all(p.requires_grad for p in teacher.parameters())  # as handed over, unfrozen
    x_t, t, noise = make_batch()
    objective = build_objective(ALL_TERMS, projection, num_directions=2, directions=directions,
                                otd={"prob": 1.0} if directions == "otd" else None,
                                jvp_method=jvp_method, jacobian_method=jacobian_method)
    probe = objective.probe(student, teacher, x_t, t, noise, torch.Generator().manual_seed(0))
    for value in [probe.teacher, *probe.teacher_products]:
        assert not value.requires_grad and value.grad_fn is None
    if jacobian_method == "double_backward":
        assert all(p.requires_grad and p.grad_fn is not None for p in [probe.student, *probe.student_products])
    else:  # products are plain values; the surrogate carries their gradient
        assert probe.student.grad_fn is not None and probe.surrogate.grad_fn is not None
        assert all(p.grad_fn is None and not p.requires_grad for p in probe.student_products)
        assert all(not v.requires_grad for v in probe.jacobian_values.values())
    total, _ = objective(student, teacher, x_t, t, noise, torch.Generator().manual_seed(0))
    total.mean().backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.requires_grad for p in teacher.parameters())  # frozen only during the call
    assert all(p.grad is not None for p in student.parameters())


# --- attention kernels and forward-mode AD (torch 2.14 CPU) ------------------------------------


def test_math_attention_only_where_needed(monkeypatch):
    """Student forwards with a Jacobian term run math SDPA; the teacher's VJP and NP/KD keep fused."""
    import torch.nn.functional as F

    calls = []
    original = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(torch.backends.cuda.flash_sdp_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    student, teacher = tiny_unet((4, 8), seed=1), tiny_unet((8, 16), seed=2)
    x_t, t, noise = make_batch()
    from diffusers.models.attention_processor import Attention

    per_net = sum(isinstance(m, Attention) for m in student.modules())
    build_objective({"np": 1.0, "kd": 1.0})(student, teacher, x_t, t, noise, None)
    assert calls == [True] * 2 * per_net
    calls.clear()
    total, _ = build_objective(ALL_TERMS, "vjp")(student, teacher, x_t, t, noise, None)
    assert calls == [True] * per_net + [False] * per_net  # teacher first, then the student
    total.mean().backward()  # the double backward goes through math attention only
    calls.clear()
    build_objective(ALL_TERMS, "jvp")(student, teacher, x_t, t, noise, None)
    assert calls == [False] * 2 * per_net  # forward mode: no fused kernel has a formula
    calls.clear()
    total, _ = build_objective(ALL_TERMS, "vjp", jacobian_method="mixed_fd")(student, teacher, x_t, t, noise, None)
    assert calls == [True] * 4 * per_net  # teacher, student, the difference pair: all fused
    total.mean().backward()  # ordinary backwards only: fused kernels have them


def test_forward_ad_on_diffusers_unet():
    """What forward-mode AD does on UNet2DModel with attention (torch 2.14, CPU).

    Our JVP path (torch.func.jvp + math SDPA, then reverse mode) must work; the other lines
    record why it is that path: fused SDPA has no forward-AD formula, and torch.autograd.forward_ad
    gives the right tangent but its backward hits an in-place exp in the math softmax.
    """
    import torch.autograd.forward_ad as fwad
    from torch.nn.attention import SDPBackend, sdpa_kernel

    net = tiny_unet((8, 16), seed=2)
    x_t, t, _ = make_batch()
    v = fixed_directions(x_t, 1)[0]
    f = lambda z: predict_noise(net, z, t)  # noqa: E731
    expected = torch.einsum("bij,bj->bi", per_sample_jacobians(net, x_t, t), v.flatten(1)).view_as(x_t)

    with sdpa_kernel(SDPBackend.MATH):
        s, tangent = torch.func.jvp(f, (x_t,), (v,))
    torch.testing.assert_close(tangent, expected, rtol=1e-9, atol=1e-12)
    tangent.square().sum().backward()  # reverse over forward: our JVP projection relies on it
    assert net.conv_in.weight.grad is not None

    findings = {}
    try:
        with fwad.dual_level():
            f(fwad.make_dual(x_t, v))
        findings["forward_ad, default SDPA"] = "works"
    except (NotImplementedError, RuntimeError) as err:
        findings["forward_ad, default SDPA"] = f"{type(err).__name__}: {str(err)[:80]}"
    with sdpa_kernel(SDPBackend.MATH):
        try:  # NOTES §1: GroupNorm's forward AD failed here on torch 2.13; 2.14 gets it right
            with fwad.dual_level():
                _, tangent = fwad.unpack_dual(f(fwad.make_dual(x_t, v)))
            error = ((tangent - expected).norm() / expected.norm()).item()
            findings["forward_ad + math SDPA, tangent rel. error"] = error
            tangent.square().sum().backward()
            findings["forward_ad + math SDPA, backward"] = "works"
        except (NotImplementedError, RuntimeError) as err:
            findings["forward_ad + math SDPA"] = f"{type(err).__name__}: {str(err)[:80]}"
    print(json.dumps(findings, indent=1))


# --- OTD ---------------------------------------------------------------------------------------


def test_otd_step_equals_formula():
    generator = torch.Generator().manual_seed(0)
    batch, n, dt = 3, 5, 0.1
    jac = torch.randn(batch, n, n, generator=generator, dtype=torch.float64)
    v = orthonormalize(torch.randn(1, batch, n, generator=generator, dtype=torch.float64))
    jv = torch.einsum("bij,kbj->kbi", jac, v)
    for b in range(batch):  # k = 1: v̂ ← normalise(v̂ + Δt (Jv̂ − v̂ v̂ᵀJv̂)), Eq. 27
        vb, jvb = v[0, b], jv[0, b]
        updated = vb + dt * (jvb - vb * (vb @ jvb))
        torch.testing.assert_close(otd_step(v, jv, dt)[0, b], updated / updated.norm())
    # k = 2: V ← orth(V + Δt (JV − V VᵀJV)), Eq. 25 with the basis kept orthonormal.
    v = orthonormalize(torch.randn(2, batch, n, generator=generator, dtype=torch.float64))
    jv = torch.einsum("bij,kbj->kbi", jac, v)
    for b in range(batch):
        vb, jvb = v[:, b].T, jv[:, b].T  # (n, k)
        updated = vb + dt * (jvb - vb @ (vb.T @ jvb))
        q, r = torch.linalg.qr(updated)
        torch.testing.assert_close(otd_step(v, jv, dt)[:, b].T, q * torch.sign(torch.diagonal(r)))


def test_otd_directions_follow_the_teachers_jacobian(brute_force):
    _, teacher, (x_t, t, _), _, (_, jac_dense) = brute_force("unet")
    for k, steps, prob in [(1, 2, 1.0), (2, 1, 1.0), (1, 2, 0.0)]:
        directions = OTDDirections(k, dt=0.1, steps=steps, prob=prob)(
            x_t, t, torch.Generator().manual_seed(5), teacher)
        generator = torch.Generator().manual_seed(5)
        expected = GaussianDirections(k)(x_t, t, generator)
        assert (torch.rand((), generator=generator).item() < prob) == (prob == 1.0)
        for _ in range(steps if prob == 1.0 else 0):
            jv = torch.einsum("bij,kbj->kbi", jac_dense, expected.flatten(2)).view_as(expected)
            expected = otd_step(expected, jv, 0.1)
        torch.testing.assert_close(directions, expected, rtol=1e-9, atol=1e-12)
    gram = torch.einsum("ibn,jbn->bij", directions.flatten(2), directions.flatten(2))
    torch.testing.assert_close(gram, torch.ones_like(gram))


# --- paper Eq. 8 -------------------------------------------------------------------------------


class SmallConvNet(nn.Module):
    """s(x, t) = conv(act(conv(x) + time embedding)): ReLU makes it piecewise linear."""

    def __init__(self, seed, activation, hidden=8, channels=2):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Conv2d(channels, hidden, 3, padding=1)
        self.time = nn.Linear(1, hidden)
        self.out = nn.Conv2d(hidden, channels, 3, padding=1)
        self.act = activation()

    def forward(self, x, t):
        h = self.inp(x) + self.time(t.to(x.dtype).view(-1, 1) / 1000)[:, :, None, None]
        return self.out(self.act(h))


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh])
def test_eq8_output_matching_under_noise_is_the_packages_jacobian_term(activation):
    """Eq. 8 through the package: E_ζ KD(x+ζ) = KD(x) + σ²·(n·JM1(x) + dᵀΔd) + O(σ⁴), where KD and
    JM1 are igsm.objectives' terms (JM1 with the k = n directions of a full orthonormal basis:
    mean_k ‖(J − J_D)ᵀv_k‖² = ‖J − J_D‖²_F / n), d = s − s_D, ζ ~ N(0, σ²I).

    Catches a KD or JM1 term that is not the paper's (a missing square, the teacher's Jacobian not
    subtracted, J where the paper has J − J_D, a mean over pixels instead of a sum, a scale on
    the directions) on the identity Eq. 8 derives. Exact for piecewise-linear networks (ReLU:
    Δd = 0); smooth ones (tanh) add the Laplacian term dᵀΔd that Eq. 8 (and Eq. 24) leave out,
    checked to be far outside the Monte-Carlo error. Antithetic pairs (ζ, −ζ) cancel the odd
    terms, so the σ² coefficient's standard error does not grow as σ shrinks (float64 keeps
    σ = 1e-5 far above round-off); 5 standard errors.
    """
    student, teacher = SmallConvNet(1, activation).double(), SmallConvNet(2, activation).double()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 3, 3, generator=generator, dtype=torch.float64)
    n, t = x.numel(), torch.tensor([400])
    basis = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]
    directions = basis.T.reshape(n, 1, 2, 3, 3)  # (k = n, B = 1, C, H, W), orthonormal
    objective = build_objective({"kd": 1.0, "jm1": 1.0}, "vjp", num_directions=n,
                                directions=lambda x_, t_, g: directions)
    _, terms = objective(student, teacher, x, t, torch.zeros_like(x), None)
    jacobian_term = n * terms["jm1"].item()

    sigma, pairs = 1e-5, 20000
    # No ReLU kink within reach of the noise (pre-activations ≥ 10σ from 0): the piecewise-linear
    # case is then exact, not exact almost everywhere.
    for net in (student, teacher):
        pre = net.inp(x) + net.time(t.to(x.dtype).view(-1, 1) / 1000)[:, :, None, None]
        assert pre.abs().min().item() > 10 * sigma
    zeta = sigma * torch.randn(pairs, *x.shape[1:], generator=generator, dtype=torch.float64)
    kd = build_objective({"kd": 1.0})
    batch = torch.cat([x + zeta, x - zeta])
    with torch.no_grad():
        noisy = kd(student, teacher, batch, t.expand(len(batch)), torch.zeros_like(batch), None)[1]["kd"]
    coefficient = (0.5 * (noisy[:pairs] + noisy[pairs:]) - terms["kd"].detach()) / sigma**2
    estimate, stderr = coefficient.mean().item(), coefficient.std().item() / pairs**0.5

    def d(z):
        return predict_noise(student, z.view_as(x), t) - predict_noise(teacher, z.view_as(x), t)

    flat = x.flatten()
    assert jacobian_term == pytest.approx(torch.autograd.functional.jacobian(d, flat).square().sum().item(),
                                          rel=1e-9)
    hessians = torch.autograd.functional.hessian(lambda z: (d(z) * d(flat).detach()).sum(), flat)
    laplacian_term = torch.diagonal(hessians).sum().item()  # dᵀΔd = Σ_i d_i tr(∇²d_i)
    assert estimate == pytest.approx(jacobian_term + laplacian_term, abs=5 * stderr)
    if activation is nn.ReLU:
        assert laplacian_term == 0.0
        assert jacobian_term > 100 * stderr  # the identity is not 0 ≈ 0
    else:  # Eq. 8 as printed misses a term far outside the Monte-Carlo error
        assert abs(laplacian_term) > 20 * stderr


# --- approximations: their error against the exact objective -----------------------------------


def test_jacobian_fraction_is_unbiased_and_reports_its_error():
    student, teacher = tiny_unet((4, 8), seed=1), tiny_unet((8, 16), seed=2)
    x_t, t, noise = make_batch(batch=4)
    # Directions as a fixed function of each row, so a row sees the same v̂ in any subset.
    direction_of = lambda x, t_, g: orthonormalize(torch.sin(37.0 * x + 1.0)[None])  # noqa: E731
    weights = {"np": 1.0, "kd": 1.0, "jm2": 0.1}

    def run(fraction, order=torch.arange(4)):
        objective = build_objective(weights, directions=direction_of, jacobian_fraction=fraction)
        student.zero_grad(set_to_none=True)
        total, terms = objective(student, teacher, x_t[order], t[order], noise[order], None)
        total.mean().backward()
        grad = torch.cat([p.grad.flatten() for p in student.parameters()])
        return total.detach(), terms, grad

    assert jacobian_rows(4, 0.5).tolist() == [0, 2]  # one row of each antithetic half
    assert jacobian_rows(4, 1.0) is None
    total, exact, grad = run(1.0)
    _, approx, grad_half = run(0.5)
    torch.testing.assert_close(approx["np"], exact["np"])
    torch.testing.assert_close(approx["kd"], exact["kd"])
    torch.testing.assert_close(approx["jm2"], torch.tensor([2.0, 0, 2.0, 0], dtype=torch.float64) * exact["jm2"])
    # Unbiased: the complementary rows (1, 3) carried instead, and the two estimates averaged.
    swap = torch.tensor([1, 0, 3, 2])
    _, approx_other, grad_other = run(0.5, swap)
    torch.testing.assert_close(0.5 * (approx["jm2"].mean() + approx_other["jm2"].mean()), exact["jm2"].mean())
    torch.testing.assert_close(0.5 * (grad_half + grad_other), grad)
    error = ((grad_half - grad).norm() / grad.norm()).item()
    jm2_error = abs(approx["jm2"].mean() / exact["jm2"].mean() - 1).item()
    print(f"jacobian_fraction=0.5, batch 4: gradient rel. error {error:.3g}, jm2 value rel. error {jm2_error:.3g}")
    assert 0 < error < 1


# --- mixed partials: the Jacobian terms' gradient without a double backward ---------------------

MIXED = [("mixed_jvp", "central"), ("mixed_fd", "central"), ("mixed_fd", "forward")]
JACOBIAN_ONLY = {"jm1": 0.3, "jm2": 0.1}  # the part mixed partials replace (NP/KD would dilute errors)
# float64 bounds on the relative error of the Jacobian terms' gradient. mixed_jvp is exact (measured
# ~2e-15); finite differences err by ≈ C·δ² + eps/δ (central, δ = 3e-6) or C'·δ + eps/δ (forward,
# δ = 1.5e-8), with C ≲ 100 and C' ≲ 10 from the float32 step sweeps of tiny U-Nets
# (igsm.objectives.mixed_partial_step): about 1e-9 and 2e-7 (measured 4e-10, 1e-7); bounds 100×
# and 50× above.
BOUNDS64 = {("mixed_jvp", "central"): 1e-10, ("mixed_fd", "central"): 1e-7, ("mixed_fd", "forward"): 1e-5}


def step_of(objective, student, teacher, batch):
    """(total value, terms, flat student gradient of total.mean()) of one objective call."""
    student.zero_grad(set_to_none=True)
    total, terms = objective(student, teacher, *batch, None)
    total.mean().backward()
    grad = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten().double()
                      for p in student.parameters()])
    student.zero_grad(set_to_none=True)
    return total.detach(), terms, grad


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("net_name", list(NETS))
def test_mixed_partials_match_exact_float64(net_name):
    """Same term values and total value as the double backward; the gradient within BOUNDS64."""
    student, teacher = NETS[net_name]()
    batch = make_batch(batch=4)
    # Two directions per row, fixed functions of the row (jacobian_fraction passes a subset of rows).
    def direction_of(x, t_, g):
        return orthonormalize(torch.stack([torch.sin(37 * x + 1), torch.cos(23 * x)]))

    options = dict(num_directions=2, directions=direction_of)
    errors = {}
    for label, weights, fraction in [("all terms", ALL_TERMS, 1.0), ("Jacobian terms", JACOBIAN_ONLY, 1.0),
                                     ("all terms, jacobian_fraction 0.5", ALL_TERMS, 0.5)]:
        exact_total, exact_terms, exact = step_of(
            build_objective(weights, jacobian_fraction=fraction, **options), student, teacher, batch)
        for method, scheme in MIXED:
            if net_name == "uvit" and method == "mixed_jvp":  # refused: LayerNorm (next test)
                with pytest.raises(ValueError, match="LayerNorm"):
                    step_of(build_objective(weights, jacobian_method=method, **options), student, teacher, batch)
                continue
            total, terms, grad = step_of(build_objective(
                weights, jacobian_method=method, fd_scheme=scheme, jacobian_fraction=fraction, **options),
                student, teacher, batch)
            assert set(terms) == set(weights)
            for name in weights:  # the true values, not the surrogate's
                torch.testing.assert_close(terms[name], exact_terms[name], rtol=1e-10, atol=1e-14, msg=name)
            torch.testing.assert_close(total, exact_total, rtol=1e-10, atol=1e-14)
            errors[f"{method} {scheme}, {label}"] = error = relative(grad, exact)
            assert error < BOUNDS64[method, scheme], (method, scheme, label, error)
    print(f"{net_name}, float64 gradient rel. errors vs double backward:",
          json.dumps({k: f"{e:.2g}" for k, e in errors.items()}, indent=1))


def test_mixed_partials_float32_error():
    """float32 gradients of the Jacobian terms against the float64 exact gradient.

    Bounds from rounding + truncation at the default steps (igsm.objectives.mixed_partial_step):
    central ≈ C·δ² + eps/δ = 100·(2.5e-3)² + 1.2e-7/2.5e-3 ≈ 7e-4, forward ≈ C'·δ + eps/δ ≈
    10·3.5e-4 + 3.4e-4 ≈ 4e-3; asserted 3e-3 and 1e-2. Measured (this net): 3.8e-4 and 2.6e-3, exact
    float32 1.4e-6; mixed_jvp like exact.
    """
    student, teacher = tiny_unet((4, 8), seed=1), tiny_unet((8, 16), seed=2)
    batch = make_batch(batch=4)
    v = fixed_directions(batch[0], 1)
    options = dict(directions=lambda x, t_, g: v.to(x.dtype))
    errors = {}
    for label, weights in [("Jacobian terms", JACOBIAN_ONLY), ("all terms", ALL_TERMS)]:
        reference = step_of(build_objective(weights, **options), student, teacher, batch)[2]
        student32, teacher32 = copy.deepcopy(student).float(), copy.deepcopy(teacher).float()
        batch32 = tuple(a.float() if a.is_floating_point() else a for a in batch)
        errors[f"exact, {label}"] = relative(step_of(build_objective(weights, **options), student32, teacher32,
                                                     batch32)[2], reference)
        for method, scheme in MIXED:
            objective = build_objective(weights, jacobian_method=method, fd_scheme=scheme, **options)
            errors[f"{method} {scheme}, {label}"] = relative(step_of(objective, student32, teacher32, batch32)[2],
                                                             reference)
    print("float32 gradient rel. errors vs float64 exact:", json.dumps({k: f"{e:.2g}" for k, e in errors.items()},
                                                                       indent=1))
    jac = {k.split(",")[0]: e for k, e in errors.items() if k.endswith("Jacobian terms")}
    assert jac["exact"] < 1e-5 and jac["mixed_jvp central"] < 1e-5
    assert jac["mixed_fd central"] < 3e-3 and jac["mixed_fd forward"] < 1e-2


def dropout_unet(seed):
    return tiny_unet((4, 8), seed, dropout=0.5).train()


def test_mixed_partials_with_dropout():
    """Training mode: every forward of a call draws the first one's dropout masks.

    mixed_fd (eager forwards) equals the double backward for the same seed. mixed_jvp runs its
    forwards through torch.func, whose dropout orders the mask of a non-contiguous activation
    differently from eager mode, so its reference is the double backward through torch.func.vjp.
    Either leaves the global RNG where one forward leaves it.
    """
    student, teacher = dropout_unet(1), tiny_unet((8, 16), seed=2)
    batch = make_batch()
    x_t, t, noise = batch
    v = fixed_directions(x_t, 2)
    options = dict(num_directions=2, directions=lambda x, t_, g: v)

    def run(method, seed=0):
        torch.manual_seed(seed)
        result = step_of(build_objective(ALL_TERMS, jacobian_method=method, **options), student, teacher, batch)
        return result, torch.rand(3)  # the RNG state after the call

    (exact_total, exact_terms, exact), exact_after = run("double_backward")
    assert relative(run("double_backward", seed=1)[0][2], exact) > 0.1  # the masks matter
    (total, terms, grad), after = run("mixed_fd")
    assert relative(grad, exact) < 1e-7
    torch.testing.assert_close(total, exact_total, rtol=1e-10, atol=0)
    torch.testing.assert_close(after, exact_after, rtol=0, atol=0)

    (total, terms, grad), after = run("mixed_jvp")
    torch.testing.assert_close(after, exact_after, rtol=0, atol=0)
    with torch.no_grad():
        s_dense, pullback = torch.func.vjp(lambda z: predict_noise(teacher, z, t), x_t)
        g_dense = [pullback(d)[0] for d in v]
    torch.manual_seed(0)
    with math_attention():
        s, pullback = torch.func.vjp(lambda z: predict_noise(student, z, t), x_t)
        g = [pullback(d)[0] for d in v]
    sq = lambda a: a.square().flatten(1).sum(1)  # noqa: E731
    mean = lambda compare: torch.stack([compare(sq(b), sq(a)) for a, b in zip(g, g_dense)]).mean(0)  # noqa: E731
    reference_terms = {"np": sq(s - noise), "kd": sq(s - s_dense),
                       "jm1": torch.stack([sq(a - b) for a, b in zip(g, g_dense)]).mean(0),
                       "jm2": mean(lambda dense, ours: (dense - ours).square()),
                       "jm2_log": mean(lambda dense, ours: (dense.log() - ours.log()).square()),
                       "jm2_rel": mean(lambda dense, ours: ((dense - ours) / dense).square())}
    student.zero_grad(set_to_none=True)
    sum(w * reference_terms[n] for n, w in ALL_TERMS.items()).mean().backward()
    reference = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in student.parameters()])
    for name in NAMES:
        torch.testing.assert_close(terms[name], reference_terms[name].detach(), rtol=1e-10, atol=1e-14, msg=name)
    assert relative(grad, reference) < 1e-10


def test_bf16_autocast_error():
    """bf16 autocast (the benchmark's --precision bf16) against float32, same inputs/directions."""
    student, teacher = tiny_unet((4, 8), seed=1).float(), tiny_unet((8, 16), seed=2).float()
    x_t, t, noise = (a.float() if a.is_floating_point() else a for a in make_batch(batch=4))
    v = fixed_directions(x_t, 1)
    errors = {}
    for projection, method in [("vjp", "double_backward"), ("jvp", "double_backward"),
                               ("vjp", "mixed_fd"), ("vjp", "mixed_jvp")]:
        objective = build_objective({"np": 1.0, "kd": 1.0, "jm2": 0.1}, projection, directions=lambda x, t_, g: v,
                                    jacobian_method=method)
        results = []
        for autocast in (False, True):
            student.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                total, terms = objective(student, teacher, x_t, t, noise, None)
            total.float().mean().backward()
            results.append((terms["jm2"].float(), torch.cat([p.grad.flatten().float() for p in student.parameters()])))
        (jm2, grad), (jm2_bf16, grad_bf16) = results
        key = projection if method == "double_backward" else method
        errors[key] = {"jm2": ((jm2_bf16 - jm2).norm() / jm2.norm()).item(),
                       "grad": ((grad_bf16 - grad).norm() / grad.norm()).item()}
        assert torch.isfinite(grad_bf16).all() and errors[key]["grad"] < 0.1
    print("bf16 vs fp32 relative errors:", json.dumps(errors))


def test_benchmark_runs_on_cpu(tmp_path):
    report = load_benchmark().main(["--device", "cpu", "--batch", "2", "--tiny", "--steps", "1",
                                    "--warmup", "0", "--out", str(tmp_path / "r.json")])
    methods = {r["method"]: r for r in report["methods"]}
    assert {"NP", "NP+KD", "authors (NOTES §1)", "IGSM exact, vjp", "IGSM exact, jvp", "IGSM mixed partials (fd)",
            "IGSM mixed partials (fd, forward)", "IGSM mixed partials (jvp)"} <= set(methods)
    errors = report["gradient_relative_errors"]
    assert errors["IGSM mixed partials (jvp) (Jacobian term alone)"] < 1e-4
    assert errors["IGSM mixed partials (fd) (Jacobian term alone)"] < 1e-2
    assert all(r["ms_per_step"] > 0 for r in methods.values())
    assert json.loads((tmp_path / "r.json").read_text())["student_params"] > 0


def test_jacobian_every_is_unbiased_over_k_steps():
    """jacobian_every k: over steps 0..k−1 the mean gradient equals the exact objective's; the
    Jacobian step reports k × jm2, the others 0; NP and KD are exact on every step."""
    student, teacher = tiny_unet((4, 8), seed=1), tiny_unet((8, 16), seed=2)
    batch = make_batch(batch=4)
    def direction_of(x, t_, g):
        return orthonormalize(torch.sin(37.0 * x + 1.0)[None])

    weights = {"np": 1.0, "kd": 1.0, "jm2": 0.1}
    exact_total, exact_terms, exact = step_of(build_objective(weights, directions=direction_of),
                                              student, teacher, batch)
    every = build_objective(weights, directions=direction_of, jacobian_every=4)
    grads = []
    for step in range(4):
        student.zero_grad(set_to_none=True)
        total, terms = every(student, teacher, *batch, None, step=step)
        total.mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
        torch.testing.assert_close(terms["np"], exact_terms["np"])
        torch.testing.assert_close(terms["kd"], exact_terms["kd"])
        expected = 4 * exact_terms["jm2"] if step == 0 else torch.zeros_like(exact_terms["jm2"])
        torch.testing.assert_close(terms["jm2"], expected)
    assert every.jacobian_step(8) and not every.jacobian_step(9)
    torch.testing.assert_close(torch.stack(grads).mean(0), exact)
    assert relative(grads[1], exact) > 1e-3  # a skipped step really lacks the Jacobian term
    with pytest.raises(ValueError, match="jacobian_every"):
        build_objective(weights, jacobian_every=0)


def test_layer_norm_forward_ad_second_derivative_is_still_wrong():
    """Why mixed_jvp refuses LayerNorm networks: ∂θ⟨v, J u⟩ by reverse-over-forward through
    Linear → LayerNorm disagrees with the double backward's ∂θ⟨u, Jᵀv⟩ (an identity), while
    LayerNorm alone agrees. If this test fails, PyTorch fixed it: lift the refusal in MixedVJP."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).double()
    x, u = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(3, 5, 8, dtype=torch.float64)
    v = torch.randn(3, 5, 8, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    g = torch.autograd.grad(net(xg), xg, v, create_graph=True)[0]
    exact = torch.autograd.grad((g * u).sum(), net[0].weight)[0]
    _, ju = torch.func.jvp(net, (x,), (u,))
    forward = torch.autograd.grad((ju * v).sum(), net[0].weight)[0]
    assert relative(forward, exact) > 1e-3
