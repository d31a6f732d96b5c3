"""Dataset download and parsing: the real CIFAR-10 code on real CIFAR-10 images."""

import numpy as np
import pytest

from conftest import CIFAR_SUBSET_SHA256
from igsm.data import DownloadError, prepare_dataset, to_model_range, to_uint8


def cifar_spec(path, sha256=CIFAR_SUBSET_SHA256):
    return {"source": "cifar10", "url": path.as_uri(), "sha256": sha256, "split": "train"}


def test_cifar10_download_and_parse(cifar_subset, tmp_path):
    out = tmp_path / "train.npz"
    prepare_dataset(cifar_spec(cifar_subset), out, tmp_path / "raw")
    with np.load(out) as data:
        images, labels = data["images"], data["labels"]
    # The shared subset holds the first 1,017–1,329 images of each of the five train batches.
    assert images.shape == (5482, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (5482,) and set(np.unique(labels)) == set(range(10))
    # Real photographs, channel-last: colour channels differ, pixels span the range.
    assert images.min() == 0 and images.max() == 255
    assert np.abs(images[..., 0].astype(int) - images[..., 2]).mean() > 5
    test = tmp_path / "test.npz"
    prepare_dataset({**cifar_spec(cifar_subset), "split": "test"}, test, tmp_path / "raw")
    with np.load(test) as data:
        assert data["images"].shape == (1017, 32, 32, 3)


def test_cifar10_sha256_mismatch_is_an_error(cifar_subset, tmp_path):
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        prepare_dataset(cifar_spec(cifar_subset, sha256="0" * 64), tmp_path / "t.npz", tmp_path / "raw")
    assert not list((tmp_path / "raw").glob("*")), "a rejected download must leave nothing behind"
    assert not (tmp_path / "t.npz").exists()


def test_unreachable_url_names_the_url(tmp_path):
    url = (tmp_path / "missing.tar.gz").as_uri()
    with pytest.raises(DownloadError, match=url):
        prepare_dataset({"source": "cifar10", "url": url, "sha256": "0" * 64}, tmp_path / "t.npz", tmp_path)


def test_sklearn_digits_upsampled(tmp_path):
    data = prepare_dataset({"source": "sklearn-digits", "image_size": 16}, tmp_path / "d.npz", tmp_path)
    assert data["images"].shape == (1797, 16, 16, 1) and data["images"].dtype == np.uint8
    assert data["images"].max() == 255


def test_model_range_round_trip():
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    x = to_model_range(images)
    assert x.shape == (4, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(to_uint8(x), images)
