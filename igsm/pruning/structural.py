"""Structural pruning of diffusion models with torch-pruning, whatever ranks the channels.

The IGSM paper prunes its dense teachers with Diff-Pruning before finetuning (Sec. 5.1,
App. B.1): local (per-layer) one-shot channel pruning with torch-pruning, every layer except
``conv_out`` losing the same fraction of its channels. This module does that pruning for any
torch-pruning ``Importance`` (:func:`prune_with_importance`); a pruning method
(igsm.pruning.methods: Diff-Pruning's criteria, gradient flow) supplies the importance, possibly
after a phase of its own, and this module never asks which method it serves.

torch-pruning is pinned to 1.4.0: from 1.4.1 on GroupNorm channel groups are rounded
differently and the pruned widths (hence the paper's 19.8M/3.4G, 14.3M/2.7G points) change
(App. B.1 uses 1.2.5; 1.2.5–1.4.0 agree). In 1.4.0 every GroupNorm'd layer loses
``⌊n_pruned / num_groups⌋`` channels per group, so realised widths move in steps.

Counts with 1.4.0 (torch 2.14, diffusers 0.42) of the CIFAR-10 U-Net at 32×32, params / MACs:
dense 35.746M / 6.064G; channel ratio 0.3 → 19.851M / 3.392G (paper "0.44"), 0.4 → 14.318M /
2.736G ("0.56"), 0.6 → 8.594M / 1.490G (the paper's 8.6M/1.5G point, "0.70"), 0.7 → 5.120M /
1.076G (5.1M/1.1G, "0.82"); 0.5 → 8.968M / 1.520G (no paper point: 4% above "0.70"'s params).
"""

from __future__ import annotations

import contextlib
import copy
import io

import torch
from torch import nn

from igsm.models import image_shape

def paper_label(pruned_params: float, pruned_macs: float, dense_params: float, dense_macs: float) -> str:
    """The paper's "pruning ratio" label of a pruned model, derived from its counts.

    The paper's labels are not one formula of the counts: its U-Net 0.44, 0.56 and 0.82 are MAC
    reductions as its tables print them (two significant figures), but its "0.70" point
    (8.6M/1.5G) reduces MACs by 0.75 and params by 0.76, its LSUN point "0.3" reduces them by 0.44,
    and its U-ViT labels are channel ratios. So: a pruned model of one of the paper's dense models
    whose params and MACs both read as the paper prints one of that model's pruned points (within
    one unit of the last printed digit: igsm.paper.tables.pruning_points, from the tables'
    counts) gets that point's label; any other model gets its MAC reduction, computed from MACs
    rounded to two significant figures, to two decimals. (CIFAR-10: channel ratio 0.6, 8.59M /
    1.49G, is "0.70"; 0.5, 8.97M / 1.52G, is not.)
    """
    from igsm.paper.tables import printed_as, pruning_points

    for (paper_dense_params, paper_dense_macs), label, (params, macs) in pruning_points():
        if (printed_as(dense_params / 1e6, paper_dense_params) and printed_as(dense_macs / 1e9, paper_dense_macs)
                and printed_as(pruned_params / 1e6, params) and printed_as(pruned_macs / 1e9, macs)):
            return f"{label:.2f}"

    def printed(x: float) -> float:
        return float(f"{x:.2g}")

    return f"{1 - printed(pruned_macs) / printed(dense_macs):.2f}"


def count_params_macs(net: nn.Module, image_size: int, in_channels: int) -> tuple[int, int]:
    """(parameters, multiply-accumulates) of one forward at batch 1, as torch-pruning counts them."""
    import torch_pruning as tp

    inputs = _example_inputs(net, image_size, in_channels)
    # The counter prints a warning per keyword-only module call (diffusers passes timesteps so).
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        macs, params = tp.utils.count_ops_and_params(net, inputs)
    return int(params), int(macs)


@contextlib.contextmanager
def metapruner(model: nn.Module, importance, channel_ratio: float, image_size: int | None = None,
               in_channels: int | None = None):
    """torch-pruning's pruner of ``model`` as :func:`prune_with_importance` configures it (the
    family's ignored layers, heads, unwrapped parameters, per-layer ratios), ranking channels by
    the torch-pruning ``importance``. On exit, the static widths are resynced to whatever was pruned."""
    import torch_pruning as tp

    if image_size is None or in_channels is None:
        channels, size, _ = image_shape(model)
        image_size, in_channels = image_size or size, in_channels or channels
    plan = _pruning_plan(model)
    example_inputs = _example_inputs(model, image_size, in_channels)
    try:
        with _module_trace(model) as where:
            pruner = tp.pruner.MetaPruner(
                model, example_inputs, importance=importance, pruning_ratio=channel_ratio,
                global_pruning=False, iterative_steps=1, ignored_layers=plan["ignored_layers"],
                num_heads=plan["num_heads"], unwrapped_parameters=plan["unwrapped_parameters"],
                pruning_ratio_dict=plan.get("pruning_ratio_dict", lambda ratio: {})(channel_ratio),
                prune_head_dims=True, prune_num_heads=False,
                # tp 1.4.0 keeps these in mutable default arguments and fills them with this
                # model's layers: fresh dicts stop one call's modules leaking into the next.
                in_channel_groups={}, out_channel_groups={}, channel_groups={},
            )
    except Exception as err:  # tracing runs arbitrary model code; any failure means "untraceable"
        raise ValueError(f"net: torch-pruning {tp_version()} could not trace {type(model).__name__}"
                         f"{where.describe()}: {type(err).__name__}: {err}") from err
    try:
        yield pruner
    finally:
        plan["sync_widths"]()


