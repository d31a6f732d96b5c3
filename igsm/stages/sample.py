"""The sample stage (paper Sec. 5.1): the 50k-image FID sets, in batches that survive an
interruption, split into shards and across GPUs, with a block-reuse plan applied where the variant
has one; and the speed measurements of the efficiency stage.

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
from igsm.sampling.denoiser import Denoiser, denoiser_from_settings
from igsm.sampling.files import PartialBatches, save_samples
from igsm.sampling.samplers import generate


def sample_images(net, *, seeds, image_shape, batch_size: int, sampler: str = "ddim",
                  schedule: NoiseSchedule | VPSDE | None = None, device="cpu", partial: PartialBatches | None = None,
                  rank: int = 0, world_size: int = 1, noise_threads: int = 1, progress: bool = False,
                  **kwargs) -> np.ndarray | None:
    """uint8 N×H×W×C images of ``seeds``, generated ``batch_size`` at a time.

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
        images = to_uint8(x)
        if partial is not None:
            partial.save(b, images)
        else:
            chunks.append(images)
    if world_size > 1:
        return None
    return partial.load(num_batches) if partial is not None else np.concatenate(chunks)



def sample_shard(model_dir, out, *, seeds: np.ndarray, shard: tuple[int, int], options: dict,
                 sampler_kwargs: dict, schedule, device: torch.device, noise_threads: int = 1,
                 grid=None, plan=None) -> str | None:
    """The sample stage's job: images for ``seeds`` (one shard of a model's) into ``out``.

    Resumable: finished batches wait in ``out.partial/`` until ``out`` is written, and a rerun with
    the same model and settings (the fingerprint below) makes only the missing ones. Under
    torchrun the processes share the batches and rank 0 writes. Returns rank 0's one-line summary.
    ``plan``: a block-reuse gate table file (igsm.reuse) the network follows.
    """
    from igsm.models import image_shape, load_model  # here: sample_images' argument image_shape is a shape

    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    batch_size = options.get("batch_size", 256)
    net = load_model(model_dir, device)
    shape = image_shape(net)
    reuse = load_plan_for(plan, net, options, schedule) if plan else None
    denoiser = denoiser_from_settings(net, options, micro_batch=options.get("micro_batch", 0) or batch_size)
    # Everything that makes the bits of the images: a resumed job reuses batches only if equal.
    fingerprint = {"model_digest": model_digest(model_dir), "sampler": options["sampler"],
                   "sampler_kwargs": sampler_kwargs, "image_shape": list(shape), "batch_size": batch_size,
                   **denoiser.metadata, "schedule": options.get("diffusion", {}),
                   "first_seed": int(seeds[0]), "num_images": len(seeds),
                   "torch": torch.__version__, "device": gpus.device_name(device),
                   **({"reuse_plan": reuse.digest()} if reuse else {})}
    folder = str(out) + ".partial"
    partial = PartialBatches(folder, fingerprint) if rank == 0 else None
    distributed.barrier()  # rank 0 has emptied a stale folder before anyone writes
    if partial is None:
        partial = PartialBatches(folder, fingerprint, reset=False)
    with apply_plan(net, reuse) if reuse else contextlib.nullcontext():
        sample_images(denoiser, seeds=seeds, image_shape=shape, batch_size=batch_size, sampler=options["sampler"],
                      schedule=schedule, device=device, partial=partial, rank=rank, world_size=world_size,
                      noise_threads=noise_threads, progress=True, **sampler_kwargs)
    distributed.barrier()
    if rank != 0:
        return None
    images = partial.load(-(-len(seeds) // batch_size))  # an unreadable batch is deleted: a rerun redoes it
    save_samples(out, images, seeds, {**fingerprint, "model": str(model_dir), "shard": list(shard),
                                      "world_size": world_size})
    partial.remove()
    if grid:
        from igsm.plots import save_grid

        save_grid(images[:64], grid)
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



def sampling_images_per_s(denoiser: Denoiser, image_shape, batch_size: int, device, *, sampler: str,
                          schedule, sampler_kwargs: dict, plan=None) -> float:
    """Whole sampling chains per second × images per chain: one batch of ``batch_size`` images
    through ``sampler`` (with a block-reuse ``plan`` if given), timed after a warm-up batch."""
    import time

    def chain():
        generate(denoiser, sampler=sampler, seeds=range(batch_size), image_shape=image_shape,
                 schedule=schedule, device=device, **sampler_kwargs)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    with apply_plan(denoiser, plan) if plan else contextlib.nullcontext():
        chain()  # warm-up: kernel selection, allocator
        begin = time.perf_counter()
        chain()
        return batch_size / (time.perf_counter() - begin)


@torch.no_grad()
def forward_images_per_s(denoiser: Denoiser, image_shape, batch_size: int, device, *,
                         warmup: int = 3, iters: int = 10) -> float:
    """Network calls per second × images per call, after ``warmup`` calls; CUDA events on GPUs."""
    device = torch.device(device)
    x = torch.randn(batch_size, *image_shape, device=device)
    t = torch.full((batch_size,), 500, device=device, dtype=torch.long)
    for _ in range(warmup):
        denoiser(x, t)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(iters):
            denoiser(x, t)
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1e3
    else:
        import time

        begin = time.perf_counter()
        for _ in range(iters):
            denoiser(x, t)
        seconds = time.perf_counter() - begin
    return batch_size * iters / seconds
