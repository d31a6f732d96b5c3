"""The MSCOCO source (igsm/data/mscoco.py; issue 31, item 4) on a tiny COCO in the official layout:
``val2017.zip`` holding ``val2017/<12-digit id>.jpg`` JPEGs (one greyscale) and
``annotations_trainval2017.zip`` holding ``annotations/captions_val2017.json``, read through file://
and http:// URLs, written into an image store with one caption per image."""

import functools
import http.server
import io
import json
import threading
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import igsm.data.mscoco as mscoco
from igsm.data import DownloadError, check_dataset_spec, file_digest, iter_mscoco, prepare_dataset
from igsm.data.lsun import center_crop_arr
from igsm.schema import dataset_defaults

SIZE = 16
# image id → (width, height, greyscale): listed and zipped out of id order. Short sides of SIZE (no
# resize: the expected pixels are a plain slice, at odd and even offsets) but one, which ADM's crop
# halves and resizes.
IMAGES = {
    632: (24, 16, False),
    139: (16, 21, False),
    776: (40, 36, False),
    285: (30, 16, True),
    724: (16, 16, False),
}
ORDER = sorted(IMAGES)
# image id → [(annotation id, caption)], in the file's order: the lowest id is never listed first.
CAPTIONS = {
    image_id: [(image_id * 10 + k, f"image {image_id} caption {k}") for k in (3, 1, 4, 2, 5)]
    for image_id in IMAGES
}
CAPTIONS[724] = [(7300, "only caption of 724 \n")]  # one caption; trailing whitespace is stripped


