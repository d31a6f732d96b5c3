"""The torch-free half of FID (paper Sec. 5.1): statistics files of Inception features (mean,
covariance and, for PRDC, some of the features themselves), the Fréchet distance between two of
them, and precision, recall, density and coverage on the kept features (Naeem et al. 2020).

igsm.fid computes the features (clean-fid, torch) and re-exports all of this. The jobs that only
read statistics files (the FID's distance, PRDC) import this module alone: numpy and SciPy start
in a fraction of a second, torch, torchvision and clean-fid in ~4 s of CPU, which the demo's 14
such jobs would each pay (BENCHMARKS.md, "CPU demo").
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import linalg as scipy_linalg

from igsm.data import read_npz
from igsm.data.common import reporting_write_errors


def distance_versions() -> dict[str, str]:
    """The versions that can move the Fréchet distance's last digits: numpy (the covariances' products)
    and SciPy (``sqrtm``). The features' own are a statistics file's ``feature_versions``."""
    import scipy

    return {"numpy": np.__version__, "scipy": scipy.__version__}


@dataclass(eq=False)
class Statistics:
    """Mean and covariance of N feature vectors; unpacks as ``mu, sigma = stats``."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int | None = None
    metadata: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.mu, self.sigma))


def statistics(features: np.ndarray, **metadata) -> Statistics:
    """(mu, sigma) of an N×D feature array, computed exactly as clean-fid does."""
    features = np.asarray(features)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features: expected N×D with N ≥ 2, got shape {features.shape}.")
    mu = np.mean(features, axis=0)
    sigma = np.cov(features, rowvar=False)
    return Statistics(mu, sigma, len(features), dict(metadata))


