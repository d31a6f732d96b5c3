"""The on-disk image store (igsm/data/store.py): what it reads equals the array it was written from,
in every indexing form and across shard boundaries; it is published whole or not at all; damage is
reported naming the file; worker processes reopen it instead of copying it."""

import json
import pickle

import numpy as np
import pytest
import torch

from igsm.data import ImageStore, StoreWriter, load_images, write_store
from igsm.training import batch_indices

SHAPE = (6, 5, 3)
PER_SHARD = 7  # images per shard in these tests: every batch below spans several shards


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, (50, *SHAPE), dtype=np.uint8)


@pytest.fixture
def store(images, tmp_path):
    labels = np.arange(len(images)) % 10
    # Chunks that do not line up with the shards.
    chunks = [(images[a:b], labels[a:b]) for a, b in ((0, 3), (3, 20), (20, 21), (21, 50))]
    return write_store(tmp_path / "train", chunks, shard_bytes=PER_SHARD * int(np.prod(SHAPE)))


def test_reads_equal_the_array_it_was_written_from(store, images):
    assert store.shape == images.shape and len(store) == 50 and store.dtype == np.uint8
    assert [s["count"] for s in store.index["shards"]] == [7] * 7 + [1]
    rng = np.random.default_rng(1)
    for indices in (rng.integers(0, 50, 64), rng.permutation(50), np.array([49, 0, 7, 6, 7]), np.array([], int)):
        np.testing.assert_array_equal(store[indices], images[indices])
    np.testing.assert_array_equal(store[[-1, -50]], images[[-1, -50]])
    for key in (slice(None), slice(5, 44, 3), slice(None, None, -1), slice(48, 60)):
        np.testing.assert_array_equal(store[key], images[key])
    for i in (0, 6, 7, 49, -1):
        np.testing.assert_array_equal(store[i], images[i])
    np.testing.assert_array_equal(store.labels, np.arange(50) % 10)
    # What a training step reads: the global batch's indices, any order, across shards.
    for step in range(8):
        idx = batch_indices(step, 16, len(store), seed=3).numpy()
        np.testing.assert_array_equal(store[idx], images[idx])


def test_bad_indices_are_refused(store):
    with pytest.raises(IndexError):
        store[50]
    with pytest.raises(IndexError):
        store[np.array([3, 50])]
    with pytest.raises(TypeError):
        store[np.ones(50, bool)]


def test_limit_is_the_first_images_and_reads_nothing_else(store, images):
    head = store.limit(12)
    assert head.shape == (12, *SHAPE) and head.fingerprint() != store.fingerprint()
    np.testing.assert_array_equal(head[:], images[:12])
    with pytest.raises(IndexError):
        head[12]
    assert len(store.limit(80)) == 50


def test_fingerprint_comes_from_the_recorded_digests(store, images, tmp_path):
    # Written again from the same images (other chunks, other folder): the same identity.
    again = write_store(tmp_path / "again", [(images, np.arange(50) % 10)],
                        shard_bytes=PER_SHARD * int(np.prod(SHAPE)))
    assert again.fingerprint() == store.fingerprint()
    # The digest of each shard is that of its file.
    from igsm.data import file_digest
    for entry in store.index["shards"]:
        assert entry["sha256"] == file_digest(store.directory / entry["file"])


def test_store_is_published_whole_or_not_at_all(images, tmp_path):
    target = tmp_path / "train"

    def chunks():
        yield images[:30], np.zeros(30, np.int64)
        raise RuntimeError("the archive ended early")

    with pytest.raises(RuntimeError):
        write_store(target, chunks(), shard_bytes=PER_SHARD * int(np.prod(SHAPE)))
    assert list(tmp_path.iterdir()) == []  # neither the store nor its temporary folder
    # A rerun over an earlier store replaces it as a whole.
    write_store(target, [(images, np.zeros(50, np.int64))])
    write_store(target, [(images[:5], np.zeros(5, np.int64))])
    assert len(load_images(target)) == 5 and [p.name for p in tmp_path.iterdir()] == ["train"]


def test_writer_refuses_inconsistent_chunks(tmp_path, images):
    with StoreWriter(tmp_path / "a") as writer:
        writer.append(images[:3], np.zeros(3, np.int64))
        with pytest.raises(ValueError, match="one dataset has one image size"):
            writer.append(np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2, np.int64))
        with pytest.raises(ValueError, match="labels"):
            writer.append(images[:3], np.zeros(2, np.int64))
        with pytest.raises(ValueError, match="uint8"):
            writer.append(images[:3].astype(np.float32), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="no images"):
        write_store(tmp_path / "empty", [])


def test_damage_is_reported_naming_the_file(store, tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path / 'nowhere'} is not an image store"):
        load_images(tmp_path / "nowhere")
    shard = store.directory / "images-00003.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 10])  # truncated
    with pytest.raises(ValueError, match=f"{store.directory}.*unreadable"):
        load_images(store.directory)
    shard.write_bytes(data)
    index = json.loads((store.directory / "index.json").read_text())
    index["num_images"] = 51
    (store.directory / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="shards hold 50 images, its index says 51"):
        load_images(store.directory)
    index["num_images"], index["shards"][0]["file"] = 50, "../elsewhere.npy"
    (store.directory / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not a file name"):
        load_images(store.directory)


def test_workers_reopen_the_store_instead_of_copying_it(store, images):
    blob = pickle.dumps(store.limit(40))
    assert len(blob) < 1000  # the folder and the count, not the images
    np.testing.assert_array_equal(pickle.loads(blob)[:], images[:40])
    # FID features read a store through DataLoader workers (clean-fid's resizer, no Inception here).
    from igsm.fid import ArrayResizeDataset

    def resized(source, workers):
        # (fork: clean-fid's resizer is a local function, which spawned workers could not receive)
        loader = torch.utils.data.DataLoader(ArrayResizeDataset(source, "clean"), batch_size=16,
                                             num_workers=workers)
        return torch.cat(list(loader))

    np.testing.assert_array_equal(resized(store.limit(20), 2).numpy(), resized(images[:20], 0).numpy())


def test_the_data_stage_writes_a_store(tmp_path):
    """`igsm download` (the workflow's data stage) on a real source, read back by the stages."""
    from click.testing import CliRunner

    from igsm.cli import main

    out = tmp_path / "results" / "data" / "digits" / "train"
    result = CliRunner().invoke(main, ["download", "--out", str(out), "--cache-dir", str(tmp_path / "raw"),
                                       "--settings", json.dumps({"source": "sklearn-digits", "image_size": 8})])
    assert result.exit_code == 0, result.output
    assert "1797 images of 8×8×1 in 1 shard(s)" in result.output
    store = ImageStore(out)
    assert store.shape == (1797, 8, 8, 1) and store[:].max() == 255
