"""The Fashion-MNIST experiment's report, in two steps, so that every number of the report traces to a
committed file (issue 33):

    python docs/experiments/fashion_mnist/report.py collect WORK RAW [STEPS]
    python docs/experiments/fashion_mnist/report.py build RAW [RAW ...] OUT
    python docs/experiments/fashion_mnist/report.py check [README]

``collect`` copies what a finished run (run.sh's working directory WORK) measured into RAW, the
folder that is committed (a few hundred KB per run): for each scored model of the experiments below
its FID JSON, training ``summary.json``, ``metrics.jsonl`` (with the per-timestep diagnostics; thinned
to at most ``MAX_METRIC_LINES`` lines, the last always kept), efficiency and variant JSON and sample
grid under ``models/<experiment>/<model>/``; the teacher's stage scores (``teacher_curve/``); the
seconds per stage; and ``digests.json``: the sha256 of the FID reference statistics, of the teacher
and of each pruned student that the run used, so that runs split over several GPU machines can be
checked to share them. With STEPS (run.sh ``ladder`` collects each rung so), finetunes that trained
another number of steps are left out.

``build`` makes every table, figure and number of the report from RAW folders alone (several when a
run was split over GPU leases; each folder's name is a "run" column value, so names must differ):
results.csv, report.json, teacher_curve.png, samples_teacher_curve.png, loss_curves.png,
loss_curves_gradient_flow.png, samples*.png (each model at its furthest rung), gradient_share.png
and, where models were scored at several finetune lengths (run.sh ``ladder``), ladder.csv (every
ladder model's FID, and each Jacobian objective's gap to NP+KD of the same seed, preferably of the
same run), ladder.png (each objective's FID and gap per rung, with their seed spread) and
ladder_rates.csv (each gap's change per fourfold budget, and the budget where that line would
reach 0: an extrapolation). A picture that is byte for byte one of another report beside OUT (a
folder of OUT's parent) is not kept twice: report.json's ``pictures_elsewhere`` names that file. It
refuses RAW folders whose reference statistics or pruned students
differ (digests.json), naming both. A model without its summary.json
(a lease lost mid-rung) takes its finetune length and seed from its RAW's hand-written
``recovered.json``, whose "why" cites the evidence; its rows say so (``training_from``).

``check`` reads the report's README: every number written as ``<number><!-- = FILE SELECTOR -->``
must be what FILE (relative to the README) gives, rounded to the decimals written. SELECTOR is
``COLUMN key=value ...`` for a CSV (the rows whose fields match; ``a–b`` before the tag checks the
smallest and largest of them, a single number needs exactly one row), or ``json KEY.KEY...`` for a
JSON file; ``SELECTOR minus SELECTOR`` and ``SELECTOR over SELECTOR`` give a difference or a ratio
(the second may read another file: ``… over @OTHER_FILE SELECTOR``).
Exit 1, listing each number that does not match the files.
"""

from __future__ import annotations

import csv
import filecmp
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from igsm.data import file_digest  # noqa: E402
from igsm.plots import legend_below, line_colours, plot_gradient_share  # noqa: E402

