"""Learned per-timestep block reuse for diffusion samplers: DiP-GO (Zhu et al., "DiP-GO: A Diffusion
Pruner via Few-step Gradient Optimization", NeurIPS 2024, arXiv 2410.16942), and the baselines it
must be compared with (DeepCache-style caching, reusing the whole noise prediction, fewer steps).

DiP-GO prunes *computation*, not weights: the network is cut into blocks, and at each sampling step
each block either runs or returns its output cached at the last step where it ran. A binary
steps × blocks table (a :class:`ReusePlan`) says which; step 0 always runs everything.

What is known and what is reconstructed. The released code (haoweiz23/dip-go) covers Stable
Diffusion's UNet2DConditionModel with diffusers' DDIM scheduler only. Taken from the paper and the
released code (see the project's reference notes, section "DiP-GO"): the SuperNet (block output
g_reuse·cache + g_keep·F(input), one-hot gates, cache = the previous step's output), the pruner's
shape (learned queries T×N×D, one self-attention encoder layer over the blocks of a step, heads
giving 2 logits, last layer zero-initialised with bias towards "keep", straight-through one-hot
gates, score = p(reuse)), the loss (1 − SSIM of the final images + a MAC-weighted sparsity term
stopped once the kept MACs are below the target), SGD (lr 0.2, wd 1e-4, no momentum, cosine with
warm-up, gradient clipping at 1), the cascade rule and the post-processing by lowering thresholds
from the output side. Reconstructed here, because the public code has no such models or samplers:
the blocks and their consumers for diffusers' UNet2DModel and igsm's U-ViT (:func:`block_graph`),
MAC counting with ``FlopCounterMode`` (:func:`block_macs`), applying a plan inside the repository's
own samplers without touching them (:func:`apply_plan`: the sampling step is recognised from the
time input), the differentiable SuperNet chain (the samplers' own step objects, run with gradients),
the pruner's heads (one shared MLP plus a per-(step, block) bias instead
of one MLP per position, to keep the parameter count small), and the baselines' plans.

Convention: every ``mac_fraction`` here is the share of the dense sampler's MACs that is still
*executed* (1 = dense). The paper's "pruned-MAC fraction p" is 1 − mac_fraction. MACs are averaged
over the sampling steps and include the part of the network outside the blocks ("rest": time
embedding, input/output convolutions, patch embedding, decoder), which always runs.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter
from torch.utils.checkpoint import checkpoint

from igsm.conditioning import guided
from igsm.data import write_text_atomically
from igsm.diffusion import VPSDE, NoiseSchedule
from igsm.families import REST, BlockGraph, family_of  # REST: everything outside the blocks
from igsm.models import check_condition, condition_keyword, example_condition, predict_noise
from igsm.sampling.denoiser import Denoiser
from igsm.sampling.noise import ImageGenerators
from igsm.sampling.samplers import Sampler, make_sampler, run_sampler, sampler_class
from igsm.schema import section_defaults

REUSE, KEEP = 0, 1  # gate indices: (g_reuse, g_keep)
PLAN_FORMAT = "igsm.reuse-plan"
PLAN_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Blocks and who reads their outputs
# ---------------------------------------------------------------------------------------------

def block_graph(net: nn.Module) -> BlockGraph:
    """The blocks of a network and their consumers, as its family cuts them (igsm.families:
    U-Net ``down_blocks.i``, ``mid_block``, ``up_blocks.i``; U-ViT ``in_blocks.i``, ``mid_block``,
    ``out_blocks.i``)."""
    if isinstance(net, Denoiser):
        net = net.net
    try:
        family = family_of(net)
    except ValueError as err:
        raise ValueError(f"block reuse: {err}") from None
    return family.block_graph(net)


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


@torch.no_grad()
def block_macs(net: nn.Module, image_shape, timestep: float = 500) -> dict[str, float]:
    """MACs of each block and of ``REST`` for one image, from ``FlopCounterMode`` on one forward
    (MACs = FLOPs / 2; matrix products, convolutions and attention: elementwise work is not counted).
    With classifier-free guidance a step calls the network twice, on the same plan: shares of these
    MACs (every ``mac_fraction``) are those of the guided sampler too.
    The CPU kernel of scaled-dot-product attention is not in torch's table: it is counted with
    torch's own attention formula, so CPU and GPU counts agree."""
    if isinstance(net, Denoiser):
        net = net.net
    graph = block_graph(net)
    parameter = next(net.parameters())
    x = torch.zeros(1, *image_shape, device=parameter.device, dtype=parameter.dtype)
    t = torch.full((1,), timestep, device=parameter.device)
    # A conditional network is counted under its family's example condition (a class label, or a text
    # embedding of the encoder's full length, as sampling passes it): one network call, one image.
    keyword = condition_keyword(net)
    condition = {} if keyword is None else {keyword: example_condition(net, 1, parameter.device)}
    counter = flop_counter.FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop})
    with counter:
        predict_noise(net, x, t, **condition)
    counts = counter.get_flop_counts()
    prefix = type(net).__name__ + "."  # FlopCounterMode names modules from the root's class name
    macs = {name: sum(counts.get(prefix + name, {}).values()) / 2 for name in graph.names}
    macs[REST] = counter.get_total_flops() / 2 - sum(macs.values())
    return macs


# ---------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------

def _cascade(recompute: torch.Tensor, names, consumers) -> torch.Tensor:
    """A block all of whose consumers reuse at a step reuses too (its output would not be read);
    iterated to a fixed point. The last block feeds ``REST``, which always runs: never cascaded."""
    keep = recompute.clone()
    index = {name: i for i, name in enumerate(names)}
    changed = True
    while changed:
        changed = False
        for b in reversed(range(len(names))):
            readers = consumers[names[b]]
            if REST in readers:
                continue
            unread = keep[:, b] & ~keep[:, [index[r] for r in readers]].any(dim=1)
            if unread.any():
                keep[unread, b] = False
                changed = True
    return keep


