"""The on-disk image store (igsm/data/store.py): what it reads equals the array it was written from,
in every indexing form and across shard boundaries; it is published whole or not at all; damage is
reported naming the file (a changed byte too, hashing each file once per change); worker processes
reopen it instead of copying it; a full disk is one error naming the file and the free space; a
killed writer's temporary folder goes with the next run."""

import contextlib
import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import command_env
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


# ---- captions (issue 31, item 4): one text per image, for mscoco ---------------------------------

# A small store written by the code before captions existed (commit 9ad6084): its index.json's
# sha256 and its fingerprints, whole and limited to 3. Existing stores must keep their identity
# (training runs identify their data by it), so a store without captions must still give these.
PINNED_INDEX_SHA256 = "7e3890ffe082405ca5c8e9cec2d186c3a5dff6b655e85117278f413c89febdfb"
PINNED_FINGERPRINT = "e200f492a2d97394b150f4b64a51738170b1711f76e20f8b9f5ba0c4ac8d0993"
PINNED_FINGERPRINT_3 = "cf18878830b184813e84cb18d0cc699d056de45af8ab8718a513ef181fc76f64"


def pinned_images():
    return (np.arange(10 * 4 * 4 * 3) % 251).astype(np.uint8).reshape(10, 4, 4, 3), np.arange(10)


@pytest.mark.parametrize("how", ["write_store", "append", "append captions=None"])
def test_a_store_without_captions_keeps_its_index_and_fingerprint(tmp_path, how):
    # Bug caught: a captions key (even null or empty) written into every index, which would change
    # the fingerprint of every existing dataset and make resumed or compared runs see new data.
    images, labels = pinned_images()
    out, shard_bytes = tmp_path / "s", 4 * 4 * 3 * 4
    if how == "write_store":
        store = write_store(out, [(images[:6], labels[:6]), (images[6:], labels[6:])], shard_bytes=shard_bytes)
    else:
        with StoreWriter(out, shard_bytes) as writer:
            for part in (slice(0, 6), slice(6, 10)):
                if how == "append":
                    writer.append(images[part], labels[part])
                else:
                    writer.append(images[part], labels[part], captions=None)
        store = ImageStore(out)
    import hashlib
    assert hashlib.sha256((out / "index.json").read_bytes()).hexdigest() == PINNED_INDEX_SHA256
    assert store.fingerprint() == PINNED_FINGERPRINT and store.limit(3).fingerprint() == PINNED_FINGERPRINT_3
    assert store.captions is None and store.captions_info is None and not (out / "captions.json").exists()


def test_captions_are_stored_aligned_checked_and_limited(tmp_path):
    images, labels = pinned_images()
    texts = [f"picture {i}: a caf\u00e9 \"quoted\"\nnext line" for i in range(10)]
    info = {"source": "test", "rule": "first", "seed": None}
    store = write_store(tmp_path / "c", [(images[:6], labels[:6], texts[:6]), (images[6:], labels[6:], texts[6:])],
                        shard_bytes=4 * 4 * 3 * 4, extra={"captions_info": info})
    assert store.captions == texts and store.captions_info == info
    assert json.loads((tmp_path / "c" / "captions.json").read_text(encoding="utf-8")) == texts
    from igsm.data import file_digest
    assert store.index["captions_sha256"] == file_digest(tmp_path / "c" / "captions.json")
    assert store.limit(3).captions == texts[:3]
    # The same images with captions are another dataset; other captions, another again.
    assert store.fingerprint() != PINNED_FINGERPRINT
    other = write_store(tmp_path / "d", [(images, labels, texts[::-1])], shard_bytes=4 * 4 * 3 * 4,
                        extra={"captions_info": info})
    assert other.fingerprint() != store.fingerprint()
    # A changed captions file is an error naming it, as a shard's is.
    flip_byte(tmp_path / "c" / "captions.json", offset_from_end=3)
    with pytest.raises(ValueError, match=f"{tmp_path / 'c' / 'captions.json'} was changed or damaged"):
        load_images(tmp_path / "c")


