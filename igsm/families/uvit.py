"""The U-ViT family: igsm.uvit.UViT (Bao et al., CVPR 2023), the paper's Transformer (Sec. 5.1,
Table 2; NOTES §3), loaded from the reference's released checkpoints, pruned in the widths that
torch-pruning can free (a reconstruction: no public code prunes U-ViT).

The network's code stays in igsm.uvit; this module imports it (and torch) inside its methods."""

from __future__ import annotations

from pathlib import Path

from igsm.families import BlockGraph, Family, chain_consumers, register

CHECKPOINT_URL_SCHEMES = ("http://", "https://", "file://")


class UViTFamily(Family):
    name = "uvit"
    title = "U-ViT"
    class_name = "UViT"
    description = "igsm.uvit.UViT"
    size_key = "img_size"
    channel_keys = ("in_chans",)  # one in_chans for input and output
    key_defaults = {"img_size": 32, "in_chans": 3}  # igsm.uvit.UViT's
    identifying_keys = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
                        "num_classes")
    # U-ViT's released checkpoints learned the continuous VP-SDE (t ~ U(0, 1), input t·999).
    process = "vpsde"
    process_reason = "U-ViT's released checkpoints were trained on the VP-SDE"
    pretrained_help = ("the reference checkpoint file (a model folder's model.safetensors), a local .pth "
                       "file or an http(s):// / file:// URL")
    pretrained_needs_architecture = True  # plain state dicts: the architecture builds their skeleton
    # Class labels as U-Net's: a label token, num_classes rows (the classes and the null label).
    condition_kinds = ("class",)
    class_slots_key = "num_classes"

    def network_class(self):
        from igsm.uvit import UViT

        return UViT

    def owns(self, net) -> bool:
        return isinstance(net, self.network_class())

    def pretrained_errors(self, key: str, pretrained: str) -> list[str]:
        if not pretrained.startswith(CHECKPOINT_URL_SCHEMES) and not Path(pretrained).expanduser().is_file():
            return [f"{key}.dense.pretrained: U-ViT checkpoint file {pretrained} does not exist "
                    f"(give a local .pth file or an http(s):// / file:// URL)"]
        return []

    def load_pretrained(self, source: str, architecture: dict, cache_dir):
        from igsm.uvit import load_reference_checkpoint

        return load_reference_checkpoint(source, self.network_arguments(architecture), cache_dir)

    def condition_keyword(self, net) -> str | None:
        return "y" if net.label_emb is not None else None

    def example_condition(self, net, device):
        import torch

        return torch.zeros(1, dtype=torch.long, device=device) if net.label_emb is not None else None

    def pruning_plan(self, model) -> dict:
        """The inner dimensions (each head's width, qkv then proj's input, and the MLP's hidden
        layer) and the residual stream of the last out-block only; the other streams keep their
        width (patch embedding, position embedding, the in/mid blocks, out-blocks 0..n−2 and every
        skip projection's input), as do the decoder's output and the final convolution. A
        reconstruction, labelled as such: it is what porting Diff-Pruning to U-ViT with
        torch-pruning gives when only the input and output layers are ignored (torch-pruning couples
        the long skips' concatenation with the patch embedding, so only the last stream, which feeds
        the decoder alone, is free), and it reproduces all of Table 5's U-ViT counts (0.5 → 22.74M /
        5.81G … 0.8 → 10.42M / 2.64G vs 22.7M / 5.8G … 10.4M / 2.6G). Each head keeps ⌊head_dim·(1 −
        ratio)⌋ dims, as torch-pruning ≥ 1.4.1 rounds (1.4.0 would keep head_dim − ⌊(D − ⌊D(1 − ratio)⌋)/heads⌋),
        set through ``pruning_ratio_dict`` on each attention's ``proj``, the root of its group."""
        from igsm.uvit import PrunableAttention

        blocks = [*model.in_blocks, model.mid_block, *model.out_blocks]
        last = model.out_blocks[-1]
        keep = [model.patch_embed.proj, model.decoder_pred, model.final_layer]
        keep += [model.label_emb] if model.label_emb is not None else []  # a stream token
        keep += [layer for b in blocks if b is not last
                 for layer in (b.attn.proj, b.mlp.fc2, b.skip_linear) if layer is not None]
        attention = {name: m for name, m in model.named_modules() if isinstance(m, PrunableAttention)}

        def head_ratios(ratio):
            return {b.attn.proj: 1 - int(b.attn.head_dim * (1 - ratio)) / b.attn.head_dim for b in blocks}

        def sync_widths():
            # Equal heads of a narrower width; the softmax scale stays the dense one (recorded).
            for name, attn in attention.items():
                if attn.qkv.out_features % (3 * attn.num_heads):
                    raise ValueError(f"net: pruning left {name} with {attn.qkv.out_features} qkv "
                                     f"features for {attn.num_heads} heads")
                attn.head_dim = attn.qkv.out_features // (3 * attn.num_heads)

        return {"ignored_layers": keep, "num_heads": {m.qkv: m.num_heads for m in attention.values()},
                "unwrapped_parameters": [(model.pos_embed, 2)], "sync_widths": sync_widths,
                "pruning_ratio_dict": head_ratios}

    def block_graph(self, net) -> BlockGraph:
        """``in_blocks.i``, ``mid_block``, ``out_blocks.i``, each in-block also read by the
        out-block its long skip reaches."""
        depth = len(net.in_blocks)
        names = ([f"in_blocks.{i}" for i in range(depth)] + ["mid_block"]
                 + [f"out_blocks.{i}" for i in range(len(net.out_blocks))])
        consumers = chain_consumers(names)
        for i in range(depth):  # the long skip: in-block i is popped by out-block depth−1−i
            consumers[f"in_blocks.{i}"].append(f"out_blocks.{depth - 1 - i}")
        return BlockGraph(tuple(names), {k: tuple(v) for k, v in consumers.items()})

    def width_attributes(self) -> dict:
        from igsm.uvit import PrunableAttention

        # Pruned heads: their number, width and the dense temperature.
        return {PrunableAttention: ("num_heads", "head_dim", "scale")}


UVIT = register(UViTFamily())
