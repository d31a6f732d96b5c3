"""Finetuning objectives for pruned diffusion models (paper Sec. 4, Eq. 7–9; App. A.2; App. E).

The total loss is Σ λ_name · term_name over

* ``np``  (noise prediction, Eq. 7)            ‖s(x_t,t) − ε‖²
* ``kd``  (output distillation, Eq. 7)         ‖s − s_D‖²
* ``jm1`` (first-order Jacobian matching, Table 3 / Eq. 8, projected)   mean_k ‖P v̂_k − P_D v̂_k‖²
* ``jm2`` (second-order Jacobian matching = IGSM, Eq. 9 squared as in Eq. 28 and the authors'
  code)                                        mean_k (‖P_D v̂_k‖² − ‖P v̂_k‖²)²

where s is the pruned student's noise prediction, s_D the dense teacher's, J = ∂s/∂x_t the Jacobian
w.r.t. the *input* image and P v̂ the projection chosen by ``projection``: ``"vjp"`` gives Jᵀv̂ (the
authors' code), ``"jvp"`` gives J v̂ (the paper's text, ‖Jv̂‖² = v̂ᵀJᵀJv̂). Both have expectation
tr(JᵀJ) over v̂ but are different estimators. Every term returns an *unreduced* per-sample loss,
summed over pixels; the training loop averages over the batch (edm ``training/loss.py`` style).

How the products are computed (all exact):

* VJP: one student forward with x_t requiring grad, then ``autograd.grad(s, x, v̂,
  create_graph=True)`` per direction; the loss backward is a double backward. The teacher's Jᵀv̂
  is a plain input-gradient (no ``create_graph``) with its parameters frozen.
* JVP: forward-mode AD through ``torch.func.jvp`` (primal s and tangent Jv̂ in one pass); the loss
  backward is reverse-over-forward. With the math SDPA kernel this works on diffusers'
  UNet2DModel (tested on torch 2.14 CPU; checked on torch 2.11 CUDA against the double VJP),
  whereas ``torch.autograd.forward_ad`` computes the tangent but its backward fails, on both, on
  an in-place ``exp`` inside the math attention's softmax formula. The fallback
  ``jvp_method="double_vjp"`` computes J v̂ = ∂/∂u ⟨Jᵀu, v̂⟩ (a VJP of a VJP; exact, slower) for
  setups where forward mode fails; it is also taken under autocast, where forward mode fails
  (CPU: GroupNorm's forward-AD formula yields a float32 tangent for a bf16 primal; CUDA: the
  backward through the tangent mixes dtypes in the math attention's softmax backward).
* Fused SDPA kernels have neither a double backward nor forward-AD formulas: the math kernel is
  selected only around the forwards that need it (the student whenever a Jacobian term is active;
  the teacher only for forward-mode/double-VJP products). NP/KD-only objectives keep fused kernels.
* The dense teacher never holds a graph for its parameters: they are frozen (requires_grad False)
  for the duration of the call and restored after, its products are built without ``create_graph``
  (or without any graph at all, under forward mode) and its outputs are detached.

Work is shared across terms: one student forward, one teacher forward, one product per direction
per network, read by both ``jm1`` and ``jm2`` (see :class:`Probe`).

Directions (``directions``): ``"gaussian"`` draws v ~ N(0, I) per sample and orthonormalises the k
directions of each sample (v̂ = v/‖v‖ for k = 1); ``"otd"`` evolves them along the *teacher's*
Jacobian (App. E, Eq. 26–27, Forward Euler on dV/dt = J_D V − V VᵀJ_D V, re-orthonormalised) for
``steps`` steps; a callable ``(x_t, t, generator) -> Tensor`` supplies its own, used as given.

OTD's ``prob`` is the probability that OTD is applied to a batch (one draw per call from the
generator), as Table 13's caption defines "Prob". Table 13 supports this reading: its Prob = 1.0
runs (FID 4.71, 4.66, 4.67, 4.67) differ from each other and from the no-OTD baseline (4.58),
which they would all equal if Prob = 1.0 meant "never applied". NOTES §1 reports that the authors'
code applies OTD with probability 1 − otd_prob: to replay one of its runs, pass prob = 1 − otd_prob.

Approximation offered (off by default): ``jacobian_fraction`` < 1 evaluates the Jacobian terms on
only ⌈f·B⌉ rows of the batch (the first rows of each antithetic half, so t/T−1−t pairs stay
together) and rescales them by B/m, an unbiased estimate of the batch mean; the other rows take a
plain forward with fused attention. Its error against the exact objective is measured in
tests/test_objectives.py and benchmarks/objective_step.py.

Measured by benchmarks/objective_step.py (one H100, torch 2.11, batch 128, CIFAR-10 U-Net teacher
35.7M, magnitude-pruned student 19.85M, random weights; per training step, ratio to NP+KD): exact
IGSM (VJP) 2.0× time / 2.6× memory under bf16 autocast, 2.9× / 1.6× in strict fp32 (TF32 off);
the authors' formulation 2.7× / 5.7× (bf16), 3.4× / 3.5× (fp32); JVP 4.0× / 2.5× (fp32, forward
mode), 3.1× / 3.5× (bf16, double VJP). ``jacobian_fraction`` 0.5 / 0.25 gives 2.3× / 2.2× time and
1.4× / 1.2× memory in fp32, but no time in bf16 (2.6×; the small-batch double backward is
launch-bound), only memory (1.8× / 1.4×).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from igsm.models import predict_noise

NAMES = ("np", "kd", "jm1", "jm2")
PROJECTIONS = ("vjp", "jvp")
JVP_METHODS = ("forward", "double_vjp")
OTD_DEFAULTS = {"dt": 0.01, "steps": 1, "prob": 0.5}


# ---------------------------------------------------------------------------------------------
# Helpers


def sq_norm(a: Tensor) -> Tensor:
    """Per-sample ‖a‖² over all non-batch dimensions, accumulated in at least float32."""
    return a.to(torch.promote_types(a.dtype, torch.float32)).square().flatten(1).sum(1)


def math_attention():
    """Select the math SDPA kernel: fused kernels have no double backward and no forward AD."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