EXPERIMENTS = ("fmnist_unet", "fmnist_unet_seed1", "fmnist_unet_variants", "fmnist_gradient_flow", "fmnist_reuse")
STAGES = ("download", "dense", "prune", "finetune", "sample", "fid_reference", "fid_statistics")
TEACHER = "fmnist_unet"          # the experiment that trains (or loads) the teacher
MAX_METRIC_LINES = 400           # a committed metrics.jsonl keeps at most this many records
JACOBIAN_OBJECTIVES = ("igsm", "igsm_lam1e-2", "igsm_t10")  # the ladder's, against np_kd
LADDER_EXPERIMENTS = ("fmnist_unet", "fmnist_unet_seed1")  # the ladder's seeds 0 and 1


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def folder_digest(folder: Path) -> str:
    """One sha256 over a model folder's files (names and contents), in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}:{file_digest(path)};".encode())
    return digest.hexdigest()


# --- collect: a run's working directory → the committed raw files ---------------------------------

def thinned(lines: list[str], limit: int = MAX_METRIC_LINES) -> list[str]:
    """At most ``limit`` records, evenly spaced, the last always kept."""
    if len(lines) <= limit:
        return lines
    keep = {round(i * (len(lines) - 1) / (limit - 1)) for i in range(limit)}
    return [line for i, line in enumerate(lines) if i in keep]


def collect(work: Path, raw: Path, steps: int | None = None) -> None:
    """With ``steps`` (a ladder rung's collect), finetunes whose summary.json says another length are
    left out: a finetune of an earlier launch in the same WORK is not this rung's (run 20). And a
    model RAW already holds at this rung's length stays where WORK's finetune has since trained on to
    another (run 21: a second launch's rung-600 collect would have deleted the first's)."""
    results = work / "results"
    if not results.is_dir():
        sys.exit(f"{work}: no results/ folder (not a run.sh working directory)")
    earlier = raw.with_name(raw.name + ".earlier")
    if earlier.exists():
        shutil.rmtree(earlier)
    if raw.exists() and steps is not None:
        for summary in sorted(raw.glob("models/*/*/*/summary.json")):
            if read_json(summary).get("num_steps") == steps:
                (earlier / summary.parent.relative_to(raw)).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(summary.parent, earlier / summary.parent.relative_to(raw))
    if raw.exists():
        shutil.rmtree(raw)
    raw.mkdir(parents=True)
    digests = {"reference": {}, "teacher": None, "students": {}}
    left_out = set()  # EXP/VARIANT of another rung's finetunes: their jobs' seconds are not this rung's
    for exp in EXPERIMENTS:
        for score in sorted((results / "fid" / exp).rglob("*.json")):
            variant = str(score.relative_to(results / "fid" / exp).with_suffix(""))
            folder = teacher_folder(results) if variant == "dense" else (results / "finetune" / exp / variant)
            summary = read_json(folder / "summary.json") if variant != "dense" else None
            if steps is not None and summary and summary.get("num_steps") != steps:
                print(f"{exp}/{variant}: trained {summary.get('num_steps')} steps, not this rung's {steps}; left out")
                left_out.add(f"{exp}/{variant}")
                continue
            out = raw / "models" / exp / variant
            out.mkdir(parents=True)
            shutil.copy(score, out / "fid.json")
            reference = Path(read_json(score)["reference"])
            reference = reference if reference.is_absolute() else work / reference
            if reference.exists():
                digests["reference"][str(reference.relative_to(work))] = file_digest(reference)
            if (folder / "summary.json").exists():
                shutil.copy(folder / "summary.json", out / "summary.json")
            if (folder / "metrics.jsonl").exists():
                lines = (folder / "metrics.jsonl").read_text().splitlines()
                (out / "metrics.jsonl").write_text("".join(line + "\n" for line in thinned(lines)))
            for source, name in ((results / "efficiency" / exp / f"{variant}.json", "efficiency.json"),
                                 (results / "variants" / exp / f"{variant}.json", "variant.json"),
                                 (results / "samples" / exp / variant / "grid.png", "grid.png")):
                if source.exists():
                    shutil.copy(source, out / name)
    for folder in sorted(earlier.glob("models/*/*/*")):  # none of it collected now: trained on since
        if not (raw / folder.relative_to(earlier)).exists():
            (raw / folder.relative_to(earlier)).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(folder, raw / folder.relative_to(earlier))
            print(f"{folder.relative_to(earlier / 'models')}: kept from this rung's earlier collect")
    if earlier.exists():
        shutil.rmtree(earlier)
    scored = [score.relative_to(raw / "models").parts for score in raw.glob("models/**/fid.json")]
    for exp, pruned in sorted({parts[:2] for parts in scored if len(parts) > 3}):  # EXP/PRUNED/…/fid.json
        student = results / "prune" / exp / pruned / "model"
        if student.is_dir():
            digests["students"][f"{exp}/{pruned}"] = folder_digest(student)
    if (teacher_folder(results) / "model").is_dir():
        digests["teacher"] = folder_digest(teacher_folder(results) / "model")
    (raw / "digests.json").write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    (raw / "stage_seconds.json").write_text(json.dumps(stage_wall_times(results, left_out), indent=1) + "\n")
    curve = work / "teacher_curve"
    for path in sorted(curve.glob("fid-*.json")) + sorted(curve.glob("grid-*.png")):
        (raw / "teacher_curve").mkdir(exist_ok=True)
        shutil.copy(path, raw / "teacher_curve" / path.name)
    print(f"{raw}: {sum(1 for _ in (raw / 'models').glob('*/**/fid.json')) if (raw / 'models').exists() else 0}"
          f" scored models")


def teacher_folder(results: Path) -> Path:
    """The teacher's folder: trained by this run, or an earlier run's (run.sh TEACHER)."""
    trained = results / "dense" / TEACHER / "trained"
    return trained if trained.exists() else results / "dense" / TEACHER / "pretrained"


def stage_wall_times(results: Path, left_out: set[str] = frozenset()) -> dict:
    """Seconds per stage: the sum of the jobs' benchmark files (last attempt of each job), leaving out
    the jobs of the models named in ``left_out`` (EXP/VARIANT): a second launch's rung in the same
    WORK counted the first launch's finetune as its own (run 26). A model kept from this rung's
    earlier collect is left out too: WORK's benchmark of it is the longer finetune's, so its own
    seconds are only in that earlier collect's file."""
    out = {}
    for stage in STAGES:
        total = 0.0
        for tsv in (results / "benchmarks" / stage).rglob("*.tsv"):
            job = tsv.relative_to(results / "benchmarks" / stage).with_suffix("").as_posix()
            if any(job == model or job.startswith(model + "/") for model in left_out):
                continue  # finetune/EXP/VARIANT.tsv, sample/EXP/VARIANT/shard-….tsv
            with open(tsv) as f:
                total += float(next(csv.DictReader(f, delimiter="\t"))["s"])
        out[stage] = round(total, 1)
    return out


# --- build: committed raw files → the report's tables and figures ---------------------------------

def check_shared_inputs(raws: list[Path]) -> None:
    """Runs reported together must have used the same reference statistics and pruned students
    (a split run carries them from one machine to the next; run.sh SHARED)."""
    seen: dict[tuple[str, str], tuple[str, Path]] = {}
    for raw in raws:
        digests = read_json(raw / "digests.json") or {}
        items = [("reference", name, value) for name, value in digests.get("reference", {}).items()]
        items += [("student", name, value) for name, value in digests.get("students", {}).items()]
        items += [("teacher", "teacher", digests["teacher"])] if digests.get("teacher") else []
        for kind, name, value in items:
            key = (kind, name)
            if key in seen and seen[key][0] != value:
                sys.exit(f"{seen[key][1] / 'digests.json'} and {raw / 'digests.json'}: different {kind} "
                         f"{name!r} ({seen[key][0][:12]}… vs {value[:12]}…): these runs are not comparable")
            seen.setdefault(key, (value, raw))


def finetune_record(raw: Path, exp: str, folder: Path) -> tuple[dict, str, list[dict]]:
    """A scored model's training summary, the file it comes from, and its metrics up to its last step.

    Where summary.json is missing and RAW has a recovered.json (written by hand, its evidence in its
    "why": the finetune length and seeds of models scored in a lease that was lost before their
    summary.json came back, run 19), the summary is that file's; a metrics.jsonl collected while a
    longer rung ran holds that rung's records past these steps, which are left out."""
    summary, source = read_json(folder / "summary.json"), "summary.json"
    recovered = read_json(raw / "recovered.json")
    if summary is None and recovered and folder.parent.name != exp:  # a finetune, not the teacher
        summary = {"num_steps": recovered["training_steps"],
                   "settings": {"training": {"seed": recovered["seeds"][exp]}}}
        source = "recovered.json"
    summary = summary or {}
    steps = summary.get("num_steps")
    history = [m for m in metrics(folder / "metrics.jsonl") if steps is None or m.get("step", 0) <= steps]
    return summary, source if summary else "", history


def model_rows(raw: Path, run: str) -> list[dict]:
    rows = []
    for score in sorted((raw / "models").glob("*/**/fid.json")):
        exp, variant = score.parent.relative_to(raw / "models").parts[0], \
            "/".join(score.parent.relative_to(raw / "models").parts[1:])
        folder = score.parent
        fid = read_json(score)
        eff = read_json(folder / "efficiency.json") or {}
        meta = read_json(folder / "variant.json") or {}
        summary, source, history = finetune_record(raw, exp, folder)
        timing = summary.get("timing", {})
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
            "training_steps": summary.get("num_steps"), "training_from": source,
            # (a finetune resumed on another machine, attempts > 1, times its legs together: mixed cards)
            "training_attempts": timing.get("attempts"), "sec_per_step": timing.get("sec_per_step"),
            "train_minutes": timing.get("wall_time_s", float("nan")) / 60,
            "peak_memory_GiB": (timing.get("peak_memory_mib") or float("nan")) / 1024,
            "final_loss": last.get("loss"), "final_np": last.get("np"), "final_kd": last.get("kd"),
            "reuse": meta.get("reuse_method", ""), "reuse_target": meta.get("mac_fraction"),
            "sampler_steps": eff.get("sampler_steps"), "sampling_macs_G": (eff.get("sampling_macs") or float("nan")) / 1e9,
            "sampling_images_per_s": eff.get("sampling_images_per_s"),
        })
    # Step time relative to NP+KD of the same run (the jobs shared the GPU alike): of the same
    # experiment, pruned network and finetune length where it has an NP+KD run, else Diff-Pruning's
    # at ratio 0.3 of the same experiment, else of any experiment of the run.
    reference = {(r["experiment"], r["model"].split("/")[0]): r["sec_per_step"] for r in rows
                 if r["objective"] == "np_kd"}
    any_dp = next((v for (exp, pruned), v in reference.items() if pruned == "diff-pruning-cr0.3"), None)
    for row in rows:
        base = reference.get((row["experiment"], row["model"].split("/")[0]),
                             reference.get((row["experiment"], "diff-pruning-cr0.3"), any_dp))
        row["step_time_vs_np_kd"] = (row["sec_per_step"] / base) if base and row["sec_per_step"] else None
    return rows


