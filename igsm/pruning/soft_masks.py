"""Soft channel masks on torch-pruning's dependency groups: the substrate of gradient-flow pruning
(issue 16; "Pruning for Sparse Diffusion Models based on Gradient Flow", arXiv 2501.09464, whose
abstract is all that is public: ../shared/reference/gradient-flow-pruning-abstract.txt).

What the abstract fixes: structured (channel) pruning, iterative and soft, a continuous mask moved
along the gradient flow of an energy built from the criterion. Everything below is a
**reconstruction** (pruning-methods-notes.md), labelled as such:

* one mask value m ∈ [0, 1] per channel of each torch-pruning group (the groups and channel indices
  Diff-Pruning's hard pruning uses, so the final widths are Diff-Pruning's at the same ratio);
* a mask acts where the channel is made and wherever it is read: the convolution or linear layer
  that makes it scales its output by m (so attention's q, k, v lose it before their products),
  every convolution or linear layer that reads it sees it scaled by m again, and every GroupNorm
  or LayerNorm over it computes its statistics with the channels weighted by m. With m ∈ {0, 1}
  the masked network therefore computes exactly what the hard-pruned network computes (tested, both
  families): a channel at 0 reaches no layer and enters no statistic. Scaling only where it is made
  would not do: the zeroed channel would still enter the norm's mean and variance, and the norm's
  bias would revive it. (Soft values thus act as m² along a plain path; at 0 and 1 that changes
  nothing.)
* U-ViT's fused ``qkv`` layer: torch-pruning's group holds its 3·d outputs, but the hard prune
  removes head dim i from q, k and v together (with ``proj``'s input i, the root of its step's
  group), so such a group gets d masks, mask i acting on q_i, k_i, v_i and proj's input i.
* the final hard prune keeps, per group, the channels with the largest m (torch-pruning ranks them,
  equally within GroupNorm groups as for every criterion).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from igsm.pruning.structural import metapruner, prune_with_importance


@dataclass
class _Use:
    """Where one group's channels are read: ``channels`` of ``module``'s input (a Conv2d or Linear
    consumer) or of its normalised channels (a GroupNorm), carrying the group's channels
    ``positions`` (a concatenation may read one group's channel twice: the U-Net's skips)."""
    group: int
    channels: torch.Tensor
    positions: torch.Tensor


@dataclass
class SoftMasks:
    """One mask vector per torch-pruning group (``masks[g]``, 1 = keep), and the layers that read
    each group's channels. Build with :func:`soft_masks`, apply with :meth:`applied`."""
    masks: list[torch.Tensor]
    roots: list[str]  # each group's root layer (its first out-channel dependency), for reports
    uses: dict[nn.Module, list[_Use]] = field(default_factory=dict)  # layers reading group channels
    makes: dict[nn.Module, list[_Use]] = field(default_factory=dict)  # conv / linear layers making them
    aliases: dict[str, int] = field(default_factory=dict)  # other root names of a group (the hard prune's)

    def channel_scale(self, uses: list[_Use], num_channels: int, like: torch.Tensor) -> torch.Tensor:
        """The factor of each of ``num_channels`` channels: m where a group owns it, else 1."""
        scale = torch.ones(num_channels, dtype=like.dtype, device=like.device)
        for use in uses:
            mask = self.masks[use.group].to(like.dtype)
            scale = scale.index_put((use.channels,), mask[use.positions])
        return scale

    def to(self, device) -> "SoftMasks":
        """Masks and channel indices on ``device`` (in place; the masks stay leaf tensors). On a
        GPU this matters: an index copied from the host at every hooked layer is a host sync, and
        with other jobs on the GPU those syncs made a flow step ~30 s instead of a fraction of one."""
        device = torch.device(device)
        for g, mask in enumerate(self.masks):
            if mask.device != device:
                self.masks[g] = mask.detach().to(device).requires_grad_(mask.requires_grad)
        for uses in (*self.uses.values(), *self.makes.values()):
            for use in uses:
                use.channels, use.positions = use.channels.to(device), use.positions.to(device)
        return self

    @contextlib.contextmanager
    def applied(self, net: nn.Module):
        """``net`` computes as the masked network inside the block (hooks removed after); the masks
        move to the network's device."""
        parameter = next(net.parameters(), None)
        if parameter is not None:
            self.to(parameter.device)
        handles = [module.register_forward_hook(self._producer_hook) for module in self.makes]
        for module in self.uses:
            if isinstance(module, nn.GroupNorm):
                handles.append(module.register_forward_hook(self._group_norm_hook))
            elif isinstance(module, nn.LayerNorm):
                handles.append(module.register_forward_hook(self._layer_norm_hook))
            else:
                handles.append(module.register_forward_pre_hook(self._consumer_hook))
        try:
            yield net
        finally:
            for handle in handles:
                handle.remove()

    def _scaled(self, module, x, uses):
        dim = 1 if isinstance(module, nn.Conv2d) else -1  # Linear works on (…, C)
        shape = [1] * x.ndim
        shape[dim] = x.shape[dim]
        return x * self.channel_scale(uses, x.shape[dim], x).view(shape)

    def _consumer_hook(self, module, args):
        return (self._scaled(module, args[0], self.uses[module]), *args[1:])

    def _producer_hook(self, module, args, output):
        return self._scaled(module, output, self.makes[module])

    def _group_norm_hook(self, module, args, output):
        return masked_group_norm(args[0], module, self.channel_scale(self.uses[module], module.num_channels, args[0]))

    def _layer_norm_hook(self, module, args, output):
        x = args[0]
        return masked_layer_norm(x, module, self.channel_scale(self.uses[module], x.shape[-1], x))


