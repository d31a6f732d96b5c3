"""The workflow's efficiency stage (``igsm efficiency``, the paper's "Speed" column) on the dense
CIFAR-10 U-Net and its magnitude-pruned copy (channel ratio 0.3), with the network run as each
``efficiency.network`` setting runs it (and strict fp32), issue 5: what the tables' speed is made of.

    python benchmarks/efficiency_stage.py --batch-size 500 --out efficiency_stage.json

Random weights (seed 0); each model is saved with ``igsm.models.save_model`` and measured by the
CLI in its own process, as a workflow job would.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from igsm.diffusion import NoiseSchedule  # noqa: E402
from igsm.models import build_unet, save_model  # noqa: E402
from igsm.pruning import prune  # noqa: E402

CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["experiments"]["cifar10_unet"]
SAMPLE = {k: CONFIG["sample"][k] for k in ("precision", "channels_last", "compile", "compile_mode")}
# efficiency.network: eager (PyTorch's defaults) | as-sampled; and strict fp32 for comparison
SETTINGS = {"eager (tf32)": {"precision": "tf32"}, "eager, strict fp32": {},
            "as-sampled (config.yaml)": SAMPLE}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256, help="config efficiency.batch_size's default")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    dense = build_unet({**CONFIG["architecture"], "dropout": 0.0}).eval()
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    pruned, _ = prune(dense, criterion="magnitude", channel_ratio=0.3, images=images, schedule=NoiseSchedule.linear())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, net in (("dense", dense), ("pruned cr0.3", pruned.eval())):
            model_dir = Path(tmp) / name.replace(" ", "-")
            save_model(net, model_dir)
            for label, settings in SETTINGS.items():
                out = Path(tmp) / "efficiency.json"
                subprocess.run([sys.executable, "-m", "igsm", "efficiency", "--model", str(model_dir),
                                "--out", str(out), "--batch-size", str(args.batch_size), "--throughput",
                                "--settings", json.dumps(settings)], check=True, cwd=REPO)
                rows.append({**json.loads(out.read_text()), "model": name, "settings": label})
                print(json.dumps(rows[-1]), flush=True)
    for label in SETTINGS:
        dense_speed = next(r["images_per_s"] for r in rows if r["model"] == "dense" and r["settings"] == label)
        for row in rows:
            if row["settings"] == label:
                row["speed_up"] = row["images_per_s"] / dense_speed
    if args.out:
        Path(args.out).write_text(json.dumps({"device": rows[0]["device"], "torch": torch.__version__,
                                              "args": vars(args), "rows": rows}, indent=2))
    print(f"\n{'model':14s} {'settings':26s} {'params M':>9s} {'GMACs':>7s} {'net img/s':>10s} {'speed-up':>9s}")
    for r in rows:
        print(f"{r['model']:14s} {r['settings']:26s} {r['params'] / 1e6:9.2f} {r['macs'] / 1e9:7.2f} "
              f"{r['images_per_s']:10.0f} {r['speed_up']:8.2f}x")


if __name__ == "__main__":
    main()
