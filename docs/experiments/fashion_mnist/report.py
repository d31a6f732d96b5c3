"""Collect the Fashion-MNIST experiment's numbers from a finished run's results/ (run.sh) into the
files of its report: results.csv (one row per model), report.json (the same plus the teacher
curve and wall time per stage), teacher_curve.png and samples_teacher_curve.png (the teacher's
loss, FID and samples after each stage of run.sh), loss_curves.png and
loss_curves_gradient_flow.png, samples.png, samples_variants.png, samples_gradient_flow.png and
samples_reuse.png (sample grids side by side), gradient_share.png (the Jacobian terms' share of the
gradient by timestep range, issue 20).

    python docs/experiments/fashion_mnist/report.py WORK [WORK ...] OUT

WORK: the run's working directory (results/ and teacher_curve/ in it); several when a run was
split over leases of the GPU, each a Snakemake of its own: their models are reported together,
each with its step time relative to NP+KD of its own WORK (jobs timed side by side) and the WORK's
name in the "run" column. OUT: where the files go. Every number is read from the workflow's own
files; nothing here computes a result.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

EXPERIMENTS = ("fmnist_unet", "fmnist_unet_seed1", "fmnist_unet_variants", "fmnist_gradient_flow", "fmnist_reuse")
STAGES = ("download", "dense", "prune", "finetune", "sample", "fid_reference", "fid_statistics")


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def model_rows(results: Path, run: str) -> list[dict]:
    rows = []
    for exp in EXPERIMENTS:
        for score in sorted((results / "fid" / exp).rglob("*.json")):
            variant = str(score.relative_to(results / "fid" / exp).with_suffix(""))
            fid = read_json(score)
            eff = read_json(results / "efficiency" / exp / f"{variant}.json") or {}
            meta = read_json(results / "variants" / exp / f"{variant}.json") or {}
            folder = (results / "dense" / "fmnist_unet" / "trained") if variant == "dense" else \
                (results / "finetune" / exp / variant)
            summary = read_json(folder / "summary.json") or {}
            timing = summary.get("timing", {})
            history = metrics(folder / "metrics.jsonl")
            last = history[-1] if history else {}
            rows.append({
                "run": run, "experiment": exp, "model": variant,
                "pruning": variant.split("/")[0].rsplit("-cr", 1)[0] if "/" in variant else "",
                # (a model scored without its table has no metadata file: its folder name says it)
                "channel_ratio": meta.get("channel_ratio", float(variant.split("/")[0].rsplit("-cr", 1)[1])
                                          if "-cr" in variant else None),
                "objective": variant.split("/")[1] if "/" in variant else "dense",
                "seed": summary.get("settings", {}).get("training", {}).get("seed", 0),
                "fid": fid["fid"], "fid_images": fid["num_images"], "fid_mode": fid["mode"],
                "params_M": eff.get("params", float("nan")) / 1e6, "macs_G": eff.get("macs", float("nan")) / 1e9,
                "images_per_s": eff.get("images_per_s"),
                "training_steps": summary.get("num_steps"), "sec_per_step": timing.get("sec_per_step"),
                "train_minutes": timing.get("wall_time_s", float("nan")) / 60,
                "peak_memory_GiB": (timing.get("peak_memory_mib") or float("nan")) / 1024,
                "final_loss": last.get("loss"), "final_np": last.get("np"),
                "reuse": meta.get("reuse_method", ""), "reuse_target": meta.get("mac_fraction"),
                "sampler_steps": eff.get("sampler_steps"), "sampling_macs_G": (eff.get("sampling_macs") or float("nan")) / 1e9,
                "sampling_images_per_s": eff.get("sampling_images_per_s"),
            })
    # Step time relative to NP+KD of the same run (the jobs shared the GPU alike): of the same
    # experiment and pruned network where it has an NP+KD run, else Diff-Pruning's at ratio 0.3
    # of the same experiment, else of any experiment of the run.
    reference = {(r["experiment"], r["model"].split("/")[0]): r["sec_per_step"] for r in rows
                 if r["objective"] == "np_kd"}
    any_dp = next((v for (exp, pruned), v in reference.items() if pruned == "diff-pruning-cr0.3"), None)
    for row in rows:
        base = reference.get((row["experiment"], row["model"].split("/")[0]),
                             reference.get((row["experiment"], "diff-pruning-cr0.3"), any_dp))
        row["step_time_vs_np_kd"] = (row["sec_per_step"] / base) if base and row["sec_per_step"] else None
    return rows


def stage_wall_times(results: Path) -> dict:
    """Seconds per stage: the sum of the jobs' benchmark files (last attempt of each job)."""
    out = {}
    for stage in STAGES:
        total = 0.0
        for tsv in (results / "benchmarks" / stage).rglob("*.tsv"):
            with open(tsv) as f:
                total += float(next(csv.DictReader(f, delimiter="\t"))["s"])
        out[stage] = round(total, 1)
    return out


