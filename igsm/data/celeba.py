"""CelebA 64 as DDIM, U-ViT and Diff-Pruning prepare it (paper Table 2, reference NOTES §3): the
aligned images of ``img_align_celeba.zip`` (178×218 JPEGs) and the split of
``list_eval_partition.txt`` (0 train: 162,770 images, 1 valid, 2 test), both checked against the
MD5s CelebA publishes (torchvision's ``datasets/celeba.py`` lists the same), each image cropped to
128×128 at top 57, left 25 (centre (89, 121)) and resized to ``image_size`` with PIL's bilinear
filter (what their ``transforms.Resize`` does to a PIL image).

CelebA is distributed through Google Drive and Baidu, which need a browser: ``url`` is the folder
(``file://`` or http(s)) where the user put the two files.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from igsm.data.common import fetch_cached
from igsm.data.sources import check_hex_digest, check_split, check_url, register

CELEBA_MD5 = {
    "img_align_celeba.zip": "00d2c5bc6d35e252742224ab0c1e8fcb",
    "list_eval_partition.txt": "d32c9cbf5e040fd4025c592c306e6668",
}
CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}
ALIGNED_SIZE = (178, 218)  # width, height of every aligned image
CROP_BOX = (25, 57, 153, 185)  # left, top, right, bottom: 128×128 around (89, 121)
WHERE_TO_GET = ("download img_align_celeba.zip and list_eval_partition.txt from "
                "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Google Drive: 'Align&Cropped "
                "Images' and 'Eval') into one folder and set url: file:///that/folder/")


def read_partition(path: str | Path, split: str) -> list[str]:
    """The image file names of ``split``, in the file's order; a malformed line is a ValueError."""
    wanted, names = CELEBA_SPLITS[split], []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise ValueError(f"{path}, line {number}: {line!r} is not '<image>.jpg <0|1|2>': not "
                             f"CelebA's list_eval_partition.txt")
        if int(fields[1]) == wanted:
            names.append(fields[0])
    if not names:
        raise ValueError(f"{path}: no image of split {split!r} (partition {wanted})")
    return names


def load_celeba(zip_path: str | Path, partition_path: str | Path, split: str, image_size: int) -> dict:
    """The split's images in memory (see :func:`iter_celeba`)."""
    chunks = list(iter_celeba(zip_path, partition_path, split, image_size))
    return {"images": np.concatenate([c[0] for c in chunks]), "labels": np.concatenate([c[1] for c in chunks])}


def iter_celeba(zip_path: str | Path, partition_path: str | Path, split: str, image_size: int,
                chunk: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The split's images, cropped and resized (module docstring), in chunks of ``chunk`` images;
    labels are all 0."""
    from PIL import Image

    names = read_partition(partition_path, split)
    images = np.empty((min(chunk, len(names)), image_size, image_size, 3), dtype=np.uint8)
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{zip_path}: not a readable zip archive ({err}); delete it and check 'url' "
                         "and 'md5'") from None
    with archive:
        members = {Path(info.filename).name: info.filename for info in archive.infolist() if not info.is_dir()}
        for row, name in enumerate(tqdm(names, desc=f"CelebA {split}", mininterval=5.0)):
            if name not in members:
                raise ValueError(f"{zip_path}: no image {name} (listed in {partition_path}): the two "
                                 "files are not the same release of CelebA")
            where = f"{zip_path}: member {members[name]}"
            try:
                with Image.open(io.BytesIO(archive.read(members[name]))) as img:
                    img = img.convert("RGB")
            except Exception as err:  # truncated data, CRC errors, not an image
                raise ValueError(f"{where}: not a readable image ({type(err).__name__}: {err})") from None
            if img.size != ALIGNED_SIZE:
                raise ValueError(f"{where}: {img.size[0]}×{img.size[1]} pixels, expected the aligned "
                                 f"images' {ALIGNED_SIZE[0]}×{ALIGNED_SIZE[1]}: not img_align_celeba")
            crop = img.crop(CROP_BOX)
            if image_size != crop.size[0]:
                crop = crop.resize((image_size, image_size), Image.BILINEAR)
            images[row % chunk] = np.asarray(crop, dtype=np.uint8)
            filled = row % chunk + 1
            if filled == chunk or row == len(names) - 1:
                yield images[:filled].copy(), np.zeros(filled, dtype=np.int64)


def check(spec: dict, fail) -> None:
    check_split(spec, fail, tuple(CELEBA_SPLITS))
    check_url(spec, fail, required=WHERE_TO_GET)
    md5 = spec.get("md5")
    if md5 is None:
        return
    unknown = sorted(set(md5) - set(CELEBA_MD5))
    if unknown:
        fail("md5", f"unknown file name(s) {unknown}; CelebA's are {sorted(CELEBA_MD5)}")
    for name, digest in md5.items():
        check_hex_digest(digest, 32, f"md5.{name}", fail)


def prepare(spec: dict, cache_dir: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    folder = spec["url"].rstrip("/") + "/"
    digests = {**CELEBA_MD5, **(spec.get("md5") or {})}
    archive, partition = (fetch_cached(folder + name, cache_dir / name, digests[name], "md5")
                          for name in ("img_align_celeba.zip", "list_eval_partition.txt"))
    yield from iter_celeba(archive, partition, spec["split"], spec["image_size"])


register("celeba", check, prepare)
