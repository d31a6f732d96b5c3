"""The sample stage's torch-free half: a model's shards gathered into its set (with the set's grid),
and a set exported as PNG files. Numpy and PIL only (igsm.sampling.files, igsm.plots): the gather
job of each scored model starts in well under a second, where the sample stage's imports (torch)
cost ~2 s of CPU before anything is done (the demo's 13 gather jobs, BENCHMARKS.md "CPU demo").
"""

from __future__ import annotations

from pathlib import Path

from igsm.stages.common import StageError, readable_inputs


def save_sample_grid(images, grid, metadata: dict) -> None:
    """The first 64 images as a grid; for a model conditioned on at most 16 classes (or prompts), a
    column per class (the image of seed s shows class s mod num_classes: igsm.conditioning)."""
    from igsm.plots import save_grid

    conditioning = metadata.get("conditioning") or {}
    classes = conditioning.get("num_classes") or len(conditioning.get("prompts") or ())
    if classes and classes <= 16:
        save_grid(images[: classes * max(1, 64 // classes)], grid, nrow=classes)
    else:
        save_grid(images[:64], grid)


def gather_samples(shards, out, grid, first_seed: int, num_images: int) -> str:
    """Concatenate shard files in seed order, checking that every seed is there exactly once."""
    from igsm.sampling.files import gather_shards, save_samples

    try:
        images, seeds, metadata = gather_shards(list(shards), first_seed, num_images)
    except ValueError as err:
        raise StageError(str(err)) from None
    save_samples(out, images, seeds, metadata)
    if grid:
        save_sample_grid(images, grid, metadata)
    return f"{out}: {len(images)} images from {len(shards)} shards"


def export_png(samples, out) -> str:
    """Write a samples file's images as PNG files named by their seed (lossless: their FID equals the
    array's); the folder appears complete or not at all."""
    import os
    import shutil

    from PIL import Image

    from igsm.sampling.files import load_samples

    with readable_inputs():
        images, seeds, _ = load_samples(samples)
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for image, seed in zip(images, seeds):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp / f"{int(seed):06d}.png")
    if Path(out).exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return f"{out}: {len(images)} PNG files"