def ladder_rows(rows: list[dict]) -> list[dict]:
    """Every ladder model's FID per channel ratio, finetune length, objective and seed (experiments
    fmnist_unet = seed 0, fmnist_unet_seed1 = seed 1), and for the Jacobian objectives the gap to
    NP+KD's of the same seed: NP+KD of the same run where it has one, else the mean of its draws in
    the other runs (the GPU kernels are not deterministic: each draw is one sample of the same
    finetune), ``np_kd_run`` naming the runs it averages."""
    ladder = [r for r in rows if r["experiment"] in LADDER_EXPERIMENTS and r["training_steps"]]
    np_kd: dict[tuple, dict[str, float]] = {}
    for r in ladder:
        if r["objective"] == "np_kd":
            np_kd.setdefault((r["channel_ratio"], r["training_steps"], r["seed"]), {})[r["run"]] = r["fid"]
    out = []
    for r in sorted(ladder, key=lambda r: tuple(map(str, (r["channel_ratio"], r["training_steps"], r["objective"],
                                                          r["seed"], r["run"])))):
        if r["objective"] not in ("np_kd", *JACOBIAN_OBJECTIVES):
            continue
        row = {"channel_ratio": r["channel_ratio"], "steps": r["training_steps"], "objective": r["objective"],
               "seed": r["seed"], "run": r["run"], "fid": r["fid"], "np_kd_fid": None, "np_kd_run": None, "gap": None}
        draws = np_kd.get((r["channel_ratio"], r["training_steps"], r["seed"]), {})
        if r["objective"] in JACOBIAN_OBJECTIVES and draws:
            compared = [r["run"]] if r["run"] in draws else sorted(draws)
            row["np_kd_run"] = " ".join(compared)
            row["np_kd_fid"] = float(np.mean([draws[run] for run in compared]))
            row["gap"] = r["fid"] - row["np_kd_fid"]
        out.append(row)
    return out