def save_statistics(path: str | os.PathLike, features_or_stats, keep=None, **metadata) -> Statistics:
    """Write mu, sigma, num_images and JSON metadata (mode, extractor, sha1, precision, …) to ``.npz``.

    ``features_or_stats``: an N×D feature array, a ``Statistics``, or a (mu, sigma) pair (then pass
    ``num_images=``). Keyword metadata is added to (and overrides) that of a ``Statistics``.
    ``keep``: indices of feature rows to store too (``features``, float32, and ``feature_indices``),
    for metrics that need the features themselves (PRDC: ``kept_indices``, ``load_features``);
    only with a feature array.
    """
    kept = None
    if keep is not None:
        if isinstance(features_or_stats, (Statistics, tuple)):
            raise ValueError("keep= needs the features themselves, not statistics.")
        keep = np.asarray(keep, dtype=np.int64)
        kept = {"features": np.asarray(features_or_stats, dtype=np.float32)[keep], "feature_indices": keep}
    if isinstance(features_or_stats, Statistics):
        stats = Statistics(features_or_stats.mu, features_or_stats.sigma,
                           metadata.pop("num_images", features_or_stats.num_images),
                           {**features_or_stats.metadata, **metadata})
    elif isinstance(features_or_stats, tuple):
        if "num_images" not in metadata:
            raise ValueError("A (mu, sigma) pair does not say how many images it came from: pass num_images=.")
        num_images = int(metadata.pop("num_images"))
        stats = Statistics(np.asarray(features_or_stats[0]), np.asarray(features_or_stats[1]), num_images, metadata)
    else:
        stats = statistics(features_or_stats, **metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: a half-written reference file must never look complete.
    tmp = path.with_name(path.name + ".tmp")
    with reporting_write_errors(path), open(tmp, "wb") as f:
        np.savez(f, mu=stats.mu, sigma=stats.sigma,
                 num_images=np.int64(-1 if stats.num_images is None else stats.num_images),
                 metadata=np.array(json.dumps(stats.metadata, sort_keys=True)), **(kept or {}))
    os.replace(tmp, path)
    return stats


def kept_indices(num_images: int, num: int, seed: int | None = None) -> np.ndarray:
    """Which of ``num_images`` feature rows a statistics file keeps for PRDC, sorted: all of them if
    ``num`` ≥ ``num_images``; else ``num`` drawn without replacement by numpy's ``default_rng(seed)``
    (a reference's images, stored in some order of the dataset), or, with ``seed`` None, the first
    ``num`` (a model's samples: image k has seed first_seed + k, already a random draw)."""
    if num >= num_images:
        return np.arange(num_images, dtype=np.int64)
    if seed is None:
        return np.arange(num, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(num_images, size=num, replace=False)).astype(np.int64)


def load_features(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """(features N×D float32, their rows among the file's images, metadata) that ``save_statistics``
    kept in a statistics file; ``ValueError`` naming the file if it kept none or they are malformed."""
    remedy = ("it was written without kept features (prdc.enabled off, or a supplied mu/sigma file): "
              "rerun the workflow with prdc.enabled, which rewrites it; if it was written with them, "
              "it was not written completely: delete it and rerun")
    arrays, keys = read_npz(path, ("features", "feature_indices", "metadata"), "statistics", remedy)
    if "features" not in arrays or "feature_indices" not in arrays:
        raise ValueError(f"{path}: no kept Inception features ('features', 'feature_indices'); keys are {keys}; "
                         f"{remedy}")
    features, indices = arrays["features"], arrays["feature_indices"]
    if features.ndim != 2 or indices.shape != (len(features),) or not np.isfinite(features).all():
        raise ValueError(f"{path}: kept features of shape {features.shape} with indices {indices.shape}, or "
                         f"non-finite values; expected N×D and N; {remedy}")
    metadata = json.loads(str(arrays["metadata"])) if "metadata" in arrays else {}
    return features, indices, metadata


def prdc_versions() -> dict[str, str]:
    """The versions that can move PRDC's digits: the prdc package, and the scikit-learn and numpy
    it computes the distances and k-th nearest neighbours with."""
    from importlib import metadata

    return {"prdc": metadata.version("prdc"), "scikit-learn": metadata.version("scikit-learn"),
            "numpy": np.__version__}


def prdc_min_features(nearest_k: int) -> int:
    """The fewest features of a set that ``prdc.compute_prdc`` takes with ``nearest_k``: k + 2, one
    more than the point and its k neighbours, as it partitions each row of distances at index k + 1."""
    return nearest_k + 2


def precision_recall_density_coverage(real_features: np.ndarray, fake_features: np.ndarray,
                                      nearest_k: int) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake_features`` against ``real_features``
    (Naeem et al. 2020, Sec. 3-4), by the authors' ``prdc.compute_prdc`` unchanged: k-nearest-
    neighbour balls in Euclidean distance, each point's radius its k-th neighbour's distance (the
    point itself not counted), "inside" strictly. Both sets need ``prdc_min_features(nearest_k)`` rows."""
    import prdc

    real, fake = np.asarray(real_features, np.float32), np.asarray(fake_features, np.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features of shapes {real.shape} and {fake.shape}: expected N×D and M×D.")
    if min(len(real), len(fake)) < prdc_min_features(nearest_k):
        raise ValueError(f"nearest_k {nearest_k} needs at least {prdc_min_features(nearest_k)} features in each "
                         f"set; got {len(real)} real and {len(fake)} generated.")
    # compute_prdc prints the set sizes to stdout: into the job's log, with everything else.
    scores = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=nearest_k)
    return {name: float(scores[name]) for name in ("precision", "recall", "density", "coverage")}


# ADM's evaluator (openai/guided-diffusion, evaluations/evaluator.py) publishes its reference batches
# (VIRTUAL_imagenet256_labeled.npz, the reference of DiT's and ADM's ImageNet FIDs) as .npz files with
# the images (arr_0) and the statistics of its TensorFlow Inception-v3: pool_3 (mu, sigma) and spatial
# (mu_s, sigma_s). Its features are another computation than clean-fid's (another graph and resize):
# an FID against them is labelled as such, never silently mixed.
ADM_KEYS = ("mu_s", "sigma_s")
ADM_FEATURES = "ADM evaluator (guided-diffusion evaluations/evaluator.py): TensorFlow Inception-v3 pool_3"


def load_statistics(path: str | os.PathLike) -> Statistics:
    """Read a file of ``save_statistics``, or any .npz with ``mu`` and ``sigma`` (clean-fid, pytorch-fid,
    ADM's reference batches: their metadata then names ADM's features, ``ADM_FEATURES``).

    A missing, unreadable (truncated, not an .npz) or malformed file (no mu/sigma, mu not a vector,
    sigma not the matching square matrix, non-finite values) raises ``ValueError`` naming it.
    """
    remedy = ("if the workflow wrote it, it was not written completely or was changed since: delete "
              "it and rerun the workflow, which remakes it; if you supplied it (a reference file), "
              "replace it by an .npz holding 'mu' (D) and 'sigma' (D×D)")
    arrays, keys = read_npz(path, ("mu", "sigma", "num_images", "metadata"), "statistics", remedy)
    if "mu" not in arrays or "sigma" not in arrays:
        raise ValueError(f"{path}: no 'mu'/'sigma' arrays; keys are {keys}; {remedy}")
    mu, sigma = arrays["mu"], arrays["sigma"]
    if not (np.issubdtype(mu.dtype, np.number) and np.issubdtype(sigma.dtype, np.number)):
        raise ValueError(f"{path}: mu ({mu.dtype}) and sigma ({sigma.dtype}) must be numeric; {remedy}")
    if mu.ndim != 1 or len(mu) == 0 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: mu has shape {mu.shape} and sigma {sigma.shape}; expected D and "
                         f"D×D; {remedy}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu or sigma holds NaN or infinite values; {remedy}")
    try:
        num_images = int(arrays["num_images"]) if "num_images" in arrays else -1
        metadata = json.loads(str(arrays["metadata"])) if "metadata" in arrays else {}
        if not isinstance(metadata, dict):
            raise ValueError(f"a JSON {type(metadata).__name__}, not an object")
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: malformed num_images or metadata ({err}); {remedy}") from None
    if not metadata and set(ADM_KEYS) <= set(keys):
        metadata = {"feature_extractor": ADM_FEATURES, "format": "ADM reference batch"}
    return Statistics(mu, sigma, None if num_images < 0 else num_images, metadata)


# Tolerance of clean-fid's frechet_distance on the imaginary part of sqrtm's diagonal.
IMAGINARY_ATOL = 1e-3


def matrix_sqrt(a: np.ndarray) -> np.ndarray:
    """``scipy.linalg.sqrtm(a)`` on every SciPy, without the ``disp`` argument.

    clean-fid 0.1.35 calls ``sqrtm(a, disp=False)``: deprecated in SciPy 1.16, removed in 1.18
    (TypeError). Without ``disp`` every SciPy returns the array alone (< 1.16: ``disp=True`` is the
    default; ≥ 1.18: no other return); a tuple (only ``disp=False`` ever returned one) is unpacked
    all the same, should a version bring it back. The square root itself is the same Schur method
    as with ``disp=False``: ``disp`` only chose between printing a failure and returning an
    error estimate.
    """
    result = scipy_linalg.sqrtm(a)
    if isinstance(result, tuple):
        result = result[0]
    return np.asarray(result)


# How the FID takes tr √(Σa Σb) (the config's fid.square_root): SciPy's sqrtm of the product, as
# clean-fid (its numbers bit for bit), or two symmetric eigendecompositions (trace_sqrt_product).
SQUARE_ROOTS = ("sqrtm", "eigh")


def trace_sqrt_product(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """tr √(Σa Σb) of two covariances by two symmetric eigendecompositions instead of ``sqrtm``.

    With Σa = V D Vᵀ and B = V √D, the symmetric Bᵀ Σb B = √D Vᵀ Σb V √D is similar to
    √Σa Σb √Σa, whose eigenvalues are those of Σa Σb (real, ≥ 0 for covariances): the trace of the
    root is the sum of their square roots. Negative eigenvalues are round-off of a positive
    semi-definite matrix and count as 0. About 5× faster than ``sqrtm`` at 2048 dimensions and never
    complex, but it differs from clean-fid's number in the last digits (~1e-7 relative on the
    rank-deficient covariances of a few hundred images).
    """
    eigenvalues, eigenvectors = np.linalg.eigh(sigma_a)
    half = eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))
    product_eigenvalues = np.linalg.eigvalsh(half.T @ sigma_b @ half)
    return float(np.sqrt(np.clip(product_eigenvalues, 0, None)).sum())


def frechet_distance(stats_a, stats_b, eps: float = 1e-6, square_root: str = "sqrtm") -> float:
    """FID between two ``Statistics`` or (mu, sigma) pairs: clean-fid 0.1.35's ``frechet_distance``,
    step for step, but without ``sqrtm(disp=False)`` (see ``matrix_sqrt``), so it also runs on
    SciPy ≥ 1.18, where clean-fid's own function fails.

    ‖μa − μb‖² + tr Σa + tr Σb − 2 tr √(Σa Σb), √ by ``scipy.linalg.sqrtm`` of the product, as
    clean-fid: if the root is not finite (singular product), ``eps``·I is added to both covariances
    and the root taken again; a complex root is replaced by its real part, unless an imaginary part
    on its diagonal exceeds 1e-3 (then ``ValueError``). On the same SciPy the result is clean-fid's
    bit for bit. (A root through eigendecompositions of the symmetric √Σa Σb √Σa is ~5x faster
    and immune to complex round-off, but differs from clean-fid by up to ~3e-7 relative on
    rank-deficient covariances, N < 2048 images, where sqrtm's round-off on the null space counts:
    matching clean-fid's numbers exactly won. ``square_root="eigh"`` takes that route,
    ``trace_sqrt_product``, where seconds matter more than the last digits: the CPU demo.)

    Refuses statistics whose recorded modes differ: such a number means nothing.
    """
    mode_a = getattr(stats_a, "metadata", {}).get("mode")
    mode_b = getattr(stats_b, "metadata", {}).get("mode")
    if mode_a and mode_b and mode_a != mode_b:
        raise ValueError(f"Statistics of mode {mode_a!r} against mode {mode_b!r}: recompute one of them.")
    mu_a, sigma_a = stats_a
    mu_b, sigma_b = stats_b
    mu_a, mu_b = np.atleast_1d(mu_a), np.atleast_1d(mu_b)
    sigma_a, sigma_b = np.atleast_2d(sigma_a), np.atleast_2d(sigma_b)
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != mu_a.shape * 2:
        raise ValueError(f"Statistics of different shapes: mu {mu_a.shape} and {mu_b.shape}, "
                         f"sigma {sigma_a.shape} and {sigma_b.shape}.")
    diff = mu_a - mu_b
    if square_root not in SQUARE_ROOTS:
        raise ValueError(f"square_root {square_root!r}: expected one of {', '.join(SQUARE_ROOTS)}")
    trace_root = (trace_sqrt_product(sigma_a, sigma_b) if square_root == "eigh"
                  else _sqrtm_trace(sigma_a, sigma_b, eps))
    return float(diff.dot(diff) + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_root)


def _sqrtm_trace(sigma_a: np.ndarray, sigma_b: np.ndarray, eps: float):
    """tr √(Σa Σb) as clean-fid takes it (``frechet_distance``'s docstring): ``sqrtm`` of the product,
    retried with ``eps``·I on a singular product, the real part of a complex root."""
    covmean = matrix_sqrt(sigma_a.dot(sigma_b))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: the product of the covariances is singular; adding {eps} to their diagonals.",
                      RuntimeWarning, stacklevel=3)  # frechet_distance's caller
        offset = np.eye(sigma_a.shape[0]) * eps
        covmean = matrix_sqrt((sigma_a + offset).dot(sigma_b + offset))

    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_ATOL):
            largest = np.max(np.abs(covmean.imag))
            raise ValueError(
                f"FID: the square root of the covariance product has imaginary parts up to {largest:.3g} "
                f"(diagonal tolerance {IMAGINARY_ATOL}): the statistics are not valid covariances "
                f"(too few images, non-finite features?), so the distance would be meaningless.")
        covmean = covmean.real
    return np.trace(covmean)
