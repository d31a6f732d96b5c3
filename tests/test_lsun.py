"""The LSUN source on real formats: LMDBs written with the lmdb package, values encoded as the
official exports' (webp, JPEG), zipped as <category>_<split>_lmdb.zip, read through file:// and
http:// URLs. Each image is compared with a reference built by plain PIL calls on the same bytes."""

import functools
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import zipfile

import lmdb
import numpy as np
import pytest
import yaml
from PIL import Image

import igsm.data.lsun as lsun
from conftest import REPO, command_env
from igsm.data import DownloadError, check_dataset_spec, download, file_digest
from igsm.data.common import WriteError
from igsm.schema import dataset_defaults
from test_store import full_disk

SIZE = 16
# (key, width, height, format): several aspect ratios; short sides ≥ 2·SIZE (BOX halving), between
# SIZE and 2·SIZE (BICUBIC down), < SIZE (BICUBIC up), = SIZE (no resize, odd crop offset).
# Inserted in this (unsorted) order; LMDB keeps its keys sorted, and that is the reading order.
IMAGES = [
    ("f3a9", 70, 33, "WEBP"),
    ("0b12", 40, 24, "JPEG"),
    ("7c00", 20, 50, "WEBP"),
    ("a001", 64, 64, "JPEG"),
    ("2e7d", 27, 16, "WEBP"),
    ("c5b8", 12, 19, "JPEG"),
]
ORDER = sorted(key for key, *_ in IMAGES)


def pixels(width, height, seed):
    """Smooth colour ramps plus noise: resampling filters and offsets visibly change them."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 32 * 8], -1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def encode(array, fmt, lossless=False):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"lossless": True} if lossless else {"quality": 90}))
    return buffer.getvalue()


def write_lmdb(folder, entries):
    """An LMDB folder (data.mdb, lock.mdb) of key → bytes, written in the given order."""
    folder.mkdir(parents=True)
    env = lmdb.open(str(folder), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for key, value in entries:
            txn.put(key.encode(), value)
    env.close()
    return folder


def lsun_entries(lossless=False):
    return [(key, encode(pixels(w, h, seed), fmt, lossless)) for seed, (key, w, h, fmt) in enumerate(IMAGES)]


def zip_folder(folder, archive):
    """The official layout: <name>_lmdb/data.mdb and lock.mdb inside <name>_lmdb.zip."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(folder, folder.name)
        for f in sorted(folder.iterdir()):
            zf.write(f, f"{folder.name}/{f.name}")
    return archive


