"""The download stage: a dataset (config 'datasets.<name>') fetched and parsed into an image store."""

from __future__ import annotations

import contextlib

from igsm.stages.common import StageError


def download(out, cache_dir, settings: dict) -> str:
    """Fetch and parse a dataset into the image store ``out``; archives go to ``cache_dir``."""
    import faulthandler

    from igsm.data import DownloadError, prepare_dataset

    # Sources read archives through memory maps (LSUN's LMDB): should a damaged file still end in a
    # fatal signal, the log shows where instead of being empty.
    with contextlib.suppress(Exception):  # a stderr without a file descriptor (click's test runner)
        faulthandler.enable()
    try:
        store = prepare_dataset(settings, out, cache_dir)
    except (DownloadError, ValueError, OSError) as err:  # OSError: WriteError names the file, free space
        raise StageError(str(err)) from None
    n, h, w, c = store.shape
    return f"{out}: {n} images of {h}×{w}×{c} in {len(store.index['shards'])} shard(s)"
