"""Latent diffusion (issue 31, igsm/latents.py): the autoencoder stored with its identity, the data
stage's latent store, the refusal of a store made with another autoencoder, decoding in sampling,
and the config's checks. Tiny random-initialised diffusers AutoencoderKLs, on the CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from igsm.data import to_model_range, write_store
from igsm.latents import (IDENTITY_FILE, Autoencoder, autoencoder_facts, check_latent_store, encode_store,
                          make_autoencoder, read_record)
from igsm.stages.common import StageError, training_data

ARCHITECTURE = {"in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16], "latent_channels": 4,
                "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
                "norm_num_groups": 4, "layers_per_block": 1, "sample_size": 16}
RGB = {**ARCHITECTURE, "in_channels": 3, "out_channels": 3}
SCALE = 0.37  # not 1, nor the default 0.18215: a factor applied twice, or not at all, shows


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A pixel store of 10 random 16×16 greyscale images, a tiny autoencoder and its latent store."""
    root = tmp_path_factory.mktemp("latents")
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 1), dtype=np.uint8)
    pixels = write_store(root / "train", [(images, np.arange(10) % 3)])
    make_autoencoder({"architecture": ARCHITECTURE, "seed": 0, "scale_factor": SCALE}, root / "vae")
    vae = Autoencoder(root / "vae")
    latents = encode_store(pixels, vae, root / "latents", batch_size=4, progress=False)
    return {"root": root, "images": images, "pixels": pixels, "vae": vae, "latents": latents}


def test_the_store_holds_the_posterior_means_times_the_scale_factor(stored):
    """Catches a latent stored unscaled, scaled twice, drawn from the posterior, or the images' rows
    shuffled across the encoder's batches."""
    vae, store = stored["vae"], stored["latents"]
    with torch.no_grad():
        expected = vae.vae.encode(to_model_range(stored["images"])).latent_dist.mean * SCALE
    assert store.shape == (10, 8, 8, 4) and store.dtype == np.float16
    torch.testing.assert_close(to_model_range(store[np.arange(10)]), expected, atol=2e-3, rtol=2e-3)
    np.testing.assert_array_equal(store.labels, np.arange(10) % 3)
    assert store.latent["autoencoder"] == vae.identity() and store.latent["autoencoder"]["scale_factor"] == SCALE
    assert store.latent["images"] == stored["pixels"].fingerprint()


def test_decoding_what_training_reads_gives_the_autoencoders_reconstruction(stored):
    """The scale factor round trip: training reads latents × s, sampling decodes latents ÷ s. A wrong
    VAE scale factor on either side (or none) decodes other images than the autoencoder's own
    reconstruction of the training image."""
    vae = stored["vae"]
    x0 = to_model_range(stored["latents"][np.arange(4)])
    with torch.no_grad():
        reconstruction = vae.vae.decode(vae.vae.encode(to_model_range(stored["images"][:4])).latent_dist.mean).sample
    torch.testing.assert_close(vae.decode(x0), reconstruction, atol=5e-3, rtol=5e-3)


def test_a_pixel_store_keeps_the_index_it_had_before_latents(stored):
    """A uint8 store's index gains no key: its fingerprint, and every training run's, stays the same."""
    index = json.loads((stored["root"] / "train" / "index.json").read_text())
    assert set(index) == {"format", "num_images", "image_shape", "shards", "labels_sha256"}


def test_a_store_made_with_another_autoencoder_is_refused(stored):
    """Another autoencoder's latents, another scale factor, latents for a pixel experiment and images
    for a latent one: each an error naming the store, at the job's start."""
    root = stored["root"]
    make_autoencoder({"architecture": ARCHITECTURE, "seed": 1, "scale_factor": SCALE}, root / "other")
    make_autoencoder({"architecture": ARCHITECTURE, "seed": 0, "scale_factor": 0.5}, root / "rescaled")
    latents = root / "latents"
    training_data(latents, {"autoencoder": str(root / "vae")})  # its own: accepted
    with pytest.raises(StageError, match=r"latents was encoded by another autoencoder \(source, weights_sha256"):
        training_data(latents, {"autoencoder": str(root / "other")})
    with pytest.raises(StageError, match=r"another autoencoder \(scale_factor: \[0\.37\], the experiment's: \[0\.5\]"):
        training_data(latents, {"autoencoder": str(root / "rescaled")})
    with pytest.raises(StageError, match=r"holds latents of the autoencoder .* names no autoencoder"):
        training_data(latents, None)
    with pytest.raises(StageError, match=r"train holds images, but the experiment is a latent one"):
        training_data(root / "train", {"autoencoder": str(root / "vae")})
    with pytest.raises(StageError, match=rf"{IDENTITY_FILE}"):
        training_data(latents, {"autoencoder": str(root)})  # a folder that is no stored autoencoder


