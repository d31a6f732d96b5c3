"""Training images: download, check, parse, and store as one uint8 array (N×H×W×C).

Sources:
* ``cifar10``: the official python-pickle archive (paper Sec. 5.1), fetched from a URL with a
  sha256 check; the URL is a config key so that a mirror or a local ``file://`` copy can serve.
* ``sklearn-digits``: scikit-learn's 8×8 digits (1,797 real images shipped inside its wheel),
  upsampled: the embedded offline demo.
* ``image-folder``: a user's own images (any PIL-readable files), resized to ``image_size``.

Every dataset ends up as ``{"images": uint8 N×H×W×C, "labels": int64 N}`` in an ``.npz`` file:
training, pruning, and FID reference statistics all read that one file.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

SOURCES = ("cifar10", "sklearn-digits", "image-folder")
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


def parse_cifar10(archive: str | os.PathLike, split: str = "train") -> dict:
    """Images and labels from the official ``cifar-10-python.tar.gz`` (any number of images)."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    with tarfile.open(archive, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for name in names:
            if name not in members:
                raise ValueError(f"{archive}: no {name} inside: not a CIFAR-10 python archive")
            batch = pickle.load(tar.extractfile(members[name]), encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return {"images": np.ascontiguousarray(np.concatenate(images)), "labels": np.concatenate(labels)}


def load_sklearn_digits(image_size: int) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 intensities, dark digits on white in sklearn's convention are bright-on-dark here.
    small = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)
    big = torch.nn.functional.interpolate(small, size=image_size, mode="bilinear", align_corners=False)
    images = (big.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return {"images": np.ascontiguousarray(images), "labels": digits.target.astype(np.int64)}


def load_image_folder(folder: str | os.PathLike, image_size: int, channels: int) -> dict:
    from PIL import Image

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no images found (looked for {sorted(IMAGE_SUFFIXES)})")
    mode = {1: "L", 3: "RGB"}[channels]
    images = []
    for path in files:
        with Image.open(path) as img:
            img = img.convert(mode).resize((image_size, image_size), Image.BICUBIC)
            images.append(np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels))
    return {"images": np.stack(images), "labels": np.zeros(len(images), dtype=np.int64)}


def prepare_dataset(spec: dict, out_path: str | os.PathLike, cache_dir: str | os.PathLike) -> dict:
    """Build the dataset described by a config ``datasets.<name>`` entry and save it as .npz."""
    source = spec["source"]
    if source == "cifar10":
        archive = Path(cache_dir) / "cifar-10-python.tar.gz"
        if not archive.exists() or file_digest(archive) != spec["sha256"].lower():
            download(spec["url"], archive, spec["sha256"])
        data = parse_cifar10(archive, spec.get("split", "train"))
    elif source == "sklearn-digits":
        data = load_sklearn_digits(spec["image_size"])
    elif source == "image-folder":
        data = load_image_folder(spec["path"], spec["image_size"], spec["channels"])
    else:
        raise ValueError(f"unknown dataset source {source!r}; choose one of {SOURCES}")
    save_arrays(out_path, **data)
    return data


def save_arrays(path: str | os.PathLike, **arrays) -> None:
    """np.savez written to a temporary name first, so a crash leaves no complete-looking file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
        np.savez(tmp, **arrays)
    os.replace(tmp.name, path)


def load_images(path: str | os.PathLike) -> np.ndarray:
    with np.load(path) as data:
        return data["images"]


def to_model_range(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 N×H×W×C → float N×C×H×W in [−1, 1], the range the networks model."""
    x = torch.as_tensor(images_uint8)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float N×C×H×W in [−1, 1] → uint8 N×H×W×C, rounding as image writers do."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
