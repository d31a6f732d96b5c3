"""The FID stage (paper Sec. 5.1): Inception statistics of the training images and of each model's
samples, and the Fréchet distance between two statistics files (igsm.fid)."""

from __future__ import annotations

import sys

from igsm.stages.common import StageError, readable_inputs, write_json
from igsm.stages.prdc import prdc
from igsm.stages.process import device as torch_device, set_blas_threads, set_threads
from igsm.stages.settings import FidSettings

# Sample metadata that the FID JSON reports, carried from the samples file by the statistics file.
# "precision" is the features'; "image_precision" is the sampler network's (fp32, tf32, bf16).
SAMPLE_KEYS = ("samples", "image_precision", "sampler", "sampler_kwargs")
# A conditional model's samples also record these (igsm.conditioning); unconditional ones do not.
CONDITIONAL_KEYS = ("conditioning", "guidance_scale")


def features(images, settings: FidSettings, device: str, threads: int | None, batch_size: int):
    """Inception features of ``images`` in the settings' FID mode, and the extractor's metadata."""
    from igsm import fid

    extractor = fid.feature_extractor(settings.mode, device=torch_device(device))
    # clean-fid resizes every image on the CPU (PIL): worker processes keep the GPU fed.
    workers = threads if threads and threads > 1 else 0
    found = fid.image_features(images, extractor=extractor, batch_size=batch_size, num_workers=workers)
    return found, extractor.metadata


def fid_reference(data, out, settings: FidSettings, device: str, threads: int | None, batch_size: int) -> None:
    """Inception statistics of the training images (settings: 'fid')."""
    from igsm import fid
    from igsm.data import load_images

    set_threads(threads)
    with readable_inputs():
        images = load_images(data)
    num = settings.num_reference or len(images)  # 0: all of them
    if num > len(images):
        raise StageError(f"fid.num_reference: {num} images asked, {data} holds {len(images)}")
    found, metadata = features(images.limit(num), settings, device, threads, batch_size)
    keep = kept_features(found, settings, metadata, settings.prdc.get("seed", 0))
    fid.save_statistics(out, found, keep=keep, source=data, **metadata)


def kept_features(found, settings: FidSettings, metadata: dict, seed: int | None):
    """The rows of ``found`` a statistics file keeps for PRDC (settings.prdc's num_features of them,
    chosen by ``seed``, or the first ones: igsm.fid.kept_indices), recorded in ``metadata``; None
    where PRDC is off."""
    from igsm import fid

    asked = settings.prdc.get("num_features", 0)
    if not asked:
        return None
    keep = fid.kept_indices(len(found), asked, seed)
    metadata["kept_features"] = {"num": len(keep), "of": len(found), "asked": asked,
                                 "chosen": "first images" if seed is None else f"at random, seed {seed}"}
    return keep


def fid_statistics(samples, out, settings: FidSettings, device: str, threads: int | None, batch_size: int) -> None:
    """Inception statistics of generated images (settings: 'fid' mode): the costly half of the FID."""
    from igsm import fid
    from igsm.sampling import load_samples

    set_threads(threads)
    with readable_inputs():
        images, _, sample_metadata = load_samples(samples)
    found, metadata = features(images, settings, device, threads, batch_size)
    # A model's images are random draws already (image k: seed first_seed + k): its first ones.
    keep = kept_features(found, settings, metadata, None)
    fid.save_statistics(out, found, keep=keep, samples=samples,
                        image_precision=sample_metadata.get("precision", "unknown"),
                        sampler=sample_metadata.get("sampler"),
                        sampler_kwargs=sample_metadata.get("sampler_kwargs"), **metadata,
                        **{key: sample_metadata[key] for key in CONDITIONAL_KEYS if key in sample_metadata})


def fid_score(statistics, reference, out, prdc_out, nearest_k: int, settings: FidSettings,
              threads: int | None) -> str | None:
    """FID of generated images' statistics against reference statistics (settings: 'fid'); with
    ``prdc_out``, also precision, recall, density and coverage (k = ``nearest_k``) of the features the
    two files kept (prdc.enabled; igsm.stages.prdc), so one job reads them for both.

    Reads two statistics files only: a failure here never costs the Inception features again. Imports
    no torch (igsm.feature_statistics): seconds of start-up less for each of these small jobs."""
    from igsm import feature_statistics as fid

    set_blas_threads(threads)
    with readable_inputs():
        stats = fid.load_statistics(statistics)
        reference_stats = fid.load_statistics(reference)
    if stats.metadata.get("mode") != settings.mode:
        raise StageError(f"{statistics}: features of mode {stats.metadata.get('mode')!r}, "
                         f"but the settings ask for {settings.mode!r}; recompute them.")
    try:
        score = fid.frechet_distance(stats, reference_stats, square_root=settings.square_root)
    except ValueError as err:
        raise StageError(f"{statistics} against {reference}: {err}") from None
    sample_metadata = {key: stats.metadata.get(key) for key in SAMPLE_KEYS}
    conditional = {key: stats.metadata[key] for key in CONDITIONAL_KEYS if key in stats.metadata}
    extractor_metadata = {k: v for k, v in stats.metadata.items() if k not in SAMPLE_KEYS + CONDITIONAL_KEYS}
    # Which Inception the reference's features come from: a bare mu/sigma file records none; ADM's
    # reference batches are recognised (igsm.fid.ADM_FEATURES). Another one than ours: said, not hidden.
    features = stats.metadata.get("feature_extractor")
    reference_features = reference_stats.metadata.get("feature_extractor")
    same_features = None if reference_features is None else reference_features == features
    if same_features is False:
        print(f"warning: {reference} holds features of {reference_features}, {statistics} those of "
              f"{features}: this FID is not the reference's own evaluator's number", file=sys.stderr)
    write_json(out, {"fid": score, "num_images": stats.num_images, "samples": sample_metadata["samples"],
                     "statistics": statistics, "reference": reference,
                     # The user's file (fid.reference_statistics), or the workflow's own statistics.
                     "reference_kind": "supplied" if settings.reference_statistics else "computed",
                     "num_reference": reference_stats.num_images,
                     "reference_feature_extractor": reference_features or "not recorded in the file",
                     "same_feature_extractor": same_features,
                     "image_precision": sample_metadata["image_precision"] or "unknown",
                     "sampler": sample_metadata["sampler"],
                     "sampler_kwargs": sample_metadata["sampler_kwargs"], **conditional, **extractor_metadata,
                     # The Fréchet distance's own (numpy, scipy's sqrtm); the features' are feature_versions.
                     "distance_versions": fid.distance_versions(), "square_root": settings.square_root,
                     # another dataset's images (fid.reference_dataset), named only where given
                     **({"reference_dataset": settings.reference_dataset} if settings.reference_dataset else {})})
    if prdc_out:
        return prdc(statistics, reference, prdc_out, nearest_k, threads)
    return None
