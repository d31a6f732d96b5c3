"""ImageNet (ILSVRC2012 train) for the class-conditional latent models of the later IGSM paper and
DiT (issue 31, item 4). It cannot be downloaded without a licence: ``path`` points to the user's copy,
in either official layout:

* the class-folder tree that unpacking gives, ``<path>/<wnid>/<wnid>_<n>.JPEG`` (1,000 folders); or
* ``ILSVRC2012_img_train.tar`` itself, a tar of 1,000 per-class tars ``<wnid>.tar``, read in place
  (no unpacked copy: ≈140 GB).

Labels are each class's index among the sorted WordNet ids found (n01440764 → 0 for the full set), as
guided-diffusion's ``image_datasets.py`` and DiT's ``ImageFolder`` number them; images are taken in
sorted (class, file name) order, so ``max_images`` keeps the first classes whole. Preprocessing is
ADM's ``center_crop_arr`` (igsm.data.lsun): BOX halving while the short side is ≥ 2·``image_size``,
BICUBIC to the short side, centre crop; DiT trains on it at 256 (``image_size: 256``). Images are
streamed in chunks into the dataset store, never all in memory.
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from igsm.data.image_folder import CHUNK, IMAGE_SUFFIXES, convert_image, open_image
from igsm.data.lsun import center_crop_arr
from igsm.data.sources import check_max_images, register

WNID = re.compile(r"n\d{8}")  # a WordNet id: the name of an ImageNet class folder or tar


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _folder_classes(root: Path) -> list[tuple[str, list]]:
    """[(wnid, sorted image paths)] of a class-folder tree."""
    classes = sorted(p for p in root.iterdir() if p.is_dir() and WNID.fullmatch(p.name))
    return [(c.name, sorted(p for p in c.iterdir() if p.is_file() and _is_image(p.name))) for c in classes]


def _read_folder(root: Path) -> Iterator[tuple[int, Path, object]]:
    """(label index, file, PIL image) of every image of a class-folder tree, in sorted order."""
    for label, (wnid, files) in enumerate(_folder_classes(root)):
        if not files:
            raise ValueError(f"{root / wnid}: a class folder without images")
        for path in files:
            yield label, path, open_image(path)


def _read_tar(archive: Path) -> Iterator[tuple[int, str, object]]:
    """(label index, member name, PIL image) of every image of ILSVRC2012_img_train.tar (a tar of
    per-class tars), in sorted order, read in place."""
    try:
        outer = tarfile.open(archive, "r:")
    except (tarfile.TarError, OSError) as err:
        raise ValueError(f"{archive}: not a readable tar ({err})") from None
    with outer:
        try:
            members = {Path(m.name).stem: m for m in outer.getmembers()
                       if m.isfile() and m.name.endswith(".tar") and WNID.fullmatch(Path(m.name).stem)}
        except (tarfile.TarError, OSError) as err:
            raise ValueError(f"{archive}: not a readable tar ({err})") from None
        if not members:
            raise ValueError(f"{archive}: holds no per-class tars <wnid>.tar (the layout of ILSVRC2012_img_train.tar)")
        for label, wnid in enumerate(sorted(members)):
            where = f"{archive}:{members[wnid].name}"
            try:
                inner = tarfile.open(fileobj=outer.extractfile(members[wnid]), mode="r:")
            except tarfile.TarError as err:
                raise ValueError(f"{where}: not a readable tar ({err})") from None
            with inner:
                files = sorted((m for m in inner.getmembers() if m.isfile() and _is_image(m.name)),
                               key=lambda m: m.name)
                if not files:
                    raise ValueError(f"{where}: a class tar without images")
                for member in files:
                    name = f"{where}/{member.name}"
                    yield label, name, open_image(io.BytesIO(inner.extractfile(member).read()), name)


def iter_imagenet(path: str | Path, image_size: int, channels: int = 3, max_images: int | None = None,
                  chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks (uint8 n×S×S×C images, int64 class labels) of an ImageNet train copy at ``path`` (a
    class-folder tree or ILSVRC2012_img_train.tar), ADM's centre crop to ``image_size``."""
    path = Path(path)
    if path.is_dir():
        if not _folder_classes(path):
            raise ValueError(f"{path}: no class folders <wnid>/ (e.g. n01440764/) in it")
        images = _read_folder(path)
    elif path.is_file():
        images = _read_tar(path)
    else:
        raise ValueError(f"{path}: neither a folder nor a file")
    batch, labels = [], []
    for count, (label, name, img) in enumerate(images):
        if max_images is not None and count >= max_images:
            break
        img = convert_image(img, channels, Path(str(name)))
        batch.append(center_crop_arr(img, image_size).reshape(image_size, image_size, channels))
        labels.append(label)
        if len(batch) == chunk:
            yield np.stack(batch), np.asarray(labels, dtype=np.int64)
            batch, labels = [], []
    if batch:
        yield np.stack(batch), np.asarray(labels, dtype=np.int64)


def check(spec: dict, fail) -> None:
    path = spec.get("path") or ""
    if not path:
        fail("path", "imagenet needs 'path': your copy of ILSVRC2012 train (the class-folder tree or "
                     "ILSVRC2012_img_train.tar; ImageNet is not downloadable without a licence)")
    if not Path(path).exists():
        fail("path", f"{path} does not exist")
    if spec.get("channels", 3) not in (1, 3):
        fail("channels", f"{spec['channels']!r}: 3 (RGB) or 1 (greyscale)")
    check_max_images(spec, fail)


def prepare(spec: dict, cache_dir: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    yield from iter_imagenet(spec["path"], spec["image_size"], spec.get("channels", 3), spec.get("max_images"))


register("imagenet", check, prepare)