@dataclass
class ReusePlan:
    """Which block runs at which sampling step.

    ``recompute``: bool [num_steps, num_blocks], True = run the block, False = return its output
    cached at the last step where it ran. ``timesteps``: the network time inputs the sampler visits,
    in sampling order (:func:`sampler_timesteps`). ``macs``: per block and ``REST``, one image.
    """

    recompute: torch.Tensor
    blocks: tuple[str, ...]
    consumers: dict[str, tuple[str, ...]]
    timesteps: tuple[float, ...]
    macs: dict[str, float]
    method: str = "dipgo"
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.recompute = torch.as_tensor(self.recompute, dtype=torch.bool).cpu()
        self.blocks = tuple(self.blocks)
        self.consumers = {name: tuple(readers) for name, readers in self.consumers.items()}
        self.timesteps = tuple(self.timesteps)
        self.macs = {name: float(value) for name, value in self.macs.items()}
        problem = self._problem()
        if problem:
            raise ValueError(f"ReusePlan: {problem}")

    def _problem(self) -> str | None:
        shape = (len(self.timesteps), len(self.blocks))
        if self.recompute.ndim != 2 or tuple(self.recompute.shape) != shape:
            return f"recompute has shape {tuple(self.recompute.shape)}, expected (num_steps, num_blocks) = {shape}"
        if not self.recompute[0].all():
            return "step 0 must recompute every block (there is nothing cached yet)"
        if set(self.consumers) != set(self.blocks):
            return f"consumers name {sorted(self.consumers)}, but the blocks are {list(self.blocks)}"
        for name, readers in self.consumers.items():
            if not readers or not set(readers) <= set(self.blocks) | {REST}:
                return f"consumers of {name}: {list(readers)} are not blocks or {REST!r}"
        if set(self.macs) != set(self.blocks) | {REST}:
            return f"macs name {sorted(self.macs)}, expected the blocks and {REST!r}"
        if any(not math.isfinite(v) or v < 0 for v in self.macs.values()):
            return f"macs must be finite and ≥ 0: {self.macs}"
        if not isinstance(self.method, str) or not self.method:  # a name of igsm.reuse_methods, or dense
            return f"method {self.method!r}: the name of the method that made the plan"
        return None

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def cascaded(self) -> "ReusePlan":
        """The plan with the cascade rule applied (what :func:`apply_plan` runs)."""
        return replace(self, recompute=_cascade(self.recompute, self.blocks, self.consumers))

    def executed_macs(self) -> torch.Tensor:
        """MACs executed at each step (one image), after the cascade, float64 [num_steps]."""
        block_macs_ = torch.tensor([self.macs[name] for name in self.blocks], dtype=torch.float64)
        return self.macs[REST] + self.cascaded().recompute.double() @ block_macs_

    def dense_macs(self) -> float:
        return sum(self.macs.values())

    def mac_fraction(self) -> float:
        """Executed MACs averaged over steps / dense MACs (rest included, after the cascade)."""
        return float(self.executed_macs().mean()) / self.dense_macs()

    def digest(self) -> str:
        """sha256 of what changes the images: the cascaded gates and the timesteps."""
        import hashlib

        gates = "".join("1" if g else "0" for g in self.cascaded().recompute.flatten().tolist())
        return hashlib.sha256(f"{gates};{self.timesteps}".encode()).hexdigest()

    def save(self, path) -> None:
        """JSON, one string of '1' (run) / '0' (reuse) per step; written atomically."""
        document = {
            "format": PLAN_FORMAT, "version": PLAN_VERSION, "method": self.method,
            "mac_fraction": self.mac_fraction(), "blocks": list(self.blocks),
            "consumers": {name: list(readers) for name, readers in self.consumers.items()},
            "timesteps": list(self.timesteps), "macs": self.macs,
            "recompute": ["".join("1" if g else "0" for g in row) for row in self.recompute.tolist()],
            "metadata": self.metadata,
        }
        write_text_atomically(path, json.dumps(document, indent=1) + "\n")

    @classmethod
    def load(cls, path, graph: BlockGraph | None = None, timesteps=None) -> "ReusePlan":
        """Read :meth:`save`'s file; with ``graph`` / ``timesteps``, check that the plan was made
        for those blocks and sampler steps. Any problem is a ``ValueError`` naming the file."""
        path = Path(path)
        try:
            document = json.loads(path.read_text())
            if document.get("format") != PLAN_FORMAT or document.get("version") != PLAN_VERSION:
                raise ValueError(f"not a {PLAN_FORMAT} version {PLAN_VERSION} file")
            rows = document["recompute"]
            width = len(document["blocks"])
            for s, row in enumerate(rows):
                if not isinstance(row, str) or len(row) != width or set(row) - {"0", "1"}:
                    raise ValueError(f"recompute row {s} is {row!r}, expected {width} characters '0'/'1'")
            recompute = torch.tensor([[c == "1" for c in row] for row in rows], dtype=torch.bool)
            plan = cls(recompute.reshape(len(rows), width), document["blocks"], document["consumers"],
                       document["timesteps"], document["macs"], document["method"], document.get("metadata", {}))
        except (OSError, KeyError, TypeError, ValueError) as err:
            kind = f"missing key {err}" if isinstance(err, KeyError) else str(err)
            raise ValueError(f"{path}: not a readable reuse plan ({kind}); make it again") from None
        if graph is not None and (plan.blocks != graph.names or plan.consumers != graph.consumers):
            raise ValueError(f"{path}: the plan's blocks {list(plan.blocks)} do not match the network's "
                             f"{list(graph.names)}; it was made for another architecture")
        if timesteps is not None and not _same_timesteps(plan.timesteps, timesteps):
            raise ValueError(f"{path}: the plan has {plan.num_steps} steps at timesteps "
                             f"{_describe_steps(plan.timesteps)}, but the sampler visits {len(timesteps)} "
                             f"at {_describe_steps(timesteps)}")
        return plan


