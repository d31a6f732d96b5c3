"""Dataset download and parsing: the real CIFAR-10 and Fashion-MNIST code on real images."""

import builtins
import gzip
import io
import os
import pickle
import re
import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest

import igsm.data
import igsm.data.cifar10
import igsm.data.common
from conftest import CIFAR_SUBSET_SHA256, REPO
from igsm.data import (DownloadError, check_dataset_spec, file_digest, load_fashion_mnist, load_images,
                       load_image_folder, parse_cifar10, prepare_dataset, read_idx, to_model_range,
                       to_uint8)


def cifar_spec(path, sha256=CIFAR_SUBSET_SHA256):
    return {"source": "cifar10", "url": path.as_uri(), "sha256": sha256, "split": "train"}


def test_cifar10_download_and_parse(cifar_subset, tmp_path):
    out = tmp_path / "train"
    prepare_dataset(cifar_spec(cifar_subset), out, tmp_path / "raw")
    data = load_images(out)  # the store as the stages read it
    images, labels = data[:], data.labels
    # The shared subset holds the first 1,017–1,329 images of each of the five train batches.
    assert images.shape == (5482, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (5482,) and set(np.unique(labels)) == set(range(10))
    assert images.min() == 0 and images.max() == 255
    test = tmp_path / "test"
    prepare_dataset({**cifar_spec(cifar_subset), "split": "test"}, test, tmp_path / "raw")
    assert load_images(test).shape == (1017, 32, 32, 3)


# CIFAR-10's own first images (the subset keeps each batch's first images and labels unchanged):
# data_batch_1 starts with a frog (6), then two trucks (9), a deer (4) …; test_batch with a cat (3).
# Pixels (row, column): (R, G, B), as the batch stores them, one 32×32 plane per colour.
CIFAR_FIRST = {
    "data_batch_1": ([6, 9, 9, 4, 1, 1, 2, 7, 8, 3],
                     {(0, 0): (59, 62, 63), (0, 31): (148, 124, 103), (15, 16): (255, 253, 232),
                      (31, 0): (177, 144, 116), (31, 31): (123, 92, 72)}),
    "test_batch": ([3, 8, 8, 0, 6, 6, 1, 6, 3, 1],
                   {(0, 0): (158, 112, 49), (0, 31): (116, 85, 33), (15, 16): (121, 112, 101),
                    (31, 0): (54, 107, 160), (31, 31): (21, 67, 110)}),
}


def raw_cifar_batches(archive):
    """Each member's (data N×3072, labels) by plain pickle: the archive is the sha256-pinned one."""
    assert file_digest(archive) == CIFAR_SUBSET_SHA256
    with tarfile.open(archive, "r:gz") as tar:
        return {Path(m.name).name: (np.asarray(b[b"data"]), list(b[b"labels"]))
                for m in tar.getmembers() if m.name.split("/")[-1].startswith(("data_batch", "test_batch"))
                for b in [pickle.loads(tar.extractfile(m).read(), encoding="bytes")]}


@pytest.mark.parametrize("split, member", [("train", "data_batch_1"), ("test", "test_batch")])
def test_cifar10_first_images_are_cifar10s_own(cifar_subset, split, member):
    """Catches a wrong byte layout (channel-major read as pixel-major, planes in the wrong order,
    rows and columns swapped) and a wrong batch order or label mapping: the first labels and
    pixels are CIFAR-10's, pinned, and every image equals the batch bytes read plane by plane."""
    data = parse_cifar10(cifar_subset, split)
    images, labels = data["images"], data["labels"]
    first_labels, pixels = CIFAR_FIRST[member]
    assert labels[:10].tolist() == first_labels
    for (row, col), rgb in pixels.items():
        assert tuple(images[0, row, col]) == rgb, (row, col)
    # Independently of the pinned numbers: R, G, B of pixel (r, c) are bytes r·32+c, 1024+r·32+c
    # and 2048+r·32+c of the image's row in the batch, for every image and batch, in batch order.
    raw = raw_cifar_batches(cifar_subset)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    expected = np.concatenate([raw[n][0] for n in names]).reshape(-1, 3, 1024)
    assert np.array_equal(images.reshape(-1, 1024, 3).transpose(0, 2, 1), expected)
    assert labels.tolist() == sum((raw[n][1] for n in names), [])
    # The transposed reading would give other pixels: the comparison above can fail.
    assert not np.array_equal(images[0], raw[member][0][0].reshape(32, 32, 3))


def test_cifar10_sha256_mismatch_is_an_error(cifar_subset, tmp_path):
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        prepare_dataset(cifar_spec(cifar_subset, sha256="0" * 64), tmp_path / "t", tmp_path / "raw")
    assert not list((tmp_path / "raw").glob("*")), "a rejected download must leave nothing behind"
    assert not (tmp_path / "t").exists()


def test_unreachable_url_names_the_url(tmp_path):
    url = (tmp_path / "missing.tar.gz").as_uri()
    with pytest.raises(DownloadError, match=url):
        prepare_dataset({"source": "cifar10", "url": url, "sha256": "0" * 64}, tmp_path / "t", tmp_path)


def test_sklearn_digits_upsampled(tmp_path):
    data = prepare_dataset({"source": "sklearn-digits", "image_size": 16}, tmp_path / "d", tmp_path)
    assert data.shape == (1797, 16, 16, 1) and data[:].dtype == np.uint8
    assert data[:].max() == 255


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
    out, cache = tmp_path / "d", tmp_path / "raw"
    prepare_dataset(fm_spec(fmnist, split, image_size, slash=split == "train"), out, cache)
    # Only the split's two files are fetched.
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        n for n in DEBIAN_SHA256 if n.startswith(PREFIX[split]))
    data = load_images(out)
    images, labels = data[:], data.labels
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
    prepare_dataset(fm_spec(fmnist), tmp_path / "a", cache)
    # Verified files in the cache: nothing is fetched, so an unreachable URL does not matter.
    prepare_dataset(fm_spec(tmp_path / "nowhere"), tmp_path / "b", cache)
    # A cached file with the wrong content is fetched again.
    (cache / "t10k-labels-idx1-ubyte.gz").write_bytes(b"stale")
    prepare_dataset(fm_spec(fmnist), tmp_path / "c", cache)
    assert file_digest(cache / "t10k-labels-idx1-ubyte.gz") == DEBIAN_SHA256["t10k-labels-idx1-ubyte.gz"]


