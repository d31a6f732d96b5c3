"""CIFAR-10 (paper Sec. 5.1): the official python-pickle archive, fetched from a URL with a sha256
check (the URL is a config key, so a mirror or a local ``file://`` copy can serve), read by an
unpickler that can build nothing but the batches' arrays.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from igsm.data.common import fetch_cached
from igsm.data.sources import check_hex_digest, check_split, check_url, register

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"


def _latin1_bytes(text, encoding="latin1"):
    """What a protocol-2 pickle calls for ``bytes``: ``_codecs.encode(text, 'latin1')``, nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode called with {type(text).__name__}, {encoding!r}: "
                                     "only latin1-encoded strings (a pickled bytes object) are allowed")
    return text.encode("latin1")


# The globals a CIFAR-10 batch pickle may name, and what each resolves to. Plain dicts, lists,
# bytes, str, ints and floats need none. Numpy arrays need their reconstruction functions: resolved
# here from numpy itself, so both its 1.x ('numpy.core') and 2.x ('numpy._core') names work without
# importing numpy.core (deprecated in numpy 2). Protocol-2 pickles written by Python 3 spell bytes
# as _codecs.encode(str, 'latin1'): allowed through a wrapper that does only that.
_ARRAY_RECONSTRUCT = np.empty(0).__reduce__()[0]
_SCALAR = np.float64(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # protocol-5 pickles of arrays
_CIFAR10_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _ARRAY_RECONSTRUCT for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _SCALAR for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _FROMBUFFER for core in ("core", "_core")},
    ("_codecs", "encode"): _latin1_bytes,
}


_CIFAR10_MAX_BATCH_BYTES = 1 << 29  # 512 MiB: a batch is read into memory whole


class _RefusedGlobal(ValueError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only CIFAR-10 batch contents: never imports or calls anything else.

    A pickle runs code only through the globals it names (``find_class``); this one resolves just
    the allow-list above, so a hostile archive cannot reach os.system, eval, or any constructor.
    """

    def __init__(self, file, where: str):
        super().__init__(file, encoding="bytes")
        self.where = where

    def find_class(self, module, name):
        try:
            return _CIFAR10_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{self.where}: refuses to load '{module}.{name}': not CIFAR-10 data "
                                 "(a batch holds only a dict of numpy arrays, lists, bytes and ints). "
                                 "Do not use this archive; point 'url' at the official one and set "
                                 "'sha256' to its digest.") from None

    def persistent_load(self, pid):
        raise _RefusedGlobal(f"{self.where}: refuses a persistent id in the pickle: not CIFAR-10 data")


def _cifar10_batch(blob: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N×32×32×3 uint8, labels N int64) of one batch pickle, checked; ``where`` names it."""
    try:
        batch = _CifarUnpickler(io.BytesIO(blob), where).load()
    except _RefusedGlobal:
        raise
    except Exception as err:  # anything a malformed pickle makes the unpickler raise
        raise ValueError(f"{where}: not a readable pickle ({type(err).__name__}: {err}): the archive is "
                         "corrupt or not CIFAR-10's; delete it and fix the dataset's 'url' or 'sha256'") from None

    def bad(message):
        raise ValueError(f"{where}: {message}: not a CIFAR-10 batch")

    if not isinstance(batch, dict):
        bad(f"a pickled {type(batch).__name__}, expected a dict with 'data' and 'labels'")
    keys = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in batch.items()}
    for key in ("data", "labels"):
        if key not in keys:
            bad(f"no {key!r} entry (keys: {sorted(map(str, keys))})")
    data, labels = keys["data"], keys["labels"]
    if not isinstance(data, (np.ndarray, list, tuple)) or not isinstance(labels, (np.ndarray, list, tuple)):
        bad(f"'data' is a {type(data).__name__} and 'labels' a {type(labels).__name__}, expected "
            "arrays or lists")
    try:
        data, labels = np.asarray(data), np.asarray(labels)
    except ValueError as err:  # ragged lists
        bad(f"'data' or 'labels' is not a regular array ({err})")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) == 0:
        bad(f"'data' of shape {data.shape}, expected N×3072 (N ≥ 1 images of 3×32×32)")
    if data.dtype.kind not in "ui" or data.min() < 0 or data.max() > 255:
        bad(f"'data' of dtype {data.dtype}, range {data.min()}..{data.max()}: expected bytes 0..255"
            if data.dtype.kind in "uif" else f"'data' of dtype {data.dtype}, expected uint8")
    if labels.shape != (len(data),):
        bad(f"'labels' of shape {labels.shape}, expected ({len(data)},), one per image")
    if labels.dtype.kind not in "ui" or labels.min() < 0 or labels.max() > 9:
        bad(f"'labels' of dtype {labels.dtype}" + (f", range {labels.min()}..{labels.max()}"
            if labels.dtype.kind in "uif" else "") + ": expected integers 0..9, CIFAR-10's classes")
    images = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int64)