def ladder_rates(gaps: list[dict]) -> list[dict]:
    """How fast each Jacobian objective's gap to NP+KD moves with budget: per channel ratio, objective
    and seed scored at two or more rungs, the least-squares line gap = a + b·log4(steps) (exact through
    two rungs). ``change_per_fourfold`` is b; ``closes_at_steps`` is where that line reaches 0, where
    a positive gap is shrinking — an extrapolation of the line, not a measurement."""
    by_series: dict[tuple, dict[int, list[float]]] = {}
    for g in gaps:
        if g["gap"] is not None:
            by_series.setdefault((g["channel_ratio"], g["objective"], g["seed"]), {}).setdefault(
                g["steps"], []).append(g["gap"])
    out = []
    for (ratio, objective, seed), rungs in sorted(by_series.items(), key=lambda item: tuple(map(str, item[0]))):
        if len(rungs) < 2:
            continue
        steps = sorted(rungs)
        x = np.log(steps) / np.log(4)
        y = np.array([float(np.mean(rungs[s])) for s in steps])
        # the least-squares line in closed form: np.polyfit goes through LAPACK, whose last digit
        # differs between machines, and a rebuild should give the committed files byte for byte
        slope = float(np.sum((x - x.mean()) * (y - y.mean())) / np.sum((x - x.mean()) ** 2))
        intercept = float(y.mean() - slope * x.mean())
        closes = float(4 ** (-intercept / slope)) if slope < 0 and y[-1] > 0 else None
        out.append({"channel_ratio": ratio, "objective": objective, "seed": seed,
                    "rungs": " ".join(map(str, steps)), "first_gap": y[0], "last_gap": y[-1],
                    "change_per_fourfold": float(slope), "closes_at_steps": closes})
    return out