@contextlib.contextmanager
def frozen(net: nn.Module | None):
    """Parameters of ``net`` do not require grad inside the block (restored after)."""
    params = [p for p in net.parameters() if p.requires_grad] if net is not None else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def orthonormalize(directions: Tensor) -> Tensor:
    """Orthonormal frame per sample for directions of shape (k, B, ...); v/‖v‖ when k = 1.

    Gram–Schmidt through QR with the signs of diag(R) made positive, so that the first direction
    keeps the orientation of the first input and k = 1 reduces to plain normalisation.
    """
    k, batch = directions.shape[:2]
    if k == 1:
        norm = directions.flatten(2).norm(dim=2).view(1, batch, *[1] * (directions.ndim - 2))
        return directions / norm
    work = torch.promote_types(directions.dtype, torch.float32)  # QR has no bf16/fp16 kernels
    q, r = torch.linalg.qr(directions.flatten(2).permute(1, 2, 0).to(work))  # (B, n, k)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q.permute(2, 0, 1).reshape(directions.shape).to(directions.dtype)


def otd_step(directions: Tensor, jacobian_products: Tensor, dt: float) -> Tensor:
    """One Forward-Euler step of dV/dt = JV − V VᵀJV (App. E, Eq. 25/27), re-orthonormalised.

    ``directions`` V and ``jacobian_products`` JV have shape (k, B, ...); VᵀJV is the per-sample
    k×k matrix of v_iᵀ J v_j (the scalar v̂ᵀJv̂ when k = 1).
    """
    v, jv = directions.flatten(2), jacobian_products.flatten(2)
    overlap = torch.einsum("ibn,jbn->bij", v, jv)
    v_overlap = torch.einsum("ibn,bij->jbn", v, overlap)
    return orthonormalize(directions + dt * (jacobian_products - v_overlap.view_as(directions)))


def jacobian_rows(batch_size: int, fraction: float) -> Tensor | None:
    """Rows carrying the Jacobian terms, None for all of them.

    The first rows of each antithetic half (t and T−1−t pairs, igsm.diffusion.antithetic_timesteps)
    so that the variance reduction of the pairing is kept; batch rows are i.i.d. otherwise.
    """
    count = min(batch_size, max(1, math.ceil(fraction * batch_size)))
    if count == batch_size:
        return None
    half = (batch_size + 1) // 2
    first = (count + 1) // 2
    return torch.cat([torch.arange(first), half + torch.arange(count - first)])


# ---------------------------------------------------------------------------------------------
# Jacobian products w.r.t. the input image. ``directions`` is a sequence of tensors shaped like x.


