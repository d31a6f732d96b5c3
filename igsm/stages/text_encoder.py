"""Tiny random CLIP models written offline, where no real one can be downloaded: a text encoder and
tokenizer for the text conditioning (igsm.conditioning's ``text`` kind; issue 31, item 3), what a toy
config's ``conditioning.text_encoder`` names in place of Stable Diffusion's CLIP ViT-L/14; and a whole
CLIP model with its processor for the CLIP score (igsm.clip_score; issue 31, item 5), what its
``clip_score.model`` names in place of openai/clip-vit-large-patch14."""

from __future__ import annotations


def tiny_text_encoder(out, prompts: tuple[str, ...], layers: int, heads: int, seed: int, hidden_size: int) -> str:
    """Write the encoder and tokenizer to ``out`` (igsm.conditioning.save_tiny_text_encoder)."""
    from igsm.conditioning import save_tiny_text_encoder

    if hidden_size % heads:
        from igsm.stages.common import StageError

        raise StageError(f"--hidden-size {hidden_size} does not split into --heads {heads} equal heads")
    folder = save_tiny_text_encoder(out, list(prompts), hidden_size=hidden_size, layers=layers, heads=heads, seed=seed)
    return (f"{folder}: a random CLIP text encoder ({hidden_size} wide, {layers} layers, seed {seed}) and a "
            f"tokenizer with the words of {len(prompts)} prompt(s); architecture.cross_attention_dim: {hidden_size}")


def tiny_clip(out, prompts: tuple[str, ...], layers: int, heads: int, seed: int, hidden_size: int, image_size: int,
              patch_size: int) -> str:
    """Write the CLIP model and processor to ``out`` (igsm.clip_score.save_tiny_clip)."""
    from igsm.stages.common import StageError

    if hidden_size % heads:
        raise StageError(f"--hidden-size {hidden_size} does not split into --heads {heads} equal heads")
    if image_size % patch_size:
        raise StageError(f"--image-size {image_size} is not a whole number of --patch-size {patch_size} patches")
    from igsm.clip_score import save_tiny_clip

    folder = save_tiny_clip(out, list(prompts), hidden_size=hidden_size, layers=layers, heads=heads,
                            image_size=image_size, patch_size=patch_size, seed=seed)
    return (f"{folder}: a random CLIP model ({hidden_size} wide, {layers} layers, {image_size}-pixel images, seed "
            f"{seed}) and a processor whose tokenizer has the words of {len(prompts)} prompt(s): a clip_score.model")
