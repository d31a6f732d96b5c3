"""CLIP score of a text-conditioned model's samples (issue 31, item 5), beside their FID.

Each sampled image is compared with the prompt it was sampled with (the conditioning's
``sampling_prompts(seeds)``: igsm.conditioning) by torchmetrics' ``CLIPScore``: 100 · cos(CLIP
image embedding, CLIP text embedding), averaged over the images. The CLIP model is a config key
(``clip_score.model``: a hub id, by default SD's evaluation model ``openai/clip-vit-large-patch14``,
or a local folder), loaded here through igsm.hub, as the text encoder and the autoencoders are, and
handed to torchmetrics as the callable its ``model_name_or_path`` accepts.

Two things torchmetrics 1.9.0 does that this module keeps, and one it cannot do with our transformers:

* ``compute()`` is ``max(mean, 0)``: the *mean* is clipped at 0, not each image's score, although
  its docstring writes max(100·cos, 0) per pair. The score here is that value; the JSON also records
  the unclipped mean (the metric's own sum over its count), which a random tiny CLIP often needs.
* Texts are tokenised per batch with ``padding=True`` and the attention mask (a prompt longer than
  the text model's positions is cut there, with torchmetrics' warning); images go through the
  CLIP processor (resize, centre crop, normalisation) from uint8.
* With transformers ≥ 5, ``CLIPModel.get_image_features`` / ``get_text_features`` return a
  ``BaseModelOutputWithPooling`` whose ``pooler_output`` is the projected embedding, and
  torchmetrics 1.9.0 calls ``.norm`` on it (AttributeError; Lightning-AI/torchmetrics#3407).
  :class:`ProjectedFeatures` hands torchmetrics that tensor, as transformers 4 did.

Offline no CLIP model can be downloaded: :func:`save_tiny_clip` writes a random tiny one (its
tokenizer igsm.conditioning.tiny_tokenizer's), whose scores measure the path, not the images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from igsm.conditioning import tiny_tokenizer, weights_digest
from igsm.hub import load_local_or_hub

KEY = "clip_score.model"  # the config key a loading failure names
# How torchmetrics 1.9.0 defines the number (its compute(); see the module docstring).
DEFINITION = ("torchmetrics CLIPScore: max(mean over images of 100·cos(CLIP image embedding, CLIP text embedding "
              "of the image's prompt), 0); the mean is clipped, not each image's score")


def _projected(features) -> torch.Tensor:
    """The projected embedding, whichever transformers returned it (a tensor before 5.0)."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class ProjectedFeatures(torch.nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the projected embedding as a
    tensor, what torchmetrics 1.9.0 expects (transformers 5 wraps it in a model output)."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.config = clip.config  # torchmetrics reads text_config.max_position_embeddings

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _projected(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _projected(self.clip.get_text_features(*args, **kwargs))


def load_clip(source: str, cache_dir=None):
    """(CLIPModel in eval mode, CLIPProcessor, sha256 of the model's weights) from a local folder or a
    hub id (igsm.hub: the hub asked only where it answers); ``ValueError`` naming clip_score.model
    and what to do otherwise (offline: a folder written by :func:`save_tiny_clip`)."""
    from transformers import CLIPModel, CLIPProcessor

    processor = load_local_or_hub(CLIPProcessor.from_pretrained, source, subfolders=("",), key=KEY,
                                  what="CLIP processor (tokenizer and image processor)",
                                  marker="tokenizer_config.json", cache_dir=cache_dir)
    model = load_local_or_hub(CLIPModel.from_pretrained, source, subfolders=("",), key=KEY, what="CLIP model",
                              cache_dir=cache_dir)
    model.eval().requires_grad_(False)
    return model, processor, weights_digest(model)


def as_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 N×H×W×3 of N×H×W×C images: a greyscale image (C = 1) as the RGB image of equal channels
    (PIL's convert("RGB")), which CLIP's processor takes; C = 3 unchanged."""
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 N×H×W×C images with C 1 or 3, found {images.dtype} {images.shape}")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def clip_score(images: np.ndarray, prompts: list[str], model, processor, batch_size: int = 64,
               device="cpu") -> dict:
    """torchmetrics' CLIPScore of ``images`` (uint8 N×H×W×C) against ``prompts`` (one per image),
    ``batch_size`` pairs per update: {clip_score: its compute(), clip_score_unclipped: the mean of
    100·cos before compute() clips it at 0, num_images}."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if not len(images):
        raise ValueError("no images to score")
    device = torch.device(device)
    wrapped = ProjectedFeatures(model)
    metric = CLIPScore(model_name_or_path=lambda: (wrapped, processor)).to(device)
    rgb = as_rgb(np.asarray(images))
    with torch.no_grad():
        for start in range(0, len(rgb), batch_size):
            # On the device: torchmetrics runs the model where the images are (its processor reads a CPU copy).
            batch = torch.from_numpy(rgb[start:start + batch_size]).permute(0, 3, 1, 2).to(device)
            metric.update(batch, list(prompts[start:start + batch_size]))
        score = metric.compute()
        unclipped = metric.score / metric.n_samples  # the metric's own states: sum of 100·cos, count
    return {"clip_score": float(score), "clip_score_unclipped": float(unclipped), "num_images": int(metric.n_samples)}


def save_tiny_clip(folder, prompts, hidden_size: int = 32, layers: int = 2, heads: int = 2, image_size: int = 32,
                   patch_size: int = 8, seed: int = 0, max_length: int = 77) -> Path:
    """Write a random-initialised tiny CLIPModel (text and vision towers ``hidden_size`` wide, the
    embedding too) and its CLIPProcessor (the tokenizer of igsm.conditioning.tiny_tokenizer, knowing
    the words of ``prompts``; a CLIPImageProcessor resizing and cropping to ``image_size``) into
    ``folder`` with ``save_pretrained``: a clip_score.model for tests and toy configs, offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = Path(folder)
    tokenizer, vocab_size = tiny_tokenizer(folder, prompts, max_length)
    tower = {"hidden_size": hidden_size, "intermediate_size": 4 * hidden_size, "num_hidden_layers": layers,
             "num_attention_heads": heads}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": vocab_size, "max_position_embeddings": max_length,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={**tower, "image_size": image_size, "patch_size": patch_size},
        projection_dim=hidden_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
