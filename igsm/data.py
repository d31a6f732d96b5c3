"""Training images: download, check, parse, and store as one uint8 array (N×H×W×C).

Sources:
* ``cifar10``: the official python-pickle archive (paper Sec. 5.1), fetched from a URL with a
  sha256 check; the URL is a config key so that a mirror or a local ``file://`` copy can serve.
* ``fashion-mnist``: the four official idx archives (28×28 grayscale, 60,000 train / 10,000 test),
  fetched from a folder URL with a sha256 per file (only the chosen split's two), parsed by a
  strict idx reader and zero-padded (black, the background) to ``image_size``.
* ``sklearn-digits``: scikit-learn's 8×8 digits (1,797 real images shipped inside its wheel),
  upsampled: the embedded offline demo.
* ``image-folder``: a user's own images (any PIL-readable files), resized to ``image_size``.

An empty ``url`` and an absent ``sha256`` mean the source's official ones (constants below).
``check_dataset_spec`` reports the errors a config entry alone shows, before any job runs.

Every dataset ends up as ``{"images": uint8 N×H×W×C, "labels": int64 N}`` in an ``.npz`` file:
training, pruning, and FID reference statistics all read that one file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch

SOURCES = ("cifar10", "fashion-mnist", "sklearn-digits", "image-folder")
URL_SCHEMES = ("http", "https", "file")

# Official archives, used when a config leaves 'url' empty / 'sha256' unset.
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
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
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


class DownloadError(RuntimeError):
    pass


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, destination: str | os.PathLike, sha256: str | None = None) -> Path:
    """Fetch ``url`` (http(s) or file://) to ``destination``, checking its sha256.

    The file appears under its final name only once complete and verified.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as err:
        partial.unlink(missing_ok=True)
        raise DownloadError(
            f"could not download {url}: {err}. Point the dataset's 'url' at a reachable copy "
            "(a mirror, or file:///path/to/the/archive)."
        ) from None
    if sha256 is not None:
        actual = file_digest(partial)
        if actual != sha256.lower():
            partial.unlink()
            raise DownloadError(
                f"sha256 mismatch for {url}: expected {sha256}, got {actual}. The file is "
                "corrupt or not the archive the config names; fix 'url' or 'sha256'."
            )
    partial.replace(destination)
    return destination


def fetch_cached(url: str, destination: str | os.PathLike, sha256: str) -> Path:
    """``destination`` if it already holds the file with this sha256, else ``download`` it there."""
    destination = Path(destination)
    if not destination.exists() or file_digest(destination) != sha256.lower():
        download(url, destination, sha256)
    return destination


def _latin1_bytes(text, encoding="latin1"):
    """What a protocol-2 pickle calls for ``bytes``: ``_codecs.encode(text, 'latin1')``, nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode called with {type(text).__name__}, {encoding!r}: "
                                     "only latin1-encoded strings (a pickled bytes object) are allowed")
    return text.encode("latin1")


# The globals a CIFAR-10 batch pickle may name, and what each resolves to. Plain dicts, lists,
# bytes, str, ints and floats need none. Numpy arrays need their reconstruction functions: resolved
# here from numpy itself, so both its 1.x ('numpy.core') and 2.x ('numpy._core') names work without
# importing numpy.core (deprecated in numpy 2). Protocol-2 pickles written by Python 3 spell bytes
# as _codecs.encode(str, 'latin1'): allowed through a wrapper that does only that.
_ARRAY_RECONSTRUCT = np.empty(0).__reduce__()[0]
_SCALAR = np.float64(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # protocol-5 pickles of arrays
_CIFAR10_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _ARRAY_RECONSTRUCT for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _SCALAR for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _FROMBUFFER for core in ("core", "_core")},
    ("_codecs", "encode"): _latin1_bytes,
}


_CIFAR10_MAX_BATCH_BYTES = 1 << 29  # 512 MiB: a batch is read into memory whole


class _RefusedGlobal(ValueError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only CIFAR-10 batch contents: never imports or calls anything else.

    A pickle runs code only through the globals it names (``find_class``); this one resolves just
    the allow-list above, so a hostile archive cannot reach os.system, eval, or any constructor.
    """

    def __init__(self, file, where: str):
        super().__init__(file, encoding="bytes")
        self.where = where

    def find_class(self, module, name):
        try:
            return _CIFAR10_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{self.where}: refuses to load '{module}.{name}': not CIFAR-10 data "
                                 "(a batch holds only a dict of numpy arrays, lists, bytes and ints). "
                                 "Do not use this archive; point 'url' at the official one and set "
                                 "'sha256' to its digest.") from None

    def persistent_load(self, pid):
        raise _RefusedGlobal(f"{self.where}: refuses a persistent id in the pickle: not CIFAR-10 data")


