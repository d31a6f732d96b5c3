"""What every stage does alike: fail with a message the user can act on, read its inputs with the
loaders' own messages, write JSON atomically, build the experiment's forward process."""

from __future__ import annotations

import contextlib
import json


class StageError(Exception):
    """A stage's failure the user can act on: its message names the file, option or config key.
    The CLI prints it (no traceback) and exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def readable_inputs():
    """A missing or corrupt input file (model, samples, statistics): the loader's message, which
    names the file and what to do, instead of a traceback."""
    try:
        yield
    except (ValueError, OSError) as err:
        raise StageError(str(err)) from None


def write_json(path, payload) -> None:
    from igsm.data import write_text_atomically

    write_text_atomically(path, json.dumps(payload, indent=2) + "\n")


def diffusion_of(settings: dict) -> dict:
    """The 'diffusion' section a stage's settings carry (the workflow passes the experiment's along
    with the stage's own section), or the schema's default where they carry none."""
    from igsm.schema import experiment_default

    return settings["diffusion"] if "diffusion" in settings else experiment_default("diffusion")


def forward_process(diffusion: dict):
    """The experiment's forward process of its 'diffusion' section (DDPM or VP-SDE, igsm.diffusion)."""
    from igsm.diffusion import process_from_settings

    try:
        return process_from_settings(diffusion)
    except ValueError as err:
        raise StageError(f"--settings: {err}") from None


def conditioning_of(settings: dict):
    """The experiment's conditioning (igsm.conditioning) that a stage's settings carry; None if
    they carry none (unconditional)."""
    from igsm.conditioning import conditioning_from_settings

    try:
        return conditioning_from_settings(settings.get("conditioning"))
    except ValueError as err:
        raise StageError(f"--settings: {err}") from None


def denoiser(net, options: dict, micro_batch: int | None = None):
    """The network as the 'sample' settings run it (igsm.sampling.denoiser_from_settings)."""
    from igsm.sampling import denoiser_from_settings

    try:
        return denoiser_from_settings(net, options, micro_batch)
    except ValueError as err:
        raise StageError(str(err)) from None


def training_data(data, latents: dict | None):
    """The store a training or pruning job reads (``data``), checked against a latent experiment's
    autoencoder (``latents``: the settings' ``latents`` section, its ``autoencoder`` folder; None for
    a pixel experiment): a latent store made with another autoencoder or scale factor, or the wrong
    kind of store, is refused naming both (igsm.latents)."""
    from igsm.data import load_images
    from igsm.latents import check_latent_store, read_record

    with readable_inputs():
        images = load_images(data)
        check_latent_store(images, read_record(latents["autoencoder"])["identity"] if latents else None)
    return images