def ladder_plot(gaps: list[dict], teacher_fids: list[float], out: Path) -> None:
    """One column per channel ratio. Top: each objective's FID against finetune steps, with the dense
    teacher's (its range over the experiments' samplings) — where NP+KD has no model at a rung, the
    Jacobian objective's FID still shows against NP+KD's at the others. Bottom: the gap
    FID(objective) − FID(NP+KD) of the same seed. In both, the line goes through the mean of the
    scored models, the bar spans their range."""
    ratios = sorted({g["channel_ratio"] for g in gaps})
    fig, axes = plt.subplots(2, len(ratios), figsize=(5.5 * len(ratios), 8), squeeze=False)
    for column, ratio in enumerate(ratios):
        top, bottom = axes[0][column], axes[1][column]
        for i, objective in enumerate(("np_kd", *JACOBIAN_OBJECTIVES)):
            for axis, key in ((top, "fid"), (bottom, "gap")):
                points: dict[int, list[float]] = {}
                for g in gaps:
                    if g["channel_ratio"] == ratio and g["objective"] == objective and g[key] is not None:
                        points.setdefault(g["steps"], []).append(g[key])
                if not points:
                    continue
                steps = sorted(points)
                mean = [float(np.mean(points[s])) for s in steps]
                low = [m - min(points[s]) for m, s in zip(mean, steps)]
                high = [max(points[s]) - m for m, s in zip(mean, steps)]
                axis.errorbar(steps, mean, yerr=[low, high], marker="o", capsize=3, color=f"C{i}", label=objective)
        if teacher_fids:
            top.axhspan(min(teacher_fids), max(teacher_fids), color="grey", alpha=0.3, label="dense teacher")
        bottom.axhline(0, color="black", linewidth=0.8)
        top.set(title=f"channel ratio {ratio}: 10k-sample FID", ylabel="FID")
        bottom.set(title=f"channel ratio {ratio}: FID − FID(NP+KD), same seed",
                   ylabel="FID gap (below 0: the Jacobian objective wins)")
        rungs = sorted({g["steps"] for g in gaps if g["channel_ratio"] == ratio})
        for axis in (top, bottom):
            axis.set(xlabel="finetune steps", xscale="log")
            axis.set_xticks(rungs, [f"{s:,}" for s in rungs])
            axis.minorticks_off()
            axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def loss_plot(raws: list[Path], out: Path, experiments=LADDER_EXPERIMENTS) -> None:
    """The finetunes' loss terms, one colour per objective (and pruning), seed 1 dashed."""
    teacher = next((metrics(p) for p in (r / "models" / TEACHER / "dense" / "metrics.jsonl"
                                         for r in raws) if p.exists()), [])  # none when pretrained
    runs = [(exp, "--" if exp.endswith("seed1") else "-", path, finetune_record(raw, exp, path.parent)[2])
            for exp in experiments for raw in raws for path in sorted((raw / "models" / exp).glob("*/*/metrics.jsonl"))]
    if not runs:
        return
    fig, axes = plt.subplots(1, 4 if teacher else 3, figsize=(21 if teacher else 16, 4.5))
    if teacher:
        axes[0].plot([r["step"] for r in teacher], [r["loss"] for r in teacher])
        axes[0].set(title="dense teacher: NP loss", xlabel="step", yscale="log")
    else:  # the panels below index from 1
        axes = [None, *axes]

    # One colour per objective in every panel (a seed repeats its objective's colour, dashed).
    objectives = sorted({model_label(path) for _, _, path, _ in runs})
    palette = line_colours(len(objectives))
    colour = {name: palette(i % palette.N) for i, name in enumerate(objectives)}
    for exp, style, path, history in runs:
        label = model_label(path) + (" (seed 1)" if exp.endswith("seed1") else "")
        steps = [r["step"] for r in history]
        for axis, term in zip(axes[1:], ("np", "kd", "jm2")):
            if history and term in history[0]:
                axis.plot(steps, [r[term] for r in history], style, color=colour[model_label(path)], label=label)
    for axis, title in zip(axes[1:], ("NP term", "KD term", "Jacobian term (jm2, unweighted)")):
        axis.set(title=f"finetunes: {title}", xlabel="step", yscale="log")
    legend_below(fig, [axis for axis in axes if axis is not None], columns=4)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def model_label(metrics_file: Path) -> str:
    """A finetune's objective, and its pruning unless it is Diff-Pruning at ratio 0.3."""
    pruned = metrics_file.parent.parent.name
    objective = metrics_file.parent.name
    return objective if pruned == "diff-pruning-cr0.3" else f"{objective} ({pruned})"


