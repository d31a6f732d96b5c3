"""The SD U-Net family: diffusers' ``UNet2DConditionModel``, Stable Diffusion 1.5's ε-network
(Rombach et al., CVPR 2022), text-conditional through cross-attention (issue 31, items 2 and 3),
hub ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (formerly ``runwayml/stable-diffusion-v1-5``;
the network in the pipeline's ``unet/`` folder).

Conditioning: the ``text`` kind (igsm.conditioning.TextPrompts), the frozen CLIP text encoder's last
hidden state (batch, 77 tokens, its hidden size) as ``encoder_hidden_states``, which every
cross-attention reads as keys and values; the network's ``cross_attention_dim`` is the encoder's
hidden size (768 for SD 1.5's CLIP ViT-L/14). diffusers' forward already returns ``.sample`` = ε
(igsm.models.predict_noise reads it): the network class is diffusers' own.

Pruning is the U-Net family's (igsm.families.unet: Diff-Pruning's, every layer but ``conv_out``,
each attention's heads kept equal), the ResNet channels, the transformer blocks' stream and the
attention widths freed. Two widths stay: cross-attention's key/value *input* width, the text
encoder's hidden size (the text embedding is a network input, which torch-pruning never prunes:
tests/test_sd_unet.py checks it), and the GEGLU feed-forward's hidden width: torch-pruning 1.4
mis-indexes a projection whose output is chunked into value and gate (an IndexError in its
importance), so the GEGLU projections are left out of pruning (their input, the stream, is still
pruned with it). Blocks for reuse: the U-Net's graph (down blocks, mid block, up blocks with the
skips they pop), the same structure.

SD 1.5 learned the DDPM process on the scaled-linear β schedule (√β linear from 0.00085 to 0.012):
``diffusion.beta_schedule: scaled_linear`` with that range, which the config checks require of an
experiment finetuning a pretrained SD U-Net (``pretrained_diffusion``).

Imports torch and diffusers only inside its functions (igsm.families)."""

from __future__ import annotations

from pathlib import Path

from igsm.families import register
from igsm.families.unet import UNetFamily
from igsm.hub import load_local_or_hub, looks_like_local_path

# The tokens of a prompt as SD gives it (CLIP's tokenizer pads to its model_max_length, 77): the
# length of the example condition that traces the network for pruning and MAC counts. The network's
# config does not hold it (cross-attention takes any length); igsm.conditioning's text kind uses the
# tokenizer's own, 77 for every CLIP tokenizer.
CLIP_TEXT_LENGTH = 77
# diffusers' UNet2DConditionModel default, for an architecture that leaves the key out.
DEFAULT_CROSS_ATTENTION_DIM = 1280


class SDUNetFamily(UNetFamily):
    """The U-Net family's pruning, block graph and checkpoint widths; its own network class,
    loading and conditioning."""

    name = "sd-unet"
    title = "SD U-Net"
    class_name = "UNet2DConditionModel"
    description = ("diffusers' UNet2DConditionModel (text-conditional through cross-attention; "
                   "Stable Diffusion 1.5's unet/)")
    key_defaults = {"sample_size": None, "in_channels": 4, "out_channels": 4}  # diffusers': SD's latents
    identifying_keys = (*UNetFamily.identifying_keys, "cross_attention_dim", "num_attention_heads",
                        "transformer_layers_per_block", "use_linear_projection")
    process = "ddpm"
    process_reason = "Stable Diffusion's U-Nets are DDPM ε-prediction models"
    pretrained_help = ("a hub id (stable-diffusion-v1-5/stable-diffusion-v1-5) or a local diffusers folder "
                       "(a pipeline's, with the network in unet/, or the network's own)")
    pretrained_diffusion = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    condition_kinds = ("text", "captions")  # prompts per label, or each image's own caption
    class_slots_key = None  # no class embedding: the text embedding is its only condition
    CROSS_ATTENTION_KEY = "cross_attention_dim"

    def network_class(self):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel

    def owns(self, net) -> bool:
        return isinstance(net, self.network_class())

    def condition_keyword(self, net) -> str | None:
        return "encoder_hidden_states"  # always conditional: cross-attention needs its keys and values

    def example_condition(self, net, device):
        import torch

        return torch.zeros(1, CLIP_TEXT_LENGTH, net.config[self.CROSS_ATTENTION_KEY], device=device)

    def conditioning_errors(self, key: str, architecture: dict, conditioning) -> list[str]:
        if conditioning is None:
            return [f"{key}.conditioning.kind: none, but the SD U-Net is text-conditional (set kind: text, "
                    f"text_encoder and prompts)"]
        errors = super().conditioning_errors(key, architecture, conditioning)
        if errors or architecture is None:
            return errors
        width = architecture.get(self.CROSS_ATTENTION_KEY, DEFAULT_CROSS_ATTENTION_DIM)
        hidden = conditioning.encoder_hidden_size()  # None where the config alone does not tell
        if hidden is not None and width != hidden:
            return [f"{key}.architecture.{self.CROSS_ATTENTION_KEY}: {width}, but conditioning.text_encoder "
                    f"{conditioning.text_encoder} gives embeddings of width {hidden} (its hidden_size), which "
                    f"every cross-attention reads"]
        return []

    def pretrained_errors(self, key: str, pretrained: str) -> list[str]:
        if looks_like_local_path(pretrained) and not Path(pretrained).expanduser().is_dir():
            return [f"{key}.dense.pretrained: local folder {pretrained} does not exist"]
        return []

    def load_pretrained(self, source: str, architecture: dict, cache_dir):
        """A diffusers folder (a pipeline's with the network in unet/, or the network's own) or a hub
        id, read from the hub cache first; ``ValueError`` naming the key and what to do."""
        return load_local_or_hub(self.network_class().from_pretrained, source, subfolders=("", "unet"),
                                 key="dense.pretrained", what=f"diffusers {self.title}", cache_dir=cache_dir)

    def pruning_plan(self, model) -> dict:
        """The U-Net's plan, the GEGLU feed-forwards' projections kept (module docstring)."""
        from diffusers.models.activations import GEGLU

        plan = super().pruning_plan(model)
        plan["ignored_layers"] = [*plan["ignored_layers"],
                                  *(m.proj for m in model.modules() if isinstance(m, GEGLU))]
        return plan


SD_UNET = register(SDUNetFamily())
