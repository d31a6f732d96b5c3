"""The DiT family: diffusers' ``DiTTransformer2DModel`` (Peebles & Xie, ICCV 2023), the latent
class-conditional Transformer of the later IGSM paper's ImageNet experiments and of DiP-GO's DiT
results (issue 31), hub ``facebook/DiT-XL-2-256`` (its ``transformer/`` folder).

Conditioning: class labels (``class_labels``), ``num_embeds_ada_norm`` classes and the null label
``num_embeds_ada_norm`` in each block's label table, as DiT trains for classifier-free guidance.
diffusers' label embedding would also drop labels by itself in training mode, in every block
independently and from torch's global generator: the network class here is diffusers' with that
switched off, so that igsm.conditioning's dropout (one draw per image, the same labels for student
and teacher) is the only one.

Output: DiT-XL/2 learns its variance too (8 output channels for 4 latent ones); the samplers and the
objectives read ε only, so the network class returns the first ``in_channels`` channels (the
variance head is kept, untrained by finetuning, and unused by DDIM).

Pruning keeps the residual stream (patch embedding, every adaLN modulation, attention and MLP
output projections, the final layer) and frees each block's attention heads' widths and MLP hidden
width, as for U-ViT (igsm.families.uvit): a reconstruction, no public code prunes DiT with
torch-pruning. Blocks for reuse: ``transformer_blocks.i``, a chain.

Imports torch and diffusers only inside its functions (igsm.families)."""

from __future__ import annotations

import functools
from pathlib import Path

from igsm.families import BlockGraph, Family, chain_consumers, register
from igsm.families.unet import load_diffusers_network, looks_like_local_path


@functools.cache
def _network_class():
    """diffusers' DiTTransformer2DModel without its own label dropout, returning ε only, its image
    argument named ``sample``. Named like diffusers' class, so that checkpoints and hub configs name
    it alike (igsm.models); defined once (cached), where diffusers is first needed."""
    from diffusers import DiTTransformer2DModel as Diffusers
    from diffusers.models.embeddings import LabelEmbedding
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    class DiTTransformer2DModel(Diffusers):
        @functools.wraps(Diffusers.__init__)  # its signature: diffusers reads the config keys from it
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for module in self.modules():
                if isinstance(module, LabelEmbedding):
                    module.dropout_prob = 0.0  # the table keeps its null row (num_classes + 1 rows)

        # ``sample`` as the other families name the image (the pruner traces with keyword inputs).
        def forward(self, sample, timestep=None, class_labels=None, cross_attention_kwargs=None,
                    return_dict: bool = True):
            out = super().forward(sample, timestep, class_labels, cross_attention_kwargs, return_dict=False)[0]
            eps = out[:, : self.config.in_channels]  # a learned variance's channels follow ε's
            return Transformer2DModelOutput(sample=eps) if return_dict else (eps,)

    return DiTTransformer2DModel


