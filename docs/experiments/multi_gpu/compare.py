"""Compare the runs of docs/experiments/multi_gpu/run.sh: 1 vs 2 GPUs, resumed vs not, throughput.

    python docs/experiments/multi_gpu/compare.py WORK OUT

Writes OUT/multi_gpu.json and prints the same as Markdown tables. Everything is read from the
workflow's own files (metrics.jsonl, summary.json, model.safetensors, samples.npz, logs).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from igsm.sampling import load_samples

FINETUNE = "results/finetune/ddp/magnitude-cr0.3"
OBJECTIVES = ("np_kd", "igsm")
LOGGED = ("loss", "np", "kd", "jm2", "grad_norm")


def records(run: Path, objective: str) -> list[dict]:
    path = run / FINETUNE / objective / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def logged_values(run: Path) -> list[dict]:
    """IGSM's metrics without the timing: what a resumed run must repeat exactly."""
    return [{k: r[k] for k in ("step", *LOGGED) if k in r} for r in records(run, "igsm")]


def weights(run: Path, objective: str) -> dict | None:
    path = run / FINETUNE / objective / "model" / "model.safetensors"
    return load_file(path) if path.exists() else None


def weight_difference(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return None
    return {"bitwise_equal": all(np.array_equal(a[k], b[k]) for k in a) and a.keys() == b.keys(),
            "max_abs_difference": float(max(np.abs(a[k] - b[k]).max() for k in a))}


def loss_agreement(one: list[dict], two: list[dict]) -> dict:
    """Largest relative difference of each logged value over the steps both runs logged."""
    worst = {}
    for a, b in zip(one, two):
        assert a["step"] == b["step"]
        for key in LOGGED:
            if key in a and key in b:
                relative = abs(a[key] - b[key]) / max(abs(a[key]), 1e-12)
                worst[key] = max(worst.get(key, 0.0), relative)
    return {"steps_compared": min(len(one), len(two)), "max_relative_difference": worst}


def throughput(run: Path, objective: str) -> dict | None:
    logged, summary = records(run, objective), run / FINETUNE / objective / "summary.json"
    if len(logged) < 2 or not summary.exists():  # not run, or not finished
        return None
    summary = json.loads(summary.read_text())
    # The first logged interval holds cuDNN's and the allocator's warm-up: left out.
    seconds = statistics.median(r["sec_per_step"] for r in logged[1:])
    return {"sec_per_step": seconds, "steps_per_s": 1 / seconds,
            "num_processes": summary.get("num_processes"),
            "peak_memory_mib": summary.get("timing", {}).get("peak_memory_mib")}


def main(work: Path, out: Path) -> None:
    report = {"loss_agreement_1_vs_2_gpus": {}, "weights_1_vs_2_gpus": {}, "throughput": {}}
    for objective in OBJECTIVES:
        report["loss_agreement_1_vs_2_gpus"][objective] = loss_agreement(
            records(work / "g1", objective), records(work / "g2", objective))
        report["weights_1_vs_2_gpus"][objective] = weight_difference(
            weights(work / "g1", objective), weights(work / "g2", objective))
        one, two = throughput(work / "t1", objective), throughput(work / "t2", objective)
        report["throughput"][objective] = {"1_gpu": one, "2_gpus": two,
                                           "speedup": one and two and two["steps_per_s"] / one["steps_per_s"]}
    resumed = work / "g2_resumed"
    logs = "".join(p.read_text(errors="replace") for p in sorted(resumed.glob("results/logs/finetune/**/*.log")))
    first = work / "g2_resumed-first.log"
    report["resume_2_gpus"] = {
        "resumed_from": [line for line in logs.splitlines() if "resuming from" in line],
        "first_attempt_log_tail": first.read_text(errors="replace")[-600:] if first.exists() else None,
        "summary_timing": json.loads((resumed / FINETUNE / "igsm" / "summary.json").read_text()).get("timing")
        if (resumed / FINETUNE / "igsm" / "summary.json").exists() else None,
        "vs_uninterrupted": weight_difference(weights(work / "g2", "igsm"), weights(resumed, "igsm")),
        "logged_values_equal_to_uninterrupted": logged_values(work / "g2") == logged_values(resumed),
    }
    if (work / "g2_again").exists():
        report["rerun_2_gpus_vs_g2"] = weight_difference(weights(work / "g2", "igsm"),
                                                         weights(work / "g2_again", "igsm"))
    samples = [work / run / "results/samples/ddp/dense/samples.npz" for run in ("g1", "g2")]
    if all(p.exists() for p in samples):
        one, two = (load_samples(p)[0] for p in samples)
        report["samples_1_vs_2_processes"] = {
            "num_images": len(one), "bitwise_equal": bool(np.array_equal(one, two)),
            "images_differing": int((one != two).reshape(len(one), -1).any(axis=1).sum())}

    out.mkdir(parents=True, exist_ok=True)
    (out / "multi_gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