def _same_timesteps(a, b) -> bool:
    return len(a) == len(b) and np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-6, atol=1e-6)


def _describe_steps(timesteps) -> str:
    shown = ", ".join(f"{t:g}" for t in list(timesteps)[:4])
    return f"[{shown}{', …' if len(timesteps) > 4 else ''}]"


def sampler_timesteps(sampler: str, num_steps: int, *, schedule: NoiseSchedule | VPSDE | None = None,
                      spacing: str = "uniform", t_min: float = 1e-3) -> list[float]:
    """Network time inputs of the repository's samplers, in sampling order (``Sampler.timesteps``):
    DDIM's integer steps, or t·VPSDE_TIME_SCALE on Euler–Maruyama's grid."""
    return _make_chain(sampler, num_steps, schedule, spacing=spacing, t_min=t_min).timesteps


def dense_plan(graph: BlockGraph, macs: dict, timesteps) -> ReusePlan:
    return ReusePlan(torch.ones(len(timesteps), len(graph.names), dtype=torch.bool), graph.names,
                     graph.consumers, timesteps, macs, method="dense")


def smallest_mac_fraction(macs: dict, num_steps: int) -> float:
    """Step 0 dense, every block reused afterwards: the least any plan can execute."""
    dense = sum(macs.values())
    return (dense + (num_steps - 1) * macs[REST]) / (num_steps * dense)


# ---------------------------------------------------------------------------------------------
# Applying a plan inside the repository's samplers
# ---------------------------------------------------------------------------------------------