def _cifar10_batch(blob: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N×32×32×3 uint8, labels N int64) of one batch pickle, checked; ``where`` names it."""
    try:
        batch = _CifarUnpickler(io.BytesIO(blob), where).load()
    except _RefusedGlobal:
        raise
    except Exception as err:  # anything a malformed pickle makes the unpickler raise
        raise ValueError(f"{where}: not a readable pickle ({type(err).__name__}: {err}): the archive is "
                         "corrupt or not CIFAR-10's; delete it and fix the dataset's 'url' or 'sha256'") from None

    def bad(message):
        raise ValueError(f"{where}: {message}: not a CIFAR-10 batch")

    if not isinstance(batch, dict):
        bad(f"a pickled {type(batch).__name__}, expected a dict with 'data' and 'labels'")
    keys = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in batch.items()}
    for key in ("data", "labels"):
        if key not in keys:
            bad(f"no {key!r} entry (keys: {sorted(map(str, keys))})")
    data, labels = keys["data"], keys["labels"]
    if not isinstance(data, (np.ndarray, list, tuple)) or not isinstance(labels, (np.ndarray, list, tuple)):
        bad(f"'data' is a {type(data).__name__} and 'labels' a {type(labels).__name__}, expected "
            "arrays or lists")
    try:
        data, labels = np.asarray(data), np.asarray(labels)
    except ValueError as err:  # ragged lists
        bad(f"'data' or 'labels' is not a regular array ({err})")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) == 0:
        bad(f"'data' of shape {data.shape}, expected N×3072 (N ≥ 1 images of 3×32×32)")
    if data.dtype.kind not in "ui" or data.min() < 0 or data.max() > 255:
        bad(f"'data' of dtype {data.dtype}, range {data.min()}..{data.max()}: expected bytes 0..255"
            if data.dtype.kind in "uif" else f"'data' of dtype {data.dtype}, expected uint8")
    if labels.shape != (len(data),):
        bad(f"'labels' of shape {labels.shape}, expected ({len(data)},), one per image")
    if labels.dtype.kind not in "ui" or labels.min() < 0 or labels.max() > 9:
        bad(f"'labels' of dtype {labels.dtype}" + (f", range {labels.min()}..{labels.max()}"
            if labels.dtype.kind in "uif" else "") + ": expected integers 0..9, CIFAR-10's classes")
    images = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int64)


def parse_cifar10(archive: str | os.PathLike, split: str = "train") -> dict:
    """Images and labels from the official ``cifar-10-python.tar.gz`` (any number of images).

    The batches are pickles; they are read by an unpickler that resolves only numpy's array
    reconstruction globals (see ``_CIFAR10_GLOBALS``), so an archive from an untrusted mirror whose
    sha256 the user copied cannot run code: any other global is refused with a ValueError. A
    truncated or corrupt archive (its gzip stream is checked to the CRC first) is a ValueError
    naming it, as is a batch of the wrong structure.
    """
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []

    try:
        # The whole gzip stream first, to its CRC: tarfile stops silently at a garbled header
        # after the first, and a member's bytes are checked only when the stream's end is read.
        with gzip.open(archive, "rb") as stream:
            while stream.read(1 << 22):
                pass
        with tarfile.open(archive, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for name in names:
                if name not in members:
                    raise ValueError(f"{archive}: no {name} inside: not a CIFAR-10 python archive. "
                                     "Delete it and check the dataset's 'url' and 'sha256'")
                if members[name].size > _CIFAR10_MAX_BATCH_BYTES:  # the official ones are 31 MB
                    raise ValueError(f"{archive}: member {members[name].name} is {members[name].size} "
                                     "bytes, far beyond a CIFAR-10 batch: not a CIFAR-10 python archive. "
                                     "Delete it and check the dataset's 'url' and 'sha256'")
                # Read whole first, so a broken archive and a broken pickle are told apart.
                blob = tar.extractfile(members[name]).read()
                batch_images, batch_labels = _cifar10_batch(blob, f"{archive}: member {members[name].name}")
                images.append(batch_images)
                labels.append(batch_labels)
    except FileNotFoundError:
        raise ValueError(f"{archive}: no such file") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{archive}: corrupt or truncated gzip/tar archive ({type(err).__name__}: {err}). "
                         "Delete it and check the dataset's 'url' and 'sha256' (the digest must be the "
                         "complete official archive's)") from None
    return {"images": np.ascontiguousarray(np.concatenate(images)), "labels": np.concatenate(labels)}


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


def load_sklearn_digits(image_size: int) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 intensities, dark digits on white in sklearn's convention are bright-on-dark here.
    small = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)
    big = torch.nn.functional.interpolate(small, size=image_size, mode="bilinear", align_corners=False)
    images = (big.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return {"images": np.ascontiguousarray(images), "labels": digits.target.astype(np.int64)}


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_image_folder(folder: str | os.PathLike, image_size: int, channels: int) -> dict:
    """Every image under ``folder`` (recursively, by suffix), converted to ``channels`` and resized.

    Conversion of each PIL mode to 8-bit 'RGB' (channels 3) or 'L' (channels 1):

    * 'L', 'RGB': as stored. 'L' → RGB repeats the grey; RGB → L is PIL's ITU-R 601-2 luma,
      L = R·299/1000 + G·587/1000 + B·114/1000 (every colour mode reaches L through RGB).
    * 16-bit greyscale ('I;16', 'I;16B', …) and 32-bit integer 'I' (how PIL opens some 16-bit
      files): taken as 0..65535 and scaled to 0..255 as round(value / 257), so 65535 → 255 and
      257·k → k (PIL's own convert would clip everything ≥ 255 to white). An 'I' image with values
      outside 0..65535 is refused: its range is unknown.
    * Alpha ('RGBA', 'LA', 'PA'): dropped, as PIL's convert does: the stored colour of each pixel
      is kept whatever its opacity (no compositing onto a background).
    * Palette 'P': each pixel's palette colour; with a 'transparency' entry it goes through
      RGBA first (PIL's advice), then the alpha is dropped as above.
    * 'CMYK': PIL's conversion, R = (255 − C)(255 − K)/255 (likewise G from M, B from Y), rounded.
    * '1' (bilevel): 0 and 255.
    * 'F' (32-bit float): refused, since its scale (0..1? 0..255? any?) is not knowable from the
      file; save such images as 8- or 16-bit PNG.
    * Other modes PIL can convert to RGB (e.g. 'YCbCr', 'HSV') go through PIL's convert.

    A file PIL cannot read, or a mode it cannot convert, is a ValueError naming the file.
    """
    from PIL import Image

    if not str(folder):  # Path("") is the working directory: never scan that by accident
        raise ValueError("image-folder: empty 'path'; set it to the folder of images")
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder (image-folder's 'path')")
    if channels not in (1, 3):
        raise ValueError(f"channels: {channels!r}, expected 1 (greyscale) or 3 (RGB)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{folder}: no images found (looked for {sorted(IMAGE_SUFFIXES)})")
    images = []
    for path in files:
        img = _open_image(path)
        img = _convert_image(img, channels, path).resize((image_size, image_size), Image.BICUBIC)
        images.append(np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels))
    return {"images": np.stack(images), "labels": np.zeros(len(images), dtype=np.int64)}


def _open_image(path: Path):
    """The decoded PIL image in ``path``, or a ValueError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img
    except Exception as err:  # UnidentifiedImageError, truncated data, decompression bombs, ...
        raise ValueError(f"{path}: not a readable image ({type(err).__name__}: {err}). Replace the "
                         "file or remove it from the image folder") from None


def _convert_image(img, channels: int, path: Path):
    """``img`` as an 8-bit 'L' (channels 1) or 'RGB' (channels 3) image: see load_image_folder."""
    from PIL import Image

    mode = img.mode
    if mode in SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{path}: 32-bit integer image (PIL mode 'I') with values "
                             f"{values.min()}..{values.max()}, outside the 16-bit range 0..65535 this "
                             "loader scales from; save it as an 8- or 16-bit image")
        # round(v / 257) in integers: 257 is odd, so v / 257 is never exactly halfway.
        img = Image.fromarray(((2 * values + 257) // 514).astype(np.uint8))  # 2-D uint8: mode L
        mode = "L"
    elif mode == "F":
        raise ValueError(f"{path}: 32-bit float image (PIL mode 'F'): its value range is not known "
                         "(0..1? 0..255?); save it as an 8- or 16-bit PNG")
    try:
        if mode == "PA" or (mode == "P" and "transparency" in img.info):
            img, mode = img.convert("RGBA"), "RGBA"
        if channels == 3:
            return img.convert("RGB")
        if mode in ("L", "1", "LA"):
            return img.convert("L")
        return img.convert("RGB").convert("L")
    except (ValueError, OSError) as err:  # e.g. a mode without a conversion to RGB
        raise ValueError(f"{path}: cannot convert its PIL mode {img.mode!r} to "
                         f"{'RGB' if channels == 3 else 'greyscale'} ({err})") from None


def prepare_dataset(spec: dict, out_path: str | os.PathLike, cache_dir: str | os.PathLike) -> dict:
    """Build the dataset described by a config ``datasets.<name>`` entry and save it as .npz."""
    _check_spec(spec)
    source, split, cache_dir = spec["source"], spec.get("split", "train"), Path(cache_dir)
    if source == "cifar10":
        sha256 = spec.get("sha256") or CIFAR10_SHA256
        archive = fetch_cached(spec.get("url") or CIFAR10_URL, cache_dir / "cifar-10-python.tar.gz", sha256)
        data = parse_cifar10(archive, split)
    elif source == "fashion-mnist":
        folder = (spec.get("url") or FASHION_MNIST_URL).rstrip("/") + "/"
        digests = spec.get("sha256") or FASHION_MNIST_SHA256
        images, labels = (fetch_cached(folder + name, cache_dir / name, digests[name])
                          for name in FASHION_MNIST_FILES[split])
        data = load_fashion_mnist(images, labels, spec.get("image_size", 32))
    elif source == "sklearn-digits":
        data = load_sklearn_digits(spec["image_size"])
    else:  # image-folder (_check_spec rejected anything else)
        data = load_image_folder(spec["path"], spec["image_size"], spec["channels"])
    save_arrays(out_path, **data)
    return data


def check_dataset_spec(name: str, spec: dict) -> None:
    """Raise ValueError naming ``datasets.<name>.<key>`` for an error the config entry alone shows.

    Touches neither the network nor the disk, except to see that an image-folder's ``path`` is a
    folder, so the workflow can call it for every dataset before any job runs.
    """
    _check_spec(spec, f"datasets.{name}.")


def _check_spec(spec: dict, prefix: str = "") -> None:
    """check_dataset_spec's checks; keys absent from ``spec`` take the schema's defaults."""

    def fail(key, message):
        raise ValueError(f"{prefix}{key}: {message}")

    source = spec.get("source")
    if source not in SOURCES:
        fail("source", f"unknown dataset source {source!r}; choose one of {SOURCES}")
    split, image_size, sha256 = spec.get("split", "train"), spec.get("image_size", 32), spec.get("sha256")
    if source in ("cifar10", "fashion-mnist"):
        if split not in FASHION_MNIST_FILES:
            fail("split", f"{split!r} is neither 'train' nor 'test'")
        url = spec.get("url") or ""
        if url and urllib.parse.urlsplit(url).scheme not in URL_SCHEMES:
            fail("url", f"{url!r} is not an http://, https:// or file:// URL")
    if source == "cifar10":
        if image_size != 32:
            fail("image_size", f"CIFAR-10 images are 32×32; set 32 (got {image_size!r})")
        if sha256 is not None and not (isinstance(sha256, str) and _HEX64.fullmatch(sha256)):
            fail("sha256", f"cifar10 is one archive: give its sha256 as one string of 64 hex digits "
                           f"(got {sha256!r})")
    elif source == "fashion-mnist":
        _check_padded_size(image_size, lambda message: fail("image_size", message))
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
            if not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
                fail(f"sha256.{name}", f"not 64 hex digits (got {digest!r})")
    elif source == "image-folder":
        path = spec.get("path") or ""
        if not path:
            fail("path", "source image-folder needs 'path', the folder of images")
        if not Path(path).is_dir():
            fail("path", f"{path} is not a folder")


def _check_padded_size(image_size, fail) -> None:
    if not isinstance(image_size, int) or image_size < FASHION_MNIST_SIDE or (image_size - FASHION_MNIST_SIDE) % 2:
        fail(f"Fashion-MNIST's 28×28 images are zero-padded equally on each side, so it must be an "
             f"integer ≥ 28 with image_size − 28 even (got {image_size!r})")


def save_arrays(path: str | os.PathLike, **arrays) -> None:
    """np.savez written to a temporary name first, so a crash leaves no complete-looking file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
        np.savez(tmp, **arrays)
    os.replace(tmp.name, path)


# What to do about a file of results/ that cannot be read.
REMAKE = "it was not written completely or was changed since; delete it and rerun the workflow, which remakes it"


def numpy_error_text(err: BaseException) -> str:
    """Why numpy could not read a file, in one line."""
    if "pickled" in str(err):  # numpy takes an unknown format for a pickle
        return "not a numpy file: its first bytes are neither an .npz (zip) nor an .npy header"
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def read_npz(path: str | os.PathLike, names: tuple, kind: str, remedy: str = REMAKE) -> tuple[dict, list]:
    """(the arrays among ``names`` that an .npz file holds, all its keys); a missing or unreadable
    file (truncated, not an .npz) raises ValueError naming it, its ``kind`` and ``remedy``."""
    if not Path(path).is_file():
        raise ValueError(f"{kind} file {path} does not exist; check the path, or rerun the workflow, "
                         "which makes it")
    try:
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):  # an .npy file: one array
            raise ValueError(f"one {getattr(data, 'shape', '')} array (.npy), not an .npz archive")
        with data:
            keys = sorted(data.files)
            return {k: data[k] for k in names if k in keys}, keys
    except Exception as err:  # BadZipFile, EOFError, zlib.error, ValueError, OSError, …
        raise ValueError(f"{path} is unreadable ({numpy_error_text(err)}); {remedy}") from None


def load_images(path: str | os.PathLike) -> np.ndarray:
    """The uint8 N×H×W×C images of a dataset file written by :func:`prepare_dataset`."""
    arrays, keys = read_npz(path, ("images",), "dataset")
    images = arrays.get("images")
    if images is None or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3) \
            or not len(images):
        found = f"{images.dtype} {images.shape}" if images is not None else f"keys {keys}"
        raise ValueError(f"{path}: expected uint8 images N×H×W×C with C 1 or 3, found {found}; {REMAKE}")
    return images


def to_model_range(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 N×H×W×C → float N×C×H×W in [−1, 1], the range the networks model."""
    x = torch.as_tensor(images_uint8)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float N×C×H×W in [−1, 1] → uint8 N×H×W×C, rounding as image writers do."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