def vjp_products(net, x, t, directions, *, create_graph):
    """s(x) and [Jᵀv̂ for v̂ in directions] by reverse mode."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        s = predict_noise(net, x, t)
        last = len(directions) - 1
        products = [torch.autograd.grad(s, x, v.to(s.dtype), create_graph=create_graph,
                                        retain_graph=create_graph or i < last)[0]
                    for i, v in enumerate(directions)]
    return s, products


def forward_jvp_products(net, x, t, directions):
    """s(x) and [J v̂] by forward mode (torch.func.jvp); differentiable w.r.t. the parameters."""
    x = x.detach()
    outputs = [torch.func.jvp(lambda z: predict_noise(net, z, t), (x,), (v.to(x.dtype),))
               for v in directions]
    # With k > 1 every jvp recomputes the primal (with its own dropout mask in training mode);
    # the first one serves NP/KD.
    return outputs[0][0], [tangent for _, tangent in outputs]


def double_vjp_products(net, x, t, directions, *, create_graph):
    """s(x) and [J v̂] as J v̂ = ∂/∂u ⟨Jᵀu, v̂⟩ (reverse over reverse; exact, no forward AD)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        s = predict_noise(net, x, t)
        u = torch.zeros_like(s, requires_grad=True)
        (vjp,) = torch.autograd.grad(s, x, u, create_graph=True)  # Jᵀu, linear in u
        last = len(directions) - 1
        products = [torch.autograd.grad(vjp, u, v.to(vjp.dtype), create_graph=create_graph,
                                        retain_graph=create_graph or i < last)[0]
                    for i, v in enumerate(directions)]
    return s, products


class VJP:
    """Products Jᵀv̂ (the authors' code)."""

    name = "vjp"

    def student(self, net, x, t, directions):
        with math_attention():
            return vjp_products(net, x, t, directions, create_graph=True)

    def teacher(self, net, x, t, directions):
        s, products = vjp_products(net, x, t, directions, create_graph=False)
        return s.detach(), products


class JVP:
    """Products J v̂ (the paper's text), by forward mode or the double-VJP identity."""

    name = "jvp"

    def __init__(self, method: str = "forward"):
        if method not in JVP_METHODS:
            raise ValueError(f"jvp_method: unknown {method!r}; expected one of {JVP_METHODS}")
        self.method = method

    def _method(self, x):
        # Under autocast, forward mode breaks on diffusers' U-Net: on CPU GroupNorm's forward-AD
        # formula returns a float32 tangent for a bf16 primal and the next conv fails (torch 2.14);
        # on CUDA the backward through the math-SDPA tangent mixes dtypes in softmax's backward
        # (torch 2.11). Reverse mode is unaffected, so autocast takes the double-VJP path.
        if torch.is_autocast_enabled(x.device.type):
            return "double_vjp"
        return self.method

    def student(self, net, x, t, directions):
        with math_attention():
            if self._method(x) == "forward":
                return forward_jvp_products(net, x, t, directions)
            return double_vjp_products(net, x, t, directions, create_graph=True)

    def teacher(self, net, x, t, directions):
        with math_attention():
            if self._method(x) == "forward":
                with torch.no_grad():
                    return forward_jvp_products(net, x, t, directions)
            s, products = double_vjp_products(net, x, t, directions, create_graph=False)
            return s.detach(), products


# ---------------------------------------------------------------------------------------------
# Directions: each returns a (k, B, ...) tensor.


class GaussianDirections:
    """v ~ N(0, I) per sample, the k directions orthonormalised (Eq. 9: v̂ = v/‖v‖)."""

    needs_teacher = False

    def __init__(self, num_directions: int = 1):
        self.num_directions = num_directions

    def __call__(self, x, t, generator, teacher=None):
        v = torch.randn((self.num_directions, *x.shape), generator=generator, device=x.device,
                        dtype=x.dtype)
        return orthonormalize(v)


class OTDDirections:
    """Gaussian directions evolved along the dense teacher's Jacobian (App. E, Eq. 26–27)."""

    needs_teacher = True

    def __init__(self, num_directions: int = 1, dt: float = 0.01, steps: int = 1,
                 prob: float = 0.5, jvp_method: str = "forward"):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"otd.prob: {prob} is outside [0, 1]")
        if steps < 0:
            raise ValueError(f"otd.steps: {steps} is negative")
        self.initial = GaussianDirections(num_directions)
        self.dt, self.steps, self.prob = dt, steps, prob
        self.jacobian = JVP(jvp_method)  # J_D v̂: a forward product whatever the loss projection

    def __call__(self, x, t, generator, teacher=None):
        directions = self.initial(x, t, generator)
        # Always drawn, so the generator advances the same way whether OTD applies or not.
        apply = torch.rand((), generator=generator, device=x.device).item() < self.prob
        for _ in range(self.steps if apply else 0):
            _, products = self.jacobian.teacher(teacher, x, t, list(directions))
            directions = otd_step(directions, torch.stack(products), self.dt)
        return directions