class _StepTracker:
    """Finds the sampling step from the time input of each network call.

    A ``Denoiser`` with ``micro_batch`` calls the network several times per step, on fixed-size
    chunks, all with the same t: the chunk counter restarts when t changes, and each chunk has its
    own cache. DDIM's "quad" spacing repeats small timesteps (e.g. 0, 0, 0, 0, 1 at 100 steps), so
    equal t on consecutive calls may also be the next step: the number of chunks per step, learnt
    at step 0, tells them apart. t = the plan's first timestep starts a new chain.
    """

    def __init__(self, timesteps, on_new_chain):
        self.timesteps = np.asarray(timesteps, dtype=np.float64)
        if len(self.timesteps) > 1 and self._matches(self.timesteps[0])[-1] > 0:
            raise ValueError("apply_plan: the first timestep repeats; chunked calls could not be "
                             "told from steps")
        self.on_new_chain = on_new_chain
        self.step = self.chunk = self.last = self.chunks_per_step = None

    def _matches(self, value: float) -> np.ndarray:
        # Euler–Maruyama's network time (t·VPSDE_TIME_SCALE) reaches the network in float32: equal up to
        # its rounding.
        return np.flatnonzero(np.abs(self.timesteps - value) <= 1e-5 * max(1.0, abs(value)))

    def _next_step_at(self, value: float) -> int:
        matches = self._matches(value)
        if not len(matches):
            raise ValueError(f"apply_plan: the network was called at t = {value:g}, not a timestep of the plan; "
                             f"its {len(self.timesteps)} steps are at {_describe_steps(self.timesteps)} (made for "
                             f"another sampler, number of steps or spacing?)")
        if self.step is None:
            raise ValueError(f"apply_plan: the first network call is at t = {value:g}, but the plan starts "
                             f"at t = {self.timesteps[0]:g}; a chain must start at the plan's step 0")
        later = matches[matches > self.step]
        if not len(later):
            raise ValueError(f"apply_plan: the network was called at t = {value:g} after step {self.step}, out of "
                             f"the plan's order {_describe_steps(self.timesteps)}")
        return int(later[0])

    def __call__(self, module, args, kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
        if t is None:
            raise ValueError("apply_plan: the network was called without a timestep")
        flat = torch.as_tensor(t).reshape(-1)
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            raise ValueError("apply_plan: one timestep per network call is needed (the samplers call "
                             "every image at the same t)")
        value = float(flat[0])
        if value != self.last:
            if self.step == 0 and self.chunks_per_step is None:
                self.chunks_per_step = self.chunk + 1
            if len(self._matches(value)) and self._matches(value)[0] == 0:
                self.step, self.chunks_per_step = 0, None
                self.on_new_chain()
            else:
                self.step = self._next_step_at(value)
            self.chunk = 0
        else:
            self.chunk += 1
            if self.chunks_per_step is not None and self.chunk == self.chunks_per_step:
                self.step, self.chunk = self._next_step_at(value), 0
        self.last = value


class _StandIn(nn.Module):
    """A module put in a block's place; attributes it lacks are the block's (UNet2DModel.forward
    reads ``resnets`` of its up blocks)."""

    def __init__(self, block: nn.Module, name: str):
        super().__init__()
        self.block, self.name = block, name

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


class _CachedBlock(_StandIn):
    """Stands in for a block: runs it and keeps its output, or returns the kept output without
    running it."""

    def __init__(self, block: nn.Module, name: str, recompute: torch.Tensor, tracker: _StepTracker):
        super().__init__(block, name)
        self.recompute = recompute.tolist()
        # Keep an output only if some later step reuses it: no memory for always-run blocks.
        self.reused_after = [not all(self.recompute[s + 1:]) for s in range(len(self.recompute))]
        self.tracker = tracker
        self.cache = {}  # chunk position within the step → the block's output

    def forward(self, *args, **kwargs):
        step, chunk = self.tracker.step, self.tracker.chunk
        if self.recompute[step]:
            out = self.block(*args, **kwargs)
            if self.reused_after[step]:
                self.cache[chunk] = out
            return out
        if chunk not in self.cache:
            raise RuntimeError(f"apply_plan: {self.name} reuses at step {step}, but chunk {chunk} has no "
                               f"cached output (the batch is split differently than at the last full step)")
        out = self.cache[chunk]
        first = _leaves(out)[0]
        given = args[0] if args else next(iter(kwargs.values()))
        if first.shape[0] != given.shape[0]:
            raise RuntimeError(f"apply_plan: {self.name}'s cached output is for {first.shape[0]} images, "
                               f"called on {given.shape[0]}")
        # Returned as is, not copied: the consumers in diffusers and U-ViT do not write into their inputs.
        return out


@contextlib.contextmanager
def apply_plan(net: nn.Module, plan: ReusePlan):
    """Within the block, ``net`` (or a ``Denoiser``'s network) follows ``plan.cascaded()``: reused
    blocks are not executed. Use eagerly (not with ``compile_mode``), e.g.
    ``with apply_plan(net, plan): images = ddim_sample(net, noise, schedule, num_steps=...)``.
    Yields the cascaded plan that runs."""
    if isinstance(net, Denoiser):
        net = net.net
    graph = block_graph(net)
    if plan.blocks != graph.names or plan.consumers != graph.consumers:
        raise ValueError(f"apply_plan: the plan's blocks {list(plan.blocks)} are not the network's "
                         f"{list(graph.names)}")
    plan = plan.cascaded()
    wrappers = []
    tracker = _StepTracker(plan.timesteps, on_new_chain=lambda: [w.cache.clear() for w in wrappers])
    originals = {name: net.get_submodule(name) for name in plan.blocks}
    for b, name in enumerate(plan.blocks):
        wrappers.append(_CachedBlock(originals[name], name, plan.recompute[:, b], tracker))
        net.set_submodule(name, wrappers[-1])
    handle = net.register_forward_pre_hook(tracker, with_kwargs=True)
    try:
        yield plan
    finally:
        handle.remove()
        for name, block in originals.items():
            net.set_submodule(name, block)


# ---------------------------------------------------------------------------------------------
# The pruner
# ---------------------------------------------------------------------------------------------

class ReusePruner(nn.Module):
    """DiP-GO's pruner network: gates [num_steps, num_blocks, 2] = (g_reuse, g_keep), one-hot.

    Learned queries per (step, block) → one self-attention encoder layer over the blocks of each
    step (its output is used: the released code computes it and then discards it, a bug) → a
    2-layer MLP head per (step, block), as the paper's per-position heads (one layer fewer; at the
    default width 64 that is 3.8M parameters for 100 steps × 9 blocks) → 2 logits. The heads'
    last layer starts at zero with bias (0, 1), so every gate starts at "keep". Gates are
    straight-through: one-hot forward, softmax gradient.

    Why not one head shared by all positions: its output bias then takes the summed gradient of
    all T·N gates and moved them together (seen on the GPU run and on CPU: the kept share jumped
    between 1.0 and 0.4 from one step to the next, every gate flipping at once), so the scores
    ranked nothing.
    """

    def __init__(self, num_steps: int, num_blocks: int, dim: int = 64, num_heads: int = 4):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_steps, num_blocks, dim) * 0.02)
        self.encoder = nn.TransformerEncoderLayer(dim, num_heads, dim_feedforward=2 * dim, dropout=0.0,
                                                  batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)  # the pre-norm stack's closing norm: O(1) features into the heads
        # Per-position heads as batched weights (initialised as nn.Linear's: uniform ±1/√dim).
        bound = dim ** -0.5
        self.hidden_weight = nn.Parameter(torch.empty(num_steps, num_blocks, dim, dim).uniform_(-bound, bound))
        self.hidden_bias = nn.Parameter(torch.empty(num_steps, num_blocks, dim).uniform_(-bound, bound))
        self.out_weight = nn.Parameter(torch.zeros(num_steps, num_blocks, dim, 2))
        self.out_bias = nn.Parameter(torch.tensor([0.0, 1.0]).repeat(num_steps, num_blocks, 1))  # (reuse, keep)

    def logits(self) -> torch.Tensor:
        # Steps are the batch, blocks the sequence: attention mixes the blocks of one step.
        features = self.norm(self.encoder(self.queries))
        hidden = F.gelu(torch.einsum("tnd,tnde->tne", features, self.hidden_weight) + self.hidden_bias)
        return torch.einsum("tne,tnek->tnk", hidden, self.out_weight) + self.out_bias

    def forward(self) -> torch.Tensor:
        soft = self.logits().softmax(-1)
        hard = F.one_hot(soft.argmax(-1), 2).to(soft.dtype)
        return hard + soft - soft.detach()

    @torch.no_grad()
    def scores(self) -> torch.Tensor:
        """p(reuse) per (step, block)."""
        return self.logits().softmax(-1)[..., REUSE]


# ---------------------------------------------------------------------------------------------
# The SuperNet: every block runs, its output mixed with its cache by the gates
# ---------------------------------------------------------------------------------------------

class _SuperNetState:
    """What the gated blocks of one sampling step read and write."""

    def __init__(self):
        self.gates = None    # [num_blocks, 2] for this step
        self.cache = {}      # block → its SuperNet output at the previous step (empty at step 0)
        self.outputs = {}    # block → its SuperNet output at this step