def test_writer_refuses_captions_for_some_chunks_only(tmp_path, images):
    with StoreWriter(tmp_path / "a") as writer:
        writer.append(images[:2], np.zeros(2, np.int64), ["a", "b"])
        with pytest.raises(ValueError, match="a chunk without captions after chunks with them"):
            writer.append(images[:2], np.zeros(2, np.int64))
        with pytest.raises(ValueError, match="expected 2 captions, got 1"):
            writer.append(images[:2], np.zeros(2, np.int64), ["a"])
        with pytest.raises(ValueError, match="list of str"):
            writer.append(images[:2], np.zeros(2, np.int64), ["a", 3])
    assert load_images(tmp_path / "a").captions == ["a", "b"]  # the refused chunks left nothing
    with pytest.raises(ValueError, match="a chunk with captions after chunks without them"):
        write_store(tmp_path / "b", [(images[:2], np.zeros(2, np.int64)),
                                     (images[:2], np.zeros(2, np.int64), ["a", "b"])])
    assert not (tmp_path / "b").exists()


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


# ---- hostile cases (issue 29): a changed byte, a full disk, a killed writer ----------------------

def flip_byte(path, offset_from_end=1):
    """Change one byte of a file in place (a pixel of a shard's last image), then set its mtime
    back, as a careless tool or a copy that keeps times would leave it."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns


@pytest.mark.parametrize("name", ["images-00003.npy", "labels.npy"])
def test_a_changed_byte_is_an_error_naming_the_file(store, name):
    load_images(store.directory)  # intact: opens
    flip_byte(store.directory / name)
    with pytest.raises(ValueError, match=f"{store.directory / name} was changed or damaged after the store "
                                         "was written .*index.json records"):
        load_images(store.directory)
    with pytest.raises(ValueError, match="changed or damaged"):  # not recorded as verified by the failure
        load_images(store.directory)


def test_files_are_hashed_once_and_again_only_when_changed(store, images, tmp_path, monkeypatch):
    import igsm.data.store as store_module

    hashed = []
    real_digest = store_module.file_digest

    def counting_digest(path):
        hashed.append(Path(path).name)
        return real_digest(path)

    monkeypatch.setattr(store_module, "file_digest", counting_digest)
    shard_names = [entry["file"] for entry in store.index["shards"]]
    # The writer hashed every file while writing it: opening the new store (and a worker reopening
    # it) reads nothing again.
    load_images(store.directory)
    pickle.loads(pickle.dumps(store.limit(20)))
    assert hashed == []
    # Touched (its ctime changes, its bytes do not): hashed once more, then recorded again.
    os.utime(store.directory / "images-00002.npy")
    load_images(store.directory)
    assert hashed == ["images-00002.npy"]
    load_images(store.directory)
    assert hashed == ["images-00002.npy"]
    # A copy (new inodes) is hashed whole, once.
    hashed.clear()
    shutil.copytree(store.directory, tmp_path / "copy")
    np.testing.assert_array_equal(load_images(tmp_path / "copy")[:], images)
    assert sorted(hashed) == sorted([*shard_names, "labels.npy"])
    load_images(tmp_path / "copy")
    assert len(hashed) == len(shard_names) + 1


def run_data_stage(cwd, dataset="digits", preexec_fn=None):
    """`python -m igsm download` of the 8-px scikit-learn digits (115 KB of images) into
    results/data/<dataset>/train under ``cwd``, as the workflow runs it."""
    return subprocess.run([sys.executable, "-m", "igsm", "download", "--out", f"results/data/{dataset}/train",
                           "--cache-dir", f"results/data/{dataset}/raw",
                           "--settings", json.dumps({"source": "sklearn-digits", "image_size": 8})],
                          cwd=cwd, env=command_env(), text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=120, preexec_fn=preexec_fn)


@contextlib.contextmanager
def full_disk(folder, size="64k"):
    """A real filesystem of ``size`` at ``folder`` (tmpfs; needs root), unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root; the RLIMIT_FSIZE variant runs instead")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def limit_file_size():
    """In the child: files may not grow past 64 KiB; a write beyond fails with EFBIG (SIGXFSZ ignored)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


@pytest.mark.parametrize("limit", ["full tmpfs", "RLIMIT_FSIZE"])
def test_a_full_disk_names_the_file_and_the_free_space(tmp_path, limit):
    if limit == "full tmpfs":
        with full_disk(tmp_path / "disk") as disk:
            result = run_data_stage(disk)
            left = sorted(p.name for p in (disk / "results" / "data" / "digits").iterdir())
        assert "the disk is full: make room there and rerun" in result.stdout
    else:
        result = run_data_stage(tmp_path, preexec_fn=limit_file_size)
        left = sorted(p.name for p in (tmp_path / "results" / "data" / "digits").iterdir())
    assert result.returncode == 1, result.stdout
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stdout, result.stdout
    assert re.fullmatch(r"Error: cannot write results/data/digits/\.train\.\w{8}/images-00000\.npy: "
                        r".+ \([\d.]+ (bytes|KiB|MiB|GiB|TiB) free on /\S*\).*", lines[0]), lines[0]
    assert left == [], "no store and no temporary folder after a failed write"


def test_a_killed_writers_temporary_folder_goes_with_the_next_run(tmp_path):
    """kill -9 in the middle of writing a store, then a good rerun: it leaves only the store."""
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os, signal, numpy as np
        from igsm.data import StoreWriter
        writer = StoreWriter("results/data/digits/train", shard_bytes=64)
        writer.append(np.zeros((4, 4, 4, 1), np.uint8), np.zeros(4, np.int64))  # one 64-byte shard written
        os.kill(os.getpid(), signal.SIGKILL)
        """)], cwd=tmp_path, env=command_env())
    assert killed.returncode == -signal.SIGKILL
    data = tmp_path / "results" / "data" / "digits"
    [stale] = [p for p in data.iterdir() if p.name.startswith(".train.")]
    assert (stale / "images-00000.npy").is_file()
    # Another dataset's store being written beside it is not this writer's to remove.
    other = data / ".valid.abcd1234"
    other.mkdir()
    result = run_data_stage(tmp_path)
    assert result.returncode == 0, result.stdout
    assert sorted(p.name for p in data.iterdir()) == [".valid.abcd1234", "train"]
    assert len(load_images(data / "train")) == 1797


@pytest.mark.parametrize("limit", ["full tmpfs", "RLIMIT_FSIZE"])
def test_a_full_disk_while_saving_a_model_names_the_file(tmp_path, limit):
    """The other stages' big outputs too: `igsm init` writing a model (safetensors raises its own
    error type, which named neither the file nor the disk)."""
    from conftest import TINY_ARCHITECTURE

    def init(folder, preexec_fn=None):
        return subprocess.run([sys.executable, "-m", "igsm", "init", "--out", str(folder / "model"),
                               "--settings", json.dumps(TINY_ARCHITECTURE)], env=command_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120, preexec_fn=preexec_fn)

    if limit == "full tmpfs":
        with full_disk(tmp_path / "disk", size="16k") as disk:
            result = init(disk)
        assert "the disk is full: make room there and rerun" in result.stdout
        folder = disk
    else:
        result = init(tmp_path, preexec_fn=limit_file_size)
        folder = tmp_path
    assert result.returncode == 1, result.stdout
    assert result.stdout.startswith(f"Error: cannot write {folder / 'model' / 'model.safetensors'}: ")
    assert re.search(r"\([\d.]+ (bytes|KiB|MiB|GiB|TiB) free on /", result.stdout), result.stdout
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout
