"""MSCOCO captions (2014 or 2017, train or val) for text-conditioned models (issue 31, item 4): each
image of the split with one of its human captions, stored beside it (igsm/data/store.py's
``captions.json``).

Files: the split's images ``{split}{year}.zip`` (JPEGs ``{split}{year}/<file_name>``, the
``file_name`` that the annotations give: ``000000000139.jpg`` in 2017,
``COCO_val2014_000000000042.jpg`` in 2014) and ``annotations_trainval{year}.zip``, of which only
``annotations/captions_{split}{year}.json`` is read (its ``images``: id and file_name; its
``annotations``: id, image_id, caption; about five captions per image). Both are read straight from
the zips, never unpacked. By default they are downloaded from images.cocodataset.org into the
download cache and checked against the sha256s below; a ``file://`` URL is read where it lies
(checked too, when a digest applies).

Images are taken in sorted image-id order, so ``max_images: N`` keeps the N smallest ids; each is
converted to RGB (COCO holds some greyscale JPEGs) and preprocessed with ADM's
``center_crop_arr`` (igsm.data.lsun, as igsm.data.imagenet uses it) to ``image_size``.

Captions: ``caption: first`` takes the caption with the lowest annotation id; ``caption: random``
takes one drawn uniformly among the image's captions (in annotation-id order) by
``numpy.random.default_rng([caption_seed, image_id])``: each image its own generator, so an image's
caption does not depend on ``max_images`` or on which other images the split holds. Captions are
stored as published except for leading and trailing whitespace (some end in a space or a newline).
The store's index records the rule in ``captions_info`` (the seed only for ``random``: under
``first`` it picks nothing, so changing it does not change the dataset's identity).

Labels: COCO has no classes. Each image's label is its own index in the store, 0..N−1, which is also
the index of its caption in ``captions.json``: a caption-conditioning kind reads
``store.captions[label]``, so the labels that training already carries through its batches select
the texts.

Licence (cocodataset.org/#termsofuse): the annotations are CC BY 4.0; the COCO Consortium does not
own the images, whose use must abide by Flickr's terms of use (their owners' licences). Sizes:
train2017 118,287 images (19.3 GB zipped), val2017 5,000 (0.8 GB); train2014 82,783 (13.5 GB),
val2014 40,504 (6.6 GB); annotations_trainval 0.25 GB either year.
"""

from __future__ import annotations

import io
import json
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from igsm.data.common import DownloadError, download, fetch_cached, file_digest
from igsm.data.image_folder import CHUNK, convert_image, open_image
from igsm.data.lsun import center_crop_arr
from igsm.data.sources import check_hex_digest, check_max_images, check_split, check_url, register

YEARS = (2014, 2017)
SPLITS = ("train", "val")
CAPTION_RULES = ("first", "random")
# The archive each URL key names (its role: the key under 'sha256'), and the official URL's form.
URL_KEYS = {"images": "images_url", "annotations": "annotations_url"}
COCO_URLS = {
    "images": "http://images.cocodataset.org/zips/{split}{year}.zip",
    "annotations": "http://images.cocodataset.org/annotations/annotations_trainval{year}.zip",
}
# sha256 of the official archives, by file name: COCO publishes none itself. These are
# tensorflow_datasets' (github.com/tensorflow/datasets, tensorflow_datasets/url_checksums/coco.txt;
# coco2014.txt, coco2017.txt and coco_captions.txt there list the same values, with the sizes in the
# module docstring). The MD5s that torchvision for R (github.com/mlverse/torchvision,
# R/dataset-coco.R) and others list (val2017 442b8da7…, annotations 2017 f4bbac64…) are of the
# same files, but the download helpers check one digest and these are the stronger one.
COCO_SHA256 = {
    "train2014.zip": "ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775",
    "val2014.zip": "fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0",
    "train2017.zip": "69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929",
    "val2017.zip": "4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05",
    "annotations_trainval2014.zip": "031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009",
    "annotations_trainval2017.zip": "113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268",
}


def official_url(role: str, year: int, split: str) -> str:
    return COCO_URLS[role].format(split=split, year=year)