class CallableDirections:
    """User-supplied ``fn(x_t, t, generator) -> Tensor`` of shape (k, *x_t.shape) or x_t.shape."""

    needs_teacher = False

    def __init__(self, fn: Callable, num_directions: int = 1):
        self.fn, self.num_directions = fn, num_directions

    def __call__(self, x, t, generator, teacher=None):
        v = self.fn(x, t, generator)
        if v.shape == x.shape:
            v = v.unsqueeze(0)
        if v.shape != (self.num_directions, *x.shape):
            raise ValueError(f"directions: the callable returned shape {tuple(v.shape)}; expected "
                             f"{(self.num_directions, *x.shape)} (num_directions, *x_t.shape)")
        return v


# ---------------------------------------------------------------------------------------------
# Terms: small swappable losses reading a shared Probe, each returning a per-sample loss.


@dataclass
class Probe:
    """What the terms read, computed once per call and shared between them.

    ``student`` keeps its graph to the student's parameters; ``teacher`` and ``teacher_products``
    hold no graph. Products are lists over directions, for the batch rows ``rows`` (None: all).
    """

    noise: Tensor
    student: Tensor
    teacher: Tensor | None = None
    student_products: list[Tensor] = field(default_factory=list)
    teacher_products: list[Tensor] = field(default_factory=list)
    directions: Tensor | None = None
    rows: Tensor | None = None


class NoisePrediction:
    """L_NP = ‖s(x_t, t) − ε‖² (Eq. 7): the DDPM loss."""

    needs_teacher, needs_jacobian = False, False

    def __call__(self, probe: Probe) -> Tensor:
        return sq_norm(probe.student - probe.noise)


class Distillation:
    """L_KD = ‖s(x_t, t) − s_D(x_t, t)‖² (Eq. 7): output-level knowledge distillation."""

    needs_teacher, needs_jacobian = True, False

    def __call__(self, probe: Probe) -> Tensor:
        return sq_norm(probe.student - probe.teacher)


class FirstOrderJacobianMatching:
    """Projected ‖J − J_D‖² (Eq. 8, Table 3): mean over directions of ‖P v̂ − P_D v̂‖²."""

    needs_teacher, needs_jacobian = True, True

    def __call__(self, probe: Probe) -> Tensor:
        per_direction = [sq_norm(p - p_dense)
                         for p, p_dense in zip(probe.student_products, probe.teacher_products)]
        return torch.stack(per_direction).mean(0)


class SecondOrderJacobianMatching:
    """IGSM (Eq. 9, squared as in Eq. 28): mean over directions of (‖P_D v̂‖² − ‖P v̂‖²)²."""

    needs_teacher, needs_jacobian = True, True

    def __call__(self, probe: Probe) -> Tensor:
        per_direction = [(sq_norm(p_dense) - sq_norm(p)).square()
                         for p, p_dense in zip(probe.student_products, probe.teacher_products)]
        return torch.stack(per_direction).mean(0)


TERMS = {"np": NoisePrediction, "kd": Distillation, "jm1": FirstOrderJacobianMatching,
         "jm2": SecondOrderJacobianMatching}


# ---------------------------------------------------------------------------------------------


