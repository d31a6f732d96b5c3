"""LSUN scenes (church_outdoor, bedroom, …) for the DDPM U-Nets at 256 px (``google/ddpm-church-256``,
``google/ddpm-bedroom-256``; reference NOTES §3), read from the official LMDB exports.

The official export of a category and split is ``<category>_<split>_lmdb.zip`` under
http://dl.yf.io/lsun/scenes/: one LMDB (``<category>_<split>_lmdb/data.mdb``) whose values are
encoded images (webp, some JPEG; short side 256) keyed by image id. Its values are read in key
order (LMDB's byte order of the keys), so the first ``max_images`` are always the same images.

Preprocessing: the short side resized to ``image_size`` and the centre cropped to a square, as
guided-diffusion's ``center_crop_arr`` (``guided_diffusion/image_datasets.py``) does: halve the
image with PIL's BOX filter while its short side is ≥ 2·``image_size``, resize with BICUBIC so that
the short side is exactly ``image_size`` (the long side rounded), then crop at offset
⌊(side − image_size)/2⌋. At ``image_size`` 256 the official images' short side is already 256, so
no filter runs: the long side is centre-cropped and the pixels are LSUN's own. The anchors:

* DDPM (Ho et al. 2020) trains its LSUN models on 256×256 centre crops (its TF pipeline; the
  diffusers ports ``google/ddpm-*-256`` are those weights).
* guided-diffusion's LSUN export (``datasets/lsun_bedroom.py``) resizes the short side in one
  step with BOX and centre-crops; its training loader (``center_crop_arr``) is the recipe above.
  The two agree at 256, where neither resizes.
* Diff-Pruning (``ddpm_exp``, DDIM's loader) applies torchvision ``Resize(256)`` (bilinear) and
  ``CenterCrop(256)``; at 256 that too leaves the official images unresized.

Bedroom's train split is ≈3M images (≈43 GB zipped): :func:`prepare` is a generator of chunks,
so the images stream into the dataset store and are never all in memory. A ``file://`` folder that
holds the unpacked ``<category>_<split>_lmdb/`` is read in place (unless ``sha256`` names the zip,
which is then checked and used); a zip is unpacked (streamed) into the download cache, a
``file://`` zip read where it lies, not copied, a downloaded one deleted once unpacked.
"""

from __future__ import annotations

import io
import json
import shutil
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from igsm.data.common import DownloadError, WriteError, copy_to_file, download, file_digest
from igsm.data.sources import check_hex_digest, check_max_images, check_split, check_url, register

LSUN_URL = "http://dl.yf.io/lsun/scenes/"
LSUN_CATEGORIES = ("bedroom", "bridge", "church_outdoor", "classroom", "conference_room", "dining_room",
                   "kitchen", "living_room", "restaurant", "tower")
LSUN_SPLITS = ("train", "val")
CHUNK = 1024  # images per chunk that prepare yields (1024 × 256² × 3 bytes = 192 MiB)
STAMP = "igsm-source.json"  # in an unpacked cache folder: which archive it came from


def lmdb_name(spec: dict) -> str:
    return f"{spec['category']}_{spec['split']}_lmdb"


