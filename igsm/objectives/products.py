"""Jacobian–vector products of a network w.r.t. its input image (paper Sec. 4, Eq. 8–9; App. A.2):
VJP (reverse mode, the authors' code), JVP (forward mode, the paper's text) and the mixed-partials
estimators of the Jacobian terms' gradient, with the numerics they need (math attention, frozen
teacher, strict float32 for finite differences). The package docstring (igsm.objectives) says how
each is computed and what it costs.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor, nn

from igsm.models import predict_noise

JVP_METHODS = ("forward", "double_vjp")
JACOBIAN_METHODS = ("double_backward", "mixed_fd", "mixed_jvp")
FD_SCHEMES = ("central", "forward")


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


_retain_subgraphs = False


@contextlib.contextmanager
def retained_subgraphs():
    """Backward passes inside the block keep :class:`StrictSubgraph`'s inner graph (autograd cannot
    tell a Function's backward whether the outer pass retains its graph): for the training loop's
    diagnostics, several backward passes through the step's graph before the step's own."""
    global _retain_subgraphs
    saved, _retain_subgraphs = _retain_subgraphs, True
    try:
        yield
    finally:
        _retain_subgraphs = saved


class StrictSubgraph(torch.autograd.Function):
    """``closure()``'s value, differentiated w.r.t. ``params`` with TF32 off in the backward too.

    The closure builds its own graph (forward under strict numerics, see :meth:`MixedVJP.surrogate`);
    the backward runs ``autograd.grad`` on it inside :func:`strict_fp32`, whatever the global flags
    (the rest of the step keeps them). The inner graph is freed by the first backward outside
    :func:`retained_subgraphs`.
    """

    @staticmethod
    def forward(ctx, closure, *params):
        with torch.enable_grad():
            value = closure()
        ctx.value, ctx.params = value, params
        return value.detach()

    @staticmethod
    def backward(ctx, grad):
        value = ctx.value
        if not _retain_subgraphs:
            ctx.value = None
        if value is None:
            raise RuntimeError("mixed_fd: the finite-difference graph was already freed by a backward")
        wanted = [i for i, p in enumerate(ctx.params) if ctx.needs_input_grad[1 + i]]
        grads = [None] * len(ctx.params)
        if wanted and value.requires_grad:
            with strict_fp32(grad.device):
                found = torch.autograd.grad(value, [ctx.params[i] for i in wanted], grad, allow_unused=True,
                                            retain_graph=_retain_subgraphs)
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