def archive_source(spec: dict, role: str) -> tuple[str, str | None]:
    """(URL, expected sha256 or None) of the ``role`` archive ('images' or 'annotations'): the
    config's URL or the official one; ``sha256.<role>`` if given, else the official digest for the
    official URL, else None (an overridden URL without its own digest is not checked)."""
    official = official_url(role, spec["year"], spec["split"])
    url = spec.get(URL_KEYS[role]) or official
    given = (spec.get("sha256") or {}).get(role)
    if given is not None:
        return url, given.lower()
    return url, (COCO_SHA256[official.rsplit("/", 1)[1]] if url == official else None)


def locate_archive(url: str, digest: str | None, cache_dir: Path, role: str) -> Path:
    """The archive at ``url`` as a local file: a ``file://`` one where it lies (no copy: train2017
    is 19 GB), an http(s) one downloaded into ``cache_dir`` (kept while its digest matches; without
    a digest fetched again, since nothing would tell a stale copy). Checked against ``digest``."""
    url_key, digest_key = URL_KEYS[role], f"sha256.{role}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "file":
        destination = Path(cache_dir) / (Path(urllib.request.url2pathname(parts.path)).name or f"{role}.zip")
        if digest is None:
            return download(url, destination, None, url_key=url_key)
        return fetch_cached(url, destination, digest, url_key=url_key, digest_key=digest_key)
    path = Path(urllib.request.url2pathname(parts.path))
    if not path.is_file():
        raise DownloadError(f"could not read {url}: {path} is not a file. Point the dataset's '{url_key}' "
                            f"at a copy of COCO's {role} archive (or leave it out for the official URL).")
    if digest is not None:
        actual = file_digest(path)
        if actual != digest:
            raise DownloadError(f"sha256 mismatch for {url}: expected {digest}, got {actual}. The file is "
                                f"corrupt or not the archive the config names; fix '{url_key}' or "
                                f"'{digest_key}'.")
    return path


def _open_zip(path: Path, url: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{path} (from {url}): not a readable zip archive ({err}); delete it and check the "
                         "URL and its sha256") from None


def read_captions(path: Path, year: int, split: str, url: str = "") -> list[tuple[int, str, list[str]]]:
    """[(image id, file name, captions in annotation-id order)] of ``captions_{split}{year}.json``
    in the annotations zip at ``path``, sorted by image id."""
    member = f"annotations/captions_{split}{year}.json"
    where = f"{path}" + (f" (from {url})" if url else "")
    with _open_zip(path, url) as archive:
        if member not in archive.namelist():
            raise ValueError(f"{where}: no {member}: not COCO's annotations_trainval{year}.zip (another year's, "
                             "or another archive)")
        try:
            data = json.loads(archive.read(member))
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:  # CRC errors, bad JSON
            raise ValueError(f"{where}: {member} is unreadable ({type(err).__name__}: {err})") from None
    where = f"{where}: {member}"
    try:
        files = {}
        for image in data["images"]:
            if image["id"] in files:
                raise ValueError(f"image id {image['id']} listed twice")
            files[int(image["id"])] = str(image["file_name"])
        captions = {image_id: [] for image_id in files}
        for annotation in data["annotations"]:
            if annotation["image_id"] not in captions:
                raise ValueError(f"annotation {annotation['id']} captions image {annotation['image_id']}, "
                                 "which 'images' does not list")
            captions[annotation["image_id"]].append((int(annotation["id"]), str(annotation["caption"]).strip()))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: not a COCO captions file ({type(err).__name__}: {err})") from None
    if not files:
        raise ValueError(f"{where}: lists no images")
    missing = [image_id for image_id, texts in captions.items() if not texts]
    if missing:
        raise ValueError(f"{where}: {len(missing)} image(s) without a caption (ids {missing[:5]}…): not a COCO "
                         "captions file")
    return [(image_id, files[image_id], [text for _, text in sorted(captions[image_id])])
            for image_id in sorted(files)]


def pick_caption(captions: list[str], rule: str, seed: int, image_id: int) -> str:
    """One of an image's captions (in annotation-id order) by ``rule`` (module docstring)."""
    if rule == "first":
        return captions[0]
    return captions[int(np.random.default_rng([seed, image_id]).integers(len(captions)))]