def test_a_captioned_store_keeps_its_captions_in_its_latents(stored, tmp_path):
    """MSCOCO's latents for SD: each latent with its image's caption and the caption rule (the
    captions kind reads them from the store training reads: the latent one)."""
    images = stored["images"][:5]
    captions = [f"caption {i}" for i in range(5)]
    pixels = write_store(tmp_path / "train", [(images[:3], np.arange(3), captions[:3]),
                                              (images[3:], np.arange(3, 5), captions[3:])],
                         extra={"captions_info": {"source": "mscoco", "rule": "first"}})
    latents = encode_store(pixels, stored["vae"], tmp_path / "latents", batch_size=2, progress=False)
    assert latents.captions == captions and latents.captions_info == {"source": "mscoco", "rule": "first"}
    assert stored["latents"].captions is None  # and none where the pixels had none


def test_greyscale_images_with_an_rgb_autoencoder(tmp_path):
    """Fashion-MNIST with SD's VAE: the channel repeated to encode, the mean of three decoded."""
    make_autoencoder({"architecture": RGB, "seed": 0, "scale_factor": 1.0}, tmp_path / "vae")
    vae = Autoencoder(tmp_path / "vae")
    grey = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
    with torch.no_grad():
        expected = vae.vae.encode(to_model_range(np.repeat(grey, 3, axis=3))).latent_dist.mean
    torch.testing.assert_close(to_model_range(vae.encode(grey)), expected, atol=2e-3, rtol=2e-3)
    decoded = vae.decode(expected, channels=1)
    with torch.no_grad():
        rgb = vae.vae.decode(expected).sample
    assert decoded.shape == (2, 1, 16, 16)
    torch.testing.assert_close(decoded, rgb.mean(dim=1, keepdim=True))


def test_a_pretrained_folder_its_pipeline_layout_and_its_own_scale_factor(tmp_path):
    """A local diffusers folder, or a pipeline's with vae/, gives the autoencoder whose weights it
    holds; the scale factor defaults to its config's scaling_factor; facts read without loading."""
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    AutoencoderKL(**RGB, scaling_factor=0.25).save_pretrained(tmp_path / "pipeline" / "vae")
    make_autoencoder({"pretrained": str(tmp_path / "pipeline")}, tmp_path / "stored")
    record = read_record(tmp_path / "stored")
    assert record["scale_factor"] == 0.25 and record["source"] == str(tmp_path / "pipeline")
    original = AutoencoderKL.from_pretrained(tmp_path / "pipeline" / "vae").state_dict()
    for name, tensor in Autoencoder(tmp_path / "stored").vae.state_dict().items():
        torch.testing.assert_close(tensor, original[name])
    assert autoencoder_facts({"pretrained": str(tmp_path / "pipeline")}) == \
        {"in_channels": 3, "latent_channels": 4, "downsample_factor": 2}
    assert autoencoder_facts({"pretrained": "stabilityai/sd-vae-ft-ema"}) is None  # known once fetched


def test_a_hub_autoencoder_offline_fails_at_once_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"autoencoders\.pretrained: could not load the diffusers AutoencoderKL from "
                                         r"stabilityai/sd-vae-ft-ema .*hf download stabilityai/sd-vae-ft-ema"):
        make_autoencoder({"pretrained": "stabilityai/sd-vae-ft-ema"}, tmp_path / "vae", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "vae").exists()


def test_sampling_decodes_into_images_of_the_datasets_channels(stored, tmp_path):
    """The sample command's images are the decoded latents (the dataset's size and channels, from
    the settings' ``latents``), the same at any batch size, and record which autoencoder decoded
    them. Catches samples saved as latents, or decoded by batch-dependent calls."""
    from click.testing import CliRunner

    from igsm.cli import main as cli
    from igsm.families import family_named
    from igsm.models import save_model
    from igsm.sampling import load_samples

    torch.manual_seed(0)
    net = family_named("unet").build({"family": "unet", "sample_size": 8, "in_channels": 4, "out_channels": 4,
                                      "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
                                      "down_block_types": ["DownBlock2D", "DownBlock2D"],
                                      "up_block_types": ["UpBlock2D", "UpBlock2D"]})
    save_model(net, tmp_path / "model")
    latents = {"autoencoder": str(stored["root"] / "vae"), "image_channels": 1}
    outputs = {}
    for batch in (4, 3):
        settings = {"sampler": "ddim", "num_steps": 3, "eta": 0.0, "spacing": "uniform", "clip_x0": False,
                    "batch_size": batch, "micro_batch": 2, "latents": latents}
        out = tmp_path / f"samples-{batch}.npz"
        result = CliRunner().invoke(cli, ["sample", "--model", str(tmp_path / "model"), "--out", str(out),
                                          "--num-images", "4", "--settings", json.dumps(settings), "--device", "cpu",
                                          "--threads", "1"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outputs[batch] = load_samples(out)
    images, seeds, metadata = outputs[4]
    assert images.shape == (4, 16, 16, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, outputs[3][0])
    assert metadata["latents"] == {"autoencoder": stored["vae"].identity(), "image_channels": 1}