def reference(value, size, resample=Image.BICUBIC, floor=True):
    """guided-diffusion's center_crop_arr written out with PIL's crop; ``resample``/``floor`` make
    the plausible wrong variants (another filter, torchvision's rounded offset)."""
    img = Image.open(io.BytesIO(value)).convert("RGB")
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), Image.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample)
    left, top = ((img.width - size) // 2, (img.height - size) // 2) if floor else \
        (int(round((img.width - size) / 2)), int(round((img.height - size) / 2)))
    return np.asarray(img.crop((left, top, left + size, top + size)))


def collect(spec, cache):
    chunks = list(lsun.prepare(spec, cache))
    for images, labels in chunks:
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == (SIZE, SIZE, 3)
        assert labels.dtype == np.int64 and labels.shape == (len(images),) and not labels.any()
    return chunks, np.concatenate([c[0] for c in chunks])


@pytest.fixture
def mirror(tmp_path):
    """A folder holding church_outdoor_train_lmdb.zip, and the entries it holds."""
    entries = lsun_entries()
    folder = write_lmdb(tmp_path / "build" / "church_outdoor_train_lmdb", entries)
    zip_folder(folder, tmp_path / "mirror" / "church_outdoor_train_lmdb.zip")
    return tmp_path / "mirror", dict(entries)


def spec_for(url, **extra):
    return {"source": "lsun", "category": "church_outdoor", "split": "train", "url": url,
            "image_size": SIZE, **extra}


def test_zip_through_file_url_streams_chunks_equal_to_the_reference(mirror, tmp_path, monkeypatch):
    folder, values = mirror
    monkeypatch.setattr(lsun, "CHUNK", 4)
    spec = spec_for(folder.as_uri())
    check_dataset_spec("church", spec)
    chunks, images = collect(spec, tmp_path / "cache")
    assert [len(c[0]) for c in chunks] == [4, 2]
    expected = np.stack([reference(values[key], SIZE) for key in ORDER])
    assert np.array_equal(images, expected)
    # The reference can tell the plausible bugs apart on these images.
    for variant in (dict(resample=Image.BILINEAR), dict(resample=Image.LANCZOS), dict(floor=False)):
        assert not np.array_equal(np.stack([reference(values[k], SIZE, **variant) for k in ORDER]), expected)
    # Insertion order is not key order: reading in insertion order would differ.
    inserted = np.stack([reference(values[k], SIZE) for k, *_ in IMAGES])
    assert not np.array_equal(inserted, expected)
    # Unpacked into the cache (data.mdb only); the file:// zip itself is not copied.
    cache = tmp_path / "cache"
    assert sorted(p.name for p in cache.iterdir()) == ["church_outdoor_train_lmdb"]
    assert (cache / "church_outdoor_train_lmdb" / "data.mdb").is_file()
    # A second run reuses the unpacked copy and reads the same images.
    stamp = (cache / "church_outdoor_train_lmdb" / "data.mdb").stat().st_mtime_ns
    assert np.array_equal(collect(spec, cache)[1], expected)
    assert (cache / "church_outdoor_train_lmdb" / "data.mdb").stat().st_mtime_ns == stamp


def test_max_images_keeps_the_first_in_key_order(mirror, tmp_path, monkeypatch):
    folder, values = mirror
    monkeypatch.setattr(lsun, "CHUNK", 2)
    chunks, images = collect(spec_for(folder.as_uri(), max_images=3), tmp_path / "cache")
    assert [len(c[0]) for c in chunks] == [2, 1]
    assert np.array_equal(images, np.stack([reference(values[k], SIZE) for k in ORDER[:3]]))


def test_short_side_at_image_size_is_a_pure_centre_crop(tmp_path):
    """Lossless webp at the target size: no filter runs, the output is the source's own pixels at
    offset ⌊(side − size)/2⌋ (27 wide → columns 5…20; torchvision's rounding would start at 6)."""
    wide, tall = pixels(27, SIZE, 1), pixels(SIZE, 35, 2)
    folder = write_lmdb(tmp_path / "x" / "bedroom_val_lmdb",
                        [("b", encode(wide, "WEBP", lossless=True)), ("a", encode(tall, "WEBP", lossless=True))])
    images = np.concatenate([c[0] for c in lsun.read_lmdb(folder, SIZE)])
    assert np.array_equal(images[0], tall[9:9 + SIZE])
    assert np.array_equal(images[1], wide[:, 5:5 + SIZE])


def test_unpacked_folder_is_read_in_place(tmp_path):
    entries = lsun_entries()
    write_lmdb(tmp_path / "lsun" / "church_outdoor_train_lmdb", entries)
    cache = tmp_path / "cache"
    _, images = collect(spec_for((tmp_path / "lsun").as_uri() + "/"), cache)
    values = dict(entries)
    assert np.array_equal(images, np.stack([reference(values[k], SIZE) for k in ORDER]))
    assert not cache.exists() or not any(cache.iterdir()), "the unpacked LMDB must not be copied"


def test_sha256_is_checked_and_a_mismatch_names_the_file(mirror, tmp_path):
    folder, _ = mirror
    name = "church_outdoor_train_lmdb.zip"
    with pytest.raises(DownloadError, match=f"sha256 mismatch for .*{name}: expected 0000"):
        list(lsun.prepare(spec_for(folder.as_uri(), sha256={name: "0" * 64}), tmp_path / "cache"))
    assert not (tmp_path / "cache" / "church_outdoor_train_lmdb").exists()
    digest = file_digest(folder / name)
    _, images = collect(spec_for(folder.as_uri(), sha256={name: digest.upper()}), tmp_path / "cache")
    assert len(images) == len(IMAGES)


def test_http_download_is_unpacked_then_deleted(mirror, tmp_path):
    folder, values = mirror
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    name = "church_outdoor_train_lmdb.zip"
    cache = tmp_path / "cache"
    try:
        with pytest.raises(DownloadError, match=f"sha256 mismatch for {url}{name}"):
            list(lsun.prepare(spec_for(url, sha256={name: "f" * 64}), cache))
        spec = spec_for(url, sha256={name: file_digest(folder / name)})
        _, images = collect(spec, cache)
    finally:
        server.shutdown()
        server.server_close()
    assert np.array_equal(images, np.stack([reference(values[k], SIZE) for k in ORDER]))
    assert sorted(p.name for p in cache.iterdir()) == ["church_outdoor_train_lmdb"]
    assert np.array_equal(collect(spec, cache)[1], images)  # server gone: the unpacked copy serves


def test_undecodable_value_names_its_key_and_the_lmdb(tmp_path):
    entries = lsun_entries()
    entries.append(("bad0", entries[1][1][:40]))  # a truncated JPEG
    folder = write_lmdb(tmp_path / "lsun" / "bridge_train_lmdb", entries)
    spec = {**spec_for((tmp_path / "lsun").as_uri()), "category": "bridge"}
    with pytest.raises(ValueError, match=f"{folder}: key 'bad0': not a readable image"):
        list(lsun.prepare(spec, tmp_path / "cache"))
    write_lmdb(tmp_path / "e" / "empty", [])
    with pytest.raises(ValueError, match="holds no images"):
        list(lsun.read_lmdb(tmp_path / "e" / "empty", SIZE))


def test_missing_archive_names_what_was_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DownloadError, match="neither church_outdoor_train_lmdb/data.mdb nor church_outdoor_train_lmdb.zip"):
        list(lsun.prepare(spec_for((tmp_path / "empty").as_uri()), tmp_path / "cache"))


