"""Dataset download and parsing: the real CIFAR-10 and Fashion-MNIST code on real images."""

import gzip
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import igsm.data
from conftest import CIFAR_SUBSET_SHA256, REPO
from igsm.data import (DownloadError, check_dataset_spec, file_digest, load_fashion_mnist,
                       prepare_dataset, read_idx, to_model_range, to_uint8)


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


# ---- Fashion-MNIST, on Debian's copy of the real archives (package dataset-fashion-mnist) ----

FMNIST = Path("/usr/share/datasets/fashion-mnist")
# Debian recompressed the archives: these differ from the official ones (igsm.data's defaults).
DEBIAN_SHA256 = {
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
}
PREFIX = {"train": "train", "test": "t10k"}


@pytest.fixture
def fmnist():
    if not all((FMNIST / name).exists() for name in DEBIAN_SHA256):
        reason = f"{FMNIST} lacks the Fashion-MNIST archives (Debian package dataset-fashion-mnist)"
        if os.environ.get("CI"):  # .ci/run installs them: missing there is a failure, not a skip
            pytest.fail(reason)
        pytest.skip(reason)
    return FMNIST


def fm_spec(folder, split="test", image_size=32, sha256=DEBIAN_SHA256, slash=False):
    return {"source": "fashion-mnist", "url": folder.as_uri() + ("/" if slash else ""),
            "sha256": dict(sha256), "split": split, "image_size": image_size}


