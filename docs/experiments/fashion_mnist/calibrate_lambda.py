"""λ for the scale-free Jacobian terms (issue 20): the weight at which jm2_log / jm2_rel pull on the
student as hard as the paper's jm2 at λ = 0.1 does, *away from t ≈ 0*.

The teacher (a model folder), Diff-Pruning of it at the experiment's ratio (config/fashion_mnist.yaml),
then, over a few batches of training images at timesteps drawn uniformly from [--from, 1000), the
norm of each term's gradient w.r.t. the student (λ = 1, training's own diagnostics:
igsm.training.term_diagnostics). λ_variant = 0.1 · mean ‖∇jm2‖ / mean ‖∇variant‖. The same numbers
on [0, 10) and [10, 100) show how each form's weight is spread over timesteps.

    python docs/experiments/fashion_mnist/calibrate_lambda.py --teacher <model folder> \
        --data /usr/share/datasets/fashion-mnist --out calibration.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import yaml

from igsm.data import to_model_range
from igsm.data.fashion_mnist import load_fashion_mnist
from igsm.diffusion import NoiseSchedule
from igsm.models import load_model
from igsm.objectives import build_objective
from igsm.pruning import prune
from igsm.training import term_diagnostics

REPO = Path(__file__).resolve().parents[3]
TERMS = ("jm2", "jm2_log", "jm2_rel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="the dense teacher's model folder")
    parser.add_argument("--data", required=True, help="folder of train-images-idx3-ubyte.gz and its labels")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--from", dest="low", type=int, default=100, help="timesteps drawn from [from, 1000)")
    parser.add_argument("--paper-lambda", type=float, default=0.1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="calibration.json")
    args = parser.parse_args()

    config = yaml.safe_load((REPO / "config" / "fashion_mnist.yaml").read_text())
    experiment = config["experiments"]["fmnist_unet"]
    data = Path(args.data)
    images = load_fashion_mnist(data / "train-images-idx3-ubyte.gz", data / "train-labels-idx1-ubyte.gz",
                                config["datasets"]["fashion_mnist"]["image_size"])["images"]
    schedule = NoiseSchedule.linear()
    device = torch.device(args.device)
    teacher = load_model(args.teacher, device).eval()
    x_prune = to_model_range(images[: experiment["prune"]["num_images"]]).to(device)
    ratio = experiment["finetune"]["runs"][0]["channel_ratio"]
    student, _ = prune(teacher, criterion="diff-pruning", channel_ratio=ratio, images=x_prune,
                       schedule=schedule, thr=experiment["prune"]["thr"])
    student.eval()  # no dropout: the same network for every term
    params = list(student.parameters())

    generator = torch.Generator(device).manual_seed(0)
    objective = build_objective({name: 1.0 for name in TERMS})
    edges = [10, 100]
    norms = {name: {"low": [], "all_ranges": []} for name in TERMS}
    for batch in range(args.batches):
        index = torch.randint(len(images), (args.batch,), generator=generator, device=device).cpu().numpy()
        x0 = to_model_range(images[index]).to(device)
        # Half the batch at t ≥ args.low (the calibration), half over all t (the spread by range).
        t = torch.cat([torch.randint(args.low, schedule.num_steps, (args.batch // 2,), generator=generator, device=device),
                       torch.randint(0, schedule.num_steps, (args.batch - args.batch // 2,), generator=generator, device=device)])
        noise = torch.randn(x0.shape, generator=generator, device=device)
        x_t = schedule.add_noise(x0, noise, t)
        _, values, parts = objective(student, teacher, x_t, t, noise, generator, contributions=True)
        record = term_diagnostics(parts, values, t, params, args.batch, [args.low])
        full = term_diagnostics(parts, values, t, params, args.batch, edges)
        for name in TERMS:
            norms[name]["low"].append(record[name]["grad_norm"][1])
            norms[name]["all_ranges"].append(full[name]["grad_norm"])
        print(f"batch {batch + 1}/{args.batches}: " + ", ".join(
            f"{name} {norms[name]['low'][-1]:.3g}" for name in TERMS), flush=True)

    mean = {name: float(np.mean(norms[name]["low"])) for name in TERMS}
    result = {
        "teacher": str(args.teacher), "channel_ratio": ratio, "batches": args.batches, "batch": args.batch,
        "timesteps": [args.low, schedule.num_steps], "paper_lambda": args.paper_lambda,
        "mean_grad_norm_at_lambda_1": mean,
        "lambda": {name: args.paper_lambda * mean["jm2"] / mean[name] for name in TERMS},
        "grad_norm_by_range_at_lambda_1": {
            "ranges": [[0, 10], [10, 100], [100, None]],
            **{name: np.mean(norms[name]["all_ranges"], axis=0).tolist() for name in TERMS}},
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["lambda"], indent=2))


if __name__ == "__main__":
    main()