@pytest.mark.parametrize("change, key, message", [
    (lambda s: s.update(category="church"), "category", "not an LSUN scene category"),
    (lambda s: s.pop("category"), "category", "required for lsun"),
    (lambda s: s.update(split="test"), "split", "lsun has the splits"),
    (lambda s: s.update(url="ftp://x/"), "url", "not an http://, https:// or file:// URL"),
    (lambda s: s.update(max_images=0), "max_images", "positive number"),
    (lambda s: s.update(sha256="0" * 64), "sha256", "takes an object"),
    (lambda s: s.update(sha256={"bedroom_train_lmdb.zip": "0" * 64}), "sha256", "unknown file name"),
    (lambda s: s.update(sha256={"church_outdoor_train_lmdb.zip": "xyz"}),
     "sha256.church_outdoor_train_lmdb.zip", "not 64 hex digits"),
])
def test_config_errors_name_the_key(change, key, message):
    spec = {"source": "lsun", "category": "church_outdoor", "split": "train", "url": ""}
    check_dataset_spec("church", spec)
    check_dataset_spec("church", {**spec, "split": "val", "url": "http://dl.yf.io/lsun/scenes/"})
    change(spec)
    with pytest.raises(ValueError, match=f"^datasets\\.church\\.{key.replace('.', '[.]')}: .*{message}"):
        check_dataset_spec("church", spec)


def test_schema_agrees_with_the_module():
    dataset = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())["$defs"]["dataset"]
    assert tuple(dataset["properties"]["category"]["enum"]) == lsun.LSUN_CATEGORIES
    assert set(lsun.LSUN_SPLITS) <= set(dataset["properties"]["split"]["enum"])
    assert dataset["if"]["properties"]["source"]["const"] == "lsun"
    # Bug caught: LSUN at the others' 32 px when the config leaves image_size out (the paper's is 256).
    assert dataset_defaults({"source": "lsun", "category": "church_outdoor"})["image_size"] == 256
    assert dataset_defaults({"source": "cifar10"})["image_size"] == 32


# ---- hostile cases (issue 29): a truncated LMDB, a full disk while unpacking ---------------------

@pytest.mark.parametrize("cut", ["half", "last byte"])
def test_truncated_lmdb_is_an_error_naming_the_file(tmp_path, cut):
    """lmdb reads through a memory map: a data.mdb shorter than its pages killed the data job with
    SIGBUS and an empty log. The CLI runs in its own process, so a regression cannot kill pytest."""
    folder = write_lmdb(tmp_path / "lsun" / "church_outdoor_train_lmdb", lsun_entries())
    data = folder / "data.mdb"
    size = data.stat().st_size
    os.truncate(data, size // 2 if cut == "half" else size - 1)
    run = tmp_path / "run"
    run.mkdir()
    result = subprocess.run([sys.executable, "-m", "igsm", "download", "--out", "results/data/church/train",
                             "--cache-dir", "results/data/church/raw",
                             "--settings", json.dumps(spec_for((tmp_path / "lsun").as_uri()))],
                            cwd=run, env=command_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=120)
    assert result.returncode == 1, f"exit status {result.returncode}: {result.stdout}"
    assert result.stdout.startswith(f"Error: {data} is truncated: ") and "header says" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout
    assert not (run / "results" / "data" / "church" / "train").exists()


def test_full_disk_while_unpacking_is_not_called_a_bad_archive(mirror, tmp_path):
    """The zip is good, the cache's disk is full: the error names the file being written and the
    free space (it used to say 'not a readable zip archive; delete it', for a good 43 GB archive)."""
    folder, _ = mirror
    with full_disk(tmp_path / "disk", size="16k") as disk:
        with pytest.raises(WriteError, match=f"cannot write {disk}/church_outdoor_train_lmdb.part/data.mdb: "
                                             r"No space left on device \(\d+ \w+ free on "):
            list(lsun.prepare(spec_for(folder.as_uri()), disk))
        assert list(disk.iterdir()) == []  # the partial unpack is removed
        # A download to a full disk names the file it was writing, not the URL it was reading.
        large = tmp_path / "build" / "church_outdoor_train_lmdb" / "data.mdb"  # 24 KiB
        with pytest.raises(WriteError, match=f"cannot write {disk}/data.mdb.part: No space left"):
            download(large.as_uri(), disk / "data.mdb")
        assert list(disk.iterdir()) == []