def parse_cifar10(archive: str | os.PathLike, split: str = "train") -> dict:
    """Images and labels from the official ``cifar-10-python.tar.gz`` (any number of images).

    The batches are pickles; they are read by an unpickler that resolves only numpy's array
    reconstruction globals (see ``_CIFAR10_GLOBALS``), so an archive from an untrusted mirror whose
    sha256 the user copied cannot run code: any other global is refused with a ValueError. A
    truncated or corrupt archive (its gzip stream is checked to the CRC first) is a ValueError
    naming it, as is a batch of the wrong structure.
    """
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []

    try:
        # The whole gzip stream first, to its CRC: tarfile stops silently at a garbled header
        # after the first, and a member's bytes are checked only when the stream's end is read.
        with gzip.open(archive, "rb") as stream:
            while stream.read(1 << 22):
                pass
        with tarfile.open(archive, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for name in names:
                if name not in members:
                    raise ValueError(f"{archive}: no {name} inside: not a CIFAR-10 python archive. "
                                     "Delete it and check the dataset's 'url' and 'sha256'")
                if members[name].size > _CIFAR10_MAX_BATCH_BYTES:  # the official ones are 31 MB
                    raise ValueError(f"{archive}: member {members[name].name} is {members[name].size} "
                                     "bytes, far beyond a CIFAR-10 batch: not a CIFAR-10 python archive. "
                                     "Delete it and check the dataset's 'url' and 'sha256'")
                # Read whole first, so a broken archive and a broken pickle are told apart.
                blob = tar.extractfile(members[name]).read()
                batch_images, batch_labels = _cifar10_batch(blob, f"{archive}: member {members[name].name}")
                images.append(batch_images)
                labels.append(batch_labels)
    except FileNotFoundError:
        raise ValueError(f"{archive}: no such file") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{archive}: corrupt or truncated gzip/tar archive ({type(err).__name__}: {err}). "
                         "Delete it and check the dataset's 'url' and 'sha256' (the digest must be the "
                         "complete official archive's)") from None
    return {"images": np.ascontiguousarray(np.concatenate(images)), "labels": np.concatenate(labels)}




def check(spec: dict, fail) -> None:
    check_split(spec, fail, ("train", "test"))
    check_url(spec, fail)
    if spec["image_size"] != 32:
        fail("image_size", f"CIFAR-10 images are 32×32; set 32 (got {spec['image_size']!r})")
    sha256 = spec.get("sha256")
    if sha256 is not None and not isinstance(sha256, str):
        fail("sha256", f"cifar10 is one archive: give its sha256 as one string of 64 hex digits "
                       f"(got {sha256!r})")
    if sha256 is not None:
        check_hex_digest(sha256, 64, "sha256", fail)


def prepare(spec: dict, cache_dir: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    archive = fetch_cached(spec.get("url") or CIFAR10_URL, cache_dir / "cifar-10-python.tar.gz",
                           spec.get("sha256") or CIFAR10_SHA256)
    data = parse_cifar10(archive, spec["split"])
    yield data["images"], data["labels"]


register("cifar10", check, prepare)