def teacher_scores(raw: Path) -> dict[int, dict]:
    """{steps: FID JSON} of the teacher's stages (run.sh's teacher_curve/fid-<steps>.json), sorted."""
    scores = {int(p.stem.split("-")[1]): read_json(p) for p in (raw / "teacher_curve").glob("fid-*.json")}
    return dict(sorted(scores.items()))


def teacher_curve_plot(raw: Path, scores: dict[int, dict], out: Path) -> None:
    """The teacher grown in stages (run.sh): its NP loss over training and each stage's FID."""
    if not scores:
        return
    history = metrics(raw / "models" / TEACHER / "dense" / "metrics.jsonl")
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
    plt.close(fig)


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
    plt.close(fig)


def furthest_grids(rows: list[dict], raws: list[Path], experiment: str) -> list[tuple[str, Path]]:
    """(title, grid.png) per finetuned model of ``experiment``, each at its furthest rung: a ladder scores
    one model name at several budgets, each in its own RAW, and the title says which one the panel shows.
    Of equal budgets, the first RAW's."""
    by_name = {raw.name: raw for raw in raws}
    furthest: dict[str, dict] = {}
    for r in rows:  # in RAW order
        if r["experiment"] == experiment and "/" in r["model"]:
            best = furthest.get(r["model"])
            if best is None or (r["training_steps"] or 0) > (best["training_steps"] or 0):
                furthest[r["model"]] = r
    return [(f"{model}, {r['training_steps']:,} steps" if r["training_steps"] else model,
             by_name[r["run"]] / "models" / experiment / model / "grid.png") for model, r in sorted(furthest.items())]


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def build(raws: list[Path], out: Path) -> None:
    for raw in raws:
        if not (raw / "digests.json").exists():
            sys.exit(f"{raw}: no digests.json (not a folder written by `report.py collect`)")
    names = [raw.name for raw in raws]
    if len(set(names)) < len(names):  # the "run" column tells their models apart
        twice = sorted({name for name in names if names.count(name) > 1})
        sys.exit(f"RAW folders of the same name ({', '.join(twice)}): their models would share one run value")
    check_shared_inputs(raws)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for raw in raws for row in model_rows(raw, raw.name)]
    if rows:  # a run stopped early has fewer (or no) scored models: report what exists
        write_csv(rows, out / "results.csv")
    gaps, rates = ladder_rows(rows), None
    if len({g["steps"] for g in gaps}) > 1:
        write_csv(gaps, out / "ladder.csv")
        teacher_fids = [r["fid"] for r in rows if r["objective"] == "dense" and r["experiment"] in LADDER_EXPERIMENTS]
        ladder_plot(gaps, teacher_fids, out / "ladder.png")
        rates = ladder_rates(gaps)
        if rates:
            write_csv(rates, out / "ladder_rates.csv")
    # The teacher curve: of the (first) RAW that grew one.
    curve_raw = next((raw for raw in raws if teacher_scores(raw)), raws[0])
    scores = teacher_scores(curve_raw)
    report = {"models": rows, "ladder": gaps, "ladder_rates": rates or [],
              "teacher_fid_by_steps": {steps: score["fid"] for steps, score in scores.items()},
              "stage_seconds": {raw.name: read_json(raw / "stage_seconds.json") for raw in raws},
              "digests": {raw.name: read_json(raw / "digests.json") for raw in raws}}
    teacher_curve_plot(curve_raw, scores, out / "teacher_curve.png")
    sample_montage([(f"teacher, {steps} steps", curve_raw / "teacher_curve" / f"grid-{steps}.png")
                    for steps in scores], out / "samples_teacher_curve.png")
    loss_plot(raws, out / "loss_curves.png")
    loss_plot(raws, out / "loss_curves_gradient_flow.png", experiments=("fmnist_gradient_flow",))

    # Sample grids: the teacher (its images are fmnist_unet's, from the first RAW that has them), then
    # each experiment's models.
    teacher_grids = [raw / "models" / TEACHER / "dense" / "grid.png" for raw in raws]
    teacher = [("dense", next((p for p in teacher_grids if p.exists()), teacher_grids[0]))]
    for exp, picture in (("fmnist_unet", "samples.png"), ("fmnist_unet_variants", "samples_variants.png"),
                         ("fmnist_gradient_flow", "samples_gradient_flow.png"), ("fmnist_reuse", "samples_reuse.png")):
        panels = furthest_grids(rows, raws, exp)
        if panels:
            sample_montage(teacher + panels, out / picture)
    diagnosed = {}  # each Jacobian finetune's records up to its rung (a recovered model's file runs on)
    for raw in raws:
        for exp in EXPERIMENTS:
            for path in sorted((raw / "models" / exp).glob("*/*/metrics.jsonl")):
                history = finetune_record(raw, exp, path.parent)[2]
                if history and any(k.startswith("jm") for k in history[0]):
                    diagnosed[f"{model_label(path)}, {path.parent.parent.parent.name}, {raw.name}"] = history
    if diagnosed:
        plot_gradient_share(diagnosed, out / "gradient_share.png")
    report["pictures_elsewhere"] = drop_repeated_pictures(out)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")


