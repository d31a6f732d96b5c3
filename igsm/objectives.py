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
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from igsm.models import predict_noise

NAMES = ("np", "kd", "jm1", "jm2")
PROJECTIONS = ("vjp", "jvp")
JVP_METHODS = ("forward", "double_vjp")
JACOBIAN_METHODS = ("double_backward", "mixed_fd", "mixed_jvp")
FD_SCHEMES = ("central", "forward")
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


class RNGReplay:
    """Replays the global RNG state of ``device`` (CPU, CUDA), so that repeated forwards of a
    network in training mode draw the same dropout masks as the first (torch.utils.checkpoint's
    preserve_rng_state). Each replay leaves the RNG where one forward from the start leaves it."""

    def __init__(self, device: torch.device):
        self.cuda = device if device.type == "cuda" else None
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(self.cuda) if self.cuda is not None else None

    def replay(self):
        torch.set_rng_state(self.cpu_state)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.cuda)


def mixed_partial_step(dtype: torch.dtype, scheme: str) -> float:
    """Default relative finite-difference step δ: eps^(1/3)/2 (central) or eps^(1/2) (forward).

    The step is h = δ·‖x‖ per sample. Rounding contributes ~eps/δ and truncation ~C·δ² (central) or
    ~C·δ (forward) to the relative error; for the orders of eps the optimum is at eps^(1/3) and
    eps^(1/2) times a constant set by the networks' curvature. Float32 sweeps on two random tiny
    U-Nets (Jacobian terms' gradient against float64 exact) put the central optimum at δ ≈ 1e-3 to
    3e-3 (errors 1.3e-4, 1.8e-4) and the forward one at δ ≈ 3e-4 (2.3e-3, 2.7e-3), hence
    float32: 2.5e-3 / 3.5e-4; float64: 3.0e-6 / 1.5e-8.
    """
    eps = torch.finfo(dtype).eps
    return eps ** (1 / 3) / 2 if scheme == "central" else eps ** 0.5


