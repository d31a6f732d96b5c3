"""The U-Net family: diffusers' ``UNet2DModel``, the paper's U-Nets (Sec. 5.1, App. B Table 6),
pruned as Diff-Pruning does (NOTES §2), its blocks for reuse as DeepCache cuts them.

Imports torch and diffusers only inside its methods (igsm.families)."""

from __future__ import annotations

import math
from pathlib import Path

from igsm.families import REST, BlockGraph, Family, chain_consumers, register

# Plain state dicts (U-ViT's released checkpoints), which a U-Net experiment cannot load.
STATE_DICT_SUFFIXES = (".pth", ".pt")


class UNetFamily(Family):
    name = "unet"
    title = "U-Net"
    class_name = "UNet2DModel"
    description = ("diffusers' UNet2DModel, or a network built like one (its output layer conv_out, "
                   "which pruning keeps)")
    size_key = "sample_size"
    channel_keys = ("in_channels", "out_channels")
    # diffusers' UNet2DModel: 3 channels, no sample_size.
    key_defaults = {"sample_size": None, "in_channels": 3, "out_channels": 3}
    identifying_keys = ("sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
                        "down_block_types", "up_block_types", "norm_num_groups", "attention_head_dim")
    process = "ddpm"
    process_reason = "pretrained diffusers U-Nets are DDPM models"
    pretrained_help = "a hub id or a local diffusers folder"
    pretrained_folders = True

    def network_class(self):
        from diffusers import UNet2DModel

        return UNet2DModel

    def owns(self, net) -> bool:
        from torch import nn

        # Any ε-network whose last layer is conv_out prunes as a U-Net (tests plant such networks).
        return isinstance(net, self.network_class()) or isinstance(getattr(net, "conv_out", None), nn.Module)

    def pretrained_errors(self, key: str, pretrained: str) -> list[str]:
        from igsm.models import looks_like_local_path

        if pretrained.endswith(STATE_DICT_SUFFIXES):
            return [f"{key}.architecture.family: {self.name!r}, but dense.pretrained {pretrained} is a plain state "
                    f"dict (a U-ViT checkpoint); set architecture.family: uvit and give U-ViT's architecture "
                    f"(img_size, patch_size, …) to build it"]
        if looks_like_local_path(pretrained) and not Path(pretrained).expanduser().is_dir():
            return [f"{key}.dense.pretrained: local folder {pretrained} does not exist"]
        return []

    def load_pretrained(self, source: str, architecture: dict, cache_dir):
        from igsm.models import load_pretrained

        return load_pretrained(source)

    def pruning_plan(self, model) -> dict:
        """Diff-Pruning's U-Net: every layer but ``conv_out``; each attention's heads keep equal widths."""
        attention = _attention_modules(model)
        dense_head_dims = {name: attn.inner_dim // attn.heads for name, attn in attention.items()}
        return {"ignored_layers": [model.conv_out],
                "num_heads": {lin: attn.heads for attn in attention.values() if attn.heads > 1
                              for lin in (attn.to_q, attn.to_k, attn.to_v)},
                "unwrapped_parameters": None,
                "sync_widths": lambda: _sync_static_widths(model, dense_head_dims)}

    def block_graph(self, net) -> BlockGraph:
        """``down_blocks.i``, ``mid_block``, ``up_blocks.i``, each down block also read by the up
        blocks that pop its residuals."""
        if not (hasattr(net, "down_blocks") and hasattr(net, "up_blocks")):
            raise ValueError(f"block reuse: {type(net).__name__} has no down_blocks and up_blocks to cut "
                             f"into blocks (a diffusers UNet2DModel has)")
        names = ([f"down_blocks.{i}" for i in range(len(net.down_blocks))]
                 + (["mid_block"] if net.mid_block is not None else [])
                 + [f"up_blocks.{i}" for i in range(len(net.up_blocks))])
        consumers = chain_consumers(names)
        # UNet2DModel.forward: the residual stack starts with conv_in's output and grows by every
        # down block's res_samples (one per resnet, plus one for its downsampler); each up block pops
        # len(resnets) of them from the end.
        stack = [REST]
        for i, block in enumerate(net.down_blocks):
            if getattr(block, "skip_conv", None) is not None:
                raise ValueError(f"block reuse: down_blocks.{i} ({type(block).__name__}) is a skip block, "
                                 f"whose extra output is not supported")
            stack += [f"down_blocks.{i}"] * (len(block.resnets) + (block.downsamplers is not None))
        for j, block in enumerate(net.up_blocks):
            taken = stack[-len(block.resnets):]
            del stack[-len(block.resnets):]
            for producer in taken:
                if producer != REST and f"up_blocks.{j}" not in consumers[producer]:
                    consumers[producer].append(f"up_blocks.{j}")
        return BlockGraph(tuple(names), {k: tuple(v) for k, v in consumers.items()})

    def width_attributes(self) -> dict:
        from diffusers.models.attention_processor import Attention
        from diffusers.models.downsampling import Downsample2D
        from diffusers.models.upsampling import Upsample2D

        return {
            Upsample2D: ("channels", "out_channels"),
            Downsample2D: ("channels", "out_channels"),
            # scale: pruned attention keeps the dense softmax temperature (_sync_static_widths folds
            # it into to_q and sets scale for diffusers' non-SDPA path); the dims are descriptive.
            Attention: ("heads", "inner_dim", "inner_kv_dim", "query_dim", "cross_attention_dim",
                        "out_dim", "scale"),
        }


def _attention_modules(model) -> dict:
    from diffusers.models.attention_processor import Attention

    return {name: m for name, m in model.named_modules() if isinstance(m, Attention)}


def _sync_static_widths(model, dense_head_dims: dict) -> None:
    """Make diffusers' static width attributes agree with the pruned layers.

    Up/Downsample2D assert on ``channels``; Attention keeps ``inner_dim`` and friends. Attention
    also needs its softmax temperature kept: diffusers' fused path (SDPA) divides q·k by
    √(pruned head dim) and ignores ``attn.scale``, its math path multiplies by ``attn.scale``
    (√ of the dense head dim). We keep the dense model's temperature on both paths by folding
    √(pruned/dense) into ``to_q`` and setting ``attn.scale`` to what SDPA uses; ``save_model``
    records ``scale``.
    """
    import torch
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D
    from torch import nn

    for name, m in model.named_modules():
        if isinstance(m, (Upsample2D, Downsample2D)):
            conv = getattr(m, "conv", None) or getattr(m, "Conv2d_0", None)
            if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
                m.channels, m.out_channels = conv.in_channels, conv.out_channels
    for name, attn in _attention_modules(model).items():
        attn.inner_dim = attn.to_q.out_features
        attn.inner_kv_dim = attn.to_k.out_features
        attn.query_dim = attn.to_q.in_features
        attn.cross_attention_dim = attn.to_k.in_features
        attn.out_dim = attn.to_out[0].out_features
        if attn.inner_dim % attn.heads:
            raise ValueError(f"net: pruning left {name} with {attn.inner_dim} dims for "
                             f"{attn.heads} heads")
        head_dim, dense_head_dim = attn.inner_dim // attn.heads, dense_head_dims[name]
        if attn.scale_qk and head_dim != dense_head_dim:
            with torch.no_grad():
                factor = math.sqrt(head_dim / dense_head_dim)
                attn.to_q.weight.mul_(factor)
                if attn.to_q.bias is not None:
                    attn.to_q.bias.mul_(factor)
            attn.scale = head_dim ** -0.5


UNET = register(UNetFamily())