@pytest.mark.parametrize("wrong", ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"])
def test_fashion_mnist_sha256_mismatch(fmnist, tmp_path, wrong):
    cache, out = tmp_path / "raw", tmp_path / "d"
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
        prepare_dataset(fm_spec(folder), tmp_path / "d", tmp_path / "raw")


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
        prepare_dataset(fm_spec(folder, sha256=sha256), tmp_path / "d", tmp_path / "raw")
    assert not (tmp_path / "d").exists()


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

    def fake_download(url, destination, sha256=None, algorithm="sha256", **keys):
        calls.append((url, Path(destination).name, sha256))
        raise DownloadError(f"could not download {url}: offline test")

    monkeypatch.setattr(igsm.data.common, "download", fake_download)
    for spec in ({"source": "cifar10", "url": ""}, {"source": "fashion-mnist", "url": "", "split": "test"},
                 {"source": "mscoco"}):
        with pytest.raises(DownloadError):
            prepare_dataset(spec, tmp_path / "d", tmp_path / "raw")
    assert calls == [
        ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
         "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-images-idx3-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229"),
        # mscoco (2017 val by default) fetches the annotations first: the small archive
        ("http://images.cocodataset.org/annotations/annotations_trainval2017.zip", "annotations_trainval2017.zip",
         "113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268"),
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
    ("fashion-mnist", set_key("split", "val"), "split", "has the splits"),
    ("fashion-mnist", set_key("url", "ftp://example.org/fmnist/"), "url", "not an http"),
    ("cifar10", set_key("image_size", 28), "image_size", "32×32"),
    ("cifar10", set_key("sha256", {"cifar-10-python.tar.gz": "ab" * 32}), "sha256", "one string"),
    ("image-folder", set_key("path", ""), "path", "needs 'path'"),
    ("image-folder", set_key("path", "/nonexistent/images"), "path", "not a folder"),
    ("places365", lambda spec: None, "source", "unknown dataset source"),
])
def test_check_dataset_spec_names_the_key(tmp_path, monkeypatch, source, change, key, message):
    def no_io(*args, **kwargs):
        raise AssertionError("check_dataset_spec must not download or read files")

    monkeypatch.setattr(igsm.data.common, "download", no_io)
    monkeypatch.setattr(igsm.data.common, "file_digest", no_io)
    # A spec as the schema's defaults leave it, valid before the change.
    spec = {"source": source, "url": "", "split": "test", "path": str(tmp_path), "image_size": 32,
            "channels": 3}
    if source != "places365":
        check_dataset_spec("mine", spec)
    change(spec)
    with pytest.raises(ValueError, match=re.escape(f"datasets.mine.{key}: ") + ".*" + message):
        check_dataset_spec("mine", spec)
    # prepare_dataset makes the same checks before fetching anything (naming the bare key).
    with pytest.raises(ValueError, match=re.escape(f"{key}: ")):
        prepare_dataset(spec, tmp_path / "d", tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


# ---- hostile, corrupt, or malformed CIFAR-10 archives ----------------------------------------

def cifar_batch(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"training batch", b"labels": [int(x) for x in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"a.png"] * n}


def write_cifar_archive(path, batches, protocol=2):
    """A tar.gz in the official layout; ``batches`` maps member names to objects or raw bytes."""
    with tarfile.open(path, "w:gz") as tar:
        for name, batch in batches.items():
            blob = batch if isinstance(batch, bytes) else pickle.dumps(batch, protocol=protocol)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def train_archive(path, first, protocol=2):
    """Five train batches, the first one ``first``, the others valid."""
    batches = {"data_batch_1": first, **{f"data_batch_{i}": cifar_batch(seed=i) for i in range(2, 6)}}
    return write_cifar_archive(path, batches, protocol)


class Payload:
    """Unpickling it calls ``call(*args)``: what a hostile archive would do."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("where", ["top", "nested"])
@pytest.mark.parametrize("call, refused", [(os.system, re.escape(f"{os.system.__module__}.system")),
                                           (builtins.eval, r"(builtins|__builtin__)\.eval")])
def test_cifar10_malicious_pickle_is_refused(tmp_path, call, refused, where, protocol):
    marker = tmp_path / "pwned"
    payload = Payload(call, f"open({str(marker)!r}, 'w').close()" if call is builtins.eval
                      else f"touch {marker}")
    # The payload is live: plain pickle.loads runs it (on a different marker).
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(Payload(call, *(a.replace(str(marker), str(live)) for a in payload.args))))
    assert live.exists()
    first = payload if where == "top" else {**cifar_batch(), b"filenames": [b"a.png", payload]}
    archive = train_archive(tmp_path / "evil.tar.gz", first, protocol)
    spec = {"source": "cifar10", "url": archive.as_uri(), "sha256": file_digest(archive)}
    # (Protocol 2 spells builtins the Python 2 way, '__builtin__'.)
    message = (re.escape("member cifar-10-batches-py/data_batch_1: refuses to load '") + refused
               + "': not CIFAR-10")
    with pytest.raises(ValueError, match=message):
        prepare_dataset(spec, tmp_path / "d", tmp_path / "raw")
    assert not marker.exists(), "the archive's pickle ran code"
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_synthetic_batches_parse_exactly(tmp_path, protocol):
    """Pickles as Python 3 writes them (bytes via _codecs.encode at protocol 2, arrays via
    numpy._core at 2 and 4, _frombuffer at 5), and numpy 1.x's 'numpy.core' spelling."""
    batches = {f"data_batch_{i}": cifar_batch(n=i, seed=i) for i in range(1, 6)}
    archive = write_cifar_archive(tmp_path / "c.tar.gz", batches, protocol)
    data = parse_cifar10(archive)
    expected = np.concatenate([b[b"data"] for b in batches.values()]).reshape(-1, 3, 32, 32)
    assert np.array_equal(data["images"], expected.transpose(0, 2, 3, 1))
    assert data["labels"].tolist() == sum((b[b"labels"] for b in batches.values()), [])
    old = pickle.dumps(cifar_batch(), protocol=2)
    assert b"numpy._core.multiarray\n_reconstruct" in old
    old = old.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    write_cifar_archive(tmp_path / "old.tar.gz", {"test_batch": old})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DeprecationWarning from importing numpy.core
        assert parse_cifar10(tmp_path / "old.tar.gz", "test")["images"].shape == (2, 32, 32, 3)


def changed(**entries):
    return {**cifar_batch(), **{k.encode(): v for k, v in entries.items()}}


@pytest.mark.parametrize("first, message", [
    ([1, 2, 3], "a pickled list, expected a dict"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, "no 'labels' entry"),
    (changed(data=np.zeros((2, 3071), np.uint8)), r"'data' of shape \(2, 3071\), expected N×3072"),
    (changed(data=np.zeros((2, 3, 32, 32), np.uint8)), "expected N×3072"),
    (changed(data=np.full((2, 3072), 256, np.int16)), "range 256..256: expected bytes 0..255"),
    (changed(data=np.zeros((2, 3072), np.float32)), "dtype float32"),
    (changed(data=b"\0" * 6144), "'data' is a bytes"),
    (changed(labels=[1, 10]), "range 1..10: expected integers 0..9"),
    (changed(labels=[1, -1]), "expected integers 0..9"),
    (changed(labels=[1, 2, 3]), r"'labels' of shape \(3,\), expected \(2,\)"),
    (changed(labels=["a", "b"]), "expected integers 0..9"),
    (b"\x80\x02}q\x00", "not a readable pickle"),  # truncated pickle inside a whole archive
])
def test_cifar10_malformed_batch_names_the_member(tmp_path, first, message):
    archive = train_archive(tmp_path / "bad.tar.gz", first)
    with pytest.raises(ValueError, match=re.escape(f"{archive}: member cifar-10-batches-py/data_batch_1: ")
                       + ".*" + message):
        parse_cifar10(archive)


def test_cifar10_archive_without_batches(tmp_path):
    archive = write_cifar_archive(tmp_path / "meta.tar.gz", {"batches.meta": {b"label_names": []}})
    with pytest.raises(ValueError, match=re.escape(f"{archive}: no test_batch inside: not a CIFAR-10")):
        parse_cifar10(archive, "test")


def half(data):
    return data[: len(data) // 2]


CORRUPT = "corrupt or truncated gzip/tar archive"


@pytest.mark.parametrize("damage, message", [
    (half, CORRUPT),                                    # cut in the middle of a member
    (lambda data: data[:-100], CORRUPT),                # only the gzip trailer and the tar's end missing
    (lambda data: data[:100], CORRUPT),                 # cut inside the first tar header
    (lambda data: b"\0" * 1000, CORRUPT),               # not gzip at all
    (lambda data: data[:5_000_000] + bytes(b ^ 0xFF for b in data[5_000_000:5_000_100]) + data[5_000_100:],
     CORRUPT),                                          # flipped bytes: tarfile alone sees fewer members
    (lambda data: gzip.compress(b"no tar here" * 100), CORRUPT),
    (lambda data: data[:-8] + data[-8:-4][::-1] + data[-4:], CORRUPT),  # wrong CRC: only its check tells
])
def test_cifar10_truncated_or_corrupt_archive(cifar_subset, tmp_path, damage, message):
    """An archive whose sha256 matches (the user copied a wrong digest): the parser must tell."""
    mirror = tmp_path / "mirror.tar.gz"
    mirror.write_bytes(damage(cifar_subset.read_bytes()))
    cache = tmp_path / "raw"
    spec = cifar_spec(mirror, sha256=file_digest(mirror))
    with pytest.raises(ValueError, match=re.escape(str(cache / "cifar-10-python.tar.gz"))
                       + ": " + message + ".*Delete it.*'url'.*'sha256'") as caught:
        prepare_dataset(spec, tmp_path / "d", cache)
    assert not isinstance(caught.value, DownloadError)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert not (tmp_path / "d").exists()


# ---- image-folder: every PIL mode, converted to exact 8-bit values -------------------------


def load_one(tmp_path, name, img, channels, **save):
    """``img`` saved alone in a folder, loaded back through load_image_folder at its own size."""
    folder = tmp_path / f"{name}-{channels}"
    folder.mkdir()
    img.save(folder / name, **save)
    assert img.size[0] == img.size[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's "Palette images with Transparency ..." warning
        data = load_image_folder(folder, img.size[0], channels)
    assert data["images"].shape == (1, *img.size, channels) and data["images"].dtype == np.uint8
    return data["images"][0]


def luma(rgb):
    """ITU-R 601-2 luma as PIL documents it for convert('L'), by hand."""
    r, g, b = np.moveaxis(np.asarray(rgb, float), -1, 0)
    return np.round((299 * r + 587 * g + 114 * b) / 1000).astype(int)


SIXTEEN = np.array([[0, 257 * 10, 128], [129, 300, 257 * 200 + 128], [257 * 200 + 129, 65534, 65535]])
SIXTEEN_AS_8 = [[0, 10, 0], [1, 1, 200], [201, 255, 255]]  # round(v / 257), by hand


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode, name", [("I;16", "a.png"), ("I;16B", "a.tif"), ("I", "a.tif")])
def test_image_folder_16_bit_is_scaled_not_clipped(tmp_path, channels, mode, name):
    from PIL import Image

    dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
    img = Image.frombytes(mode, (3, 3), SIXTEEN.astype(dtype).tobytes())
    folder_copy = tmp_path / "check"
    folder_copy.mkdir()
    img.save(folder_copy / name)
    with Image.open(folder_copy / name) as reopened:  # the file really holds this mode and these values
        assert reopened.mode == mode and np.asarray(reopened).tolist() == SIXTEEN.tolist()
    loaded = load_one(tmp_path, name, img, channels)
    for c in range(channels):
        assert loaded[..., c].tolist() == SIXTEEN_AS_8


def test_image_folder_refuses_float_and_out_of_range_int(tmp_path):
    from PIL import Image

    for name, array, message in [("f.tif", np.array([[0, 0.5], [1, 0.25]], np.float32), "float image"),
                                 ("i.tif", np.array([[0, 70000], [1, 2]], np.int32), "0..70000, outside")]:
        folder = tmp_path / name
        folder.mkdir()
        Image.fromarray(array).save(folder / name)
        with pytest.raises(ValueError, match=re.escape(str(folder / name)) + ".*" + message):
            load_image_folder(folder, 2, 3)


PALETTE = [(10, 200, 30), (255, 0, 0), (0, 0, 255), (7, 8, 9)]


@pytest.mark.parametrize("transparency", [None, 0, bytes([0, 128, 255, 255])])
def test_image_folder_palette(tmp_path, transparency):
    """Each pixel's palette colour, whatever its transparency (alpha dropped, no compositing)."""
    from PIL import Image

    img = Image.new("P", (2, 2))
    img.putpalette([v for colour in PALETTE for v in colour])
    img.putdata([0, 1, 2, 3])
    save = {} if transparency is None else {"transparency": transparency}
    expected = np.array(PALETTE).reshape(2, 2, 3)
    assert load_one(tmp_path, "p.png", img, 3, **save).tolist() == expected.tolist()
    assert load_one(tmp_path, "p.png", img, 1, **save)[..., 0].tolist() == luma(expected).tolist()
    assert luma(expected).tolist() == [[124, 76], [29, 8]]


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_alpha_cmyk_bilevel(tmp_path, channels):
    from PIL import Image

    def check(name, img, expected_rgb, **save):
        got = load_one(tmp_path, name, img, channels, **save)
        expected = np.asarray(expected_rgb)
        expected = expected if channels == 3 else luma(expected)[..., None]
        assert got.tolist() == expected.tolist(), name

    # RGBA / LA: the stored colour, even under alpha 0 (compositing on black would give 0).
    rgba = [(200, 100, 50, 0), (40, 90, 220, 128), (255, 255, 255, 255), (0, 0, 0, 0)]
    img = Image.new("RGBA", (2, 2))
    img.putdata(rgba)
    check("rgba.png", img, np.array([c[:3] for c in rgba]).reshape(2, 2, 3))
    img = Image.new("LA", (2, 2))
    img.putdata([(100, 0), (7, 255), (255, 3), (0, 0)])
    check("la.png", img, np.repeat(np.array([[100, 7], [255, 0]])[..., None], 3, axis=2))
    # CMYK, PIL's conversion by hand: R = (255 − C)(255 − K)/255, rounded (never a tie: 255 is odd).
    cmyk = [(100, 50, 0, 60), (0, 0, 0, 0), (255, 0, 0, 0), (10, 20, 30, 255)]
    img = Image.new("CMYK", (2, 2))
    img.putdata(cmyk)
    expected = [[round((255 - v) * (255 - k) / 255) for v in c[:3]] for *c, k in [(*c[:3], c[3]) for c in cmyk]]
    assert expected[0] == [119, 157, 195] and expected[1] == [255, 255, 255] and expected[3] == [0, 0, 0]
    check("cmyk.tif", img, np.array(expected).reshape(2, 2, 3))
    # '1': 0 and 255.
    img = Image.new("1", (2, 2))
    img.putdata([0, 1, 1, 0])
    check("one.png", img, np.repeat(np.array([[0, 255], [255, 0]])[..., None], 3, axis=2))


def test_image_folder_unreadable_file_is_named(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(folder / "a_good.png")
    bad = folder / "b_bad.png"
    bad.write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ": not a readable image"):
        load_image_folder(folder, 4, 3)
    # A truncated PNG opens (its header is intact) and fails only when decoded.
    big = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "whole.png")
    bad.write_bytes((tmp_path / "whole.png").read_bytes()[:2000])
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ": not a readable image"):
        load_image_folder(folder, 4, 3)
    bad.unlink()
    assert load_image_folder(folder, 4, 3)["images"][0, 0, 0].tolist() == [1, 2, 3]


def test_image_folder_empty_path_is_refused(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    Image.new("L", (4, 4)).save(tmp_path / "in_cwd.png")  # would be found if "" meant "."
    with pytest.raises(ValueError, match="empty 'path'"):
        load_image_folder("", 4, 1)
    for spec in ({"source": "image-folder", "path": "", "image_size": 4, "channels": 1},
                 {"source": "image-folder", "image_size": 4, "channels": 1}):
        with pytest.raises(ValueError, match="path: .*needs 'path'"):
            prepare_dataset(spec, tmp_path / "d", tmp_path / "raw")
        with pytest.raises(ValueError, match="datasets.x.path"):
            check_dataset_spec("x", spec)


def test_cifar10_oversized_member_is_refused_before_reading(cifar_subset, monkeypatch):
    """A batch is read into memory whole: a member beyond the cap (512 MiB; lowered here) is refused."""
    monkeypatch.setattr(igsm.data.cifar10, "_CIFAR10_MAX_BATCH_BYTES", 1000)
    with pytest.raises(ValueError, match=re.escape(f"{cifar_subset}: member cifar-10-batches-py/data_batch_1 is "
                                                   "4936284 bytes, far beyond a CIFAR-10 batch")):
        parse_cifar10(cifar_subset)


# ---- CelebA ---------------------------------------------------------------------------------------

def celeba_files(folder, names_and_parts, size=(178, 218)):
    """A CelebA-layout zip (img_align_celeba/<name>) and partition file. Lossless PNG bytes under the
    .jpg names (PIL reads by content), each pixel a function of (row, column, image), so that crops
    can be checked exactly."""
    import zipfile

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows, cols = np.mgrid[0:size[1], 0:size[0]]
    with zipfile.ZipFile(folder / "img_align_celeba.zip", "w") as archive:
        for k, (name, _) in enumerate(names_and_parts):
            pixels = np.stack([rows % 256, cols % 256, np.full_like(rows, 10 * k)], axis=-1).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            archive.writestr(f"img_align_celeba/{name}", buffer.getvalue())
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{name} {part}\n" for name, part in names_and_parts))
    return {name: file_digest(folder / name, "md5") for name in ("img_align_celeba.zip", "list_eval_partition.txt")}


CELEBA_LAYOUT = [("000001.jpg", 0), ("000002.jpg", 1), ("000003.jpg", 0), ("000004.jpg", 2)]


def test_celeba_split_and_crop_geometry(tmp_path):
    md5 = celeba_files(tmp_path / "celeba", CELEBA_LAYOUT)
    spec = {"source": "celeba", "url": (tmp_path / "celeba").as_uri(), "md5": md5, "split": "train",
            "image_size": 128}
    check_dataset_spec("celeba", spec)
    data = prepare_dataset(spec, tmp_path / "train", tmp_path / "raw")[:]
    # Partition 0 in the file's order: images 0 and 2 of the zip; the crop is rows 57..184 and
    # columns 25..152 of the 218×178 aligned image (centre (89, 121)), not resized at 128.
    assert data.shape == (2, 128, 128, 3)
    assert data[1, 0, 0].tolist() == [57, 25, 20]
    assert data[0, -1, -1].tolist() == [184, 152, 0]
    np.testing.assert_array_equal(data[0, :, 0, 0], np.arange(57, 185))
    np.testing.assert_array_equal(data[0, 0, :, 1], np.arange(25, 153))
    # At 64: PIL's bilinear resize of that crop (torchvision's Resize on a PIL image), nothing else.
    from PIL import Image

    small = prepare_dataset({**spec, "image_size": 64, "split": "test"}, tmp_path / "t", tmp_path / "raw")
    crop = data[0].copy()
    crop[..., 2] = 30  # image 3 of the zip (partition 2): its third channel is 10·k
    expected = np.asarray(Image.fromarray(crop).resize((64, 64), Image.BILINEAR))
    np.testing.assert_array_equal(small[0], expected)


def test_celeba_and_image_folders_stream_in_chunks(tmp_path):
    """A chunk boundary changes nothing: chunks of 1 and 2 images concatenate to the whole split."""
    from igsm.data.celeba import iter_celeba, load_celeba
    from PIL import Image

    from igsm.data.image_folder import iter_image_folder

    celeba_files(tmp_path / "celeba", [(f"{k:06d}.jpg", 0) for k in range(1, 6)])
    args = (tmp_path / "celeba" / "img_align_celeba.zip", tmp_path / "celeba" / "list_eval_partition.txt", "train", 8)
    whole = load_celeba(*args)["images"]
    assert whole.shape == (5, 8, 8, 3) and len(np.unique(whole[..., 2])) > 1
    for chunk in (1, 2):
        parts = list(iter_celeba(*args, chunk=chunk))
        assert [len(p[0]) for p in parts] == [chunk] * (5 // chunk) + [5 % chunk] * (5 % chunk > 0)
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole)
    folder = tmp_path / "folder"
    folder.mkdir()
    for k in range(5):
        Image.fromarray(np.full((4, 4, 3), 40 * k, np.uint8)).save(folder / f"{k}.png")
    parts = list(iter_image_folder(folder, 4, 3, chunk=2))
    assert [len(p[0]) for p in parts] == [2, 2, 1]
    assert [int(p[0][i, 0, 0, 0]) for p in parts for i in range(len(p[0]))] == [0, 40, 80, 120, 160]


def test_celeba_md5_mismatch_names_the_file(tmp_path):
    md5 = celeba_files(tmp_path / "celeba", CELEBA_LAYOUT)
    md5["list_eval_partition.txt"] = "0" * 32
    spec = {"source": "celeba", "url": (tmp_path / "celeba").as_uri(), "md5": md5}
    with pytest.raises(DownloadError, match="md5 mismatch for .*list_eval_partition.txt.*fix 'url' or 'md5'"):
        prepare_dataset(spec, tmp_path / "d", tmp_path / "raw")
    # Without an md5 key the official digests apply, which a test zip cannot have.
    with pytest.raises(DownloadError, match="md5 mismatch for .*img_align_celeba.zip: expected 00d2c5bc"):
        prepare_dataset({**spec, "md5": None}, tmp_path / "d", tmp_path / "raw")


@pytest.mark.parametrize("change, key, message", [
    (lambda s: s.pop("url"), "url", "no official URL .*mmlab.ie.cuhk.edu.hk"),
    (lambda s: s.update(split="val"), "split", "has the splits \\['train', 'valid', 'test'\\]"),
    (lambda s: s.update(md5={"img_align_celeba.zip": "xyz"}), "md5.img_align_celeba.zip", "not 32 hex digits"),
    (lambda s: s.update(md5={"celeba.zip": "0" * 32}), "md5", "unknown file name"),
])
def test_celeba_config_errors_name_the_key(change, key, message):
    spec = {"source": "celeba", "url": "file:///data/celeba/", "split": "train", "image_size": 64}
    check_dataset_spec("faces", spec)
    change(spec)
    with pytest.raises(ValueError, match=re.escape(f"datasets.faces.{key}: ") + ".*" + message):
        check_dataset_spec("faces", spec)


def test_celeba_damaged_files_are_named(tmp_path):
    from igsm.data import load_celeba

    celeba_files(tmp_path / "c", CELEBA_LAYOUT + [("000005.jpg", 0)], size=(178, 218))
    (tmp_path / "c" / "list_eval_partition.txt").write_text("000001.jpg 0\n000009.jpg 0\n")
    with pytest.raises(ValueError, match="no image 000009.jpg .* not the same release"):
        load_celeba(tmp_path / "c" / "img_align_celeba.zip", tmp_path / "c" / "list_eval_partition.txt", "train", 64)
    (tmp_path / "c" / "list_eval_partition.txt").write_text("000001.jpg train\n")
    with pytest.raises(ValueError, match="line 1: .* not CelebA's list_eval_partition.txt"):
        load_celeba(tmp_path / "c" / "img_align_celeba.zip", tmp_path / "c" / "list_eval_partition.txt", "train", 64)
    celeba_files(tmp_path / "d", [("000001.jpg", 0)], size=(64, 64))
    with pytest.raises(ValueError, match="member img_align_celeba/000001.jpg: 64×64 pixels, expected .* 178×218"):
        load_celeba(tmp_path / "d" / "img_align_celeba.zip", tmp_path / "d" / "list_eval_partition.txt", "train", 64)


def test_every_registered_source_is_in_the_schema():
    import yaml

    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())
    assert schema["$defs"]["dataset"]["properties"]["source"]["enum"] == list(igsm.data.SOURCES)
