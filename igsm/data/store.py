"""The on-disk image store that every stage reads (issue 14: datasets larger than memory).

A dataset is a folder written once by the data stage:

    index.json          format, image shape, count, each shard's file, count and sha256
    images-00000.npy    uint8 n×H×W×C, about ``SHARD_BYTES`` each (numpy's .npy format)
    labels.npy          int64 N
    captions.json       only a captioned store (issue 31: mscoco): a JSON list of N str, one per image
    verified.json       each file's sha256 and the stat (inode, size, mtime, ctime) it had when hashed

Readers memory-map the shards (``np.load(mmap_mode="r")``): a batch reads only its own images,
and a process's memory does not grow with the dataset (the OS page cache holds what was read).
:class:`ImageStore` indexes like a read-only uint8 array (an int, a slice, an array of indices), so
training, pruning and the FID reference take a store or an in-memory array alike.

Identity: the sha256 digests of the shards are computed once, when written, and recorded in the
index; :meth:`ImageStore.fingerprint` hashes the index, so a training run identifies its data
without reading every image again (a 3M-image LSUN bedroom is hundreds of GB).

Integrity: opening a store checks each shard (and the labels) against the sha256 its index records,
but hashes only files whose stat differs from the one recorded in ``verified.json`` when they were
last hashed. Any write through the filesystem changes a file's ctime, which no one can set back
(``touch``/``utime`` set mtime only, and themselves change ctime), and a copy is a new inode: a file
whose stat is unchanged holds the bytes that were hashed. The writer records the stats of the shards
it hashed when writing them, so in the workflow no job hashes a store again unless a file changed
(or the store was copied elsewhere): then the first job that opens it hashes those files once
(1–3 s per 1 GiB shard on one CPU core) and records them. A mismatch is an error naming the file.

Latents (issue 31): a latent diffusion experiment's training set is a store of the autoencoder's
latents (float16 n×h×w×c, channels last like the images), written by igsm.latents. Its index adds
``dtype`` and ``latent`` (the autoencoder's identity and scale factor, the pixel store encoded):
what a reader compares with the autoencoder it was given. A uint8 store's index has neither key,
so stores written before latents existed keep their fingerprint.

Captions (issue 31, item 4): a source may give each image one text (MSCOCO's captions). The store
then holds ``captions.json``, a JSON list of str aligned with the images, whose sha256 the index
records as ``captions_sha256`` (checked on open like the shards and labels), beside a
``captions_info`` record of how the source picked them (igsm.data.mscoco: the caption rule and its
seed). A store without captions has neither key, so its index.json is byte for byte what it was
before captions existed, and so is its fingerprint.

The writer fills a temporary sibling folder (``.<name>.`` and 8 random characters) and renames it into place when
complete: a folder named like a store is always a whole one. It first removes such folders that a
killed writer of the same store left behind (Snakemake runs one job per output at a time).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from igsm.data.common import REMAKE, file_digest, numpy_error_text, reporting_write_errors

FORMAT = "igsm-image-store/1"
INDEX = "index.json"
LABELS = "labels.npy"
CAPTIONS = "captions.json"
# Updated after the store is published; Snakemake dates a directory output by the
# .snakemake_timestamp it puts inside, so this does not make the jobs that read the store outdated.
VERIFIED = "verified.json"
SHARD_BYTES = 1 << 30  # 1 GiB of images per shard: a few hundred files for LSUN bedroom


DTYPES = ("uint8", "float16", "float32")  # images; latents (igsm.latents)


class ImageStore:
    """Read-only images N×H×W×C (uint8, or a latent store's floats) in memory-mapped shards, with
    their labels."""

    def __init__(self, directory: str | os.PathLike, _limit: int | None = None):
        self.directory = Path(directory)
        index_path = self.directory / INDEX
        if not index_path.is_file():
            if (self.directory.with_suffix(".npz")).is_file() or self.directory.suffix == ".npz":
                hint = "it looks like a dataset file of an older version of the workflow"
            else:
                hint = "check the path, or rerun the workflow, which makes it"
            raise ValueError(f"dataset {self.directory} is not an image store (no {INDEX}); {hint}")
        try:
            self.index = json.loads(index_path.read_text())
            if self.index.get("format") != FORMAT:
                raise ValueError(f"format {self.index.get('format')!r}, expected {FORMAT!r}")
            shape = tuple(self.index["image_shape"])
            self.dtype = np.dtype(self.index.get("dtype", "uint8"))
            if self.dtype.name not in DTYPES:
                raise ValueError(f"dtype {self.dtype.name}, expected one of {DTYPES}")
            self._shards = [self._open_shard(entry, shape) for entry in self.index["shards"]]
        except (ValueError, KeyError, TypeError, OSError) as err:
            raise ValueError(f"dataset {self.directory} is unreadable ({numpy_error_text(err)}); {REMAKE}") from None
        counts = [len(s) for s in self._shards]
        if sum(counts) != self.index["num_images"] or not counts:
            raise ValueError(f"dataset {self.directory}: its shards hold {sum(counts)} images, its "
                             f"index says {self.index['num_images']}; {REMAKE}")
        self._verify()
        self._starts = np.cumsum([0, *counts])
        self._length = sum(counts) if _limit is None else min(_limit, sum(counts))
        self.image_shape = shape

    def _open_shard(self, entry: dict, shape: tuple) -> np.ndarray:
        path = self.directory / entry["file"]
        if Path(entry["file"]).name != entry["file"]:  # the index names files in its own folder only
            raise ValueError(f"shard name {entry['file']!r} is not a file name")
        shard = np.load(path, mmap_mode="r", allow_pickle=False)
        if shard.dtype != self.dtype or shard.shape != (entry["count"], *shape):
            raise ValueError(f"{path}: {shard.dtype} {shard.shape}, the index says {self.dtype} "
                             f"{(entry['count'], *shape)}")
        return shard

    def _verify(self) -> None:
        """Each file against the sha256 that the index records; only files whose stat changed since
        they were last hashed are read (see the module's docstring)."""
        files = [(entry["file"], entry["sha256"]) for entry in self.index["shards"]]
        if "labels_sha256" in self.index:
            files.append((LABELS, self.index["labels_sha256"]))
        if "captions_sha256" in self.index:
            files.append((CAPTIONS, self.index["captions_sha256"]))
        with _verified_files(self.directory / VERIFIED) as verified:
            for name, expected in files:
                path = self.directory / name
                record = {"sha256": expected, "stat": _stat_key(path)}  # the stat before reading it
                if verified.get(name) == record:
                    continue
                actual = file_digest(path)
                if actual != expected:
                    raise ValueError(f"dataset {self.directory}: {path} was changed or damaged after the "
                                     f"store was written (its sha256 is {actual}, index.json records "
                                     f"{expected}); delete {self.directory} and rerun the workflow, which "
                                     "remakes it")
                verified[name] = record

    def __reduce__(self):
        # Worker processes (DataLoader, spawn/forkserver) reopen the maps instead of receiving copies.
        return ImageStore, (self.directory, self._length)

    # ---- the array interface -------------------------------------------------------------------
    ndim = 4

    @property
    def latent(self) -> dict | None:
        """A latent store's record (igsm.latents: the autoencoder's identity, its scale factor, the
        pixel store encoded); None for images."""
        return self.index.get("latent")

    @property
    def shape(self) -> tuple:
        return (self._length, *self.image_shape)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, key) -> np.ndarray:
        """Images by position: an int (H×W×C), a slice or an array of indices (n×H×W×C), copied
        out of the memory maps in the order asked."""
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self._length if key < 0 else 0)
            if not 0 <= i < self._length:
                raise IndexError(f"image {key} of a dataset of {self._length}")
            shard = int(np.searchsorted(self._starts, i, side="right")) - 1
            return np.array(self._shards[shard][i - self._starts[shard]])
        if isinstance(key, slice):
            indices = np.arange(self._length)[key]
        else:
            indices = np.asarray(key)
            if indices.dtype == bool or indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
                raise TypeError(f"index images by an int, a slice or a 1-D array of ints, not {indices.dtype} "
                                f"{indices.shape}")
            indices = np.where(indices < 0, indices + self._length, indices)
            if len(indices) and (indices.min() < 0 or indices.max() >= self._length):
                raise IndexError(f"images {indices.min()}…{indices.max()} of a dataset of {self._length}")
        out = np.empty((len(indices), *self.image_shape), self.dtype)
        shard_of = np.searchsorted(self._starts, indices, side="right") - 1
        for shard in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == shard)
            local = indices[rows] - self._starts[shard]
            # Sorted reads from the map, then back into the order asked.
            order = np.argsort(local, kind="stable")
            out[rows[order]] = self._shards[shard][local[order]]
        return out

    def limit(self, num_images: int) -> "ImageStore":
        """The first ``num_images`` images, as a store (nothing is read)."""
        return ImageStore(self.directory, _limit=min(num_images, self._length))

    @property
    def labels(self) -> np.ndarray:
        return np.load(self.directory / LABELS, allow_pickle=False)[: self._length]

    @functools.cached_property
    def captions(self) -> list[str] | None:
        """Each image's text (``captions[k]`` goes with image k; a captioned source's labels are
        these positions), or None for a store without captions. Read on first use (MSCOCO train's
        118k captions are ≈6 MB); checked against its digest when the store was opened."""
        if "captions_sha256" not in self.index:
            return None
        path = self.directory / CAPTIONS
        try:
            captions = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"dataset {self.directory}: {path} is unreadable ({err}); {REMAKE}") from None
        if (not isinstance(captions, list) or len(captions) != self.index["num_images"]
                or not all(isinstance(c, str) for c in captions)):
            raise ValueError(f"dataset {self.directory}: {path} is not a list of {self.index['num_images']} "
                             f"str, one per image; {REMAKE}")
        return captions[: self._length]

    @property
    def captions_info(self) -> dict | None:
        """How the source picked the captions (igsm.data.mscoco: rule and seed); None without captions."""
        return self.index.get("captions_info")

    def fingerprint(self) -> str:
        """sha256 of what the images are: the index (with every shard's digest) and the count used."""
        canonical = json.dumps({**self.index, "used": self._length}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


def _stat_key(path: Path) -> list:
    """What changes when a file's bytes may have: its inode (a copy), size, mtime and ctime (any
    write, and any attempt to set mtime back)."""
    info = os.stat(path)
    return [info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


@contextlib.contextmanager
def _verified_files(path: Path):
    """The record of verified files (file name → {sha256, stat}) as a dict, written back if changed.

    Held under an exclusive lock, so that the processes that open a store at once (DDP ranks, jobs
    started together) wait for the first one's hashing instead of all reading the shards. Where
    the record cannot be written (a read-only store) or locked, the files are checked all the same.
    """
    try:
        handle = open(path, "a+")
    except OSError as err:
        print(f"note: cannot record verified files in {path} ({err.strerror}); every job that opens "
              "this store hashes its shards", file=sys.stderr)
        yield {}
        return
    with handle:
        with contextlib.suppress(OSError):  # filesystems without flock: checked all the same
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        try:
            verified = json.loads(handle.read() or "{}")
            verified = verified if isinstance(verified, dict) else {}
        except ValueError:  # a record cut short: hash again
            verified = {}
        before = json.dumps(verified, sort_keys=True)
        try:
            yield verified
        finally:
            if json.dumps(verified, sort_keys=True) != before:
                with contextlib.suppress(OSError):  # a full disk only costs hashing again
                    handle.seek(0)
                    handle.truncate()
                    handle.write(json.dumps(verified, indent=1, sort_keys=True) + "\n")
                    handle.flush()


class StoreWriter:
    """Write a store from chunks of images, shard by shard; ``close()`` publishes it.

    ``dtype``: the images' (a latent store's float16); ``extra``: keys added to the index (a latent
    store's ``latent`` record, a captioned store's ``captions_info``). Chunks carry captions (one
    str per image) all or none: a store has a caption for every image or for none."""

    def __init__(self, directory: str | os.PathLike, shard_bytes: int = SHARD_BYTES, dtype: str = "uint8",
                 extra: dict | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: a store holds one of {DTYPES}")
        self.directory = Path(directory)
        self.dtype, self.extra = np.dtype(dtype), dict(extra or {})
        with reporting_write_errors(self.directory.parent):
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            self._remove_stale_partials()
            # Beside the store, in the form its path was given: mkdtemp returns an absolute path from
            # Python 3.12 on, which would put the caller's cwd into every error message.
            created = tempfile.mkdtemp(prefix=f".{self.directory.name}.", dir=self.directory.parent)
            self.partial = self.directory.parent / Path(created).name
        self.shard_bytes = shard_bytes
        self.image_shape: tuple | None = None
        self.shards: list[dict] = []
        self.verified: dict[str, dict] = {}  # verified.json: the stat of each file when it was hashed
        self.labels: list[np.ndarray] = []
        self.captions: list[str] | None = None  # None until a chunk with captions came
        self._chunks = 0
        self._pending: list[np.ndarray] = []
        self._pending_count = 0

    def _remove_stale_partials(self) -> None:
        """Temporary folders of this store that a killed writer left (kill -9, a lost node): no other
        writer of it runs now, since Snakemake runs one job per output at a time. They can be as
        large as the store, so they go before the new one is written."""
        pattern = re.compile(re.escape(f".{self.directory.name}.") + "[a-z0-9_]{8}")  # mkdtemp's names
        for stale in self.directory.parent.iterdir():
            if pattern.fullmatch(stale.name) and stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)

    def _write(self, name: str, save) -> str:
        """``save(path)`` into the temporary folder; the file's sha256, its stat recorded as verified."""
        path = self.partial / name
        with reporting_write_errors(path):
            save(path)
        self.verified[name] = {"stat": _stat_key(path)}  # the stat before hashing it
        self.verified[name]["sha256"] = digest = file_digest(path)
        return digest

    def append(self, images: np.ndarray, labels: np.ndarray, captions: list[str] | None = None) -> None:
        images, labels = np.asarray(images), np.asarray(labels)
        channels_ok = images.ndim == 4 and (images.shape[3] in (1, 3) or self.dtype != np.uint8)
        if images.dtype != self.dtype or not channels_ok:
            what = "n×H×W×C with C 1 or 3" if self.dtype == np.uint8 else "n×h×w×c"
            raise ValueError(f"images: expected {self.dtype} {what}, got {images.dtype} {images.shape}")
        if labels.shape != (len(images),):
            raise ValueError(f"labels: expected {len(images)} labels, got shape {labels.shape}")
        if captions is not None:
            captions = [captions] if isinstance(captions, str) else list(captions)
            if not all(isinstance(c, str) for c in captions):
                raise ValueError("captions: expected a list of str, one per image")
            if len(captions) != len(images):
                raise ValueError(f"captions: expected {len(images)} captions, got {len(captions)}")
        if self._chunks and (captions is None) != (self.captions is None):
            this, earlier = ("without", "with") if captions is None else ("with", "without")
            raise ValueError(f"a chunk {this} captions after chunks {earlier} them: a store has a caption "
                             "for every image or for none")
        if self.image_shape is None:
            self.image_shape = images.shape[1:]
        elif images.shape[1:] != self.image_shape:
            raise ValueError(f"images of shape {images.shape[1:]} after {self.image_shape}: one dataset "
                             "has one image size")
        self.labels.append(labels.astype(np.int64))
        if captions is not None:
            self.captions = self.captions if self.captions is not None else []
            self.captions.extend(captions)
        self._chunks += 1
        per_shard = max(1, self.shard_bytes // (int(np.prod(self.image_shape)) * self.dtype.itemsize))
        while len(images):
            take = min(len(images), per_shard - self._pending_count)
            self._pending.append(images[:take])
            self._pending_count += take
            images = images[take:]
            if self._pending_count == per_shard:
                self._flush()

    def _flush(self) -> None:
        if not self._pending_count:
            return
        name = f"images-{len(self.shards):05d}.npy"
        pending = np.concatenate(self._pending)
        digest = self._write(name, lambda path: np.save(path, pending, allow_pickle=False))
        self.shards.append({"file": name, "count": self._pending_count, "sha256": digest})
        self._pending, self._pending_count = [], 0

    def close(self) -> None:
        self._flush()
        if not self.shards:
            raise ValueError("the dataset has no images")
        labels = np.concatenate(self.labels)
        labels_digest = self._write(LABELS, lambda path: np.save(path, labels, allow_pickle=False))
        index = {"format": FORMAT, "num_images": len(labels), "image_shape": list(self.image_shape),
                 "shards": self.shards, "labels_sha256": labels_digest}
        if self.dtype != np.uint8:  # a uint8 store's index stays as before latents (its fingerprint)
            index["dtype"] = self.dtype.name
        if self.captions is not None:  # likewise absent without captions: stores keep their identity
            text = json.dumps(self.captions, ensure_ascii=False, indent=0)  # one caption a line
            index["captions_sha256"] = self._write(CAPTIONS, lambda path: path.write_text(text + "\n",
                                                                                      encoding="utf-8"))
        index.update(self.extra)
        for name, text in ((VERIFIED, json.dumps(self.verified, indent=1, sort_keys=True)),
                           (INDEX, json.dumps(index, indent=1))):  # the index last: it makes a store
            with reporting_write_errors(self.partial / name):
                (self.partial / name).write_text(text + "\n")
        if self.directory.exists():  # a rerun replaces the earlier store as a whole
            shutil.rmtree(self.directory) if self.directory.is_dir() else self.directory.unlink()
        os.replace(self.partial, self.directory)  # a rename: the files keep their inodes and ctimes

    def abort(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.close()
        finally:
            if self.partial.exists():  # failed, here or in close() (a full disk): nothing left behind
                self.abort()


def write_store(directory: str | os.PathLike, chunks: Iterable[tuple], shard_bytes: int = SHARD_BYTES,
                extra: dict | None = None) -> ImageStore:
    """Write ``(images, labels)`` or ``(images, labels, captions)`` chunks as a store at ``directory``
    and open it; ``extra``: keys added to the index (see :class:`StoreWriter`)."""
    with StoreWriter(directory, shard_bytes, extra=extra) as writer:
        for chunk in chunks:
            if len(chunk) not in (2, 3):
                raise ValueError(f"a source's chunk is (images, labels) or (images, labels, captions), not "
                                 f"{len(chunk)} items")
            writer.append(*chunk)
    return ImageStore(directory)


def load_images(path: str | os.PathLike) -> ImageStore:
    """The images of a dataset written by the data stage (``results/data/<name>/train``)."""
    return ImageStore(path)
