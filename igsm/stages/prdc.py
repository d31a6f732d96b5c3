"""The PRDC stage (issue 32 item 4): precision, recall, density and coverage of a model's samples
against the FID reference images (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for
Generative Models", Sec. 3-4; the authors' prdc package), one JSON per model.

It reads the Inception features that the FID's statistics jobs kept beside their mu and sigma
(prdc.enabled; igsm.stages.fid.kept_features): nothing here runs the Inception network again, and
the features are those of the FID's mode. Real = the reference's kept features, fake = the model's
(swapping them swaps precision with recall and density with a different quantity).
"""

from __future__ import annotations

from igsm.stages.common import StageError, readable_inputs, write_json
from igsm.stages.process import set_blas_threads


def prdc(statistics, reference, out, nearest_k: int, threads: int | None) -> str:
    """PRDC of the features kept in ``statistics`` (a model's samples) against those kept in
    ``reference`` (the FID reference images), with k = ``nearest_k``, into ``out``."""
    from igsm import feature_statistics  # numpy and scikit-learn: no torch to start
    from igsm.data import file_digest

    set_blas_threads(threads)
    with readable_inputs():
        fake, _, fake_metadata = feature_statistics.load_features(statistics)
        real, _, real_metadata = feature_statistics.load_features(reference)
    modes = fake_metadata.get("mode"), real_metadata.get("mode")
    if modes[0] != modes[1]:
        raise StageError(f"{statistics}: features of Inception mode {modes[0]!r}, but {reference} holds mode "
                         f"{modes[1]!r} (fid.mode); PRDC compares features of one network: recompute one of them")
    needed = feature_statistics.prdc_min_features(nearest_k)
    for path, found in ((statistics, fake), (reference, real)):
        if len(found) < needed:
            raise StageError(f"prdc.nearest_k: {nearest_k} needs at least {needed} features "
                             f"in each set, but {path} keeps {len(found)} (prdc.num_features, sample.num_images, "
                             "fid.num_reference)")
    try:
        scores = feature_statistics.precision_recall_density_coverage(real, fake, nearest_k)
    except ValueError as err:
        raise StageError(f"{statistics} against {reference}: {err}") from None
    write_json(out, {
        **scores, "nearest_k": nearest_k, "num_real": len(real), "num_fake": len(fake),
        "definition": ("Naeem et al. 2020 (prdc.compute_prdc): k-NN balls of the real features, radius the k-th "
                       "neighbour's distance; precision/density: generated points in real balls, recall: real "
                       "points in generated balls, coverage: real balls holding a generated point"),
        "statistics": str(statistics), "reference": str(reference),
        "statistics_sha256": file_digest(statistics), "reference_sha256": file_digest(reference),
        # Which images' features: the reference's chosen by prdc.seed, the model's its first ones.
        "real_features": real_metadata.get("kept_features"), "fake_features": fake_metadata.get("kept_features"),
        "mode": modes[0], "feature_extractor": fake_metadata.get("feature_extractor"),
        "feature_versions": fake_metadata.get("feature_versions"),
        "prdc_versions": feature_statistics.prdc_versions(),
    })
    return (f"{out}: precision {scores['precision']:.4f}, recall {scores['recall']:.4f}, density "
            f"{scores['density']:.4f}, coverage {scores['coverage']:.4f} ({len(fake)} generated against "
            f"{len(real)} reference features, k = {nearest_k})")