def drop_repeated_pictures(out: Path) -> dict[str, str]:
    """Removes each picture of ``out`` that is byte for byte one of another report beside it (a folder
    of ``out``'s parent, the first by run number), and returns {picture: that file, relative to
    ``out``'s parent}. Each build draws every picture again, and a rung that adds no model to a montage
    draws the same one: runs 24–26 committed one 1.3 MB samples.png three times, and the committed tree
    travels with every call of a GPU lease (64 MiB a call, README "What the next run needs")."""
    def run_order(path: Path) -> list:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.parent.name)]
    elsewhere = {}
    for picture in sorted(out.glob("*.png")):
        same = (other for other in sorted(out.parent.glob(f"*/{picture.name}"), key=run_order)
                if other.parent.resolve() != out.resolve() and filecmp.cmp(other, picture, shallow=False))
        kept = next(same, None)
        if kept is not None:
            picture.unlink()
            elsewhere[picture.name] = kept.relative_to(out.parent).as_posix()
    return elsewhere


# --- check: the README's numbers against the files -------------------------------------------------

TAG = re.compile(r"(?P<number>[-+−]?[\d,]*\d(?:\.\d+)?(?:\s*[–-]\s*[-+−]?[\d,]*\d(?:\.\d+)?)?)"
                 r"(?P<suffix>[×%]?)\*{0,2}<!-- = (?P<file>\S+) (?P<selector>.*?) -->")


def _number(text: str) -> tuple[float, int]:
    """(value, decimals) of a number as written: thousands separators, a Unicode minus."""
    text = text.replace(",", "").replace("−", "-").replace("+", "")
    return float(text), len(text.split(".")[1]) if "." in text else 0