def raw_fmnist(folder, split):
    """Decoded independently of igsm.data: the idx headers are 16 and 8 bytes."""
    with gzip.open(folder / f"{PREFIX[split]}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(folder / f"{PREFIX[split]}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


@pytest.mark.parametrize("split, image_size, count, first_labels", [
    ("train", 32, 60000, [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]),
    ("test", 32, 10000, [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]),
    ("test", 28, 10000, [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]),
    ("test", 36, 10000, [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]),
])
def test_fashion_mnist_download_and_parse(fmnist, tmp_path, split, image_size, count, first_labels):
    out, cache = tmp_path / "d.npz", tmp_path / "raw"
    prepare_dataset(fm_spec(fmnist, split, image_size, slash=split == "train"), out, cache)
    # Only the split's two files are fetched.
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        n for n in DEBIAN_SHA256 if n.startswith(PREFIX[split]))
    with np.load(out) as data:
        images, labels = data["images"], data["labels"]
    assert images.shape == (count, image_size, image_size, 1) and images.dtype == np.uint8
    assert labels.shape == (count,) and labels.dtype == np.int64
    assert labels[:10].tolist() == first_labels
    assert np.bincount(labels).tolist() == [count // 10] * 10
    raw_images, raw_labels = raw_fmnist(fmnist, split)
    pad = (image_size - 28) // 2
    centre = images[:, pad:pad + 28, pad:pad + 28, 0]
    assert int(centre[0].sum()) == int(raw_images[0].sum()) > 0
    assert np.array_equal(centre, raw_images) and np.array_equal(labels, raw_labels)
    # The border is exactly the padding: zero, and the images' own edge rows are not all zero
    # (so padding on the wrong side would show up above).
    border = images.copy()
    border[:, pad:pad + 28, pad:pad + 28] = 0
    assert not border.any()
    assert raw_images[:, 0].any() and raw_images[:, -1].any() and raw_images[:, :, -1].any()


def test_fashion_mnist_cache_is_reused_and_repaired(fmnist, tmp_path):
    cache = tmp_path / "raw"
    prepare_dataset(fm_spec(fmnist), tmp_path / "a.npz", cache)
    # Verified files in the cache: nothing is fetched, so an unreachable URL does not matter.
    prepare_dataset(fm_spec(tmp_path / "nowhere"), tmp_path / "b.npz", cache)
    # A cached file with the wrong content is fetched again.
    (cache / "t10k-labels-idx1-ubyte.gz").write_bytes(b"stale")
    prepare_dataset(fm_spec(fmnist), tmp_path / "c.npz", cache)
    assert file_digest(cache / "t10k-labels-idx1-ubyte.gz") == DEBIAN_SHA256["t10k-labels-idx1-ubyte.gz"]


@pytest.mark.parametrize("wrong", ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"])
def test_fashion_mnist_sha256_mismatch(fmnist, tmp_path, wrong):
    cache, out = tmp_path / "raw", tmp_path / "d.npz"
    spec = fm_spec(fmnist)
    spec["sha256"][wrong] = "0" * 64
    with pytest.raises(DownloadError, match="sha256 mismatch for " + re.escape((fmnist / wrong).as_uri())):
        prepare_dataset(spec, out, cache)
    assert not out.exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(wrong)], "a rejected file must leave nothing"
    # Only a file verified before the rejected one may stay (the images come first).
    assert [p.name for p in cache.iterdir()] == ([] if "images" in wrong else ["t10k-images-idx3-ubyte.gz"])


def test_fashion_mnist_missing_file_names_the_url(fmnist, tmp_path):
    folder = tmp_path / "mirror"
    folder.mkdir()
    shutil.copy(fmnist / "t10k-images-idx3-ubyte.gz", folder)  # the labels are missing
    url = (folder / "t10k-labels-idx1-ubyte.gz").as_uri()
    with pytest.raises(DownloadError, match="could not download " + re.escape(url)):
        prepare_dataset(fm_spec(folder), tmp_path / "d.npz", tmp_path / "raw")


def truncated_gzip(source, target):
    target.write_bytes(source.read_bytes()[: source.stat().st_size // 2])


def truncated_idx(source, target):
    with gzip.open(source) as f:
        raw = f.read()
    target.write_bytes(gzip.compress(raw[:-1]))  # one pixel short of what the header says


@pytest.mark.parametrize("truncate, message", [(truncated_gzip, "not a complete gzip file"),
                                                (truncated_idx, "truncated")])
def test_fashion_mnist_truncated_archive(fmnist, tmp_path, truncate, message):
    folder = tmp_path / "mirror"
    folder.mkdir()
    name = "t10k-images-idx3-ubyte.gz"
    truncate(fmnist / name, folder / name)
    shutil.copy(fmnist / "t10k-labels-idx1-ubyte.gz", folder)
    # The truncated file's true sha256: the download passes, only the parser can tell.
    sha256 = {**DEBIAN_SHA256, name: file_digest(folder / name)}
    with pytest.raises(ValueError, match=re.escape(name) + ".*" + message):
        prepare_dataset(fm_spec(folder, sha256=sha256), tmp_path / "d.npz", tmp_path / "raw")
    assert not (tmp_path / "d.npz").exists()


def write_idx(path, magic, dims, data=None, extra=b""):
    count = int(np.prod(dims))
    data = np.arange(count, dtype=np.uint64).astype(np.uint8) % 10 if data is None else data
    header = np.array([magic, *dims], dtype=">u4").tobytes()
    path.write_bytes(gzip.compress(header + np.asarray(data, np.uint8).tobytes() + extra))
    return path


def test_idx_reader_is_strict(tmp_path):
    ok = write_idx(tmp_path / "ok", 0x803, (3, 28, 28))
    assert read_idx(ok, 0x803, (28, 28)).shape == (3, 28, 28)
    labels = write_idx(tmp_path / "labels", 0x801, (3,))
    assert read_idx(labels, 0x801).tolist() == [0, 1, 2]
    cases = [
        (labels, "magic number 0x00000801, expected 0x00000803"),
        (write_idx(tmp_path / "dims", 0x803, (3, 27, 28)), r"shape \(27, 28\), expected \(28, 28\)"),
        (write_idx(tmp_path / "long", 0x803, (3, 28, 28), extra=b"\0"), "trailing bytes"),
        (write_idx(tmp_path / "short", 0x803, (3, 28, 28), data=np.zeros(3 * 784 - 1)), "truncated"),
        (tmp_path / "header", "truncated"),
        (tmp_path / "plain", "not a complete gzip file"),
    ]
    (tmp_path / "header").write_bytes(gzip.compress(b"\0\0\x08\x03\0\0"))
    (tmp_path / "plain").write_bytes(b"\0\0\x08\x03" + bytes(100))
    for path, message in cases:
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
            read_idx(path, 0x803, (28, 28))


def test_fashion_mnist_pair_mismatches(tmp_path):
    images = write_idx(tmp_path / "images", 0x803, (3, 28, 28))
    with pytest.raises(ValueError, match="3 images but .* 2 labels"):
        load_fashion_mnist(images, write_idx(tmp_path / "l2", 0x801, (2,)), 32)
    with pytest.raises(ValueError, match="label 10 outside"):
        load_fashion_mnist(images, write_idx(tmp_path / "l10", 0x801, (3,), data=[0, 10, 1]), 32)
    data = load_fashion_mnist(images, write_idx(tmp_path / "l3", 0x801, (3,)), 30)
    assert data["images"].shape == (3, 30, 30, 1) and data["labels"].tolist() == [0, 1, 2]
    for size in (26, 31, 32.0):
        with pytest.raises(ValueError, match="image_size"):
            load_fashion_mnist(images, tmp_path / "l3", size)


def test_official_sources_when_url_and_sha256_unset(tmp_path, monkeypatch):
    """Empty url / no sha256 (the schema's defaults) mean the official archives; no network here."""
    calls = []

    def fake_download(url, destination, sha256=None):
        calls.append((url, Path(destination).name, sha256))
        raise DownloadError(f"could not download {url}: offline test")

    monkeypatch.setattr(igsm.data, "download", fake_download)
    for spec in ({"source": "cifar10", "url": ""}, {"source": "fashion-mnist", "url": "", "split": "test"}):
        with pytest.raises(DownloadError):
            prepare_dataset(spec, tmp_path / "d.npz", tmp_path / "raw")
    assert calls == [
        ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
         "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-images-idx3-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229"),
    ]


def test_schema_accepts_both_kinds_of_sha256():
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    schema = str(REPO / "schemas" / "config.schema.yaml")
    config = {"datasets": {"fm": {"source": "fashion-mnist", "sha256": dict(DEBIAN_SHA256)},
                           "c": {"source": "cifar10", "sha256": "ab" * 32}, "d": {"source": "cifar10"}}}
    validate(config, schema)
    assert config["datasets"]["d"]["url"] == "" and "sha256" not in config["datasets"]["d"]
    for name, spec in config["datasets"].items():
        check_dataset_spec(name, spec)
    for bad in ("xyz", {"t10k-images-idx3-ubyte.gz": "xyz"}, {}):
        with pytest.raises(WorkflowError, match="sha256"):
            validate({"datasets": {"fm": {"source": "fashion-mnist", "sha256": bad}}}, schema)


def set_key(key, value):
    return lambda spec: spec.__setitem__(key, value)


@pytest.mark.parametrize("source, change, key, message", [
    ("fashion-mnist", set_key("image_size", 27), "image_size", "≥ 28"),
    ("fashion-mnist", set_key("image_size", 31), "image_size", "even"),
    ("fashion-mnist", set_key("sha256", "ab" * 32), "sha256", "object mapping file names"),
    ("fashion-mnist", set_key("sha256", {"t10k-images-idx3-ubyte.gz": "ab" * 32}), "sha256",
     "no sha256 for .*t10k-labels-idx1-ubyte.gz"),
    ("fashion-mnist", set_key("sha256", {**DEBIAN_SHA256, "t10k-images.gz": "ab" * 32}), "sha256",
     "unknown file name"),
    ("fashion-mnist", set_key("sha256", {**DEBIAN_SHA256, "t10k-labels-idx1-ubyte.gz": "x"}),
     "sha256.t10k-labels-idx1-ubyte.gz", "64 hex digits"),
    ("fashion-mnist", set_key("split", "val"), "split", "neither"),
    ("fashion-mnist", set_key("url", "ftp://example.org/fmnist/"), "url", "not an http"),
    ("cifar10", set_key("image_size", 28), "image_size", "32×32"),
    ("cifar10", set_key("sha256", {"cifar-10-python.tar.gz": "ab" * 32}), "sha256", "one string"),
    ("image-folder", set_key("path", ""), "path", "needs 'path'"),
    ("image-folder", set_key("path", "/nonexistent/images"), "path", "not a folder"),
    ("imagenet", lambda spec: None, "source", "unknown dataset source"),
])
def test_check_dataset_spec_names_the_key(tmp_path, monkeypatch, source, change, key, message):
    def no_io(*args, **kwargs):
        raise AssertionError("check_dataset_spec must not download or read files")

    monkeypatch.setattr(igsm.data, "download", no_io)
    monkeypatch.setattr(igsm.data, "file_digest", no_io)
    # A spec as the schema's defaults leave it, valid before the change.
    spec = {"source": source, "url": "", "split": "test", "path": str(tmp_path), "image_size": 32,
            "channels": 3}
    if source != "imagenet":
        check_dataset_spec("mine", spec)
    change(spec)
    with pytest.raises(ValueError, match=re.escape(f"datasets.mine.{key}: ") + ".*" + message):
        check_dataset_spec("mine", spec)
    # prepare_dataset makes the same checks before fetching anything (naming the bare key).
    with pytest.raises(ValueError, match=re.escape(f"{key}: ")):
        prepare_dataset(spec, tmp_path / "d.npz", tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
