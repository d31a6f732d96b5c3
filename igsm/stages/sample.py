"""The sample stage (paper Sec. 5.1): the 50k-image FID sets, in batches that survive an
interruption, split into shards and across GPUs, with a block-reuse plan applied where the variant
has one (the shards gathered into one set and the set exported as PNG files: igsm.stages.sample_files).

Reproducibility: image k is made from seed ``first_seed + k`` alone (``ImageGenerators``) by a
``Denoiser`` at a fixed network batch (``micro_batch``), so for a fixed ``micro_batch``, precision
and software/hardware it is bitwise identical at any batch size, shard split or GPU count (tests
check this on CPU; ``benchmarks/sampling.py`` on the GPU).

A stage sits above the algorithms it runs: the pure samplers (igsm.sampling) and block reuse
(igsm.reuse, which runs those samplers) are both below it, so neither imports the other back.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from pathlib import Path

import numpy as np
import torch

from igsm import distributed, gpus
from igsm.data import to_uint8
from igsm.diffusion import VPSDE, NoiseSchedule
from igsm.reuse import apply_plan, load_plan_for
from igsm.sampling.denoiser import denoiser_from_settings
from igsm.sampling.files import PartialBatches, save_samples
from igsm.sampling.samplers import generate
from igsm.schema import section_defaults
from igsm.stages.common import StageError, diffusion_of, forward_process, readable_inputs
from igsm.stages.sample_files import save_sample_grid
from igsm.stages.process import relaunch_under_torchrun, start_process


def sample_images(net, *, seeds, image_shape, batch_size: int, sampler: str = "ddim",
                  schedule: NoiseSchedule | VPSDE | None = None, device="cpu", partial: PartialBatches | None = None,
                  rank: int = 0, world_size: int = 1, noise_threads: int = 1, progress: bool = False,
                  decode=None, **kwargs) -> np.ndarray | None:
    """uint8 N×H×W×C images of ``seeds``, generated ``batch_size`` at a time; ``decode``: a latent
    experiment's latents → images in [−1, 1] (igsm.latents.Autoencoder.decode).

    With ``partial``, every finished batch is stored there and batches already stored are not
    redone (resume at batch granularity). With ``world_size`` > 1 this process does batches
    ``rank::world_size`` (needs ``partial``, a folder all ranks see) and returns None; the caller
    waits for all ranks, then reads ``partial.load``.
    """
    seeds = np.asarray(seeds)
    if world_size > 1 and partial is None:
        raise ValueError("several processes share their batches through a PartialBatches folder")
    num_batches = math.ceil(len(seeds) / batch_size)
    mine = range(rank, num_batches, world_size)
    chunks = []
    iterator = mine
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(mine, desc=f"sample (rank {rank})" if world_size > 1 else "sample", unit="batch")
    for b in iterator:
        if partial is not None and partial.done(b):
            continue
        x = generate(net, sampler=sampler, seeds=seeds[b * batch_size:(b + 1) * batch_size],
                     image_shape=image_shape, schedule=schedule, device=device,
                     noise_threads=noise_threads, **kwargs)
        images = to_uint8(decode(x) if decode is not None else x)
        if partial is not None:
            partial.save(b, images)
        else:
            chunks.append(images)
    if world_size > 1:
        return None
    return partial.load(num_batches) if partial is not None else np.concatenate(chunks)



def sample_shard(model_dir, out, *, seeds: np.ndarray, shard: tuple[int, int], options: dict,
                 sampler_kwargs: dict, schedule, device: torch.device, noise_threads: int = 1,
                 grid=None, plan=None, autoencoder_dir=None, image_channels: int | None = None) -> str | None:
    """The sample stage's job: images for ``seeds`` (one shard of a model's) into ``out``.

    Resumable: finished batches wait in ``out.partial/`` until ``out`` is written, and a rerun with
    the same model and settings (the fingerprint below) makes only the missing ones. Under
    torchrun the processes share the batches and rank 0 writes. Returns rank 0's one-line summary.
    ``plan``: a block-reuse gate table file (igsm.reuse) the network follows. ``autoencoder_dir``: a
    latent experiment's autoencoder (igsm.latents), which decodes the latents into images of
    ``image_channels`` (default: its own).
    """
    from igsm.models import image_shape, load_model  # here: sample_images' argument image_shape is a shape

    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    batching = {**section_defaults("sample"), **options}  # the schema's batch sizes where unset
    batch_size = batching["batch_size"]
    net = load_model(model_dir, device)
    shape = image_shape(net)
    reuse = load_plan_for(plan, net, options, schedule) if plan else None
    micro_batch = batching["micro_batch"] or batch_size
    denoiser = denoiser_from_settings(net, options, micro_batch=micro_batch)
    decode, decoder = None, None  # a latent experiment's: the function, and what the samples record of it
    if autoencoder_dir is not None:
        from igsm.latents import Autoencoder

        vae = Autoencoder(autoencoder_dir, device)
        channels = image_channels or vae.record["in_channels"]
        decoder = {"autoencoder": vae.identity(), "image_channels": channels}

        def decode(latents):  # micro-batches, as the network runs: memory bounded alike
            return torch.cat([vae.decode(part, channels) for part in latents.split(micro_batch)])
    # Everything that makes the bits of the images: a resumed job reuses batches only if equal.
    fingerprint = {"model_digest": model_digest(model_dir), "sampler": options["sampler"],
                   "sampler_kwargs": sampler_kwargs, "image_shape": list(shape), "batch_size": batch_size,
                   **denoiser.metadata, "schedule": diffusion_of(options),
                   "first_seed": int(seeds[0]), "num_images": len(seeds),
                   "torch": torch.__version__, "device": gpus.device_name(device),
                   **({"reuse_plan": reuse.digest()} if reuse else {}), **({"latents": decoder} if decoder else {})}
    folder = str(out) + ".partial"
    partial = PartialBatches(folder, fingerprint) if rank == 0 else None
    distributed.barrier()  # rank 0 has emptied a stale folder before anyone writes
    if partial is None:
        partial = PartialBatches(folder, fingerprint, reset=False)
    with apply_plan(net, reuse) if reuse else contextlib.nullcontext():
        sample_images(denoiser, seeds=seeds, image_shape=shape, batch_size=batch_size, sampler=options["sampler"],
                      schedule=schedule, device=device, partial=partial, rank=rank, world_size=world_size,
                      noise_threads=noise_threads, progress=True, conditioning=denoiser.conditioning,
                      decode=decode, **sampler_kwargs)
    distributed.barrier()
    if rank != 0:
        return None
    images = partial.load(-(-len(seeds) // batch_size))  # an unreadable batch is deleted: a rerun redoes it
    save_samples(out, images, seeds, {**fingerprint, "model": str(model_dir), "shard": list(shard),
                                      "world_size": world_size})
    partial.remove()
    if grid:
        save_sample_grid(images, grid, denoiser.metadata)
    return f"{out}: {len(images)} images, seeds {seeds[0]}..{seeds[-1]}, {denoiser.precision}"


def shard_range(num_images: int, num_shards: int, index: int) -> tuple[int, int]:
    """[start, stop) image offsets of shard ``index``: shard i covers i·n/shards … (i+1)·n/shards."""
    if not 0 <= index < num_shards:
        raise ValueError(f"shard {index} of {num_shards}: index must be in 0..{num_shards - 1}")
    if num_shards > num_images:
        raise ValueError(f"{num_shards} shards for {num_images} images: at most one shard per image")
    return index * num_images // num_shards, (index + 1) * num_images // num_shards


def model_digest(model_dir) -> str:
    """sha256 of a checkpoint folder's files: identifies the weights that made a batch."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
    return digest.hexdigest()



