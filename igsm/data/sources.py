"""The registry of data sources: each source is one module that registers how to check a config
entry (``datasets.<name>``) and how to build the dataset from it. A new source is one new module
imported by ``igsm/data/__init__.py`` (and its name added to the schema's ``source`` enum; a test
keeps the two equal).
"""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from igsm.data.common import URL_SCHEMES
from igsm.data.store import ImageStore, write_store
from igsm.registry import registered_twice
from igsm.schema import dataset_defaults

Fail = Callable[[str, str], None]  # fail(key, message) raises, naming the key
# (entry, download cache) → (uint8 n×H×W×C images, int64 n labels) chunks, streamed into the store:
# a source never needs to hold its whole dataset in memory. A captioned source (mscoco) yields
# (images, labels, captions) instead, captions a list of n str (igsm/data/store.py).
Chunk = tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, list[str]]
Prepare = Callable[[dict, Path], Iterable[Chunk]]


@dataclass(frozen=True)
class DataSource:
    name: str
    check: Callable[[dict, Fail], None]  # errors the config entry alone shows (no network, no reading)
    prepare: Prepare
    # entry → keys its store's index adds (mscoco: how the captions were picked); None: none, so
    # the stores of the other sources keep their index and fingerprint
    store_record: Callable[[dict], dict] | None = None
    captioned: bool = False  # its stores hold one caption per image (igsm.conditioning's captions kind)


SOURCES: dict[str, DataSource] = {}


def register(name: str, check: Callable[[dict, Fail], None], prepare: Prepare,
             store_record: Callable[[dict], dict] | None = None, captioned: bool = False) -> DataSource:
    if name in SOURCES:
        raise registered_twice("data source", name, f"the name {name!r}", SOURCES[name].prepare, prepare)
    SOURCES[name] = DataSource(name, check, prepare, store_record, captioned)
    return SOURCES[name]


def is_captioned(source: str) -> bool:
    """Whether the stores of data source ``source`` hold a caption per image."""
    return source in SOURCES and SOURCES[source].captioned


def prepare_dataset(spec: dict, out_dir: str | os.PathLike, cache_dir: str | os.PathLike) -> ImageStore:
    """Build the dataset described by a config ``datasets.<name>`` entry as an image store."""
    _check_spec(spec)
    source, spec = SOURCES[spec["source"]], with_defaults(spec)
    extra = source.store_record(spec) if source.store_record else None
    return write_store(out_dir, source.prepare(spec, Path(cache_dir)), extra=extra)


def with_defaults(spec: dict) -> dict:
    """A ``datasets.<name>`` entry with the keys it leaves out at the schema's defaults: what the
    sources read (``spec["image_size"]``), so none keeps a default of its own."""
    return {**dataset_defaults(spec), **spec}


def check_dataset_spec(name: str, spec: dict) -> None:
    """Raise ValueError naming ``datasets.<name>.<key>`` for an error the config entry alone shows.

    Touches neither the network nor the disk, except to see that an image-folder's ``path`` is a
    folder, so the workflow can call it for every dataset before any job runs.
    """
    _check_spec(spec, f"datasets.{name}.")


def _check_spec(spec: dict, prefix: str = "") -> None:
    """The source's checks; keys absent from ``spec`` take the schema's defaults."""

    def fail(key, message):
        raise ValueError(f"{prefix}{key}: {message}")

    source = spec.get("source")
    if source not in SOURCES:
        fail("source", f"unknown dataset source {source!r}; choose one of {tuple(SOURCES)}")
    SOURCES[source].check(with_defaults(spec), fail)


# ---- checks several sources share ----------------------------------------------------------------

def check_split(spec: dict, fail: Fail, splits: tuple) -> None:
    split = spec["split"]
    if split not in splits:
        fail("split", f"{split!r}: {spec.get('source')} has the splits {list(splits)}")


def check_url(spec: dict, fail: Fail, required: str = "", key: str = "url") -> None:
    """An http(s):// or file:// URL at ``key``; ``required`` (a hint where to get the files) when it
    has no default."""
    url = spec.get(key) or ""
    if not url and required:
        fail(key, f"{spec.get('source')} has no official URL this workflow can download from: {required}")
    if url and urllib.parse.urlsplit(url).scheme not in URL_SCHEMES:
        fail(key, f"{url!r} is not an http://, https:// or file:// URL")


def check_max_images(spec: dict, fail: Fail) -> None:
    """``max_images``, where a source takes it: a positive count (absent = all)."""
    max_images = spec.get("max_images")
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int)
                                   or max_images < 1):
        fail("max_images", f"{max_images!r}: a positive number of images (absent = all)")


def check_hex_digest(digest, length: int, key: str, fail: Fail) -> None:
    if not (isinstance(digest, str) and re.fullmatch(f"[0-9a-fA-F]{{{length}}}", digest)):
        fail(key, f"not {length} hex digits (got {digest!r})")
