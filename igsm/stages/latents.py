"""The latent stages (issue 31): an experiment's autoencoder stored in the project's folder, and the
training images encoded into its latents once (igsm.latents)."""

from __future__ import annotations

from igsm.stages.common import StageError, readable_inputs
from igsm.stages.process import device as torch_device, set_threads


def autoencoder(out, cache_dir, settings: dict) -> str:
    """Store the autoencoder of the config entry ``settings`` (``autoencoders.<name>``) in ``out``."""
    from igsm.latents import make_autoencoder

    try:
        return make_autoencoder(settings, out, cache_dir)
    except (ValueError, OSError) as err:
        raise StageError(str(err)) from None


def encode(data, autoencoder_dir, out, batch_size: int, device: str, threads: int | None) -> str:
    """Encode the image store ``data`` into a latent store ``out`` with the stored autoencoder."""
    from igsm.data import load_images
    from igsm.latents import Autoencoder, encode_store

    set_threads(threads)
    with readable_inputs():
        images = load_images(data)
        vae = Autoencoder(autoencoder_dir, torch_device(device))
    if images.dtype.name != "uint8":
        raise StageError(f"--data: {data} holds latents already, not images")
    if images.image_shape[2] not in (1, vae.record["in_channels"]):
        raise StageError(f"--data: {data} has {images.image_shape[2]} channels, the autoencoder takes "
                         f"{vae.record['in_channels']}")
    try:
        store = encode_store(images, vae, out, batch_size)
    except (ValueError, OSError) as err:
        raise StageError(str(err)) from None
    n, h, w, c = store.shape
    return f"{out}: {n} latents of {h}×{w}×{c} ({store.dtype}), scale factor {vae.scale_factor}"