@contextlib.contextmanager
def strict_fp32(device: torch.device):
    """TF32 off for cuBLAS and cuDNN inside the block (restored after): TF32's 10-bit mantissa
    would make finite differences of float32 forwards meaningless (rounding ~1e-3)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tf32_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and (torch.backends.cuda.matmul.allow_tf32
                                      or torch.backends.cudnn.allow_tf32)


class StrictSubgraph(torch.autograd.Function):
    """``closure()``'s value, differentiated w.r.t. ``params`` with TF32 off in the backward too.

    The closure builds its own graph (forward under strict numerics, see :meth:`MixedVJP.surrogate`);
    the backward runs ``autograd.grad`` on it inside :func:`strict_fp32`, whatever the global flags
    (the rest of the step keeps them). The inner graph is freed by the first backward.
    """

    @staticmethod
    def forward(ctx, closure, *params):
        with torch.enable_grad():
            value = closure()
        ctx.value, ctx.params = value, params
        return value.detach()

    @staticmethod
    def backward(ctx, grad):
        value, ctx.value = ctx.value, None
        if value is None:
            raise RuntimeError("mixed_fd: the finite-difference graph was already freed by a backward")
        wanted = [i for i, p in enumerate(ctx.params) if ctx.needs_input_grad[1 + i]]
        grads = [None] * len(ctx.params)
        if wanted and value.requires_grad:
            with strict_fp32(grad.device):
                found = torch.autograd.grad(value, [ctx.params[i] for i in wanted], grad, allow_unused=True)
            for i, g in zip(wanted, found):
                grads[i] = g
        return (None, *grads)


class MixedVJP(VJP):
    """Products Jᵀv̂ (as :class:`VJP`) whose gradient comes from mixed partials, no double backward.

    The student's g = Jᵀv̂ is an ordinary input-gradient of its forward (no ``create_graph``; the
    forward's graph is retained and serves NP/KD). For any loss L(g) of the products the symmetry of
    second derivatives gives ∂L/∂θ = ⟨u, ∂g/∂θ⟩ = ∂/∂θ ⟨v̂, J u⟩ with u = ∂L/∂g held fixed, and
    :meth:`surrogate` returns Σ_k ⟨v̂_k, J u_k⟩ per sample, J u from

    * ``"mixed_fd"``: finite differences of ordinary forwards (fused attention allowed),
      central (s(x + h û) − s(x − h û)) / 2h, error O(h²), or forward (s(x + h û) − s(x)) / h,
      error O(h), reusing the forward s(x); û = u/‖u‖ per sample, h = δ · max(‖x‖, 1e-3 √n) per
      sample, δ = ``fd_step`` or :func:`mixed_partial_step` of the parameters' dtype. The
      difference forwards run in the parameters' dtype with autocast and TF32 off: in bf16 the
      best step found on a tiny U-Net (δ = 0.1) still leaves 14% error in ⟨v̂, J û⟩ (fp32: 1.7e-4
      at δ = 3e-3), so bf16/fp16 parameters are refused. Under autocast or TF32 the scheme is
      always central: the forward scheme's s(x) would not be full precision.
    * ``"mixed_jvp"``: forward mode (torch.func.jvp, math attention), exact; its primal output
      replaces s(x) for NP/KD, so g comes from a torch.func.vjp forward that keeps no graph for
      the parameters. Under autocast the jvp runs in float32 with autocast off (forward AD fails
      under autocast, see :class:`JVP`) and the autocast s(x) keeps its graph for NP/KD.

    Every forward after the first replays the first one's RNG state, so in training mode all of a
    method's forwards draw the same dropout masks (tested on CPU).
    """

    mixed = True

    def __init__(self, method: str, fd_scheme: str = "central", fd_step: float | None = None):
        if method not in JACOBIAN_METHODS[1:]:
            raise ValueError(f"jacobian_method: unknown {method!r}; expected one of {JACOBIAN_METHODS}")
        if fd_scheme not in FD_SCHEMES:
            raise ValueError(f"fd_scheme: unknown {fd_scheme!r}; expected one of {FD_SCHEMES}")
        if fd_step is not None and not fd_step > 0:
            raise ValueError(f"fd_step: {fd_step} is not > 0")
        self.method, self.fd_scheme, self.fd_step = method, fd_scheme, fd_step

    def student(self, net, x, t, directions):
        """s(x) (with its graph unless the jvp replaces it), detached [Jᵀv̂], and the RNG state."""
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = next(net.parameters()).dtype
        if self.method == "mixed_fd" and torch.finfo(dtype).eps > 1e-6:
            raise ValueError(f"jacobian_method='mixed_fd': finite differences with {dtype} parameters "
                             "lose all digits; use float32 parameters (autocast is fine) or 'mixed_jvp'")
        keep = self.method == "mixed_fd" or autocast  # s(x) serves NP/KD and the forward scheme
        rng = RNGReplay(x.device)
        if self.method == "mixed_jvp" and any(isinstance(m, nn.LayerNorm) for m in net.modules()):
            # torch 2.14 (CPU): the backward of LayerNorm's forward-AD formula is wrong with
            # respect to its input: ∂θ⟨v, J u⟩ through Linear → LayerNorm is off by ~50% while
            # each layer alone is exact (tests/test_objectives.py checks this is still so).
            raise ValueError("jacobian_method='mixed_jvp' gives wrong gradients for networks with "
                             "LayerNorm (U-ViT) on this PyTorch; use 'double_backward' or 'mixed_fd'")
        if self.method == "mixed_jvp":
            # Through torch.func, like the jvp after it: torch.func draws a dropout mask of a
            # non-contiguous activation in another element order than eager mode (torch 2.14 CPU),
            # so an eager forward here would not share the jvp's masks in training mode.
            with torch.enable_grad() if keep else torch.no_grad():
                s, pullback = torch.func.vjp(lambda z: predict_noise(net, z, t), x.detach())
                products = [pullback(v.to(s.dtype))[0] for v in directions]
            return s, [p.detach() for p in products], rng
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            s = predict_noise(net, x, t)
            products = [torch.autograd.grad(s, x, v.to(s.dtype), retain_graph=True)[0]
                        for v in directions]
        return s, [p.detach() for p in products], rng

    def surrogate(self, net, x, t, s, directions, tangents, rng):
        """Per-sample Σ_k ⟨v̂_k, J u_k⟩ with its graph to the parameters, and s(x) for NP/KD."""
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = next(net.parameters()).dtype
        x = x.detach().to(dtype)
        f = lambda z: predict_noise(net, z, t)  # noqa: E731
        precise = torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext()
        if self.method == "mixed_jvp":
            s_new, total = None, 0.0
            with torch.enable_grad(), precise, math_attention():
                for v, u in zip(directions, tangents):
                    rng.replay()
                    primal, ju = torch.func.jvp(f, (x,), (u.to(dtype),))
                    s_new = primal if s_new is None else s_new
                    total = total + (v.to(dtype) * ju).flatten(1).sum(1)
            return total, (s if autocast else s_new)

        scheme = "central" if autocast or tf32_enabled(x.device) else self.fd_scheme
        if scheme != self.fd_scheme:
            warnings.warn("mixed_fd: fd_scheme='forward' runs as 'central' under autocast or TF32 "
                          "(its shared s(x) is not full float32)", stacklevel=2)
        delta = self.fd_step or mixed_partial_step(dtype, scheme)
        shape = (-1, *[1] * (x.ndim - 1))
        h = delta * x.flatten(1).norm(dim=1).clamp_min(1e-3 * x[0].numel() ** 0.5)
        width = 2 * h if scheme == "central" else h
        # Per direction: c · ⟨v̂, s(x + h û)⟩ [− c · ⟨v̂, s(x − h û)⟩], c = ‖u‖ / width; the forward
        # scheme's − c · ⟨v̂, s(x)⟩ goes through the graph of s(x) (same numerics: no autocast/TF32).
        pairs = []
        for v, u in zip(directions, tangents):
            u, v = u.to(dtype), v.to(dtype)
            norm = u.flatten(1).norm(dim=1)
            unit = u / norm.clamp_min(torch.finfo(dtype).tiny).view(shape)
            pairs.append((v, (norm / width).view(shape) * v, h.view(shape) * unit))

        def differences():
            result = 0.0
            with precise, strict_fp32(x.device):
                for _, weight, step in pairs:
                    rng.replay()
                    out = weight * f(x + step)
                    if scheme == "central":
                        rng.replay()
                        out = out - weight * f(x - step)
                    result = result + out.flatten(1).sum(1)
            return result

        params = [p for p in net.parameters() if p.requires_grad]
        total = StrictSubgraph.apply(differences, *params)
        if scheme == "forward":
            total = total - sum((weight * s).flatten(1).sum(1) for _, weight, _ in pairs)
        return total, s


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
    # Mixed partials only: the Jacobian terms' detached values and the per-sample surrogate whose
    # parameter gradient is theirs (weights included), for the rows ``rows``.
    jacobian_values: dict = field(default_factory=dict)
    surrogate: Tensor | None = None


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

    def __init__(self, terms: dict, projection, directions, jacobian_fraction: float = 1.0,
                 jacobian_every: int = 1):
        self.terms = terms  # name -> (weight, term)
        self.projection = projection
        self.directions = directions
        self.jacobian_fraction = jacobian_fraction
        self.jacobian_every = jacobian_every
        self.needs_jacobian = any(term.needs_jacobian for _, term in terms.values())
        self.needs_teacher = any(term.needs_teacher for _, term in terms.values())

    def probe(self, student, teacher, x_t, t, noise, generator=None, jacobian: bool = True) -> Probe:
        """The shared quantities; ``jacobian=False`` skips the Jacobian products (their terms then
        cannot be evaluated on this probe)."""
        if self.needs_teacher and teacher is None:
            active = [name for name, (_, term) in self.terms.items() if term.needs_teacher]
            raise ValueError(f"the terms {active} need the dense teacher, but teacher is None")
        needs_kd = "kd" in self.terms
        if not (self.needs_jacobian and jacobian):
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
        if getattr(self.projection, "mixed", False):
            s, products, values, surrogate = self.mixed_partials(student, x_jac, t_jac, directions,
                                                                 dense_products)
        else:
            s, products = self.projection.student(student, x_jac, t_jac, list(directions))
            values, surrogate = {}, None
        if rows is not None:
            s = torch.cat([s, predict_noise(student, x_t[rest], t[rest])])[order]
            if needs_kd:
                with torch.no_grad():
                    s_dense = torch.cat([s_dense, predict_noise(teacher, x_t[rest], t[rest])])[order]
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
            values = {name: term(probe) for name, (_, term) in self.terms.items() if term.needs_jacobian}
            weighted = sum(self.terms[name][0] * value for name, value in values.items())
            tangents = torch.autograd.grad(weighted.sum(), leaves, allow_unused=True)
        tangents = [torch.zeros_like(p) if u is None else u for p, u in zip(products, tangents)]
        surrogate, s = self.projection.surrogate(student, x, t, s, list(directions), tangents, rng)
        values = {name: value.detach() for name, value in values.items()}
        return s, [p.detach() for p in products], values, surrogate

    def jacobian_step(self, step: int) -> bool:
        """Whether training step ``step`` evaluates the Jacobian terms (every ``jacobian_every``-th)."""
        return self.needs_jacobian and step % self.jacobian_every == 0

    def __call__(self, student, teacher, x_t, t, noise, generator=None, step: int = 0):
        """``step``: the training step, read only with ``jacobian_every`` > 1. Such an objective
        evaluates the Jacobian terms on steps 0, k, 2k, … only, weighted by k, and reports them as
        k × value there and 0 on the other steps: over every k consecutive steps the Jacobian terms'
        gradient sums to k times the exact one, an unbiased estimate per step (as jacobian_fraction
        over rows). Gradient clipping acts on the k-weighted step, which this estimate ignores."""
        with_jacobian = self.jacobian_step(step)
        probe = self.probe(student, teacher, x_t, t, noise, generator, jacobian=with_jacobian)
        total, values = 0.0, {}
        # Jacobian terms, as unbiased estimates: ×B/m on the m rows carrying them (0 elsewhere),
        # ×k on every k-th step (0 on the others).
        scale = self.jacobian_every * (1.0 if probe.rows is None else x_t.shape[0] / len(probe.rows))
        spread = lambda value: value * scale if probe.rows is None else torch.zeros(  # noqa: E731
            x_t.shape[0], dtype=value.dtype, device=value.device).index_copy(0, probe.rows, value * scale)
        for name, (weight, term) in self.terms.items():
            if term.needs_jacobian and not with_jacobian:
                values[name] = torch.zeros(x_t.shape[0], dtype=probe.student.dtype, device=x_t.device)
                continue
            value = probe.jacobian_values[name] if name in probe.jacobian_values else term(probe)
            if term.needs_jacobian:
                value = spread(value)
            total = total + weight * value
            values[name] = value.detach()
        if probe.surrogate is not None:  # value 0, gradient that of the Jacobian terms
            surrogate = spread(probe.surrogate)
            total = total + (surrogate - surrogate.detach())
        return total, values


def build_objective(weights: dict, projection: str = "vjp", num_directions: int = 1,
                    directions: str | Callable = "gaussian", otd: dict | None = None, *,
                    jvp_method: str = "forward", jacobian_fraction: float = 1.0,
                    jacobian_method: str = "double_backward", fd_scheme: str = "central",
                    fd_step: float | None = None, jacobian_every: int = 1) -> Objective:
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
    :meth:`Objective.__call__`).
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
    return Objective(terms, proj, sampler, jacobian_fraction, int(jacobian_every))