def sample(model_dir, out, grid, first_seed: int, num_images: int, shard: tuple[int, int], precision, compile_,
           channels_last, batch_size, micro_batch, nproc_per_node: int, plan, settings: dict, device: str,
           threads: int | None) -> str | None:
    """Generate images first_seed … first_seed+num_images−1, or shard (INDEX, COUNT) of them
    (settings: 'sample'; precision … micro_batch, where not None, override them; a latent
    experiment's ``latents``: the autoencoder that decodes them, and the images' channels).

    Resumable: finished batches are kept in OUT.partial/ until OUT is written, and a rerun with
    the same model and settings does only the missing ones. Under torchrun, the processes share
    the batches (one GPU each) and rank 0 writes OUT."""
    from igsm import sampling

    relaunch_under_torchrun(nproc_per_node, device_name=device)
    overrides = {"precision": precision, "compile": compile_, "channels_last": channels_last,
                 "batch_size": batch_size, "micro_batch": micro_batch}
    options = {**settings, **{k: v for k, v in overrides.items() if v is not None}}
    latents = options.pop("latents", None) or {}  # a latent experiment's autoencoder decodes the samples
    index, count = shard
    try:
        start, stop = shard_range(num_images, count, index)
        kwargs = sampling.sampler_kwargs(options)
    except ValueError as err:
        raise StageError(str(err)) from None
    device = start_process(device, threads)
    try:
        with readable_inputs():
            return sample_shard(
                model_dir, out, seeds=np.arange(first_seed + start, first_seed + stop), shard=(index, count),
                options=options, sampler_kwargs=kwargs, schedule=forward_process(diffusion_of(options)), device=device,
                noise_threads=torch.get_num_threads() if threads else 1, grid=grid, plan=plan,
                autoencoder_dir=latents.get("autoencoder"), image_channels=latents.get("image_channels"))
    finally:
        distributed.shutdown()
