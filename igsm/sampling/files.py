"""The sample stage's files: finished batches of an interrupted job (``PartialBatches``), sample sets
(``save_samples`` / ``load_samples``: uint8 images, their seeds, JSON metadata) and the gathering of a
set's shards in seed order (``gather_shards``), which refuses holes, duplicates and mixed settings.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from igsm.data import REMAKE, numpy_error_text, read_npz, save_arrays
from igsm.data.common import reporting_write_errors


class PartialBatches:
    """Finished batches of an interrupted job, one ``.npy`` each, in ``folder``.

    ``fingerprint`` (JSON-able: model digest, sampler settings, precision, seeds, batch size …)
    says what made them; a folder with another fingerprint is emptied, so a rerun with changed
    settings never mixes old and new images. Every file is written under a temporary name and
    renamed, so a batch file that exists is complete; one that still cannot be read (cut short by a
    full disk or a copy) counts as missing and is redone (``done``), or, found only when the batches
    are gathered (``load``), is removed with a ``ValueError`` so that the rerun redoes it.
    """

    FINGERPRINT = "fingerprint.json"

    def __init__(self, folder, fingerprint: dict, *, reset: bool = True):
        self.folder = Path(folder)
        text = json.dumps(fingerprint, sort_keys=True)
        marker = self.folder / self.FINGERPRINT
        if reset and self.folder.exists() and (not marker.is_file() or marker.read_bytes() != text.encode()):
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if reset and not marker.exists():
            _atomic_write(marker, lambda f: f.write(text.encode()))

    def path(self, batch: int) -> Path:
        return self.folder / f"batch-{batch:06d}.npy"

    def done(self, batch: int) -> bool:
        """Whether ``batch`` is stored and readable; an unreadable one (cut short, changed) counts
        as missing, with a message, and is redone (its file replaced)."""
        path = self.path(batch)
        if not path.exists():
            return False
        problem = _npy_problem(path)
        if problem is not None:
            print(f"{path} is unreadable ({problem}); batch {batch} is redone", flush=True)
            return False
        return True

    def save(self, batch: int, images: np.ndarray) -> None:
        _atomic_write(self.path(batch), lambda f: np.save(f, images))

    def load(self, num_batches: int) -> np.ndarray:
        missing = [b for b in range(num_batches) if not self.path(b).exists()]
        if missing:
            raise RuntimeError(f"{self.folder}: batches {missing[:10]} missing")
        batches = []
        for b in range(num_batches):
            path = self.path(b)
            try:
                images = np.load(path, allow_pickle=False)
            except Exception as err:  # ValueError, EOFError, OSError, …
                images, problem = None, numpy_error_text(err)
            else:
                problem = _images_problem(images)
            if problem is not None:
                # Removed, so that the rerun redoes this batch instead of failing here again.
                path.unlink(missing_ok=True)
                raise ValueError(f"{path} is unreadable ({problem}); removed it: rerun the job, "
                                 f"which redoes that batch and keeps the others")
            batches.append(images)
        return np.concatenate(batches)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _images_problem(images) -> str | None:
    """What is wrong with an array meant to hold uint8 N×H×W×C images (None: nothing)."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        return (f"expected uint8 N×H×W×C images, found {getattr(images, 'dtype', type(images).__name__)} "
                f"of shape {getattr(images, 'shape', '?')}")
    return None


def _npy_problem(path: Path) -> str | None:
    """Why an .npy file of images cannot be read (None: it can), from its header and size only."""
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:  # a short file: "mmap length is greater than file size", EOFError, …
        return numpy_error_text(err)
    return _images_problem(images)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with reporting_write_errors(path), open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


# Metadata that must agree between the shards of one sample set (everything that makes the bits).
SHARD_INVARIANTS = ("model_digest", "sampler", "sampler_kwargs", "image_shape", "batch_size",
                    "precision", "micro_batch", "channels_last", "compile_mode", "group_norm", "schedule")


