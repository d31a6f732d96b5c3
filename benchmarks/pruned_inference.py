"""Inference speed-up of a pruned U-Net over its dense teacher (paper Table 1, "Speed" column).

The CIFAR-10 DDPM U-Net (35.7M) and its Diff-Pruning student at channel ratio 0.3 (19.85M,
paper "PR 0.44"), one network call on a batch, fp32 (TF32 off) and bf16 autocast, timed with CUDA
events after warm-up (median of repeats). Random weights: speed does not depend on their values.

    python benchmarks/pruned_inference.py --batch 256 --out pruned_inference.json
"""

import argparse
import json
import statistics

import torch
import yaml

from igsm.diffusion import NoiseSchedule
from igsm.models import build_unet, predict_noise
from igsm.pruning import prune
from igsm.pruning.structural import count_params_macs

ARCHITECTURE = yaml.safe_load(open("config/config.yaml"))["experiments"]["cifar10_unet"]["architecture"]


def time_forward(net, x, t, precision, repeats, device):
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.inference_mode(), autocast:
        for _ in range(5):
            predict_noise(net, x, t)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                predict_noise(net, x, t)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                import time

                t0 = time.perf_counter()
                predict_noise(net, x, t)
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True

    torch.manual_seed(0)
    dense = build_unet({**ARCHITECTURE, "dropout": 0.0}).eval()
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    pruned, report = prune(dense, criterion="magnitude", channel_ratio=args.ratio, images=images,
                           schedule=NoiseSchedule.linear())
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    rows = []
    for name, net in (("dense", dense), (f"pruned cr{args.ratio:g}", pruned)):
        params, macs = count_params_macs(net, 32, 3)
        net = net.to(device)
        for precision in ("fp32", "bf16"):
            ms = time_forward(net, x, t, precision, args.repeats, device)
            rows.append({"model": name, "params_M": params / 1e6, "macs_G": macs / 1e9,
                         "precision": precision, "batch": args.batch, "ms_per_call": ms,
                         "images_per_s": args.batch / ms * 1e3})
    for row in rows:
        dense_ms = next(r["ms_per_call"] for r in rows if r["model"] == "dense" and r["precision"] == row["precision"])
        row["speedup"] = dense_ms / row["ms_per_call"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{device_name}, torch {torch.__version__}, batch {args.batch}, paper label {report['paper_label']}\n")
    print("| model | params (M) | MACs (G) | precision | ms / call | images/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params_M']:.2f} | {r['macs_G']:.2f} | {r['precision']} | "
              f"{r['ms_per_call']:.2f} | {r['images_per_s']:.0f} | {r['speedup']:.2f}× |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
