"""What every data source shares: downloads checked by digest, .npz reading with clear errors, writes
that name the file and the free space when the disk is full, and the conversion between uint8
images and the networks' value range.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are made: the workflow's DAG needs no torch
    import torch

URL_SCHEMES = ("http", "https", "file")


class DownloadError(RuntimeError):
    pass


class WriteError(OSError):
    """A file could not be written (a full disk, a quota, a file-size limit, a read-only folder);
    the message names the file and the space left on its filesystem."""


def _free_space(path: str | os.PathLike) -> tuple[int | None, Path]:
    """(bytes free or None if unknown, mount point) of the filesystem that holds ``path``."""
    folder = Path(os.path.abspath(path))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    mount = folder
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        return shutil.disk_usage(folder).free, mount
    except OSError:
        return None, mount


def _size_text(num_bytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if num_bytes < 1024:
            return f"{num_bytes:.0f} {unit}" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"


NEARLY_FULL_BYTES = 16 << 20  # less free than this after a failed write: the disk is full


@contextlib.contextmanager
def reporting_write_errors(path: str | os.PathLike, also: tuple = ()):
    """Turn an OSError raised while writing ``path`` (ENOSPC, EDQUOT, EFBIG, …) into one WriteError
    naming the file and the free space, instead of a traceback that names neither. ``also``: the
    exceptions of writers that do not raise OSError (torch.save's RuntimeError, safetensors')."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, *also) as err:
        code = getattr(err, "errno", None)
        reason = getattr(err, "strerror", None) or str(err).strip().split("\n")[0][:200] or type(err).__name__
        free, mount = _free_space(path)
        space = f"{_size_text(free)} free on {mount}" if free is not None else f"free space on {mount} unknown"
        # numpy and torch report a short write without an errno ("N requested and M written",
        # "unexpected pos"): the free space left tells
        full = code in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < NEARLY_FULL_BYTES)
        advice = "; the disk is full: make room there and rerun" if full else ""
        error = WriteError(f"cannot write {path}: {reason} ({space}){advice}")
        error.errno = code
        raise error from None


def copy_to_file(source, destination: str | os.PathLike, block_size: int = 1 << 20) -> None:
    """Stream the binary file object ``source`` into ``destination``. A failed write raises
    WriteError naming ``destination``; a failed read (network, archive) propagates unchanged, so
    the caller can tell a full disk from a broken download."""
    with reporting_write_errors(destination):
        out = open(destination, "wb")
    try:
        while block := source.read(block_size):
            with reporting_write_errors(destination):
                out.write(block)
    except BaseException:
        with contextlib.suppress(OSError):
            out.close()
        raise
    with reporting_write_errors(destination):
        out.close()  # it flushes: a full disk may show only here


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, destination: str | os.PathLike, sha256: str | None = None,
             algorithm: str = "sha256", url_key: str = "url", digest_key: str | None = None) -> Path:
    """Fetch ``url`` (http(s) or file://) to ``destination``, checking its digest (``sha256``: the
    expected hex digest of ``algorithm``; CelebA publishes MD5s). ``url_key``, ``digest_key``
    (default ``algorithm``): the config keys an error tells the user to fix (mscoco has two URLs).

    The file appears under its final name only once complete and verified.
    """
    destination = Path(destination)
    partial = destination.with_name(destination.name + ".part")
    with reporting_write_errors(destination.parent):
        destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            copy_to_file(response, partial)
    except WriteError:
        partial.unlink(missing_ok=True)
        raise
    except (urllib.error.URLError, OSError, ValueError) as err:
        partial.unlink(missing_ok=True)
        raise DownloadError(
            f"could not download {url}: {err}. Point the dataset's '{url_key}' at a reachable copy "
            "(a mirror, or file:///path/to/the/archive)."
        ) from None
    if sha256 is not None:
        actual = file_digest(partial, algorithm)
        if actual != sha256.lower():
            partial.unlink()
            raise DownloadError(
                f"{algorithm} mismatch for {url}: expected {sha256}, got {actual}. The file is "
                f"corrupt or not the archive the config names; fix '{url_key}' or '{digest_key or algorithm}'."
            )
    partial.replace(destination)
    return destination


def fetch_cached(url: str, destination: str | os.PathLike, sha256: str, algorithm: str = "sha256",
                 url_key: str = "url", digest_key: str | None = None) -> Path:
    """``destination`` if it already holds the file with this digest, else ``download`` it there."""
    destination = Path(destination)
    if not destination.exists() or file_digest(destination, algorithm) != sha256.lower():
        download(url, destination, sha256, algorithm, url_key=url_key, digest_key=digest_key)
    return destination


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write under a temporary name, then rename: never a half-written file that looks complete."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with reporting_write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def save_arrays(path: str | os.PathLike, **arrays) -> None:
    """np.savez written to a temporary name first, so a crash leaves no complete-looking file."""
    path = Path(path)
    tmp = None
    try:
        with reporting_write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
                np.savez(tmp, **arrays)
            os.replace(tmp.name, path)
    finally:
        if tmp is not None:
            Path(tmp.name).unlink(missing_ok=True)


# What to do about a file of results/ that cannot be read.
REMAKE = "it was not written completely or was changed since; delete it and rerun the workflow, which remakes it"


def numpy_error_text(err: BaseException) -> str:
    """Why numpy could not read a file, in one line."""
    if "pickled" in str(err):  # numpy takes an unknown format for a pickle
        return "not a numpy file: its first bytes are neither an .npz (zip) nor an .npy header"
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def read_npz(path: str | os.PathLike, names: tuple, kind: str, remedy: str = REMAKE) -> tuple[dict, list]:
    """(the arrays among ``names`` that an .npz file holds, all its keys); a missing or unreadable
    file (truncated, not an .npz) raises ValueError naming it, its ``kind`` and ``remedy``."""
    if not Path(path).is_file():
        raise ValueError(f"{kind} file {path} does not exist; check the path, or rerun the workflow, "
                         "which makes it")
    try:
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):  # an .npy file: one array
            raise ValueError(f"one {getattr(data, 'shape', '')} array (.npy), not an .npz archive")
        with data:
            keys = sorted(data.files)
            return {k: data[k] for k in names if k in keys}, keys
    except Exception as err:  # BadZipFile, EOFError, zlib.error, ValueError, OSError, …
        raise ValueError(f"{path} is unreadable ({numpy_error_text(err)}); {remedy}") from None


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 N×H×W×C → float N×C×H×W in [−1, 1], the range the networks model; a latent store's
    floats (igsm.latents: already scaled by the autoencoder's factor) → float32 N×C×H×W as they are."""
    import torch

    x = torch.as_tensor(images).permute(0, 3, 1, 2)
    return x.float().div(127.5).sub(1.0) if x.dtype == torch.uint8 else x.float()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float N×C×H×W in [−1, 1] → uint8 N×H×W×C, rounding as image writers do."""
    import torch

    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