def picture(seed, width, height):
    """Smooth ramps plus noise: an offset or a swapped axis changes the pixels visibly."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / (width - 1), y * 255 / (height - 1), (x + y) % 16 * 16], -1)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


def jpeg(image_id):
    width, height, grey = IMAGES[image_id]
    img = Image.fromarray(picture(image_id, width, height))
    buffer = io.BytesIO()
    (img.convert("L") if grey else img).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def expected_pixels(image_id):
    """What the store must hold: the decoded JPEG as RGB, centre-cropped to SIZE (a plain slice
    where the short side is SIZE already)."""
    decoded = Image.open(io.BytesIO(jpeg(image_id)))
    assert decoded.mode == ("L" if IMAGES[image_id][2] else "RGB")
    rgb = decoded.convert("RGB")
    if min(rgb.size) != SIZE:
        return center_crop_arr(rgb, SIZE)
    arr = np.asarray(rgb)
    top, left = (arr.shape[0] - SIZE) // 2, (arr.shape[1] - SIZE) // 2
    return arr[top:top + SIZE, left:left + SIZE]


def write_coco(folder, year=2017, split="val"):
    folder.mkdir(parents=True, exist_ok=True)
    images = folder / f"{split}{year}.zip"
    with zipfile.ZipFile(images, "w") as archive:
        archive.writestr(f"{split}{year}/", b"")
        for image_id in reversed(list(IMAGES)):
            archive.writestr(f"{split}{year}/{image_id:012d}.jpg", jpeg(image_id))
        archive.writestr(f"{split}{year}/000000999999.jpg", jpeg(139))  # not annotated: not read
    listing = {
        "info": {"year": year}, "licenses": [],
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h} for i, (w, h, _) in IMAGES.items()],
        "annotations": [{"id": a, "image_id": i, "caption": text}
                        for k in range(5) for i, texts in CAPTIONS.items() for a, text in texts[k:k + 1]],
    }
    annotations = folder / f"annotations_trainval{year}.zip"
    with zipfile.ZipFile(annotations, "w") as archive:
        archive.writestr(f"annotations/instances_{split}{year}.json", "{}")  # another file: not read
        archive.writestr(f"annotations/captions_{split}{year}.json", json.dumps(listing))
    return SimpleNamespace(images=images, annotations=annotations)


@pytest.fixture
def coco(tmp_path):
    return write_coco(tmp_path / "coco")


def spec_for(coco, **over):
    return {"source": "mscoco", "images_url": coco.images.as_uri(), "annotations_url": coco.annotations.as_uri(),
            "sha256": {"images": file_digest(coco.images), "annotations": file_digest(coco.annotations)},
            "image_size": SIZE, **over}


def first_caption(image_id):
    return min(CAPTIONS[image_id])[1].strip()


def test_images_in_id_order_centre_cropped_rgb_with_their_first_captions(coco, tmp_path):
    # Bugs caught: images in zip or listing order instead of by id, a greyscale JPEG stored with one
    # channel (or refused), the crop offset off by one or from the wrong side, labels not the store
    # positions, the caption listed first taken instead of the lowest annotation id, whitespace kept.
    store = prepare_dataset(spec_for(coco), tmp_path / "store", tmp_path / "cache")
    assert store.shape == (len(IMAGES), SIZE, SIZE, 3)
    for k, image_id in enumerate(ORDER):
        np.testing.assert_array_equal(store[k], expected_pixels(image_id), err_msg=str(image_id))
    grey = store[ORDER.index(285)].astype(int)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert store.labels.tolist() == list(range(len(IMAGES)))
    assert [store.captions[label] for label in store.labels] == [first_caption(i) for i in ORDER]
    assert store.captions[ORDER.index(139)] == "image 139 caption 1"
    assert store.captions[ORDER.index(724)] == "only caption of 724"
    assert store.captions_info == {"source": "mscoco", "file": "annotations/captions_val2017.json",
                                   "rule": "first", "seed": None}
    assert not list((tmp_path / "cache").glob("*.zip"))  # file:// zips are read where they lie


def test_chunks_continue_the_labels_and_max_images_keeps_the_smallest_ids(coco):
    # Bug caught: labels restarting at 0 in each chunk (they index the captions of the whole store).
    chunks = list(iter_mscoco(coco.images, coco.annotations, 2017, "val", SIZE, chunk=2))
    assert [len(labels) for _, labels, _ in chunks] == [2, 2, 1]
    assert np.concatenate([labels for _, labels, _ in chunks]).tolist() == [0, 1, 2, 3, 4]
    assert sum((texts for *_, texts in chunks), []) == [first_caption(i) for i in ORDER]
    head = list(iter_mscoco(coco.images, coco.annotations, 2017, "val", SIZE, max_images=3, chunk=2))
    images = np.concatenate([c[0] for c in head])
    assert len(images) == 3 and sum((c[2] for c in head), []) == [first_caption(i) for i in ORDER[:3]]
    for k, image_id in enumerate(ORDER[:3]):
        np.testing.assert_array_equal(images[k], expected_pixels(image_id))


def test_max_images_through_the_config(coco, tmp_path):
    store = prepare_dataset(spec_for(coco, max_images=2), tmp_path / "store", tmp_path / "cache")
    assert len(store) == 2 and store.labels.tolist() == [0, 1]
    assert store.captions == [first_caption(i) for i in ORDER[:2]]


def random_captions(coco, seed, max_images=None):
    chunks = iter_mscoco(coco.images, coco.annotations, 2017, "val", SIZE, caption="random",
                         caption_seed=seed, max_images=max_images)
    return sum((texts for *_, texts in chunks), [])


def test_random_captions_are_reproducible_by_seed_and_per_image(coco, tmp_path):
    # Bugs caught: an unseeded draw, the seed ignored, one generator over the images (an image's
    # caption would change with max_images), a draw outside the image's own captions.
    seed0 = random_captions(coco, 0)
    assert seed0 == random_captions(coco, 0)
    assert seed0 != random_captions(coco, 1)
    assert seed0 != [first_caption(i) for i in ORDER]
    assert random_captions(coco, 0, max_images=2) == seed0[:2]
    for image_id, text in zip(ORDER, seed0):
        ordered = [t.strip() for _, t in sorted(CAPTIONS[image_id])]
        # The documented draw: default_rng([caption_seed, image_id]) over the annotation-id order.
        assert text == ordered[int(np.random.default_rng([0, image_id]).integers(len(ordered)))]
    store = prepare_dataset(spec_for(coco, caption="random", caption_seed=1), tmp_path / "s", tmp_path / "cache")
    assert store.captions == random_captions(coco, 1)
    assert store.captions_info["rule"] == "random" and store.captions_info["seed"] == 1


def test_official_urls_carry_their_digests_and_an_overridden_one_needs_its_own():
    spec = {**dataset_defaults({"source": "mscoco"}), "source": "mscoco"}
    assert mscoco.archive_source(spec, "images") == (
        "http://images.cocodataset.org/zips/val2017.zip", mscoco.COCO_SHA256["val2017.zip"])
    spec_2014 = {**spec, "year": 2014, "split": "train"}
    assert mscoco.archive_source(spec_2014, "annotations") == (
        "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
        mscoco.COCO_SHA256["annotations_trainval2014.zip"])
    assert mscoco.archive_source({**spec, "images_url": "file:///data/val2017.zip"}, "images") == (
        "file:///data/val2017.zip", None)  # a copy elsewhere: unchecked unless sha256.images is given
    assert mscoco.archive_source({**spec, "images_url": "file:///x.zip", "sha256": {"images": "AB" * 32}},
                                 "images") == ("file:///x.zip", "ab" * 32)
    assert len(set(mscoco.COCO_SHA256.values())) == 6


def test_overridden_urls_without_digests_are_read_unchecked(coco, tmp_path):
    spec = {k: v for k, v in spec_for(coco).items() if k != "sha256"}
    assert len(prepare_dataset(spec, tmp_path / "store", tmp_path / "cache")) == len(IMAGES)


@pytest.mark.parametrize("role", ["images", "annotations"])
def test_a_checksum_mismatch_names_the_url_and_the_keys(coco, tmp_path, role):
    spec = spec_for(coco)
    spec["sha256"][role] = "0" * 64
    url = getattr(coco, role).as_uri()
    with pytest.raises(DownloadError, match=f"sha256 mismatch for {url}: expected 0{{64}}, got "
                                            f"{file_digest(getattr(coco, role))}.* '{role}_url' or 'sha256.{role}'"):
        prepare_dataset(spec, tmp_path / "store", tmp_path / "cache")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("role", ["images", "annotations"])
def test_a_missing_file_names_the_url(coco, tmp_path, role):
    missing = (tmp_path / "nowhere" / f"{role}.zip").as_uri()
    with pytest.raises(DownloadError, match=f"could not read {missing}: .* not a file.* '{role}_url'"):
        prepare_dataset(spec_for(coco, **{f"{role}_url": missing}), tmp_path / "store", tmp_path / "cache")


def test_http_downloads_are_checked_and_cached(coco, tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(coco.images.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    cache = tmp_path / "cache"
    try:
        spec = spec_for(coco, images_url=base + "val2017.zip", annotations_url=base + "annotations_trainval2017.zip")
        store = prepare_dataset(spec, tmp_path / "store", cache)
        assert len(store) == len(IMAGES) and store.captions == [first_caption(i) for i in ORDER]
        assert file_digest(cache / "val2017.zip") == file_digest(coco.images)
        with pytest.raises(DownloadError, match=f"could not download {base}gone.zip: .*'images_url'"):
            prepare_dataset({**spec, "images_url": base + "gone.zip"}, tmp_path / "store2", cache)
        bad = {**spec, "sha256": {**spec["sha256"], "annotations": "f" * 64}}
        with pytest.raises(DownloadError, match=f"sha256 mismatch for {base}annotations_trainval2017.zip.*"
                                                "'annotations_url' or 'sha256.annotations'"):
            prepare_dataset(bad, tmp_path / "store3", cache)
    finally:
        server.shutdown()
        server.server_close()


def test_archives_of_another_year_or_split_are_errors_naming_them(coco, tmp_path):
    spec = {k: v for k, v in spec_for(coco).items() if k != "sha256"}
    with pytest.raises(ValueError, match=f"{coco.annotations}.*no annotations/captions_val2014.json"):
        prepare_dataset({**spec, "year": 2014}, tmp_path / "store", tmp_path / "cache")
    other = tmp_path / "train2017.zip"  # another split's images, none of those val2017 lists
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("train2017/000000000009.jpg", jpeg(139))
    with pytest.raises(ValueError, match=f"{other}.*no image 000000000139.jpg .*same year and split"):
        prepare_dataset({**spec, "images_url": other.as_uri()}, tmp_path / "store", tmp_path / "cache")


@pytest.mark.parametrize("key, change, message", [
    ("year", {"year": 2015}, "2015: COCO's caption releases are"),
    ("split", {"split": "test"}, "mscoco has the splits"),
    ("caption", {"caption": "last"}, "'last': one of"),
    ("caption_seed", {"caption_seed": -1}, "non-negative"),
    ("url", {"url": "file:///x/"}, "images_url"),
    ("images_url", {"images_url": "ftp://x/val2017.zip"}, "not an http"),
    ("annotations_url", {"annotations_url": "s3://x.zip"}, "not an http"),
    ("sha256", {"sha256": "a" * 64}, "takes an object"),
    ("sha256", {"sha256": {"image": "a" * 64}}, "unknown archive"),
    ("sha256.images", {"sha256": {"images": "xyz"}}, "hex digits"),
    ("channels", {"channels": 1}, "RGB"),
    ("max_images", {"max_images": 0}, "positive"),
])
def test_config_errors_name_the_key(key, change, message):
    spec = {"source": "mscoco"}
    check_dataset_spec("coco", spec)  # the defaults alone are a valid entry
    with pytest.raises(ValueError, match=f"^datasets\\.coco\\.{key.replace('.', '[.]')}: .*{message}"):
        check_dataset_spec("coco", {**spec, **change})


def test_schema_defaults_are_mscoco_s_own():
    defaults = dataset_defaults({"source": "mscoco"})
    assert (defaults["year"], defaults["split"], defaults["caption"], defaults["caption_seed"]) == (2017, "val",
                                                                                                  "first", 0)
    assert defaults["image_size"] == 32
    # The other sources' entries gain no key (their download jobs' settings stay as they were).
    for source in ("cifar10", "lsun"):
        assert not {"year", "caption", "caption_seed"} & set(dataset_defaults({"source": source}))
    assert dataset_defaults({"source": "cifar10"})["split"] == "train"
    assert dataset_defaults({"source": "lsun"})["image_size"] == 256