def _select(path: Path, selector: str) -> list[float]:
    """The values one selector picks from a CSV (``COLUMN key=value ...``) or JSON (``json a.b``)."""
    words = selector.split()
    if words[0] == "json":
        value = read_json(path)
        for key in words[1].split("."):
            value = value[int(key)] if isinstance(value, list) else value[key]
        return [float(value)]
    column, conditions = words[0], dict(word.split("=", 1) for word in words[1:])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))

    def same(a: str, b: str) -> bool:
        try:
            return float(a) == float(b)
        except ValueError:
            return a == b
    return [float(row[column]) for row in rows if all(same(row.get(k, ""), v) for k, v in conditions.items())]


def check(readme: Path) -> int:
    """0 when every tagged number of ``readme`` is what its file gives, else 1 (each mismatch printed)."""
    text = readme.read_text()
    problems, count, numbered = [], 0, set()
    for match in TAG.finditer(text):
        count += 1
        numbered.add(match.start("file"))
        line = text.count("\n", 0, match.start()) + 1
        where = f"{readme}:{line}: {match.group(0)!r}"
        path = readme.parent / match.group("file")
        if not path.exists():
            problems.append(f"{where}: no file {path}")
            continue
        selector = match.group("selector")
        try:
            if " minus " in selector or " over " in selector:
                op = " minus " if " minus " in selector else " over "
                left_selector, right_selector = selector.split(op)
                right_path = path
                if right_selector.startswith("@"):
                    other, right_selector = right_selector[1:].split(" ", 1)
                    right_path = readme.parent / other
                left, right = _select(path, left_selector), _select(right_path, right_selector)
                if len(left) != 1 or len(right) != 1:
                    raise ValueError(f"{len(left)} and {len(right)} rows match (need one each)")
                values = [left[0] - right[0] if op == " minus " else left[0] / right[0]]
            else:
                values = _select(path, selector)
        except (KeyError, ValueError, IndexError, TypeError) as err:
            problems.append(f"{where}: cannot read it from {path}: {err!r}")
            continue
        if match.group("suffix") == "%":
            values = [100 * v for v in values]
        parts = re.split(r"\s*[–]\s*|(?<=\d)\s*-\s*(?=[\d+−-])", match.group("number"))
        if not values:
            problems.append(f"{where}: no row of {path} matches")
            continue
        expected = [min(values), max(values)] if len(parts) == 2 else values
        if len(parts) == 1 and len(values) != 1:
            problems.append(f"{where}: {len(values)} rows match, need one")
            continue
        for written, value in zip(parts, expected):
            number, decimals = _number(written)
            if round(value, decimals) != number:
                problems.append(f"{where}: the file gives {value:.{decimals + 2}f}")
    # A tag with no number right before it is not matched above, so it would check nothing unseen
    # (the README's own mentions of the syntax, in `code`, are not tags).
    for opening in re.finditer(r"<!-- = (\S+)", text):
        in_code = text.count("`", text.rfind("\n", 0, opening.start()) + 1, opening.start()) % 2 == 1
        if opening.start(1) not in numbered and not in_code:
            line = text.count("\n", 0, opening.start()) + 1
            problems.append(f"{readme}:{line}: a tag with no number before it: {opening.group(0)!r}")
    for problem in problems:
        print(problem)
    print(f"{readme}: {count} tagged numbers, {len(problems)} not what the files give")
    return 1 if problems or count == 0 else 0


if __name__ == "__main__":
    usage = "usage: report.py collect WORK RAW [STEPS] | build RAW [RAW ...] OUT | check [README]"
    if len(sys.argv) < 2 or sys.argv[1] not in ("collect", "build", "check"):
        sys.exit(usage)
    command, args = sys.argv[1], sys.argv[2:]
    if command == "collect" and len(args) in (2, 3) and (len(args) == 2 or args[2].isdigit()):
        collect(Path(args[0]), Path(args[1]), int(args[2]) if len(args) == 3 else None)
    elif command == "build" and len(args) >= 2:
        build([Path(arg) for arg in args[:-1]], Path(args[-1]))
    elif command == "check" and len(args) <= 1:
        sys.exit(check(Path(args[0]) if args else Path(__file__).with_name("README.md")))
    else:
        sys.exit(usage)