class Objective:
    """Weighted sum of terms: ``total, terms = objective(student, teacher, x_t, t, noise, generator)``.

    ``total`` is the per-sample weighted loss (Tensor[B]); ``terms`` maps each active term's name
    to its detached, unweighted per-sample value (with ``jacobian_fraction`` < 1, the Jacobian
    terms are B/m times their value on the m carrying rows and 0 elsewhere, so that their batch
    mean estimates the exact one without bias).
    """

    def __init__(self, terms: dict, projection, directions, jacobian_fraction: float = 1.0):
        self.terms = terms  # name -> (weight, term)
        self.projection = projection
        self.directions = directions
        self.jacobian_fraction = jacobian_fraction
        self.needs_jacobian = any(term.needs_jacobian for _, term in terms.values())
        self.needs_teacher = any(term.needs_teacher for _, term in terms.values())

    def probe(self, student, teacher, x_t, t, noise, generator=None) -> Probe:
        if self.needs_teacher and teacher is None:
            active = [name for name, (_, term) in self.terms.items() if term.needs_teacher]
            raise ValueError(f"the terms {active} need the dense teacher, but teacher is None")
        needs_kd = "kd" in self.terms
        if not self.needs_jacobian:
            s = predict_noise(student, x_t, t)
            s_dense = None
            if needs_kd:
                with torch.no_grad():
                    s_dense = predict_noise(teacher, x_t, t)
            return Probe(noise, s, s_dense)

        batch = x_t.shape[0]
        rows = jacobian_rows(batch, self.jacobian_fraction)
        if rows is not None:  # index arithmetic on the CPU: no device synchronisation
            rest = torch.ones(batch, dtype=torch.bool)
            rest[rows] = False
            rest = rest.nonzero().squeeze(1)
            order = torch.argsort(torch.cat([rows, rest])).to(x_t.device)
            rows, rest = rows.to(x_t.device), rest.to(x_t.device)
        x_jac, t_jac = (x_t, t) if rows is None else (x_t[rows], t[rows])
        # Teacher first: its activations are freed before the student's double-backward graph grows.
        with frozen(teacher):
            directions = self.directions(x_jac, t_jac, generator, teacher)
            s_dense, dense_products = self.projection.teacher(teacher, x_jac, t_jac, list(directions))
        s, products = self.projection.student(student, x_jac, t_jac, list(directions))
        if rows is not None:
            s = torch.cat([s, predict_noise(student, x_t[rest], t[rest])])[order]
            if needs_kd:
                with torch.no_grad():
                    s_dense = torch.cat([s_dense, predict_noise(teacher, x_t[rest], t[rest])])[order]
        return Probe(noise, s, s_dense, products, dense_products, directions, rows)

    def __call__(self, student, teacher, x_t, t, noise, generator=None):
        probe = self.probe(student, teacher, x_t, t, noise, generator)
        total, values = 0.0, {}
        for name, (weight, term) in self.terms.items():
            value = term(probe)
            if term.needs_jacobian and probe.rows is not None:
                value = torch.zeros(x_t.shape[0], dtype=value.dtype, device=value.device).index_copy(
                    0, probe.rows, value * (x_t.shape[0] / len(probe.rows)))
            total = total + weight * value
            values[name] = value.detach()
        return total, values


def build_objective(weights: dict, projection: str = "vjp", num_directions: int = 1,
                    directions: str | Callable = "gaussian", otd: dict | None = None, *,
                    jvp_method: str = "forward", jacobian_fraction: float = 1.0) -> Objective:
    """The objective from config: ``weights`` maps names among NAMES to λ (0 or absent: off).

    ``projection`` "vjp" (‖Jᵀv̂‖², authors' code) or "jvp" (‖Jv̂‖², paper text); ``num_directions``
    k ≥ 1 orthonormal directions per sample, the Jacobian terms averaged over them;
    ``directions`` "gaussian", "otd" (with ``otd`` = {"dt", "steps", "prob"}) or a callable
    ``(x_t, t, generator) -> Tensor``; ``jvp_method`` "forward" (torch.func.jvp) or "double_vjp";
    ``jacobian_fraction`` in (0, 1]: share of the batch carrying the Jacobian terms (1 = exact).
    """
    for name in weights:
        if name not in NAMES:
            raise ValueError(f"weights: unknown term {name!r}; expected names among {NAMES}")
    terms = {name: (float(w), TERMS[name]()) for name, w in weights.items() if w}
    if not terms:
        raise ValueError(f"weights: no active term in {weights!r}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection: unknown {projection!r}; expected one of {PROJECTIONS}")
    if int(num_directions) != num_directions or num_directions < 1:
        raise ValueError(f"num_directions: {num_directions} is not an integer ≥ 1")
    if not 0.0 < jacobian_fraction <= 1.0:
        raise ValueError(f"jacobian_fraction: {jacobian_fraction} is outside (0, 1]")
    if jvp_method not in JVP_METHODS:
        raise ValueError(f"jvp_method: unknown {jvp_method!r}; expected one of {JVP_METHODS}")
    if otd is not None and directions != "otd":
        raise ValueError(f"otd: settings given but directions is {directions!r}, not 'otd'")
    num_directions = int(num_directions)
    if callable(directions):
        sampler = CallableDirections(directions, num_directions)
    elif directions == "gaussian":
        sampler = GaussianDirections(num_directions)
    elif directions == "otd":
        settings = {**OTD_DEFAULTS, **(otd or {})}
        unknown = set(settings) - set(OTD_DEFAULTS)
        if unknown:
            raise ValueError(f"otd: unknown keys {sorted(unknown)}; expected {sorted(OTD_DEFAULTS)}")
        sampler = OTDDirections(num_directions, jvp_method=jvp_method, **settings)
    else:
        raise ValueError(f"directions: unknown {directions!r}; expected 'gaussian', 'otd' or a callable")
    proj = VJP() if projection == "vjp" else JVP(jvp_method)
    return Objective(terms, proj, sampler, jacobian_fraction)