def save_samples(path, images: np.ndarray, seeds: np.ndarray, metadata: dict) -> None:
    """images (uint8 N×H×W×C), seeds and JSON metadata, written atomically."""
    save_arrays(path, images=images, seeds=np.asarray(seeds, dtype=np.int64),
                metadata=np.array(json.dumps(metadata, sort_keys=True)))


def load_samples(path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(images, seeds, metadata) of a samples file; metadata {} for files without it.

    A missing, unreadable (truncated, not an .npz) or malformed file raises ``ValueError`` naming it.
    """
    arrays, keys = read_npz(path, ("images", "seeds", "metadata"), "samples")
    if "images" not in arrays:
        raise ValueError(f"{path}: no 'images' array; keys are {keys}; {REMAKE}")
    images = arrays["images"]
    problem = _images_problem(images)
    if problem is not None:
        raise ValueError(f"{path}: {problem}; {REMAKE}")
    seeds = arrays["seeds"] if "seeds" in arrays else np.arange(len(images))
    if seeds.ndim != 1 or len(seeds) != len(images) or not np.issubdtype(seeds.dtype, np.integer):
        raise ValueError(f"{path}: {len(images)} images but seeds of shape {seeds.shape} ({seeds.dtype}); "
                         f"expected one integer seed per image; {REMAKE}")
    try:
        metadata = json.loads(str(arrays["metadata"])) if "metadata" in arrays else {}
        if not isinstance(metadata, dict):
            raise ValueError(f"a JSON {type(metadata).__name__}, not an object")
    except ValueError as err:
        raise ValueError(f"{path}: malformed metadata ({err}); {REMAKE}") from None
    return images, seeds, metadata


def gather_shards(paths, first_seed: int, num_images: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Concatenate shard files in seed order; check that they hold exactly seeds
    first_seed … first_seed+num_images−1 once each, made with the same settings. An unreadable
    shard raises ``ValueError`` naming it (:func:`load_samples`)."""
    shards = [load_samples(p) for p in paths]
    if not shards:
        raise ValueError("no shards to gather")
    order = sorted(range(len(shards)), key=lambda i: int(shards[i][1][0]) if len(shards[i][1]) else 0)
    for i in order[1:]:
        if shards[i][0].shape[1:] != shards[order[0]][0].shape[1:]:
            raise ValueError(f"{paths[i]}: images of shape {shards[i][0].shape[1:]}, but {paths[order[0]]} "
                             f"has {shards[order[0]][0].shape[1:]}; shards of one set must be made alike")
    images = np.concatenate([shards[i][0] for i in order])
    seeds = np.concatenate([shards[i][1] for i in order])
    expected = np.arange(first_seed, first_seed + num_images)
    if len(seeds) != num_images or not np.array_equal(seeds, expected):
        raise ValueError(f"shards hold {len(seeds)} images with seeds {_describe(seeds)}; expected "
                         f"{num_images} images with seeds {first_seed}..{first_seed + num_images - 1}")
    first_meta = shards[order[0]][2]
    for i in order[1:]:
        meta = shards[i][2]
        for key in SHARD_INVARIANTS:
            if meta.get(key) != first_meta.get(key):
                raise ValueError(f"{paths[i]}: {key} = {meta.get(key)!r}, but {paths[order[0]]} has "
                                 f"{first_meta.get(key)!r}; shards of one set must be made alike")
    metadata = {k: v for k, v in first_meta.items() if k not in ("first_seed", "num_images", "shard", "device")}
    metadata.update(first_seed=int(first_seed), num_images=int(num_images), num_shards=len(shards),
                    devices=sorted({str(shards[i][2].get("device")) for i in order}))
    return images, seeds, metadata


def _describe(seeds: np.ndarray) -> str:
    if len(seeds) == 0:
        return "(none)"
    gaps = np.flatnonzero(np.diff(seeds) != 1)
    text = f"{seeds[0]}..{seeds[-1]}"
    return text + (f" (not contiguous after seed {seeds[gaps[0]]})" if len(gaps) else "")
