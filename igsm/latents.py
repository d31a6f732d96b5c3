"""Latent diffusion (issue 31; DiT and Stable Diffusion, Rombach et al. 2022): the experiment's
networks model an autoencoder's latents instead of pixels.

An autoencoder is a config entry (``autoencoders.<name>``): a diffusers ``AutoencoderKL``, pretrained
(a hub id such as ``stabilityai/sd-vae-ft-ema``, DiT's, or a local folder, its own or a pipeline's
``vae/``) or built from ``architecture`` with random weights (the offline tests and demos), and its
scale factor (default: the autoencoder's own ``scaling_factor``, 0.18215 for SD's VAEs), which brings
the latents to about unit variance. :func:`make_autoencoder` stores it in the project's folder
(diffusers' files and ``autoencoder.json``: its source, scale factor and the sha256 of its weights,
together its identity).

The data stage encodes the training images **once** (:func:`encode_store`) into a store of latents
(igsm.data.store: float16 h×w×c, already multiplied by the scale factor, so training, pruning and the
objectives read them as they read images, ``igsm.data.to_model_range``). It stores the posterior's
mean, not a draw from it: SD's and DiT's VAEs have posterior standard deviations far below the
latents' spread, and a fixed latent per image keeps a training step a function of its seed. The
store records the autoencoder's identity; :func:`check_latent_store` refuses a store made with
another autoencoder or scale factor (a stale store, or one copied from elsewhere). Sampling decodes
the sampler's latents (÷ the scale factor) into images before FID (:meth:`Autoencoder.decode`).

A grayscale dataset with an RGB autoencoder (Fashion-MNIST and SD's VAE) is encoded with its channel
repeated and decoded to the mean of the three channels.

Imports torch and diffusers inside its functions: the workflow reads the config's facts while it
builds its DAG.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from igsm.data import ImageStore, StoreWriter, file_digest, write_text_atomically
from igsm.hub import load_local_or_hub

IDENTITY_FILE = "autoencoder.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # diffusers' save_pretrained
LATENT_DTYPE = "float16"


def downsample_factor(config: dict) -> int:
    """Image side over latent side: AutoencoderKL halves the side in every encoder block but the last."""
    return 2 ** (len(config.get("block_out_channels", (64,))) - 1)


# AutoencoderKL's own defaults for the keys the config checks read (diffusers' signature).
_ARCHITECTURE_DEFAULTS = {"in_channels": 3, "latent_channels": 4, "block_out_channels": (64,)}


def autoencoder_facts(spec: dict) -> dict | None:
    """What the config alone tells of an ``autoencoders.<name>`` entry: its image channels, latent
    channels and downsampling factor, from its architecture or a local folder's config.json (its own
    or a pipeline's vae/); None for a hub id (known once fetched) or an unreadable folder (its
    job reports it)."""
    config = None
    if spec.get("pretrained"):
        folder = Path(spec["pretrained"]).expanduser()
        for path in (folder / "config.json", folder / "vae" / "config.json"):
            try:
                config = json.loads(path.read_text())
                break
            except (OSError, ValueError):
                continue
    else:
        config = spec.get("architecture")
    if not isinstance(config, dict):
        return None
    config = {**_ARCHITECTURE_DEFAULTS, **config}
    return {"in_channels": config["in_channels"], "latent_channels": config["latent_channels"],
            "downsample_factor": downsample_factor(config)}


def make_autoencoder(spec: dict, out, cache_dir=None, key: str = "autoencoders") -> str:
    """Store the autoencoder of a config entry (``pretrained`` or ``architecture`` with ``seed``,
    optional ``scale_factor``) in ``out``: diffusers' files and :data:`IDENTITY_FILE`. ``ValueError``
    naming ``key`` if it cannot be had."""
    import torch
    from diffusers import AutoencoderKL

    if spec.get("pretrained"):
        vae = load_local_or_hub(AutoencoderKL.from_pretrained, spec["pretrained"], subfolders=("", "vae"),
                                key=f"{key}.pretrained", what="diffusers AutoencoderKL", cache_dir=cache_dir)
        source = spec["pretrained"]
    else:
        torch.manual_seed(spec.get("seed", 0))
        try:
            vae = AutoencoderKL(**spec["architecture"])
        except TypeError as err:
            raise ValueError(f"{key}.architecture: {err}") from None
        source = f"random initialisation, seed {spec.get('seed', 0)}"
    scale = spec.get("scale_factor") or vae.config.get("scaling_factor")
    if not scale:
        raise ValueError(f"{key}.scale_factor: the autoencoder's config gives none (scaling_factor); set it")
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    vae.save_pretrained(tmp, safe_serialization=True)
    record = {"source": source, "scale_factor": float(scale), "weights_sha256": file_digest(tmp / WEIGHTS_FILE),
              "latent_channels": vae.config.latent_channels, "in_channels": vae.config.in_channels,
              "downsample_factor": downsample_factor(vae.config)}
    write_text_atomically(tmp / IDENTITY_FILE, json.dumps(record, indent=1, sort_keys=True) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return (f"{out}: AutoencoderKL from {source}, {record['latent_channels']} latent channels, "
            f"1/{record['downsample_factor']} of the image side, scale factor {record['scale_factor']}")


def read_record(folder) -> dict:
    """The :data:`IDENTITY_FILE` of a stored autoencoder (read without loading it)."""
    path = Path(folder) / IDENTITY_FILE
    try:
        record = json.loads(path.read_text())
        return {**record, "identity": {k: record[k] for k in ("source", "scale_factor", "weights_sha256")}}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{folder} is not an autoencoder folder of this workflow ({path}: {err}); rerun the "
                         "workflow, which makes it") from None


class Autoencoder:
    """A stored autoencoder (:func:`make_autoencoder`), frozen: encode images, decode latents."""

    def __init__(self, folder, device="cpu"):
        from diffusers import AutoencoderKL

        self.folder = Path(folder)
        self.record = read_record(folder)
        self.vae = AutoencoderKL.from_pretrained(self.folder, low_cpu_mem_usage=False).to(device).eval().requires_grad_(False)
        self.device = device

    @property
    def scale_factor(self) -> float:
        return self.record["scale_factor"]

    def identity(self) -> dict:
        """What a latent store and a sample's metadata record of it."""
        return self.record["identity"]

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 n×H×W×C → the posterior means × scale factor, float16 n×h×w×c."""
        import torch

        from igsm.data import to_model_range

        x = to_model_range(images).to(self.device)
        if x.shape[1] == 1 and self.record["in_channels"] == 3:
            x = x.expand(-1, 3, -1, -1)
        with torch.no_grad():
            mean = self.vae.encode(x).latent_dist.mean
        return (mean * self.scale_factor).permute(0, 2, 3, 1).to(torch.float16).cpu().numpy()

    def decode(self, latents, channels: int | None = None):
        """Latents as the networks model them (N×c×h×w, × scale factor) → images N×C×H×W in [−1, 1];
        ``channels`` 1: the mean of an RGB autoencoder's three."""
        import torch

        with torch.no_grad():
            images = self.vae.decode(latents.to(self.device, torch.float32) / self.scale_factor).sample
        if channels == 1 and images.shape[1] == 3:
            images = images.mean(dim=1, keepdim=True)
        return images


