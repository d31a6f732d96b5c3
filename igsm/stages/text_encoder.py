"""A tiny random CLIP text encoder and tokenizer for the text conditioning (igsm.conditioning's
``text`` kind; issue 31, item 3), written offline: what a toy config's ``conditioning.text_encoder``
names where no real encoder (Stable Diffusion's CLIP ViT-L/14) can be downloaded."""

from __future__ import annotations


def tiny_text_encoder(out, prompts: tuple[str, ...], hidden_size: int, layers: int, heads: int, seed: int) -> str:
    """Write the encoder and tokenizer to ``out`` (igsm.conditioning.save_tiny_text_encoder)."""
    from igsm.conditioning import save_tiny_text_encoder

    if hidden_size % heads:
        from igsm.stages.common import StageError

        raise StageError(f"--hidden-size {hidden_size} does not split into --heads {heads} equal heads")
    folder = save_tiny_text_encoder(out, list(prompts), hidden_size=hidden_size, layers=layers, heads=heads, seed=seed)
    return (f"{folder}: a random CLIP text encoder ({hidden_size} wide, {layers} layers, seed {seed}) and a "
            f"tokenizer with the words of {len(prompts)} prompt(s); architecture.cross_attention_dim: {hidden_size}")