def loss_plot(results: list[Path], out: Path, experiments=("fmnist_unet", "fmnist_unet_seed1")) -> None:
    """The finetunes' loss terms, one colour per objective (and pruning), seed 1 dashed."""
    teacher = next((metrics(p) for p in (r / "dense" / "fmnist_unet" / "trained" / "metrics.jsonl"
                                         for r in results) if p.exists()), [])  # none when pretrained
    fig, axes = plt.subplots(1, 4 if teacher else 3, figsize=(21 if teacher else 16, 4.5))
    if teacher:
        axes[0].plot([r["step"] for r in teacher], [r["loss"] for r in teacher])
        axes[0].set(title="dense teacher: NP loss", xlabel="step", yscale="log")
    else:  # the panels below index from 1
        axes = [None, *axes]
    runs = [(exp, "--" if exp.endswith("seed1") else "-", path) for exp in experiments for part in results
            for path in sorted((part / "finetune" / exp).glob("*/*/metrics.jsonl"))]
    if not runs:
        return

    # One colour per objective in every panel (a seed repeats its objective's colour, dashed).
    objectives = sorted({model_label(path) for _, _, path in runs})
    colour = {name: f"C{i}" for i, name in enumerate(objectives)}
    for exp, style, path in runs:
        history = metrics(path)
        label = model_label(path) + (" (seed 1)" if exp.endswith("seed1") else "")
        steps = [r["step"] for r in history]
        for axis, term in zip(axes[1:], ("np", "kd", "jm2")):
            if history and term in history[0]:
                axis.plot(steps, [r[term] for r in history], style, color=colour[model_label(path)], label=label)
    for axis, title in zip(axes[1:], ("NP term", "KD term", "Jacobian term (jm2, unweighted)")):
        axis.set(title=f"finetunes: {title}", xlabel="step", yscale="log")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def model_label(metrics_file: Path) -> str:
    """A finetune's objective, and its pruning unless it is Diff-Pruning at ratio 0.3."""
    pruned = metrics_file.parent.parent.name
    objective = metrics_file.parent.name
    return objective if pruned == "diff-pruning-cr0.3" else f"{objective} ({pruned})"


def teacher_scores(work: Path) -> dict[int, dict]:
    """{steps: FID JSON} of the teacher's stages (run.sh's teacher_curve/fid-<steps>.json), sorted."""
    scores = {int(p.stem.split("-")[1]): read_json(p) for p in (work / "teacher_curve").glob("fid-*.json")}
    return dict(sorted(scores.items()))


def teacher_curve_plot(work: Path, scores: dict[int, dict], out: Path) -> None:
    """The teacher grown in stages (run.sh): its NP loss over training and each stage's FID."""
    if not scores:
        return
    history = metrics(work / "results" / "dense" / "fmnist_unet" / "trained" / "metrics.jsonl")
    curve = [(steps, score["fid"]) for steps, score in scores.items()]
    last = scores[max(scores)]
    fig, (loss_axis, fid_axis) = plt.subplots(1, 2, figsize=(11, 4))
    if history:
        loss_axis.plot([r["step"] for r in history], [r["loss"] for r in history])
    loss_axis.set(title="dense teacher: NP loss (batch mean)", xlabel="step", yscale="log")
    fid_axis.plot(*zip(*curve), "o-")
    for steps, fid in curve:
        fid_axis.annotate(f"{fid:.2f}", (steps, fid), textcoords="offset points", xytext=(0, 6), ha="center")
    fid_axis.margins(0.1, 0.15)
    fid_axis.set(title=f"dense teacher: FID ({last['num_images']} samples, "
                       f"{last['sampler_kwargs']['num_steps']}-step {last['sampler'].upper()})",
                 xlabel="training step", ylabel="FID")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def sample_montage(grids: list[tuple[str, Path]], out: Path, per_row: int = 6) -> None:
    grids = [(n, p) for n, p in grids if p.exists()]
    if not grids:
        return
    rows, cols = -(-len(grids) // per_row), min(per_row, len(grids))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, path) in zip(axes.flat, grids):
        ax.imshow(np.asarray(Image.open(path)), cmap="gray")
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(works: list[Path], out: Path) -> None:
    results = [work / "results" for work in works]
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for work in works for row in model_rows(work / "results", work.name)]
    if rows:  # a run stopped early has fewer (or no) scored models: report what exists
        with open(out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    # The teacher curve: of the (first) WORK that grew one.
    curve_work = next((work for work in works if teacher_scores(work)), works[0])
    scores = teacher_scores(curve_work)
    report = {"models": rows, "teacher_fid_by_steps": {steps: score["fid"] for steps, score in scores.items()},
              "stage_seconds": {work.name: stage_wall_times(work / "results") for work in works}}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    teacher_curve_plot(curve_work, scores, out / "teacher_curve.png")
    sample_montage([(f"teacher, {steps} steps", curve_work / "teacher_curve" / f"grid-{steps}.png")
                    for steps in scores], out / "samples_teacher_curve.png")
    loss_plot(results, out / "loss_curves.png")
    loss_plot(results, out / "loss_curves_gradient_flow.png", experiments=("fmnist_gradient_flow",))

    def grid(exp, model):  # a model's sample grid, from the WORK that made it
        paths = [part / "samples" / exp / model / "grid.png" for part in results]
        return next((p for p in paths if p.exists()), paths[0])

    # Sample grids: the teacher (its images are fmnist_unet's), then each experiment's models.
    teacher = [("dense", grid("fmnist_unet", "dense"))]
    for exp, picture in (("fmnist_unet", "samples.png"), ("fmnist_unet_variants", "samples_variants.png"),
                         ("fmnist_gradient_flow", "samples_gradient_flow.png"), ("fmnist_reuse", "samples_reuse.png")):
        models = sorted({r["model"] for r in rows if r["experiment"] == exp and "/" in r["model"]})
        if models:
            sample_montage(teacher + [(m, grid(exp, m)) for m in models], out / picture)
    diagnosed = {f"{model_label(path)}, {exp}": path for exp in EXPERIMENTS for part in results
                 for path in sorted((part / "finetune" / exp).glob("*/*/metrics.jsonl"))
                 if any(k.startswith("jm") for k in (metrics(path) or [{}])[0])}
    if diagnosed:
        from igsm.plots import plot_gradient_share

        plot_gradient_share(diagnosed, out / "gradient_share.png")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: report.py WORK [WORK ...] OUT")
    main([Path(arg) for arg in sys.argv[1:-1]], Path(sys.argv[-1]))
