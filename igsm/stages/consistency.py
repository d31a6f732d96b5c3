"""The consistency stage (issue 31 item 8, issue 32 item 4): how far a model's images moved from the
dense model's at the same seeds — SSIM and PSNR per image pair, by torchmetrics (Diff-Pruning's
"consistency" and Singular-Value-Scaling's SSIM to the dense model), averaged, one JSON per model.

Images are paired by the seeds their samples files record, never by position: a file sampled from
other seeds is an error naming both files. Both are the 8-bit images the FID reads, scaled to
[0, 1] (data range 1). SSIM uses torchmetrics' Gaussian window (σ 1.5, 11 pixels, or the largest
odd size an image smaller than that allows). A pair of identical images has infinite PSNR: the
mean PSNR is over the pairs that differ, and the JSON counts the identical ones.
"""

from __future__ import annotations

from igsm.stages.common import StageError, readable_inputs, write_json
from igsm.stages.process import set_threads

# Sample metadata the JSON repeats for both files: what made the images.
SAMPLE_KEYS = ("sampler", "sampler_kwargs", "guidance_scale", "precision", "reuse_plan")


def paired_images(samples, reference):
    """(images, reference images, seeds): the images of ``samples`` and those of ``reference`` with
    the same seeds, in the order of ``samples``; ``StageError`` naming both files if a seed of
    ``samples`` is not in ``reference``."""
    import numpy as np

    from igsm.sampling import load_samples

    with readable_inputs():
        images, seeds, metadata = load_samples(samples)
        reference_images, reference_seeds, reference_metadata = load_samples(reference)
    position = {int(seed): k for k, seed in enumerate(reference_seeds)}
    missing = [int(seed) for seed in seeds if int(seed) not in position]
    if missing:
        raise StageError(f"{samples}: {len(missing)} of its {len(seeds)} seeds (first {missing[0]}) are not among the "
                         f"seeds of {reference}; SSIM and PSNR compare images of the same seed")
    if images.shape[1:] != reference_images.shape[1:]:
        raise StageError(f"{samples}: images of shape {images.shape[1:]}, but {reference} holds "
                         f"{reference_images.shape[1:]}")
    order = np.array([position[int(seed)] for seed in seeds], dtype=np.int64)
    return images, reference_images[order], seeds, metadata, reference_metadata


def image_metrics(images, reference, batch_size: int = 256):
    """(SSIM per pair, PSNR per pair) of uint8 NHWC image arrays, as float64 numpy arrays."""
    import numpy as np
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    side = min(images.shape[1], images.shape[2])
    kernel = min(11, side - (1 - side % 2))  # odd, at most the image
    ssim, psnr = [], []
    for start in range(0, len(images), batch_size):
        x, y = (torch.from_numpy(np.ascontiguousarray(a[start:start + batch_size])).permute(0, 3, 1, 2).double() / 255
                for a in (images, reference))
        ssim.append(structural_similarity_index_measure(x, y, data_range=1.0, kernel_size=kernel, reduction="none"))
        psnr.append(peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3)))
    return torch.cat(ssim).numpy(), torch.cat(psnr).numpy()


def consistency(samples, reference, out, batch_size: int, threads: int | None) -> str:
    """SSIM and PSNR of the images of ``samples`` to those of ``reference`` (the dense model's) with
    the same seeds, into ``out``."""
    import numpy as np
    import torchmetrics

    set_threads(threads)
    images, reference_images, seeds, metadata, reference_metadata = paired_images(samples, reference)
    ssim, psnr = image_metrics(images, reference_images, batch_size)
    finite = np.isfinite(psnr)
    seeds = np.asarray(seeds)
    write_json(out, {
        "ssim": float(ssim.mean()), "ssim_std": float(ssim.std()),
        "psnr": float(psnr[finite].mean()) if finite.any() else None,
        "psnr_std": float(psnr[finite].std()) if finite.any() else None,
        "identical_images": int((~finite).sum()), "num_images": len(images),
        "definition": ("mean over image pairs of the same seed of torchmetrics' SSIM (Gaussian window σ 1.5) and "
                       "PSNR (dB; over the pairs that differ), 8-bit images scaled to [0, 1]"),
        "samples": str(samples), "reference": str(reference),
        "first_seed": int(seeds.min()), "last_seed": int(seeds.max()),
        "torchmetrics": torchmetrics.__version__,
        "sampled_with": {key: metadata[key] for key in SAMPLE_KEYS if key in metadata},
        "reference_sampled_with": {key: reference_metadata[key] for key in SAMPLE_KEYS if key in reference_metadata},
    })
    return (f"{out}: SSIM {ssim.mean():.4f}, PSNR "
            f"{psnr[finite].mean() if finite.any() else float('inf'):.2f} dB to {reference} ({len(images)} pairs)")
