"""A toy third model family, added by a plugin (config ``plugins:``; issue 30): a tiny residual
convolutional denoiser ε̂(x, t), registered as ``toy-conv``. Everything the workflow asks of a family
is here: how to build the network from the config's architecture, its image shape, the forward
process it trains with, what pruning keeps, its blocks for block reuse and its checkpoint class.

The network takes ``forward(sample, timestep)`` like the shipped families (the stages call it so)
and keeps its constructor's arguments in ``config`` (a checkpoint records them). torch is imported
at the top: a plugin may, at the cost of its import at every Snakemake parse.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from igsm.families import BlockGraph, Family, chain_consumers, register


class ToyBlock(nn.Module):
    """h + conv(SiLU(GroupNorm(h)) + time bias): residual, so its width is the stream's."""

    def __init__(self, width: int, time_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, width)
        self.time = nn.Linear(time_dim, width)
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, h: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        return h + self.conv(nn.functional.silu(self.norm(h)) + self.time(t_emb)[:, :, None, None])


class ToyConvNet(nn.Module):
    """conv_in → ``num_blocks`` residual blocks → head; the timestep as a sinusoidal embedding."""

    def __init__(self, image_size: int = 16, channels: int = 1, width: int = 16, num_blocks: int = 2,
                 groups: int = 4):
        super().__init__()
        self.config = dict(image_size=image_size, channels=channels, width=width, num_blocks=num_blocks,
                           groups=groups)
        self.time_dim = width
        self.time_embed = nn.Sequential(nn.Linear(width, width), nn.SiLU())
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.blocks = nn.ModuleList([ToyBlock(width, width, groups) for _ in range(num_blocks)])
        # Not "conv_out": the U-Net family claims any network with a conv_out.
        self.head = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=sample.device).float().reshape(-1).expand(sample.shape[0])
        half = self.time_dim // 2
        frequencies = torch.exp(-math.log(10_000) * torch.arange(half, device=sample.device) / half)
        angles = t[:, None] * frequencies[None]
        t_emb = self.time_embed(torch.cat([angles.sin(), angles.cos()], dim=1))
        h = self.conv_in(sample)
        for block in self.blocks:
            h = block(h, t_emb)
        return self.head(h)


class ToyConvFamily(Family):
    name = "toy-conv"
    title = "toy conv net"
    class_name = "ToyConvNet"
    description = "tests/plugins/toy_family.py's ToyConvNet"
    size_key = "image_size"
    channel_keys = ("channels",)
    key_defaults = {"image_size": 16, "channels": 1}
    identifying_keys = ("width", "num_blocks")
    process = "ddpm"
    process_reason = "the toy conv net has no released weights; it is trained here on DDPM"
    pretrained_help = "nothing (train it: dense.training)"

    def network_class(self):
        return ToyConvNet

    def owns(self, net) -> bool:
        return isinstance(net, ToyConvNet)

    def pretrained_errors(self, key: str, pretrained: str) -> list[str]:
        return [f"{key}.dense.pretrained: the {self.title} has no pretrained weights; train it (dense.training)"]

    def pruning_plan(self, model) -> dict:
        """Every layer but the head (the image's channels); standard layers only, so nothing to resync."""
        return {"ignored_layers": [model.head], "num_heads": {}, "unwrapped_parameters": None,
                "sync_widths": lambda: None}

    def block_graph(self, net) -> BlockGraph:
        """``blocks.i``, one after another, the last read by the head."""
        names = [f"blocks.{i}" for i in range(len(net.blocks))]
        return BlockGraph(tuple(names), {k: tuple(v) for k, v in chain_consumers(names).items()})


register(ToyConvFamily())