class _GatedBlock(_StandIn):
    """The SuperNet's block: g_reuse·cache + g_keep·F(input), F always run (training)."""

    def __init__(self, block: nn.Module, name: str, index: int, state: _SuperNetState):
        super().__init__(block, name)
        self.index, self.state = index, state

    def forward(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        cached = self.state.cache.get(self.name)
        if cached is not None:
            g_reuse, g_keep = self.state.gates[self.index]
            mixed = [g_reuse * c + g_keep * f for c, f in zip(_leaves(cached), _leaves(out))]
            out = _build(_structure(out), iter(mixed))
        self.state.outputs[self.name] = out
        return out


@contextlib.contextmanager
def _supernet(net: nn.Module, graph: BlockGraph):
    state = _SuperNetState()
    originals = {name: net.get_submodule(name) for name in graph.names}
    for b, name in enumerate(graph.names):
        net.set_submodule(name, _GatedBlock(originals[name], name, b, state))
    try:
        yield state
    finally:
        for name, block in originals.items():
            net.set_submodule(name, block)


def _structure(out):
    """None for a tensor, else the nested tuple structure (diffusers down blocks return
    (hidden, (res_0, res_1, …)))."""
    return None if torch.is_tensor(out) else tuple(_structure(part) for part in out)


def _leaves(out) -> list[torch.Tensor]:
    return [out] if torch.is_tensor(out) else [leaf for part in out for leaf in _leaves(part)]


def _build(structure, leaves):
    return next(leaves) if structure is None else tuple(_build(part, leaves) for part in structure)


def _flatten(outputs: dict) -> tuple[list[torch.Tensor], list]:
    tensors = [leaf for out in outputs.values() for leaf in _leaves(out)]
    return tensors, [(name, _structure(out)) for name, out in outputs.items()]


def _unflatten(tensors, spec) -> dict:
    leaves = iter(tensors)
    return {name: _build(structure, leaves) for name, structure in spec}


def _make_chain(sampler: str, num_steps: int, schedule, *, eta=0.0, spacing="uniform", clip_x0=False,
                t_min=1e-3, algorithm="dpmsolver++") -> Sampler:
    """The sampler ``sampler`` as the sample stage runs it, from DiP-GO's settings (each sampler takes
    the ones it knows: DDIM eta, spacing and clip_x0, Euler–Maruyama t_min, DPM-Solver algorithm
    and t_min)."""
    settings = dict(eta=eta, spacing=spacing, clip_x0=clip_x0, t_min=t_min, algorithm=algorithm)
    keywords = sampler_class(sampler).keywords
    return make_sampler(sampler, schedule, num_steps=num_steps, **{k: settings[k] for k in keywords})


@dataclass(frozen=True)
class _Condition:
    """What a conditional network is called with in the SuperNet chain: each image's condition
    under the network's keyword and, with classifier-free guidance (``scale`` ≠ 1), the null
    condition of each image."""

    keyword: str
    condition: torch.Tensor
    null: torch.Tensor | None = None
    scale: float = 1.0

    def eps(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε̂ as the guided sampler takes it. The conditional and the null halves run as one batch
        [x; x], so each block's cache holds both halves and the null half reuses its own features
        (as apply_plan keeps one cache per call at sampling time)."""
        if self.null is None:
            return predict_noise(net, x, t, **{self.keyword: self.condition})
        both = predict_noise(net, torch.cat([x, x]), torch.cat([t, t]),
                             **{self.keyword: torch.cat([self.condition, self.null])})
        return guided(*both.chunk(2), self.scale)


def _supernet_sample(net, graph: BlockGraph, chain: Sampler, noise: torch.Tensor, gates: torch.Tensor,
                     step_noises, checkpointed: bool = True, condition: _Condition | None = None) -> torch.Tensor:
    """The SuperNet's sampling chain: ``run_sampler``'s loop over the same sampler ``chain``, with
    gradients; gates [num_steps, num_blocks, 2]; ``step_noises[i]``: step i's draw (None where
    ``chain.draws_noise(i)`` is false); ``condition``: a conditional network's (guided) inputs. With
    ``checkpointed`` each step is recomputed in the backward pass, so only the chain's state and the
    block caches are kept per step, not the activations inside the network."""
    x, cache = chain.start(noise), {}
    for step in range(len(gates)):
        spec_out = []

        def run_step(x, step_gates, *cached, step=step, spec=_flatten(cache)[1], spec_out=spec_out):
            # Self-contained (the gated blocks are put in and taken out here, the state comes from
            # the arguments): the checkpoint reruns it in the backward pass, after this loop.
            with _supernet(net, graph) as state:
                state.gates, state.cache = step_gates, _unflatten(cached, spec)
                net_x, net_t = chain.network_input(x, step)
                eps = predict_noise(net, net_x, net_t) if condition is None else condition.eps(net, net_x, net_t)
            tensors, spec_out[:] = _flatten(state.outputs)
            return (chain.update(x, eps, step, step_noises[step]), *tensors)

        cached_tensors = _flatten(cache)[0]
        if checkpointed:
            out = checkpoint(run_step, x, gates[step], *cached_tensors, use_reentrant=False)
        else:
            out = run_step(x, gates[step], *cached_tensors)
        x, cache = out[0], _unflatten(out[1:], spec_out)
    return chain.finish(x, noise.dtype)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window_size: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """SSIM per image (Wang et al. 2004; Gaussian window 11, σ 1.5, valid positions), images in
    [−1, 1] by default. The window shrinks to the image for images smaller than 11 pixels."""
    size = min(window_size, a.shape[-1], a.shape[-2])
    size -= 1 - size % 2  # odd
    coords = torch.arange(size, dtype=a.dtype, device=a.device) - (size - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    channels = a.shape[1]
    window = (g[:, None] * g[None, :]).expand(channels, 1, size, size)
    blur = lambda x: F.conv2d(x, window, groups=channels)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return value.flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------
# Learning a plan
# ---------------------------------------------------------------------------------------------

def learn_plan(net: nn.Module, *, sampler: str = "ddim", schedule: NoiseSchedule | VPSDE | None = None,
               num_steps: int, image_shape, mac_fraction: float, train_steps: int = 500, batch_size: int = 1,
               lr: float = 0.2, momentum: float = 0.0, weight_decay: float = 1e-4, grad_clip: float = 1.0,
               warmup_steps: int = 10, seed: int = 0, loss: str = "ssim", sparsity_weight: float = 1.0,
               query_dim: int = 64, num_heads: int = 4, eta: float = 0.0, spacing: str = "uniform",
               clip_x0: bool = False, t_min: float = 1e-3, algorithm: str = "dpmsolver++", device="cpu",
               checkpointed: bool = True,
               conditioning=None, guidance_scale: float = 1.0, latents: bool = False,
               progress: bool = True) -> ReusePlan:
    """DiP-GO: train a :class:`ReusePruner` so that the SuperNet's final images match the dense
    sampler's, with a sparsity term pushing kept MACs down to ``mac_fraction`` (executed share),
    then post-process its scores into a plan meeting ``mac_fraction`` (:func:`plan_from_scores`).

    Each training step draws ``batch_size`` images from seeds ``seed + step·batch_size + k`` (per-image
    generators, identical for the dense and SuperNet chains). Loss = (1 − SSIM) or MSE of the final
    images + ``sparsity_weight``·(1/T)Σ_t Σ_b g_keep[t,b]·C_b, C_b = block b's share of the dense
    MACs; the sparsity term is dropped while the kept (hard-gate, cascaded) MAC share is below
    ``mac_fraction`` (the notes' early stop). The network's weights are not trained.
    The scores and the loss history are kept in the plan's metadata.

    A conditional network (``conditioning``: an igsm.conditioning kind) samples each seed under
    the condition sampling gives it (a class, a prompt), guided with ``guidance_scale`` as the
    sample stage guides: the conditional and null passes of a step follow one gate row (DiP-GO's
    SD-1.5 setting). ``latents``: the chains end in an autoencoder's latents; the loss compares
    the final latents, not decoded images (reconstructed: DiP-GO's code does not say which it
    compares, and decoding inside the differentiable chain would cost an autoencoder backward per
    step of training), with SSIM's dynamic range that of the dense latents of the batch.
    """
    if loss not in ("ssim", "mse"):
        raise ValueError(f"loss {loss!r}: choose 'ssim' or 'mse'")
    if not 0 < mac_fraction <= 1:
        raise ValueError(f"mac_fraction {mac_fraction}: the executed share of the dense MACs, in (0, 1]")
    if isinstance(net, Denoiser):
        net = net.net
    keyword = condition_keyword(net)
    check_condition(net, keyword, conditioning)  # a conditional network needs its conditioning, and the reverse
    device = torch.device(device)
    chain = _make_chain(sampler, num_steps, schedule, eta=eta, spacing=spacing, clip_x0=clip_x0, t_min=t_min,
                        algorithm=algorithm)
    timesteps = sampler_timesteps(sampler, num_steps, schedule=schedule, spacing=spacing, t_min=t_min)
    graph = block_graph(net)
    macs = block_macs(net, image_shape)
    reachable = smallest_mac_fraction(macs, num_steps)
    if mac_fraction < reachable:  # fail before training, not after it
        raise ValueError(f"mac_fraction {mac_fraction}: at {num_steps} steps the smallest reachable executed "
                         f"share is {reachable:.4f}")
    dense_total = sum(macs.values())
    shares = torch.tensor([macs[name] / dense_total for name in graph.names], device=device)

    with torch.random.fork_rng(devices=[]):  # the pruner's initialisation from seed, global RNG untouched
        torch.manual_seed(seed)
        pruner = ReusePruner(num_steps, len(graph.names), query_dim, num_heads).to(device)
    optimizer, scheduler = _dipgo_optimizer(pruner, lr, momentum, weight_decay, warmup_steps, train_steps)
    history = []
    with _training_the_gates_only(net):
        for train_step in range(train_steps):
            seeds = range(seed + train_step * batch_size, seed + (train_step + 1) * batch_size)
            noise, dense_images, step_noises, condition = _dense_images_and_draws(
                chain, net, seeds, image_shape, num_steps, device, conditioning, guidance_scale)
            gates = pruner()
            images = _supernet_sample(net, graph, chain, noise, gates, step_noises, checkpointed, condition)
            total, consistency, sparsity, kept_fraction, sparsity_on = _dipgo_loss(
                dense_images, images, gates, shares, graph, timesteps, macs, loss=loss,
                sparsity_weight=sparsity_weight, mac_fraction=mac_fraction,
                data_range=float(dense_images.max() - dense_images.min()) if latents else 2.0)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(pruner.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            record = {"step": train_step, "loss": float(total.detach()), "consistency": float(consistency.detach()),
                      "sparsity": float(sparsity.detach()), "kept_mac_fraction": kept_fraction,
                      "sparsity_on": bool(sparsity_on)}
            history.append(record)
            if progress and (train_step % max(1, train_steps // 10) == 0 or train_step == train_steps - 1):
                print(f"dipgo step {train_step + 1}/{train_steps}: loss {record['loss']:.4f} "
                      f"({loss} {record['consistency']:.4f}), kept MACs {kept_fraction:.3f}", flush=True)

    scores = pruner.scores().cpu()
    settings = dict(sampler=sampler, num_steps=num_steps, eta=eta, spacing=spacing, clip_x0=clip_x0, t_min=t_min,
                    **({"algorithm": algorithm} if sampler == "dpm-solver" else {}),
                    train_steps=train_steps, batch_size=batch_size, lr=lr, momentum=momentum,
                    weight_decay=weight_decay, grad_clip=grad_clip, warmup_steps=warmup_steps, seed=seed,
                    loss=loss, sparsity_weight=sparsity_weight, query_dim=query_dim, num_heads=num_heads,
                    latents=latents,
                    **({} if conditioning is None else {"conditioning": conditioning.describe(),
                                                        "guidance_scale": guidance_scale}))
    return plan_from_scores(scores, graph, macs, timesteps, mac_fraction, method="dipgo",
                            metadata={"settings": settings, "history": history,
                                      "scores": [[round(float(s), 6) for s in row] for row in scores]})


def _dipgo_optimizer(pruner: nn.Module, lr: float, momentum: float, weight_decay: float, warmup_steps: int,
                     train_steps: int):
    """Plain SGD as the released code (no momentum there; lr 0.2, wd 1e-4 from the notes), its rate
    warmed up linearly, then cosine to 0."""
    optimizer = torch.optim.SGD(pruner.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def lr_factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, train_steps - warmup_steps)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


@contextlib.contextmanager
def _training_the_gates_only(net: nn.Module):
    """The network in eval mode without gradients while the gates train; restored after."""
    was_training = net.training
    requires_grad = [p.requires_grad for p in net.parameters()]
    net.eval().requires_grad_(False)
    try:
        yield
    finally:
        net.train(was_training)
        for parameter, flag in zip(net.parameters(), requires_grad):
            parameter.requires_grad_(flag)


def _dense_images_and_draws(chain, net: nn.Module, seeds: range, image_shape, num_steps: int,
                            device: torch.device, conditioning=None, guidance_scale: float = 1.0):
    """The dense sampler's final images from per-image generators of ``seeds`` (under the seeds'
    conditions, guided as sampling guides), the same draws again (the initial noise and each step's,
    in the sampler's order) for the SuperNet chain, and its :class:`_Condition` (None if unconditional)."""
    dense_generators = ImageGenerators(seeds)
    noise = dense_generators.randn(image_shape, device=device)
    condition = None if conditioning is None else conditioning.sampling_condition(seeds, device)
    denoiser = Denoiser(net, guidance_scale=guidance_scale, conditioning=conditioning)
    dense_images = run_sampler(chain, denoiser, noise, dense_generators, condition)
    generators = ImageGenerators(seeds)
    generators.randn(image_shape)
    step_noises = [generators.randn(image_shape, device=device, dtype=torch.float64)
                   if chain.draws_noise(s) else None for s in range(num_steps)]
    if condition is None:
        return noise, dense_images, step_noises, None
    guided_inputs = (dict(null=conditioning.null_like(condition), scale=guidance_scale)
                     if guidance_scale != 1.0 else {})
    return noise, dense_images, step_noises, _Condition(denoiser.keyword, condition, **guided_inputs)


def _dipgo_loss(dense_images, images, gates, shares, graph: BlockGraph, timesteps, macs: dict, *,
                loss: str, sparsity_weight: float, mac_fraction: float, data_range: float = 2.0):
    """(1 − SSIM) (over ``data_range``) or MSE of the SuperNet's final images against the dense ones,
    plus the sparsity term while the kept (hard-gate, cascaded) MAC share is at or above
    ``mac_fraction``; returns (total, consistency, sparsity, kept MAC share, whether the sparsity
    term was on)."""
    consistency = ((1 - ssim(dense_images, images, data_range)).mean() if loss == "ssim"
                   else F.mse_loss(images, dense_images))
    keep = gates[..., KEEP]
    num_steps = keep.shape[0]
    # Step 0 always runs everything: a constant, left out of the term.
    sparsity = (keep[1:] * shares).sum() / num_steps
    hard = keep.detach().cpu() > 0.5
    hard[0] = True
    kept_fraction = ReusePlan(hard, graph.names, graph.consumers, timesteps, macs).mac_fraction()
    sparsity_on = kept_fraction >= mac_fraction
    total = consistency + (sparsity_weight * sparsity if sparsity_on else 0.0)
    return total, consistency, sparsity, kept_fraction, sparsity_on


# ---------------------------------------------------------------------------------------------
# Post-processing and the baselines
# ---------------------------------------------------------------------------------------------

def plan_from_scores(scores, graph: BlockGraph, macs: dict, timesteps, mac_fraction: float, *,
                     first_threshold: float = 0.95, threshold_step: float = 0.05, method: str = "dipgo",
                     metadata: dict | None = None) -> ReusePlan:
    """DiP-GO's post-processing: in rounds with thresholds 0.95, 0.90, …, walk the blocks from the
    output side to the input side and, within a block, its steps by decreasing score; set reuse
    where the score p(reuse) > threshold, until the cascaded executed-MAC share ≤ ``mac_fraction``.
    Step 0 always runs. The result meets ``mac_fraction`` whenever any plan can; otherwise a
    ``ValueError`` says the smallest reachable share."""
    scores = torch.as_tensor(scores, dtype=torch.float64).cpu()
    num_steps, num_blocks = len(timesteps), len(graph.names)
    if tuple(scores.shape) != (num_steps, num_blocks):
        raise ValueError(f"scores of shape {tuple(scores.shape)}, expected (num_steps, num_blocks) = "
                         f"{(num_steps, num_blocks)}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite")
    reachable = smallest_mac_fraction(macs, num_steps)
    if mac_fraction < reachable - 1e-12:
        raise ValueError(f"mac_fraction {mac_fraction}: at {num_steps} steps the smallest reachable executed "
                         f"share is {reachable:.6f} (step 0 dense, only the rest of the network afterwards)")
    keep = torch.ones(num_steps, num_blocks, dtype=torch.bool)
    block_macs_ = torch.tensor([macs[name] for name in graph.names], dtype=torch.float64)
    dense_total = sum(macs.values())
    # The cascade acts within a step: only the changed step's MACs are recomputed.
    row_macs = torch.full((num_steps,), dense_total, dtype=torch.float64)
    target = mac_fraction * num_steps * dense_total + 1e-9 * dense_total
    done = row_macs.sum() <= target
    lowest = float(scores.min())
    round_index = 0
    while not done:
        threshold = first_threshold - round_index * threshold_step
        for b in reversed(range(num_blocks)):
            for s in (torch.argsort(scores[1:, b], descending=True, stable=True) + 1).tolist():
                if keep[s, b] and scores[s, b] > threshold:
                    keep[s, b] = False
                    row = _cascade(keep[s:s + 1], graph.names, graph.consumers)[0]
                    row_macs[s] = macs[REST] + row.double() @ block_macs_
                    if row_macs.sum() <= target:
                        done = True
                        break
            if done:
                break
        if threshold < lowest and not done:  # every entry is reuse: cannot happen past the check above
            raise AssertionError("post-processing: all blocks reused and the target still not met")
        round_index += 1
    return ReusePlan(keep, graph.names, graph.consumers, timesteps, macs, method, metadata or {}).cascaded()


def deepcache_plan(graph: BlockGraph, macs: dict, timesteps, interval: int | None = None, *,
                   mac_fraction: float | None = None) -> ReusePlan:
    """DeepCache (Ma et al., CVPR 2024) as a plan: every ``interval``-th step runs in full, the
    others run only the shallowest branch (the first and the last block: U-Net ``down_blocks.0`` and
    the last up block, U-ViT ``in_blocks.0`` and the last out block) and reuse the deeper features.
    With ``mac_fraction`` instead of ``interval``: the smallest interval meeting it."""
    if (interval is None) == (mac_fraction is None):
        raise ValueError("deepcache_plan: give exactly one of interval and mac_fraction")
    num_steps, num_blocks = len(timesteps), len(graph.names)

    def plan_for(k):
        recompute = torch.zeros(num_steps, num_blocks, dtype=torch.bool)
        recompute[:, [0, num_blocks - 1]] = True
        recompute[::k] = True
        return ReusePlan(recompute, graph.names, graph.consumers, timesteps, macs, "deepcache",
                         {"interval": k}).cascaded()

    if interval is not None:
        if interval < 1:
            raise ValueError(f"deepcache_plan: interval {interval} must be ≥ 1")
        return plan_for(interval)
    for k in range(1, num_steps + 1):
        plan = plan_for(k)
        if plan.mac_fraction() <= mac_fraction + 1e-12:
            return plan
    raise ValueError(f"deepcache_plan: mac_fraction {mac_fraction} is out of reach; the smallest at "
                     f"{num_steps} steps is {plan_for(num_steps).mac_fraction():.6f}")


def reuse_eps_plan(graph: BlockGraph, macs: dict, timesteps, skipped_steps=None, *,
                   mac_fraction: float | None = None) -> ReusePlan:
    """Reuse every block at the skipped steps: the network's head then recomputes the previous
    step's noise prediction exactly (the baseline the released SD-1.5 gates amount to). With
    ``mac_fraction``: the fewest skipped steps meeting it, the run steps evenly spaced from step 0."""
    if (skipped_steps is None) == (mac_fraction is None):
        raise ValueError("reuse_eps_plan: give exactly one of skipped_steps and mac_fraction")
    num_steps = len(timesteps)
    if mac_fraction is not None:
        dense_total = sum(macs.values())
        blocks_total = dense_total - macs[REST]
        reachable = smallest_mac_fraction(macs, num_steps)
        if mac_fraction < reachable - 1e-12:
            raise ValueError(f"reuse_eps_plan: mac_fraction {mac_fraction} is out of reach; the smallest at "
                             f"{num_steps} steps is {reachable:.6f}")
        # Executed share with k skipped steps: 1 − k·blocks / (T·dense) ≤ mac_fraction.
        k = max(0, math.ceil(num_steps * (1 - mac_fraction) * dense_total / blocks_total - 1e-9)) if blocks_total else 0
        k = min(k, num_steps - 1)
        run = {i * num_steps // (num_steps - k) for i in range(num_steps - k)}
        skipped_steps = [s for s in range(num_steps) if s not in run]
    skipped_steps = sorted(set(int(s) for s in skipped_steps))
    if any(not 1 <= s < num_steps for s in skipped_steps):
        raise ValueError(f"reuse_eps_plan: skipped steps {skipped_steps} must lie in 1..{num_steps - 1}")
    recompute = torch.ones(num_steps, len(graph.names), dtype=torch.bool)
    recompute[skipped_steps] = False
    return ReusePlan(recompute, graph.names, graph.consumers, timesteps, macs, "reuse-eps",
                     {"skipped_steps": skipped_steps})


# ---------------------------------------------------------------------------------------------
# The workflow's entry points (igsm.cli reuse-plan, sample --plan, efficiency --plan)
# ---------------------------------------------------------------------------------------------

def _sampler_steps(options: dict, schedule) -> list[float]:
    """The network times of the 'sample' settings' sampler."""
    return sampler_timesteps(options["sampler"], options["num_steps"], schedule=schedule,
                             spacing={**section_defaults("sample"), **options}["spacing"])


def load_plan_for(path, net: nn.Module, options: dict, schedule) -> ReusePlan:
    """The plan file ``path``, checked against the network's blocks and the sampler of the 'sample'
    settings ``options`` (a ValueError naming the file otherwise). Plans run eagerly."""
    if options.get("compile"):
        raise ValueError(f"{path}: block reuse runs the network eagerly; set sample.compile: false")
    return ReusePlan.load(path, graph=block_graph(net), timesteps=_sampler_steps(options, schedule))


def rule_plan_inputs(net: nn.Module, options: dict, schedule) -> tuple[BlockGraph, dict, list[float]]:
    """What a rule-based plan (deepcache_plan, reuse_eps_plan) is made from: the network's blocks,
    their MACs per image and the network times of the 'sample' settings' sampler."""
    from igsm.models import image_shape

    return block_graph(net), block_macs(net, image_shape(net)), _sampler_steps(options, schedule)