def center_crop_arr(img, image_size: int) -> np.ndarray:
    """guided-diffusion's ``center_crop_arr``: BOX halving, BICUBIC to the short side, centre crop."""
    from PIL import Image

    while min(img.size) >= 2 * image_size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = image_size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def read_lmdb(path: str | Path, image_size: int, max_images: int | None = None,
              chunk: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks (uint8 n×S×S×3 images, int64 zero labels; ``chunk`` images each, default
    ``CHUNK``) of an LSUN LMDB folder, in key order.

    A value that is not a readable image raises ValueError naming its key and the LMDB; so does a
    truncated ``data.mdb`` (shorter than the pages its header says are in use), which lmdb, reading
    through a memory map, would otherwise meet as a SIGBUS that kills the job without a word.
    """
    import lmdb
    from PIL import Image

    path, chunk = Path(path), chunk or CHUNK
    if not (path / "data.mdb").is_file():
        raise ValueError(f"{path}: no data.mdb: not an LMDB folder (an unpacked <category>_<split>_lmdb/)")
    if (path / "data.mdb").stat().st_size == 0:
        raise ValueError(f"{path / 'data.mdb'} is empty; delete it and unpack or download it again")
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False)
        # The meta pages at the file's start name the last page in use.
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    except lmdb.Error as err:
        raise ValueError(f"{path}: not a readable LMDB ({type(err).__name__}: {err}); delete it and "
                         "check 'url'") from None
    size = (path / "data.mdb").stat().st_size
    if size < needed:
        env.close()
        raise ValueError(f"{path / 'data.mdb'} is truncated: {size:,} bytes, its header says the database "
                         f"fills {needed:,} (an interrupted copy or unpack, or a full disk); delete it and "
                         "unpack or download it again")
    limit = max_images if max_images is not None else float("inf")
    count = 0
    try:
        with env.begin(write=False, buffers=False) as txn:
            images = np.empty((chunk, image_size, image_size, 3), dtype=np.uint8)
            filled = 0
            for key, value in txn.cursor():
                if count >= limit:
                    break
                try:
                    with Image.open(io.BytesIO(value)) as img:
                        img = img.convert("RGB")
                except Exception as err:  # truncated data, unknown format, not an image
                    raise ValueError(f"{path}: key {key.decode(errors='backslashreplace')!r}: not a readable "
                                     f"image ({type(err).__name__}: {err})") from None
                images[filled] = center_crop_arr(img, image_size)
                filled += 1
                count += 1
                if filled == chunk:
                    yield images, np.zeros(filled, dtype=np.int64)
                    images = np.empty_like(images)  # the consumer may keep the last chunk
                    filled = 0
            if filled:
                yield images[:filled], np.zeros(filled, dtype=np.int64)
    except lmdb.Error as err:
        raise ValueError(f"{path}: LMDB read failed after {count} images ({type(err).__name__}: {err}); "
                         "the database is damaged: delete it and unpack or download it again") from None
    finally:
        env.close()
    if count == 0:
        raise ValueError(f"{path}: the LMDB holds no images")


def _local_folder(url: str) -> Path | None:
    parts = urllib.parse.urlsplit(url)
    return Path(urllib.request.url2pathname(parts.path)) if parts.scheme == "file" else None


def _unpack(archive: Path, name: str, target: Path, stamp: dict) -> None:
    """Stream ``<name>/data.mdb`` of the zip into ``target`` (complete, with its stamp, or absent)."""
    partial = target.with_name(target.name + ".part")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir() and Path(m.filename).name == "data.mdb"]
            if len(members) != 1:
                raise ValueError(f"{archive}: {len(members)} data.mdb members, expected one "
                                 f"({name}/data.mdb): not an LSUN LMDB export")
            partial.mkdir(parents=True)
            with zf.open(members[0]) as src:
                copy_to_file(src, partial / "data.mdb", block_size=1 << 24)
    except WriteError:  # a full disk, not a bad archive
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise ValueError(f"{archive}: not a readable zip archive ({type(err).__name__}: {err}); delete it "
                         "and check 'url' and 'sha256'") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    (partial / STAMP).write_text(json.dumps(stamp, sort_keys=True))
    shutil.rmtree(target, ignore_errors=True)
    partial.replace(target)


def _stamp_matches(target: Path, stamp: dict) -> bool:
    try:
        return (target / "data.mdb").is_file() and json.loads((target / STAMP).read_text()) == stamp
    except (OSError, ValueError):
        return False


def locate_lmdb(spec: dict, cache_dir: Path) -> Path:
    """The LMDB folder to read: the unpacked one a file:// ``url`` holds, else the zip unpacked
    into ``cache_dir`` (downloaded there first for http(s))."""
    name = lmdb_name(spec)
    zip_name = f"{name}.zip"
    digest = (spec.get("sha256") or {}).get(zip_name)
    folder_url = (spec.get("url") or LSUN_URL).rstrip("/") + "/"
    local = _local_folder(folder_url)
    target = Path(cache_dir) / name
    if local is not None:
        archive = local / zip_name
        if (local / name / "data.mdb").is_file() and digest is None:
            return local / name  # read in place: no copy, no check (LSUN publishes no digests)
        if not archive.is_file():
            if digest is not None and (local / name / "data.mdb").is_file():
                raise DownloadError(f"{folder_url}: holds the unpacked {name}/ but not {zip_name}, which "
                                    f"sha256.{zip_name} is the digest of; remove that sha256 entry to read "
                                    "the folder unchecked, or put the zip there")
            raise DownloadError(f"{folder_url}: holds neither {name}/data.mdb nor {zip_name}; download "
                                f"{LSUN_URL}{zip_name} there (or point 'url' at the folder that holds it)")
        info = archive.stat()
        stamp = {"archive": str(archive), "size": info.st_size, "mtime_ns": info.st_mtime_ns, "sha256": digest}
        if _stamp_matches(target, stamp):
            return target
        if digest is not None:
            actual = file_digest(archive)
            if actual != digest.lower():
                raise DownloadError(f"sha256 mismatch for {archive}: expected {digest}, got {actual}. The "
                                    f"file is corrupt or not {zip_name}; fix 'url' or 'sha256'.")
        _unpack(archive, name, target, stamp)
        return target
    stamp = {"archive": folder_url + zip_name, "sha256": digest}
    if _stamp_matches(target, stamp):
        return target
    archive = download(folder_url + zip_name, Path(cache_dir) / zip_name, digest)
    _unpack(archive, name, target, stamp)
    archive.unlink()  # the unpacked LMDB is as large: keep one copy
    return target


def check(spec: dict, fail) -> None:
    check_split(spec, fail, LSUN_SPLITS)
    category = spec.get("category")
    if category is None:
        fail("category", f"required for lsun: one of {list(LSUN_CATEGORIES)}")
    if category not in LSUN_CATEGORIES:
        fail("category", f"{category!r} is not an LSUN scene category; choose one of {list(LSUN_CATEGORIES)}")
    check_url(spec, fail)
    check_max_images(spec, fail)
    sha256 = spec.get("sha256")
    if sha256 is None:
        return
    zip_name = f"{lmdb_name(spec)}.zip"
    if not isinstance(sha256, dict):
        fail("sha256", f"lsun takes an object {{{zip_name}: <sha256>}}, not {type(sha256).__name__}")
    unknown = sorted(set(sha256) - {zip_name})
    if unknown:
        fail("sha256", f"unknown file name(s) {unknown}; this category and split's archive is {zip_name}")
    for name, digest in sha256.items():
        check_hex_digest(digest, 64, f"sha256.{name}", fail)


def prepare(spec: dict, cache_dir: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks (images uint8 n×S×S×3, labels int64 n, all 0) of the category and split."""
    path = locate_lmdb(spec, Path(cache_dir))
    yield from read_lmdb(path, spec["image_size"], spec.get("max_images"))


register("lsun", check, prepare)