class DiTFamily(Family):
    name = "dit"
    title = "DiT"
    class_name = "DiTTransformer2DModel"
    description = "diffusers' DiTTransformer2DModel (class-conditional; facebook/DiT-XL-2-256)"
    size_key = "sample_size"
    channel_keys = ("in_channels",)  # out_channels may add the learned variance's
    key_defaults = {"sample_size": 32, "in_channels": 4}  # diffusers' (DiT-XL/2's latents)
    # sample_size and the channels are U-Net keys too: listed so that they contradict nothing here.
    identifying_keys = ("sample_size", "in_channels", "out_channels", "patch_size", "num_embeds_ada_norm",
                        "num_layers", "attention_head_dim", "num_attention_heads")
    # DiT's released models learned the DDPM process (linear β 1e-4..2e-2, 1000 steps).
    process = "ddpm"
    process_reason = "DiT's released models were trained on the DDPM process"
    pretrained_help = "a hub id (facebook/DiT-XL-2-256) or a local diffusers folder (its transformer/ or itself)"
    pretrained_folders = True
    condition_kinds = ("class",)
    CLASSES_KEY = "num_embeds_ada_norm"

    def network_class(self):
        return _network_class()

    def owns(self, net) -> bool:
        from diffusers import DiTTransformer2DModel

        return isinstance(net, DiTTransformer2DModel)

    def condition_keyword(self, net) -> str | None:
        return "class_labels"  # DiT has no unconditional form

    def example_condition(self, net, device):
        import torch

        return torch.zeros(1, dtype=torch.long, device=device)

    def conditioning_errors(self, key: str, architecture: dict, conditioning) -> list[str]:
        if conditioning is None:
            return [f"{key}.conditioning.kind: none, but DiT is class-conditional (set kind: class and "
                    f"num_classes: the architecture's {self.CLASSES_KEY})"]
        errors = super().conditioning_errors(key, architecture, conditioning)
        classes = (architecture or {}).get(self.CLASSES_KEY, 1000 if architecture is not None else None)
        if not errors and classes is not None and classes != conditioning.num_classes:
            errors.append(f"{key}.architecture.{self.CLASSES_KEY}: {classes} classes, but conditioning.num_classes "
                          f"is {conditioning.num_classes} (DiT's label table holds the classes and the null label)")
        return errors

    def pretrained_errors(self, key: str, pretrained: str) -> list[str]:
        if looks_like_local_path(pretrained) and not Path(pretrained).expanduser().is_dir():
            return [f"{key}.dense.pretrained: local folder {pretrained} does not exist"]
        return []

    def load_pretrained(self, source: str, architecture: dict, cache_dir):
        """A diffusers folder (the transformer's own, or a pipeline's with it in transformer/) or a
        hub id, read from the hub cache first; ``ValueError`` naming the key and what to do."""
        return load_diffusers_network(_network_class(), source, "transformer", self.title, cache_dir)

    def pruning_plan(self, model) -> dict:
        """Each block's attention heads (q, k, v outputs and the output projection's input, equal
        widths per head) and MLP hidden width; the residual stream and every conditioning layer keep
        their widths (the adaLN modulations are read as chunks of the stream's width)."""
        from torch import nn

        from igsm.families.unet import attention_modules, sync_static_widths  # diffusers' Attention, as U-Nets

        keep = [model.pos_embed.proj, model.proj_out_1, model.proj_out_2]
        for block in model.transformer_blocks:
            keep += [block.attn1.to_out[0], block.ff.net[2]]
            keep += [m for m in block.norm1.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
        attention = attention_modules(model)
        dense_head_dims = {name: attn.inner_dim // attn.heads for name, attn in attention.items()}
        return {"ignored_layers": keep,
                "num_heads": {lin: attn.heads for attn in attention.values() if attn.heads > 1
                              for lin in (attn.to_q, attn.to_k, attn.to_v)},
                "unwrapped_parameters": None,
                "sync_widths": lambda: sync_static_widths(model, dense_head_dims)}

    def block_graph(self, net) -> BlockGraph:
        """``transformer_blocks.i``, each feeding the next (no long skips)."""
        names = [f"transformer_blocks.{i}" for i in range(len(net.transformer_blocks))]
        return BlockGraph(tuple(names), {k: tuple(v) for k, v in chain_consumers(names).items()})

    def restore_computed_buffers(self, net, device) -> None:
        """The patch embedding's sin-cos position table, a non-persistent buffer, as diffusers'
        PatchEmbed computes it."""
        from diffusers.models.embeddings import get_2d_sincos_pos_embed

        patches = net.pos_embed
        table = get_2d_sincos_pos_embed(patches.proj.out_channels, patches.height, base_size=patches.base_size,
                                        interpolation_scale=patches.interpolation_scale, output_type="pt")
        patches.pos_embed = table.float().unsqueeze(0).to(device)

    def width_attributes(self) -> dict:
        from diffusers.models.attention_processor import Attention

        return {Attention: ("heads", "inner_dim", "inner_kv_dim", "query_dim", "cross_attention_dim",
                            "out_dim", "scale")}


DIT = register(DiTFamily())