def iter_mscoco(images_zip: str | Path, annotations_zip: str | Path, year: int, split: str, image_size: int,
                caption: str = "first", caption_seed: int = 0, max_images: int | None = None,
                chunk: int = CHUNK, urls: tuple[str, str] = ("", "")
                ) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """Chunks (uint8 n×S×S×3 images, int64 labels = store positions, n captions) of the split, in
    image-id order; ``urls``: where the two zips came from, for the errors."""
    images_zip, annotations_zip = Path(images_zip), Path(annotations_zip)
    listed = read_captions(annotations_zip, year, split, urls[1])
    if max_images is not None:
        listed = listed[:max_images]
    where = f"{images_zip}" + (f" (from {urls[0]})" if urls[0] else "")
    with _open_zip(images_zip, urls[0]) as archive:
        # By base name, so a copy zipped under another top folder reads the same; macOS's
        # resource forks (__MACOSX/._name) are not images.
        members = {Path(name).name: name for name in archive.namelist()
                   if not name.endswith("/") and not name.startswith("__MACOSX/")}
        batch, labels, texts = [], [], []
        for label, (image_id, file_name, captions) in enumerate(listed):
            if file_name not in members:
                raise ValueError(f"{where}: no image {file_name} (image id {image_id} of {annotations_zip}): the "
                                 f"two archives are not the same year and split ({split}{year})")
            name = f"{images_zip}:{members[file_name]}"
            try:
                data = archive.read(members[file_name])
            except (zipfile.BadZipFile, OSError, EOFError) as err:  # a CRC error, a truncated zip
                raise ValueError(f"{name}: unreadable ({type(err).__name__}: {err}); delete the archive and "
                                 "download it again") from None
            img = convert_image(open_image(io.BytesIO(data), name), 3, Path(name))
            batch.append(center_crop_arr(img, image_size))
            labels.append(label)
            texts.append(pick_caption(captions, caption, caption_seed, image_id))
            if len(batch) == chunk:
                yield np.stack(batch), np.asarray(labels, dtype=np.int64), texts
                batch, labels, texts = [], [], []
        if batch:
            yield np.stack(batch), np.asarray(labels, dtype=np.int64), texts


def check(spec: dict, fail) -> None:
    if spec.get("year") not in YEARS:
        fail("year", f"{spec.get('year')!r}: COCO's caption releases are {list(YEARS)}")
    check_split(spec, fail, SPLITS)
    if spec.get("caption") not in CAPTION_RULES:
        fail("caption", f"{spec.get('caption')!r}: one of {list(CAPTION_RULES)} (the lowest annotation id, or "
                        "one drawn with caption_seed)")
    seed = spec.get("caption_seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        fail("caption_seed", f"{seed!r}: a non-negative integer")
    if spec.get("url"):
        fail("url", "mscoco reads two archives: set 'images_url' and/or 'annotations_url' instead")
    if spec.get("channels", 3) != 3:
        fail("channels", f"{spec['channels']!r}: mscoco's images are RGB (3)")
    for key in URL_KEYS.values():
        check_url(spec, fail, key=key)
    check_max_images(spec, fail)
    sha256 = spec.get("sha256")
    if sha256 is None:
        return
    if not isinstance(sha256, dict):
        fail("sha256", f"mscoco takes an object {{images: <sha256>, annotations: <sha256>}}, not "
                       f"{type(sha256).__name__}")
    unknown = sorted(set(sha256) - set(URL_KEYS))
    if unknown:
        fail("sha256", f"unknown archive(s) {unknown}; mscoco's are {sorted(URL_KEYS)}")
    for role, digest in sha256.items():
        check_hex_digest(digest, 64, f"sha256.{role}", fail)


def prepare(spec: dict, cache_dir: Path) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """Chunks (images, labels 0..N−1, captions) of the configured year and split."""
    sources = {role: archive_source(spec, role) for role in URL_KEYS}
    # The annotations first: 0.25 GB against up to 19 GB of images, and they say what to read.
    annotations = locate_archive(*sources["annotations"], Path(cache_dir), "annotations")
    images = locate_archive(*sources["images"], Path(cache_dir), "images")
    yield from iter_mscoco(images, annotations, spec["year"], spec["split"], spec["image_size"], spec["caption"],
                           spec["caption_seed"], spec.get("max_images"),
                           urls=(sources["images"][0], sources["annotations"][0]))


def store_record(spec: dict) -> dict:
    """What the store's index records of how its captions were picked."""
    return {"captions_info": {
        "source": "mscoco", "file": f"annotations/captions_{spec['split']}{spec['year']}.json",
        "rule": spec["caption"], "seed": spec["caption_seed"] if spec["caption"] == "random" else None,
    }}


register("mscoco", check, prepare, store_record, captioned=True)
