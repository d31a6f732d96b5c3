"""Fashion-MNIST: the four official idx archives (28×28 grayscale, 60,000 train / 10,000 test),
fetched from a folder URL with a sha256 per file (only the chosen split's two), parsed by a strict
idx reader and zero-padded (black, the background) to ``image_size``.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from igsm.data.common import fetch_cached
from igsm.data.sources import check_hex_digest, check_split, check_url, register

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {  # split → (images, labels), the file names under the folder URL
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_SHA256 = {  # of the official archives (Debian's recompressed copies differ)
    "train-images-idx3-ubyte.gz": "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
    "train-labels-idx1-ubyte.gz": "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
    "t10k-images-idx3-ubyte.gz": "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
    "t10k-labels-idx1-ubyte.gz": "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
}
# Debian's package dataset-fashion-mnist recompressed the official archives (same images):
# a copy whose content, hence size, is known (igsm.config checks counts against it).
DEBIAN_FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
FASHION_MNIST_SIDE = 28


_FIX_ARCHIVE = "Delete it and check the dataset's 'url' and 'sha256'"
IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801  # uint8 (0x08), 3 or 1 dimensions


def read_idx(path: str | os.PathLike, magic: int, item_shape: tuple = ()) -> np.ndarray:
    """The uint8 array of a gzipped idx file, checked strictly against its header.

    Header: big-endian uint32 magic (0x0803 images, 0x0801 labels: its last byte is the number of
    dimensions), then one uint32 per dimension (count, then rows and cols for images); then the
    bytes, exactly count × rows × cols of them.
    """
    path = Path(path)
    what = "images" if magic == IDX_IMAGES else "labels"
    with open(path, "rb") as raw_file:
        try:
            with gzip.GzipFile(fileobj=raw_file) as f:
                raw = f.read()
        except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
            raise ValueError(f"{path}: not a complete gzip file ({type(err).__name__}: {err}): corrupt or "
                             f"truncated. {_FIX_ARCHIVE}") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    # The magic first: a file of the wrong kind should be named as such, not as "truncated".
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found is not None and found != magic:
        raise ValueError(f"{path}: idx magic number {found:#010x}, expected {magic:#010x} (uint8 {what})")
    if len(raw) < header:
        raise ValueError(f"{path}: truncated: {len(raw)} bytes, shorter than an idx {what} header ({header}). "
                         f"{_FIX_ARCHIVE}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if shape[1:] != tuple(item_shape):
        raise ValueError(f"{path}: {what} of shape {shape[1:]}, expected {tuple(item_shape)}")
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "trailing bytes"
        raise ValueError(f"{path}: {problem}: its header announces {shape[0]} {what} ({expected} bytes "
                         f"with the header), the file holds {len(raw)} bytes. {_FIX_ARCHIVE}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(images_path: str | os.PathLike, labels_path: str | os.PathLike, image_size: int) -> dict:
    """Fashion-MNIST's idx pair, each 28×28 image centred on a black image_size² canvas."""

    def bad_size(message):
        raise ValueError(f"image_size: {message}")

    _check_padded_size(image_size, bad_size)
    side = FASHION_MNIST_SIDE
    images = read_idx(images_path, IDX_IMAGES, (side, side))
    labels = read_idx(labels_path, IDX_LABELS)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} "
                         "labels: the two files are not one split's pair")
    if len(labels) == 0:
        raise ValueError(f"{labels_path}: no labels (count 0 in its header)")
    if labels.max() > 9:
        raise ValueError(f"{labels_path}: label {labels.max()} outside Fashion-MNIST's classes 0–9")
    # 0 is Fashion-MNIST's background, so a zero border only widens it (no resampling of pixels).
    pad = (image_size - side) // 2
    padded = np.zeros((len(images), image_size, image_size, 1), dtype=np.uint8)
    padded[:, pad:pad + side, pad:pad + side, 0] = images
    return {"images": padded, "labels": labels.astype(np.int64)}


def _check_padded_size(image_size, fail) -> None:
    if not isinstance(image_size, int) or image_size < FASHION_MNIST_SIDE or (image_size - FASHION_MNIST_SIDE) % 2:
        fail(f"Fashion-MNIST's 28×28 images are zero-padded equally on each side, so it must be an "
             f"integer ≥ 28 with image_size − 28 even (got {image_size!r})")




def check(spec: dict, fail) -> None:
    split = spec["split"]
    check_split(spec, fail, tuple(FASHION_MNIST_FILES))
    check_url(spec, fail)
    _check_padded_size(spec["image_size"], lambda message: fail("image_size", message))
    sha256 = spec.get("sha256")
    if sha256 is None:
        return  # the official files' digests
    if not isinstance(sha256, dict):
        fail("sha256", f"fashion-mnist has one file per images/labels and split: give an object "
                       f"mapping file names to sha256s, e.g. {{{FASHION_MNIST_FILES[split][0]}: "
                       f"<64 hex digits>, {FASHION_MNIST_FILES[split][1]}: ...}} (got {sha256!r})")
    unknown = sorted(set(sha256) - set(FASHION_MNIST_SHA256))
    if unknown:
        fail("sha256", f"unknown file name(s) {unknown}; Fashion-MNIST's are {sorted(FASHION_MNIST_SHA256)}")
    missing = [name for name in FASHION_MNIST_FILES[split] if name not in sha256]
    if missing:
        fail("sha256", f"no sha256 for {missing} (split {split!r} reads {list(FASHION_MNIST_FILES[split])})")
    for name, digest in sha256.items():
        check_hex_digest(digest, 64, f"sha256.{name}", fail)


def prepare(spec: dict, cache_dir: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    folder = (spec.get("url") or FASHION_MNIST_URL).rstrip("/") + "/"
    digests = spec.get("sha256") or FASHION_MNIST_SHA256
    images, labels = (fetch_cached(folder + name, cache_dir / name, digests[name])
                      for name in FASHION_MNIST_FILES[spec["split"]])
    data = load_fashion_mnist(images, labels, spec["image_size"])
    yield data["images"], data["labels"]


register("fashion-mnist", check, prepare)