def prune_with_importance(net: nn.Module, importance, *, channel_ratio: float, images: torch.Tensor,
                          seed: int = 0, phase=None) -> tuple[nn.Module, dict]:
    """Prune a copy of ``net``, ranking channels by the torch-pruning ``importance``; ``net``
    itself (the dense teacher) is left untouched.

    ``channel_ratio`` is the fraction of channels torch-pruning removes from every layer (its
    ``pruning_ratio``; GroupNorm groups make the realised fraction smaller, see module docstring).
    Local pruning gives every importance the same widths; only which channels survive differs.
    ``images``: one batch of images x0 in [-1, 1] (N, C, H, W), the input shape for tracing and
    counting and the data of ``phase``. ``phase(model, images)``, if given, is a method's own step
    on the copy before the ranking (Diff-Pruning accumulates gradients there, which its importance
    reads) and returns the report fields it adds. Importances that draw random numbers draw them
    from a generator seeded by ``seed``.

    Returns the pruned copy (no gradients, every parameter requiring grad, in the training mode
    ``net`` was in) and ``{**phase's fields, params and MACs before and after, paper_label, …}``.
    """
    if not 0.0 <= channel_ratio < 1.0:
        raise ValueError(f"channel_ratio: {channel_ratio} is outside [0, 1)")
    if images.ndim != 4 or images.shape[-1] != images.shape[-2] or images.shape[0] < 1:
        raise ValueError(f"images: expected one batch of square images (N, C, H, W), got shape {tuple(images.shape)}")
    _pruning_plan(net)  # an unsupported family fails here, by name, before any counting
    image_size, in_channels = images.shape[-1], images.shape[1]

    dense_params, dense_macs = _counted(net, image_size, in_channels)
    model = copy.deepcopy(net)
    was_training = net.training
    model.eval()  # Diff-Pruning takes gradients without dropout
    model.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    images = images.to(device)

    example_inputs = _example_inputs(model, image_size, in_channels)
    with metapruner(model, importance, channel_ratio, image_size, in_channels) as pruner:
        groups = pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types)
        if next(iter(groups), None) is None:
            raise ValueError(f"net: torch-pruning {tp_version()} found no prunable layer in "
                             f"{type(net).__name__} (does its forward build an autograd graph?)")
        fields = phase(model, images) if phase is not None else {}
        with seeded(seed, device):  # RandomImportance draws from the global generator
            for group in pruner.step(interactive=True):
                group.prune()
    model.zero_grad(set_to_none=True)
    _check_forward(model, example_inputs, type(net).__name__)
    model.train(was_training)

    pruned_params, pruned_macs = _counted(model, image_size, in_channels)
    return model, {
        **fields,
        "dense_params": dense_params,
        "dense_macs": dense_macs,
        "pruned_params": pruned_params,
        "pruned_macs": pruned_macs,
        "param_reduction": 1 - pruned_params / dense_params,
        "mac_reduction": 1 - pruned_macs / dense_macs,
        "paper_label": paper_label(pruned_params, pruned_macs, dense_params, dense_macs),
        "torch_pruning_version": tp_version(),
    }


def tp_version() -> str:
    from importlib.metadata import version

    return version("torch-pruning")


def _counted(net, image_size, in_channels):
    try:
        # torch-pruning counts on a deepcopy, which carries these hooks along.
        with _module_trace(net) as where:
            return count_params_macs(net, image_size, in_channels)
    except Exception as err:
        raise ValueError(f"net: cannot run {type(net).__name__} on a ({in_channels}, {image_size}, "
                         f"{image_size}) image{where.describe()}: {type(err).__name__}: {err}") from err


def _example_inputs(net: nn.Module, image_size: int, in_channels: int) -> dict:
    # Values do not matter for tracing or counting; zeros keep the global RNG untouched.
    from igsm.families import family_of

    device = next(net.parameters()).device
    inputs = {"sample": torch.zeros(1, in_channels, image_size, image_size, device=device),
              "timestep": torch.ones(1, dtype=torch.long, device=device)}
    family = family_of(net)
    condition = family.example_condition(net, device)
    if condition is not None:  # a conditional network's forward needs its condition to be traced
        inputs[family.condition_keyword(net)] = condition
    return inputs


def _pruning_plan(model: nn.Module) -> dict:
    """What torch-pruning must keep and how to resync static widths after: the model's family
    decides (igsm.families: Family.pruning_plan; Diff-Pruning's U-Net, the reconstructed U-ViT)."""
    from igsm.families import family_of

    try:
        family = family_of(model)
    except ValueError as err:
        raise ValueError(f"net: {err}") from None
    return family.pruning_plan(model)


class _ModuleStack:
    def __init__(self):
        self.stack, self.failed_in = [], None

    def describe(self) -> str:
        return f" (failed in layer {self.failed_in!r})" if self.failed_in else ""


@contextlib.contextmanager
def _module_trace(model: nn.Module):
    """Remember the innermost module whose forward raised, to name it in errors."""
    trace = _ModuleStack()
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def pre(_m, _args, name=name):
            trace.stack.append(name)

        def post(_m, _args, _out, name=name):
            if trace.stack and trace.stack[-1] == name:
                trace.stack.pop()

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield trace
    except Exception:
        trace.failed_in = trace.stack[-1] if trace.stack else None
        raise
    finally:
        for h in handles:
            h.remove()


def _check_forward(model, example_inputs, model_name):
    try:
        with torch.no_grad(), _module_trace(model) as where:
            model(**example_inputs)
    except Exception as err:
        raise ValueError(f"net: the pruned {model_name} no longer runs{where.describe()}: "
                         f"{type(err).__name__}: {err}") from err


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    # manual_seed reseeds every CUDA device, so all of them are restored afterwards.
    devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
