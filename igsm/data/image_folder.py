"""A user's own images: every PIL-readable file under a folder, converted to the configured channels
(each PIL mode by a stated rule: see ``load_image_folder``) and resized to ``image_size``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from igsm.data.sources import register

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


CHUNK = 1024  # images per chunk streamed into the store


def load_image_folder(folder: str | os.PathLike, image_size: int, channels: int) -> dict:
    """Every image under ``folder`` in memory (see :func:`iter_image_folder`)."""
    chunks = list(iter_image_folder(folder, image_size, channels))
    return {"images": np.concatenate([c[0] for c in chunks]), "labels": np.concatenate([c[1] for c in chunks])}


def iter_image_folder(folder: str | os.PathLike, image_size: int, channels: int,
                      chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every image under ``folder`` (recursively, by suffix, in sorted path order), converted to
    ``channels`` and resized, in chunks of ``chunk`` images (uint8 n×H×W×C, labels 0).

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
    for start in range(0, len(files), chunk):
        images = []
        for path in files[start: start + chunk]:
            img = open_image(path)
            img = convert_image(img, channels, path).resize((image_size, image_size), Image.BICUBIC)
            images.append(np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels))
        yield np.stack(images), np.zeros(len(images), dtype=np.int64)


def open_image(source, name=None):
    """The decoded PIL image in ``source`` (a path or a binary file object; ``name`` says where it
    is, default the path), or a ValueError naming it."""
    from PIL import Image

    try:
        with Image.open(source) as img:
            img.load()
            return img
    except Exception as err:  # UnidentifiedImageError, truncated data, decompression bombs, ...
        raise ValueError(f"{name or source}: not a readable image ({type(err).__name__}: {err}). Replace "
                         "the file or remove it from the image folder") from None


def convert_image(img, channels: int, path: Path):
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



def check(spec: dict, fail) -> None:
    path = spec.get("path") or ""
    if not path:
        fail("path", "source image-folder needs 'path', the folder of images")
    if not Path(path).is_dir():
        fail("path", f"{path} is not a folder")


def prepare(spec: dict, cache_dir: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    yield from iter_image_folder(spec["path"], spec["image_size"], spec["channels"])


register("image-folder", check, prepare)