def encode_store(images: ImageStore, autoencoder: Autoencoder, out, batch_size: int = 64,
                 progress: bool = True) -> ImageStore:
    """Encode the image store ``images`` into a latent store at ``out``, ``batch_size`` at a time
    (memory bounded as the image store's writer), with the labels, a captioned store's captions and
    the record :func:`check_latent_store` compares."""
    from tqdm.auto import tqdm

    record = {"autoencoder": autoencoder.identity(), "images": images.fingerprint(),
              "image_shape": list(images.image_shape)}
    extra = {"latent": record}
    captions = images.captions  # a captioned store's (MSCOCO) go with its latents: what SD trains on
    if captions is not None:
        extra["captions_info"] = images.captions_info
    with StoreWriter(out, dtype=LATENT_DTYPE, extra=extra) as writer:
        labels = images.labels
        for start in tqdm(range(0, len(images), batch_size), desc="encode", unit="batch", disable=not progress):
            stop = min(start + batch_size, len(images))
            writer.append(autoencoder.encode(images[start:stop]), labels[start:stop],
                          None if captions is None else captions[start:stop])
    return ImageStore(out)


def check_latent_store(store: ImageStore, autoencoder: dict | None) -> None:
    """``ValueError`` unless ``store`` is a latent store of the autoencoder whose identity is
    ``autoencoder`` (:meth:`Autoencoder.identity`), or an image store and ``autoencoder`` None."""
    made_with = (store.latent or {}).get("autoencoder")
    if autoencoder is None and made_with is None:
        return
    if autoencoder is None:
        raise ValueError(f"dataset {store.directory} holds latents of the autoencoder {made_with['source']!r}, "
                         "but the experiment names no autoencoder (experiments.<name>.autoencoder)")
    if made_with is None:
        raise ValueError(f"dataset {store.directory} holds images, but the experiment is a latent one (autoencoder "
                         f"{autoencoder['source']!r}): train on the latent store the workflow encodes")
    if made_with != autoencoder:
        differ = [k for k in autoencoder if made_with.get(k) != autoencoder[k]]
        raise ValueError(f"dataset {store.directory} was encoded by another autoencoder ({', '.join(differ)}: "
                         f"{[made_with.get(k) for k in differ]}, the experiment's: {[autoencoder[k] for k in differ]}); "
                         "delete it and rerun the workflow, which encodes it again")
