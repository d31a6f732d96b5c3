"""The CLIP score stage (issue 31, item 5): a text-conditioned model's samples against the prompts
they were sampled with, by torchmetrics' CLIPScore (igsm.clip_score), one JSON per model.

Each image's prompt comes from the seed the samples file records for it, through the experiment's
conditioning (``sampling_prompts(seeds)``: the same function of the seed that chose the embedding
the sampler gave the image), never from its position in the file. A conditioning without
``sampling_prompts`` has no prompts (class labels, unconditional): the config checks refuse
``clip_score.enabled`` there, and this stage does too.
"""

from __future__ import annotations

from igsm.stages.common import StageError, conditioning_of, readable_inputs, write_json
from igsm.stages.process import device as torch_device, set_threads
from igsm.stages.settings import ClipScoreSettings

# Prompts the JSON lists (a per-image caption set may hold thousands: counted beyond this).
LISTED_PROMPTS = 20
# Sample metadata the JSON repeats, as the FID JSON does: what made the images.
SAMPLE_KEYS = ("sampler", "sampler_kwargs", "guidance_scale")
# Settings of a conditioning that choose each image's prompt, where the samples record them
# (igsm.conditioning's describe(): the prompts per label of kind text, the prompt subset of captions).
PROMPT_KEYS = ("prompts", "prompts_dataset", "prompt_seed")


def check_recorded_conditioning(samples, recorded: dict | None, conditioning) -> None:
    """``StageError`` naming ``samples`` if they were made under another conditioning kind or other
    prompt settings than the settings' (stale samples: their prompts would not be these)."""
    recorded = recorded or {}
    if recorded.get("kind") != conditioning.kind:
        raise StageError(f"{samples}: sampled with conditioning kind {recorded.get('kind', 'none')!r}, but "
                         f"conditioning.kind is {conditioning.kind!r}; sample again")
    for key in PROMPT_KEYS:
        ours = getattr(conditioning, key, None)
        if key in recorded and ours is not None and recorded[key] != (list(ours) if key == "prompts" else ours):
            raise StageError(f"{samples}: sampled with another conditioning.{key} than the config's; sample again")


def clip_score(samples, out, settings: ClipScoreSettings, device: str, threads: int | None) -> str:
    """CLIP score of the images of ``samples`` (a samples.npz) against each one's prompt, into ``out``."""
    import numpy as np
    import torch
    import torchmetrics
    import transformers

    from igsm import clip_score as clip
    from igsm.sampling import load_samples

    set_threads(threads)
    conditioning = conditioning_of({"conditioning": settings.conditioning})
    if not hasattr(conditioning, "sampling_prompts"):
        kind = conditioning.kind if conditioning is not None else "none"
        raise StageError(f"clip_score: conditioning.kind {kind!r} gives its images no prompts; a CLIP score "
                         "needs a text-conditioned experiment")
    with readable_inputs():
        images, seeds, metadata = load_samples(samples)
    check_recorded_conditioning(samples, metadata.get("conditioning"), conditioning)
    with readable_inputs():  # a captions kind reads its prompt store here
        prompts = conditioning.sampling_prompts(seeds)
    try:
        model, processor, digest = clip.load_clip(settings.model)
        score = clip.clip_score(images, prompts, model, processor, batch_size=settings.batch_size,
                                device=torch_device(device))
    except ValueError as err:
        raise StageError(str(err)) from None
    distinct = list(dict.fromkeys(prompts))
    seeds = np.asarray(seeds)
    write_json(out, {
        **score,
        "definition": clip.DEFINITION,
        "samples": str(samples),
        "first_seed": int(seeds.min()), "last_seed": int(seeds.max()),
        "clip_model": settings.model,
        "clip_model_sha256": digest,
        "prompts": {"kind": conditioning.kind,
                    "each_image": "conditioning.sampling_prompts(seeds): the prompt its seed was sampled with",
                    "num_distinct": len(distinct), "listed": distinct[:LISTED_PROMPTS]},
        "batch_size": settings.batch_size,
        "torchmetrics": torchmetrics.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "image_precision": metadata.get("precision", "unknown"),  # the sampler network's, as in the FID JSON
        **{key: metadata[key] for key in SAMPLE_KEYS if key in metadata},
    })
    return f"{out}: CLIP score {score['clip_score']:.3f} of {score['num_images']} images ({settings.model})"
