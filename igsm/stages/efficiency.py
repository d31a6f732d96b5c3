"""The efficiency stage (paper Tables 1–3: #Params, MACs, speed-up): a model's parameters and
MACs, its network throughput and, with the sampler's settings, whole sampling chains per second
(with a block-reuse plan where the variant has one)."""

from __future__ import annotations

import contextlib

import torch

from igsm.reuse import apply_plan
from igsm.sampling.denoiser import Denoiser
from igsm.sampling.samplers import generate
from igsm.stages.common import (StageError, denoiser as make_denoiser, diffusion_of, forward_process,
                                readable_inputs, write_json)
from igsm.stages.process import device as torch_device, set_threads
from igsm.stages.settings import NetworkSettings


def efficiency(model_dir, out, batch_size: int, throughput: bool | None, sampler_settings: dict | None, plan,
               settings: NetworkSettings, device: str, threads: int | None) -> None:
    """Parameters and MACs (one image, one network call) and network throughput (settings: how the
    network runs, as in 'sample': precision, channels_last, compile, compile_mode) into ``out``.
    ``throughput`` None: measured on a GPU only (on a CPU images_per_s is null)."""
    from igsm.models import image_shape, load_model
    from igsm.pruning.structural import count_params_macs

    if plan and sampler_settings is None:
        raise StageError("--plan needs --sampler-settings")
    set_threads(threads)
    with readable_inputs():
        net = load_model(model_dir)
    shape = image_shape(net)
    params, macs = count_params_macs(net, shape[1], shape[0])
    device = torch_device(device)
    measure = throughput if throughput is not None else device.type == "cuda"
    result = {"params": params, "macs": macs, "model": model_dir, "images_per_s": None,
              "images_per_s_note": "not measured: no GPU (--throughput measures on a CPU)"}
    if sampler_settings is not None:
        result.update(_sampler_speed(net, shape, macs, sampler_settings, plan, batch_size, device, measure))
    if measure:
        result.update(_network_speed(net, shape, settings, batch_size, device))
    write_json(out, result)


def _sampler_speed(net, shape, macs: int, sampler_settings: dict, plan, batch_size: int, device,
                   measure: bool) -> dict:
    """The sampler's steps and MACs per image (a reuse plan executes a fraction of them; guidance
    doubles them) and, if ``measure``, its whole chains per second."""
    from igsm.reuse import load_plan_for
    from igsm.sampling import guidance_from_settings, sampler_kwargs

    schedule = forward_process(diffusion_of(sampler_settings))
    reuse = None
    if plan:
        with readable_inputs():
            reuse = load_plan_for(plan, net, sampler_settings, schedule)
    fraction = reuse.mac_fraction() if reuse else 1.0
    # Classifier-free guidance calls the network twice a step (conditional and null), on one plan.
    conditioning, guidance_scale = guidance_from_settings(sampler_settings)
    calls = 2 if conditioning is not None and guidance_scale != 1.0 else 1
    result = {"sampler_steps": sampler_settings["num_steps"], "reuse_mac_fraction": fraction,
              "network_calls_per_step": calls,
              "sampling_macs": macs * sampler_settings["num_steps"] * calls * fraction, "sampling_images_per_s": None}
    if measure:
        denoiser = make_denoiser(net.to(device), {**sampler_settings, "compile": False})
        result["sampling_images_per_s"] = sampling_images_per_s(
            denoiser, shape, batch_size, device, sampler=sampler_settings["sampler"], schedule=schedule,
            sampler_kwargs=sampler_kwargs(sampler_settings), plan=reuse)
    return result


def _network_speed(net, shape, settings: NetworkSettings, batch_size: int, device) -> dict:
    """Network forward passes per second, run as ``settings`` say, and how they were run."""
    from igsm import gpus

    denoiser = make_denoiser(net.to(device), settings.as_dict())
    mode = denoiser.compile_mode
    how = f"torch.compile {mode}, after 3 warm-up calls (compilation among them)" if mode else \
        "eager, after 3 warm-up calls"
    return dict(images_per_s=forward_images_per_s(denoiser, shape, batch_size, device),
                images_per_s_note=(f"network forward passes (one per sampler step), batch {batch_size}, "
                                   f"{denoiser.precision}, {how}"),
                batch_size=batch_size, precision=denoiser.precision, channels_last=denoiser.channels_last,
                compile_mode=mode, device=gpus.device_name(device))


def sampling_images_per_s(denoiser: Denoiser, image_shape, batch_size: int, device, *, sampler: str,
                          schedule, sampler_kwargs: dict, plan=None) -> float:
    """Whole sampling chains per second × images per chain: one batch of ``batch_size`` images
    through ``sampler`` (with a block-reuse ``plan`` if given), timed after a warm-up batch."""
    import time

    def chain():
        generate(denoiser, sampler=sampler, seeds=range(batch_size), image_shape=image_shape,
                 schedule=schedule, device=device, conditioning=denoiser.conditioning, **sampler_kwargs)
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
    from igsm.models import example_condition

    # A conditional network's calls as sampling makes them (with guidance, two passes a call).
    condition = example_condition(denoiser.net, batch_size, device)
    condition = {} if condition is None else {"condition": condition}
    for _ in range(warmup):
        denoiser(x, t, **condition)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(iters):
            denoiser(x, t, **condition)
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1e3
    else:
        import time

        begin = time.perf_counter()
        for _ in range(iters):
            denoiser(x, t, **condition)
        seconds = time.perf_counter() - begin
    return batch_size * iters / seconds