def masked_group_norm(x: torch.Tensor, norm: nn.GroupNorm, weights: torch.Tensor) -> torch.Tensor:
    """GroupNorm whose statistics weight channel c by ``weights[c]``: with 0/1 weights, the
    GroupNorm of the kept channels alone (what a hard-pruned GroupNorm computes)."""
    n, c = x.shape[:2]
    groups = norm.num_groups
    dtype = torch.promote_types(x.dtype, torch.float32)  # statistics at least in fp32 (bf16 runs)
    xs = x.reshape(n, groups, c // groups, -1).to(dtype)
    w = weights.to(dtype).reshape(1, groups, c // groups, 1)
    count = (w.sum(dim=2, keepdim=True) * xs.shape[-1]).clamp_min(1e-12)  # a group masked whole: no NaN
    mean = (xs * w).sum(dim=(2, 3), keepdim=True) / count
    var = ((xs - mean).square() * w).sum(dim=(2, 3), keepdim=True) / count
    y = ((xs - mean) / torch.sqrt(var + norm.eps)).reshape(x.shape).to(x.dtype)
    if norm.affine:
        shape = [1, c] + [1] * (x.ndim - 2)
        y = y * norm.weight.view(shape) + norm.bias.view(shape)
    return y


def masked_layer_norm(x: torch.Tensor, norm: nn.LayerNorm, weights: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dimension whose statistics weight channel c by ``weights[c]``: with
    0/1 weights, the LayerNorm of the kept channels alone."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    xs, w = x.to(dtype), weights.to(dtype)
    count = w.sum().clamp_min(1e-12)
    mean = (xs * w).sum(-1, keepdim=True) / count
    var = ((xs - mean).square() * w).sum(-1, keepdim=True) / count
    y = ((xs - mean) / torch.sqrt(var + norm.eps)).to(x.dtype)
    if norm.elementwise_affine:
        y = y * norm.weight + (norm.bias if norm.bias is not None else 0)
    return y


def root_name(group) -> str:
    """The module name of a torch-pruning group's root layer (its node name without the layer's
    repr, which changes as layers are pruned)."""
    return group[0].dep.target.name.split(" (")[0]


def soft_masks(groups) -> SoftMasks:
    """Masks of ones for torch-pruning ``groups`` (``DependencyGraph.get_all_groups``), with every
    layer that reads their channels."""
    import torch_pruning as tp

    masks, roots, uses, makes, aliases = [], [], {}, {}, {}
    for g, group in enumerate(groups):
        width = len(group[0].idxs)
        fused = _fused_qkv_reader(group)
        if fused is not None:  # one mask per head dim: q_i, k_i, v_i and proj's input i
            aliases[fused[0]] = g
            width = fused[1]
        masks.append(torch.ones(width))
        roots.append(root_name(group))
        for item in group:  # GroupItem: dep, idxs (the layer's channels), root_idxs (the group's)
            module, handler = item.dep.target.module, item.dep.handler
            use = _Use(g, torch.as_tensor(list(item.idxs), dtype=torch.long),
                       torch.as_tensor(list(item.root_idxs), dtype=torch.long) % width)
            if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) or (isinstance(module, (nn.Conv2d, nn.Linear)) and handler in (
                    tp.prune_conv_in_channels, tp.prune_linear_in_channels)):
                uses.setdefault(module, []).append(use)
            elif isinstance(module, (nn.Conv2d, nn.Linear)) and handler in (
                    tp.prune_conv_out_channels, tp.prune_linear_out_channels):
                makes.setdefault(module, []).append(use)
    return SoftMasks(masks, roots, uses, makes, aliases)


def _fused_qkv_reader(group) -> tuple[str, int] | None:
    """(name, d) of the layer reading a fused q/k/v projection's group: a group rooted at a linear
    layer's 3·d outputs whose only linear reader takes d of them (U-ViT's ``attn.proj`` reads v)."""
    import torch_pruning as tp

    root = group[0].dep.target.module
    if not isinstance(root, nn.Linear):
        return None
    readers = [item for item in group if isinstance(item.dep.target.module, nn.Linear)
               and item.dep.handler == tp.prune_linear_in_channels]
    if len(readers) == 1 and 3 * len(readers[0].idxs) == len(group[0].idxs):
        return readers[0].dep.target.name.split(" (")[0], len(readers[0].idxs)
    return None


class MaskImportance:
    """torch-pruning importance that ranks each group's channels by their mask: the hard prune keeps
    the channels the flow kept."""

    def __init__(self, masks: SoftMasks):
        self.by_root = {root: mask for root, mask in zip(masks.roots, masks.masks)}
        self.by_root.update({alias: masks.masks[g] for alias, g in masks.aliases.items()})

    def __call__(self, group, **kwargs) -> torch.Tensor:
        return self.by_root[root_name(group)].detach().cpu().clone()


# ---- the flow (reconstruction: pruning-methods-notes.md) ---------------------------------------

def gradient_norm_energy(net: nn.Module, masks: SoftMasks, loss_fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(½‖∇_θ L‖², its gradient with respect to each mask) for the masked network, where
    ``loss_fn(net)`` computes the training loss (e.g. noise prediction on one batch).

    The criterion of the abstract — keep what removing would lower the loss's gradient norm, prune
    what removing would raise it — in continuous form: the flow raises ½‖∇_θ L‖² (the mask gradient
    of GraSP's score −θ ⊙ Hg, taken per channel through the masks, by double backpropagation)."""
    from igsm.objectives.products import math_attention  # fused attention has no double backward

    params = [p for p in net.parameters() if p.requires_grad]
    for mask in masks.masks:
        mask.requires_grad_(True)
    with masks.applied(net), math_attention():
        loss = loss_fn(net)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        energy = 0.5 * sum(g.square().sum() for g in grads if g is not None)
        mask_grads = torch.autograd.grad(energy, masks.masks, allow_unused=True)
    for mask in masks.masks:
        mask.requires_grad_(False)
    return energy.detach(), [torch.zeros_like(m) if g is None else g for m, g in zip(masks.masks, mask_grads)]


def sparsity_indexed_step(masks: SoftMasks, ascent: list[torch.Tensor], dt: float, r: float = 1.1) -> None:
    """One step of the sparsity-indexed flow (as PSO, Mo et al., ICML 2023): move the masks along
    δ = x·a + y·b, with a the direction that raises the energy (``ascent``) and b = −∇G the one
    that lowers the density G = mean(m), x and y chosen so that G falls by exactly ``dt`` (⟨∇G, δ⟩
    = −1 per unit time) and ‖δ‖·‖b‖ = r (r > 1: room for the energy term beside the minimal-norm
    step); masks are then clipped to [0, 1]."""
    a = torch.cat([g.flatten() for g in ascent]).double()
    n = a.numel()
    b = torch.full_like(a, -1.0 / n)  # −∇ mean(m)
    c = a @ b
    denominator = a.square().sum() * b.square().sum() - c * c
    x = torch.sqrt((r * r - 1) / denominator) if denominator > 1e-30 else torch.zeros((), dtype=a.dtype)
    y = (1 - x * c) / b.square().sum()
    delta = x * a + y * b
    start = 0
    for mask in masks.masks:
        step = delta[start:start + mask.numel()].view_as(mask).to(mask.dtype)
        mask.add_(dt * step).clamp_(0.0, 1.0)
        start += mask.numel()


def density(masks: SoftMasks) -> float:
    """G = mean of all mask values (1: dense)."""
    return float(torch.cat([m.flatten() for m in masks.masks]).mean())


class MaskFlow:
    """Gradient-flow pruning as a step hook of the training loop (igsm.training.train): the network
    trains under the masks while, after every optimizer step, the masks take one flow step on the
    same batch (energy: ½‖∇_θ L_NP‖²), their density falling linearly from 1 to ``target_density``
    over ``num_steps``. The masks are saved in the loop's snapshots, so a resumed run continues
    the schedule exactly."""

    def __init__(self, masks: SoftMasks, target_density: float, num_steps: int, r: float = 1.1):
        self.masks, self.target_density, self.num_steps, self.r = masks, target_density, num_steps, r
        self.dt = (1.0 - target_density) / num_steps
        self.densities: list[float] = []
        self.spreads: list[list[list[float]]] = []  # per step, per group: (min, mean, max) of its mask

    def identity(self) -> str:
        return f"gradient-flow:target={self.target_density!r}:steps={self.num_steps}:r={self.r!r}"

    def applied(self, net: nn.Module):
        return self.masks.applied(net)

    def after_step(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                   condition: torch.Tensor | None = None) -> None:
        from igsm.models import conditioned, predict_noise

        def loss_fn(model):
            eps = predict_noise(conditioned(model, condition), x_t, t)
            return (eps.float() - noise.float()).square().flatten(1).sum(1).mean()

        was_training = net.training
        net.eval()  # the energy without dropout: a function of the masks alone
        _, ascent = gradient_norm_energy(net, self.masks, loss_fn)
        net.train(was_training)
        sparsity_indexed_step(self.masks, ascent, self.dt, self.r)
        self.densities.append(density(self.masks))
        # One host sync for all groups (not three per group).
        spread = torch.stack([torch.stack([m.min(), m.mean(), m.max()]) for m in self.masks.masks])
        self.spreads.append(spread.tolist())

    def state_dict(self) -> dict:
        return {"masks": [m.detach().cpu().clone() for m in self.masks.masks], "densities": list(self.densities),
                "spreads": [list(map(list, step)) for step in self.spreads]}

    def load_state_dict(self, state: dict) -> None:
        for mask, saved in zip(self.masks.masks, state["masks"]):
            mask.copy_(saved.to(mask.device))
        self.densities = list(state["densities"])
        self.spreads = [list(map(list, step)) for step in state.get("spreads", [])]


def prune_with_gradient_flow(net: nn.Module, images, schedule, *, channel_ratio: float, options,
                             checkpoint_dir, metrics_path, r: float = 1.1, device="cpu",
                             conditioning=None) -> tuple[nn.Module, dict]:
    """Gradient-flow pruning of a copy of ``net``: ``options.num_steps`` training steps of the one
    loop (``options``: igsm.training.TrainingOptions, its objective the noise prediction) under
    soft masks whose density the flow brings from 1 to 1 − ``channel_ratio``, then the hard prune
    of the trained (EMA) network to Diff-Pruning's widths at ``channel_ratio``, keeping each
    group's largest masks. Resumable like any training (``checkpoint_dir``). ``conditioning``
    (igsm.conditioning): a conditional network's, for the flow's training and energy."""
    from dataclasses import asdict

    import torch_pruning as tp

    from igsm.data import to_model_range
    from igsm.training import train

    student = copy.deepcopy(net)
    # Only the pruner's groups are read (nothing is pruned): any importance does.
    with metapruner(student, tp.importance.MagnitudeImportance(p=2), channel_ratio) as pruner:
        masks = soft_masks(pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                                    root_module_types=pruner.root_module_types))
    flow = MaskFlow(masks, 1.0 - channel_ratio, options.num_steps, r)
    trained, timing = train(student, images, options, checkpoint_dir, metrics_path, schedule=schedule,
                            device=device, step_hook=flow, conditioning=conditioning)
    example = to_model_range(images[:1])  # the input shape for tracing and counting
    pruned, counts = prune_with_importance(trained.cpu(), MaskImportance(masks), channel_ratio=channel_ratio,
                                           images=example)
    report = {"channel_ratio": channel_ratio, **counts}
    report["gradient_flow"] = {
        "reconstruction": "soft masks on torch-pruning groups, energy ½‖∇θ L_NP‖², PSO's sparsity-indexed "
                          "flow (igsm/pruning/soft_masks.py): not the paper's code, which is not public",
        "steps": options.num_steps, "r": r, "target_density": 1.0 - channel_ratio,
        "densities": flow.densities,
        # Each group's mask over the flow: (min, mean, max) after every step (report picture).
        "mask_spreads": {root: [[round(v, 7) for v in step[g]] for step in flow.spreads]
                         for g, root in enumerate(masks.roots)},
        "final_masks": {root: [round(float(v), 6) for v in mask] for root, mask in zip(masks.roots, masks.masks)},
        # Each group's width before → after the hard prune, in mask units: its root layer's output
        # channels, or for a fused q/k/v group the head dims its reader (proj) keeps.
        "final_widths": {root: [len(mask), _kept_width(pruned, root, masks.aliases, g)]
                         for g, (root, mask) in enumerate(zip(masks.roots, masks.masks))},
        "timing": asdict(timing),
    }
    return pruned, report


def _kept_width(pruned: nn.Module, root: str, aliases: dict[str, int], group: int) -> int:
    reader = next((name for name, g in aliases.items() if g == group), None)
    if reader is not None:
        return pruned.get_submodule(reader).in_features
    layer = pruned.get_submodule(root)
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
