"""How fast the image store serves training batches, against what a training step consumes (issue 14).

Writes a store of random 256-px RGB images (the LSUN U-Nets' size) in the store's real shard size,
then times what the training loop does each step: ``store[batch_indices(step, ...)]`` and the
conversion to the model range, from the page cache (warm: the file was just written / read once)
and, where the OS lets us drop it (root, Linux), from disk (cold). With ``--step`` it also times one
NP training step of the 256-px DDPM U-Net (google/ddpm-church-256's architecture, random weights)
on ``--device`` at the same batch, so the two rates come from one run.

    python benchmarks/store_read.py --images 20000 --batch 64 --step --device cuda --out store_read.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from igsm.data import ImageStore, StoreWriter, to_model_range
from igsm.training import batch_indices

REPO = Path(__file__).resolve().parents[1]


def lsun_architecture() -> dict:
    """church_unet's architecture in config/config.yaml (google/ddpm-church-256's, 113.7M)."""
    import yaml

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    return config["experiments"]["church_unet"]["architecture"]


def write_random_store(directory: Path, num_images: int, size: int) -> ImageStore:
    rng = np.random.default_rng(0)
    with StoreWriter(directory) as writer:
        for start in range(0, num_images, 1024):
            n = min(1024, num_images - start)
            writer.append(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.zeros(n, np.int64))
    return ImageStore(directory)


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_rate(store: ImageStore, batch: int, steps: int) -> dict:
    times = []
    for step in range(steps):
        started = time.perf_counter()
        x0 = to_model_range(store[batch_indices(step, batch, len(store), seed=0).numpy()])
        times.append(time.perf_counter() - started)
    assert x0.shape[0] == batch
    median = statistics.median(times)
    return {"median_s_per_batch": median, "images_per_s": batch / median, "steps": steps}


def training_step_time(batch: int, device: str, steps: int) -> dict:
    from igsm.models import build_unet

    net = build_unet(lsun_architecture()).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-5)
    x = torch.randn(batch, 3, 256, 256, device=device)
    times = []
    for step in range(steps + 2):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        t = torch.randint(0, 1000, (batch,), device=device)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            loss = (net(x, t).sample.float() - x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= 2:  # warm-up: cuDNN autotuning, allocator
            times.append(time.perf_counter() - started)
    median = statistics.median(times)
    return {"median_s_per_step": median, "images_per_s": batch / median, "precision": "bf16 autocast"
            if device.startswith("cuda") else "fp32", "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000, help="images in the test store")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="global batch (images per step)")
    parser.add_argument("--steps", type=int, default=30, help="timed batches")
    parser.add_argument("--step", action="store_true", help="also time the 256-px U-Net's training step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", default=None, help="folder for the test store (default: a temporary one)")
    parser.add_argument("--out", default="store_read.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.work) as work:
        started = time.perf_counter()
        store = write_random_store(Path(work) / "train", args.images, args.size)
        write_s = time.perf_counter() - started
        result = {"images": args.images, "size": args.size, "batch": args.batch,
                  "store_gib": round(sum(os.path.getsize(store.directory / s["file"]) for s in store.index["shards"]) / 2**30, 2),
                  "shards": len(store.index["shards"]), "write_s": round(write_s, 1),
                  "cpus": os.cpu_count(), "machine": platform.node(), "torch": torch.__version__}
        result["warm"] = read_rate(store, args.batch, args.steps)
        if drop_page_cache():
            result["cold"] = read_rate(ImageStore(store.directory), args.batch, args.steps)
        else:
            result["cold"] = None  # not root, or not Linux: the page cache could not be dropped
    if args.step:
        result["training_step"] = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda")
                                   else "cpu", **training_step_time(args.batch, args.device, max(3, args.steps // 5))}
        for kind in ("warm", "cold"):
            if result[kind]:
                result[f"{kind}_read_rate_over_step_rate"] = (result[kind]["images_per_s"]
                                                              / result["training_step"]["images_per_s"])
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
