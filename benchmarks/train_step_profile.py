"""Where a training step's time goes on a GPU: wall time per NP step (bf16 autocast and fp32) of
the Fashion-MNIST experiment's U-Net, and a torch.profiler table of CPU and GPU time per op.

    python benchmarks/train_step_profile.py [--config config/fashion_mnist.yaml] [--batch-size 128]

Measured on an H100 (BENCHMARKS.md, "Training step"): the step is bound by the CPU launching
~2,650 kernels, not by the GPU.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from igsm.diffusion import NoiseSchedule, antithetic_timesteps  # noqa: E402
from igsm.models import build_unet, predict_noise  # noqa: E402
from igsm.training import _update_ema  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/fashion_mnist.yaml")
    parser.add_argument("--experiment", default="fmnist_unet")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    arch = yaml.safe_load(open(args.config))["experiments"][args.experiment]["architecture"]
    device = torch.device("cuda")
    net = build_unet(arch).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)
    schedule, generator = NoiseSchedule.linear(), torch.Generator(device=device).manual_seed(0)
    shape = (args.batch_size, arch["in_channels"], arch["sample_size"], arch["sample_size"])

    def step(precision):  # the training loop's work for one NP step
        x0 = torch.rand(shape, device=device) * 2 - 1
        t = antithetic_timesteps(args.batch_size, schedule.num_steps, generator, device)
        noise = torch.randn(shape, generator=generator, device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = (predict_noise(net, schedule.add_noise(x0, noise, t), t) - noise).float().square().sum()
        optimizer.zero_grad()
        (loss / args.batch_size).backward()
        loss.item()
        torch.nn.utils.clip_grad_norm_(list(net.parameters()), 1.0)
        optimizer.step()
        _update_ema(ema, net, 0.999)

    for precision in ("bf16", "fp32"):
        for _ in range(5):
            step(precision)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.steps):
            step(precision)
        torch.cuda.synchronize()
        print(f"{precision}: {(time.perf_counter() - started) / args.steps * 1e3:.1f} ms/step", flush=True)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step("bf16")
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
