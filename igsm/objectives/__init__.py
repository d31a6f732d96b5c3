"""Finetuning objectives for pruned diffusion models (paper Sec. 4, Eq. 7–9; App. A.2; App. E).

The total loss is Σ λ_name · term_name over

* ``np``  (noise prediction, Eq. 7)            ‖s(x_t,t) − ε‖²
* ``kd``  (output distillation, Eq. 7)         ‖s − s_D‖²
* ``jm1`` (first-order Jacobian matching, Table 3 / Eq. 8, projected)   mean_k ‖P v̂_k − P_D v̂_k‖²
* ``jm2`` (second-order Jacobian matching = IGSM, Eq. 9 squared as in Eq. 28 and the authors'
  code)                                        mean_k (‖P_D v̂_k‖² − ‖P v̂_k‖²)²
* ``jm2_log``, ``jm2_rel``: scale-free forms of ``jm2``, not the paper's formula (igsm.objectives.terms)

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

Modules: ``products`` (the Jacobian products and mixed partials), ``directions`` (Gaussian, OTD,
callable), ``terms`` (the losses and the Probe they read); this one combines them
(:class:`Objective`, :func:`build_objective`).

Directions (``directions``): ``"gaussian"`` draws v ~ N(0, I) per sample and orthonormalises the k
directions of each sample (v̂ = v/‖v‖ for k = 1); ``"otd"`` evolves them along the *teacher's*
Jacobian (App. E, Eq. 26–27, Forward Euler on dV/dt = J_D V − V VᵀJ_D V, re-orthonormalised) for
``steps`` steps; a callable ``(x_t, t, generator) -> Tensor`` supplies its own, used as given.
With several processes the training loop asks for ``objective.for_global_batch(rows, B)``: the
Gaussian (and OTD's initial) directions are then drawn for the whole global batch B and each
process keeps its rows, so sample i gets the same directions at any process count.

OTD's ``prob`` is the probability that OTD is applied to a batch (one draw per call from the
generator), as Table 13's caption defines "Prob". Table 13 supports this reading: its Prob = 1.0
runs (FID 4.71, 4.66, 4.67, 4.67) differ from each other and from the no-OTD baseline (4.58),
which they would all equal if Prob = 1.0 meant "never applied". NOTES §1 reports that the authors'
code applies OTD with probability 1 − otd_prob: to replay one of its runs, pass prob = 1 − otd_prob.

Mixed partials (``jacobian_method``, vjp projection only; default "double_backward", exact as
above). For a loss L of the student products g_k = J_kᵀv̂_k (jm1, jm2), the symmetry of second
derivatives gives ∂L/∂θ = Σ_k ⟨u_k, ∂g_k/∂θ⟩ = ∂/∂θ Σ_k ⟨v̂_k, J u_k⟩ with u_k = ∂L/∂g_k held fixed:
for jm2 u = 4(b − a)·g/k (a = ‖J_Dᵀv̂‖², b = ‖g‖²), for jm1 u = 2(g − g_D)/k, λ-weighted and summed
(taken by autograd on detached products, so any product term works). So g is an ordinary input
gradient (no ``create_graph``; it reuses the student forward's graph, which NP/KD need anyway: a
separate pass would only add a forward), and J u comes from

* ``"mixed_fd"``: finite differences of ordinary forwards, fused attention included,
  ``fd_scheme`` "central" (s(x+hû) − s(x−hû))/2h (default) or "forward" (s(x+hû) − s(x))/h,
  reusing s(x); h = δ‖x‖ per sample, δ = eps^(1/3)/2 resp. eps^(1/2) (float32 2.5e-3 / 3.5e-4,
  :func:`mixed_partial_step`). Always float32 with TF32 off, forward and backward (bf16 FD leaves
  ≥14% error); under autocast or TF32 the scheme is central.
* ``"mixed_jvp"``: torch.func.jvp along u (math attention), then an ordinary backward (reverse over
  forward), exact; float32 under autocast.

``total`` = Σ λ·(true term value) + (surrogate − surrogate.detach()): its value is the loss (``terms``
holds the true jm1/jm2) and total.mean().backward() gives the Jacobian terms' gradient. The teacher
work is unchanged. Errors against the double backward (tests/test_objectives.py, benchmark):
mixed_jvp ≈ 1e-15 (float64), float32 like exact; mixed_fd, Jacobian terms alone, float64 ≤ 5e-10
(central) / 1e-7 (forward), float32 vs float64 exact 2e-4–4e-4 (central) / 2.5e-3 (forward).
Passes per step, in student forwards F (a full backward ≈ 2F, an input-only backward ≈ F; the
teacher adds T + T for its Jᵀv̂ to all VJP methods, NP+KD costs 3F + T): central 10F (forward,
input backward, the pair, their backwards), forward 7F, jvp ≈ 8F in forward-AD and math-attention
kernels; student activations held: 3, 2 and ≈ 2 forwards' worth (NP+KD: 1). Under bf16 autocast the
pair/jvp runs in float32, i.e. at float32 cost.

``jacobian_timesteps`` [lo, hi) keeps the Jacobian terms on samples with t in that range only (a mask,
not the paper's method). ``Objective(..., contributions=True)`` also returns each term's weighted
share of the total with its graph, for the training loop's per-term gradient diagnostics.

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

import copy
import math
from typing import Callable

import torch
from torch import Tensor

from igsm.models import conditioned, predict_noise

from igsm.objectives.directions import (OTD_DEFAULTS, CallableDirections, GaussianDirections,  # noqa: F401
                                        OTDDirections, orthonormalize, otd_step)
from igsm.objectives.products import (FD_SCHEMES, JACOBIAN_METHODS, JVP, JVP_METHODS, VJP,  # noqa: F401
                                      MixedVJP, RNGReplay, StrictSubgraph, double_vjp_products, retained_subgraphs,
                                      forward_jvp_products, frozen, math_attention, mixed_partial_step,
                                      sq_norm, strict_fp32, tf32_enabled, vjp_products)
from igsm.objectives.terms import (NAMES, TERMS, Distillation, FirstOrderJacobianMatching,  # noqa: F401
                                   NoisePrediction, Probe, SecondOrderJacobianMatching)

PROJECTIONS = ("vjp", "jvp")


def jacobian_rows(batch_size: int, fraction: float) -> Tensor | None:
    """Rows carrying the Jacobian terms, None for all of them.

    The first rows of each antithetic half (t paired with its mirror, T−1−t or 1−t: the processes'
    ``sample_times`` in igsm.diffusion) so that the variance reduction of the pairing is kept; batch
    rows are i.i.d. otherwise.
    """
    count = min(batch_size, max(1, math.ceil(fraction * batch_size)))
    if count == batch_size:
        return None
    half = (batch_size + 1) // 2
    first = (count + 1) // 2
    return torch.cat([torch.arange(first), half + torch.arange(count - first)])



# ---------------------------------------------------------------------------------------------


class Objective:
    """Weighted sum of terms: ``total, terms = objective(student, teacher, x_t, t, noise, generator)``.

    ``total`` is the per-sample weighted loss (Tensor[B]); ``terms`` maps each active term's name
    to its detached, unweighted per-sample value (with ``jacobian_fraction`` < 1, the Jacobian
    terms are B/m times their value on the m carrying rows and 0 elsewhere, so that their batch
    mean estimates the exact one without bias).
    """

    def __init__(self, terms: dict, projection, directions, jacobian_fraction: float = 1.0,
                 jacobian_every: int = 1, jacobian_timesteps: tuple | None = None):
        self.terms = terms  # name -> (weight, term)
        self.projection = projection
        self.directions = directions
        self.jacobian_fraction = jacobian_fraction
        self.jacobian_every = jacobian_every
        self.jacobian_timesteps = jacobian_timesteps
        self.needs_jacobian = any(term.needs_jacobian for _, term in terms.values())
        self.needs_teacher = any(term.needs_teacher for _, term in terms.values())

    def for_global_batch(self, rows: slice, global_batch: int) -> "Objective":
        """This objective for a process holding ``rows`` of a global batch (several processes):
        its directions are drawn for the whole batch (``directions.for_global_batch``)."""
        mode = copy.copy(self)
        mode.directions = self.directions.for_global_batch(rows, global_batch)
        return mode

    def probe(self, student, teacher, x_t, t, noise, generator=None, jacobian: bool = True,
              condition: Tensor | None = None) -> Probe:
        """The shared quantities; ``jacobian=False`` skips the Jacobian products (their terms then
        cannot be evaluated on this probe). ``condition``: each row's condition (igsm.conditioning),
        given to student and teacher alike; the Jacobians stay with respect to x_t alone."""
        if self.needs_teacher and teacher is None:
            active = [name for name, (_, term) in self.terms.items() if term.needs_teacher]
            raise ValueError(f"the terms {active} need the dense teacher, but teacher is None")
        needs_kd = any(term.needs_teacher_output for _, term in self.terms.values())
        # Each network with the condition of the rows it is given bound (igsm.models.Conditioned):
        # the products and the directions call net(x, t) as for an unconditional network.
        def bind(net, rows=None):
            return conditioned(net, condition if condition is None or rows is None else condition[rows])

        if not (self.needs_jacobian and jacobian):
            s = predict_noise(bind(student), x_t, t)
            s_dense = None
            if needs_kd:
                with torch.no_grad():
                    s_dense = predict_noise(bind(teacher), x_t, t)
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
        teacher_jac, student_jac = bind(teacher, rows), bind(student, rows)
        with frozen(teacher):
            directions = self.directions(x_jac, t_jac, generator, teacher_jac)
            s_dense, dense_products = self.projection.teacher(teacher_jac, x_jac, t_jac, list(directions))
        if getattr(self.projection, "mixed", False):
            s, products, values, surrogate = self.mixed_partials(student_jac, x_jac, t_jac, directions,
                                                                 dense_products)
        else:
            s, products = self.projection.student(student_jac, x_jac, t_jac, list(directions))
            values, surrogate = {}, None
        if rows is not None:
            s = torch.cat([s, predict_noise(bind(student, rest), x_t[rest], t[rest])])[order]
            if needs_kd:
                with torch.no_grad():
                    s_dense = torch.cat([s_dense, predict_noise(bind(teacher, rest), x_t[rest], t[rest])])[order]
        return Probe(noise, s, s_dense, products, dense_products, directions, rows, values, surrogate)

    def mixed_partials(self, student, x, t, directions, dense_products):
        """Student products without create_graph, the Jacobian terms' values, and the surrogate.

        The tangent u_k = ∂(Σ λ·term)/∂g_k is taken by autograd on the detached products (cheap:
        elementwise), so any term reading the products gets its gradient through mixed partials.
        """
        s, products, rng = self.projection.student(student, x, t, list(directions))
        leaves = [p.requires_grad_(True) for p in products]
        probe = Probe(None, s.detach(), None, leaves, dense_products, directions)
        with torch.enable_grad():
            values = {name: self.restrict(term(probe), t)
                      for name, (_, term) in self.terms.items() if term.needs_jacobian}
            weighted = sum(self.terms[name][0] * value for name, value in values.items())
            tangents = torch.autograd.grad(weighted.sum(), leaves, allow_unused=True)
        tangents = [torch.zeros_like(p) if u is None else u for p, u in zip(products, tangents)]
        surrogate, s = self.projection.surrogate(student, x, t, s, list(directions), tangents, rng)
        values = {name: value.detach() for name, value in values.items()}
        return s, [p.detach() for p in products], values, surrogate

    def restrict(self, value: Tensor, t: Tensor) -> Tensor:
        """A Jacobian term's per-sample ``value`` at network times ``t``, zero outside
        ``jacobian_timesteps`` [lo, hi) (the products are still computed there: a mask, so that
        batch shapes stay fixed and no step waits on the device to count rows)."""
        if self.jacobian_timesteps is None:
            return value
        low, high = self.jacobian_timesteps
        return value * ((t >= low) & (t < high)).to(value.dtype)

    def jacobian_step(self, step: int) -> bool:
        """Whether training step ``step`` evaluates the Jacobian terms (every ``jacobian_every``-th)."""
        return self.needs_jacobian and step % self.jacobian_every == 0

    def __call__(self, student, teacher, x_t, t, noise, generator=None, step: int = 0,
                 contributions: bool = False, condition: Tensor | None = None):
        """``step``: the training step, read only with ``jacobian_every`` > 1. Such an objective
        evaluates the Jacobian terms on steps 0, k, 2k, … only, weighted by k, and reports them as
        k × value there and 0 on the other steps: over every k consecutive steps the Jacobian terms'
        gradient sums to k times the exact one, an unbiased estimate per step (as jacobian_fraction
        over rows). Gradient clipping acts on the k-weighted step, which this estimate ignores.

        ``contributions``: also return, as a third value, each term's weighted per-sample share of
        ``total`` with its graph (name -> Tensor[B]; their sum is ``total``), for per-term gradients
        (igsm.training's diagnostics). Under mixed partials the Jacobian terms' gradient comes as
        one surrogate: it is one entry, named by the terms joined with "+".

        ``condition``: each row's condition, for student and teacher alike (:meth:`probe`)."""
        with_jacobian = self.jacobian_step(step)
        probe = self.probe(student, teacher, x_t, t, noise, generator, jacobian=with_jacobian,
                           condition=condition)
        parts, values = {}, {}
        # Jacobian terms, as unbiased estimates: ×B/m on the m rows carrying them (0 elsewhere),
        # ×k on every k-th step (0 on the others).
        scale = self.jacobian_every * (1.0 if probe.rows is None else x_t.shape[0] / len(probe.rows))
        spread = lambda value: value * scale if probe.rows is None else torch.zeros(  # noqa: E731
            x_t.shape[0], dtype=value.dtype, device=value.device).index_copy(0, probe.rows, value * scale)
        t_rows = t if probe.rows is None else t[probe.rows]
        for name, (weight, term) in self.terms.items():
            if term.needs_jacobian and not with_jacobian:
                values[name] = torch.zeros(x_t.shape[0], dtype=probe.student.dtype, device=x_t.device)
                continue
            if name in probe.jacobian_values:  # mixed partials: restricted, no graph
                value = spread(probe.jacobian_values[name])
            else:
                value = term(probe)
                if term.needs_jacobian:
                    value = spread(self.restrict(value, t_rows))
                parts[name] = weight * value
            values[name] = value.detach()
        if probe.surrogate is not None:  # value 0, gradient that of the Jacobian terms
            surrogate = spread(probe.surrogate)
            parts["+".join(probe.jacobian_values)] = surrogate - surrogate.detach()
        total = sum(parts.values()) + sum(self.terms[name][0] * values[name] for name in probe.jacobian_values)
        return (total, values, parts) if contributions else (total, values)


def build_objective(weights: dict, projection: str = "vjp", num_directions: int = 1,
                    directions: str | Callable = "gaussian", otd: dict | None = None, *,
                    jvp_method: str = "forward", jacobian_fraction: float = 1.0,
                    jacobian_method: str = "double_backward", fd_scheme: str = "central",
                    fd_step: float | None = None, jacobian_every: int = 1,
                    jacobian_timesteps: list | tuple | None = None) -> Objective:
    """The objective from config: ``weights`` maps names among NAMES to λ (0 or absent: off).

    ``projection`` "vjp" (‖Jᵀv̂‖², authors' code) or "jvp" (‖Jv̂‖², paper text); ``num_directions``
    k ≥ 1 orthonormal directions per sample, the Jacobian terms averaged over them;
    ``directions`` "gaussian", "otd" (with ``otd`` = {"dt", "steps", "prob"}) or a callable
    ``(x_t, t, generator) -> Tensor``; ``jvp_method`` "forward" (torch.func.jvp) or "double_vjp";
    ``jacobian_fraction`` in (0, 1]: share of the batch carrying the Jacobian terms (1 = exact);
    ``jacobian_method`` (vjp projection): how the Jacobian terms' gradient is obtained,
    "double_backward" (exact, default), "mixed_jvp" (exact, forward mode over an ordinary VJP) or
    "mixed_fd" (finite differences, ``fd_scheme`` "central" or "forward", relative step
    ``fd_step``, default :func:`mixed_partial_step`); see :class:`MixedVJP`; ``jacobian_every``
    k ≥ 1: the Jacobian terms on every k-th training step only, weighted by k (see
    :meth:`Objective.__call__`); ``jacobian_timesteps`` [lo, hi): the Jacobian terms only on samples
    whose network time t (DDPM step, or t·999 on the VP-SDE) is in that range, 0 elsewhere (not the
    paper's method; None: every t).
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
    if int(jacobian_every) != jacobian_every or jacobian_every < 1:
        raise ValueError(f"jacobian_every: {jacobian_every} is not an integer ≥ 1")
    if not 0.0 < jacobian_fraction <= 1.0:
        raise ValueError(f"jacobian_fraction: {jacobian_fraction} is outside (0, 1]")
    if jacobian_timesteps is not None:
        if len(jacobian_timesteps) != 2 or not 0 <= jacobian_timesteps[0] < jacobian_timesteps[1]:
            raise ValueError(f"jacobian_timesteps: {jacobian_timesteps} is not a range [lo, hi) "
                             "with 0 ≤ lo < hi")
        jacobian_timesteps = tuple(float(x) for x in jacobian_timesteps)
    if jvp_method not in JVP_METHODS:
        raise ValueError(f"jvp_method: unknown {jvp_method!r}; expected one of {JVP_METHODS}")
    if jacobian_method not in JACOBIAN_METHODS:
        raise ValueError(f"jacobian_method: unknown {jacobian_method!r}; expected one of {JACOBIAN_METHODS}")
    if jacobian_method != "double_backward" and projection != "vjp":
        raise ValueError(f"jacobian_method={jacobian_method!r} needs projection='vjp'; the jvp "
                         "projection already avoids the double backward by forward mode")
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
    if jacobian_method != "double_backward":
        proj = MixedVJP(jacobian_method, fd_scheme, fd_step)
    else:
        proj = VJP() if projection == "vjp" else JVP(jvp_method)
    return Objective(terms, proj, sampler, jacobian_fraction, int(jacobian_every), jacobian_timesteps)
