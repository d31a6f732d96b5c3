"""Pictures people would rather look at: sample grids and training curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def save_grid(images: np.ndarray, path, nrow: int | None = None) -> None:
    """uint8 N×H×W×C images → one PNG grid, pixel for pixel what torchvision's ``save_image`` writes
    of them (``make_grid``: ``nrow`` images a row, 1-pixel black padding, one channel shown as RGB, a
    single image unpadded), in numpy and PIL: the sample gathering job that draws it starts without
    torch (tests/test_sampling.py compares the two)."""
    from PIL import Image

    images = np.asarray(images)
    # Tiny images (the 16×16 demo) are enlarged with nearest neighbours to stay legible.
    scale = max(1, 64 // images.shape[2])
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    if images.shape[-1] == 1:
        images = images.repeat(3, axis=-1)
    count, height, width, channels = images.shape
    columns = min(nrow or math.ceil(math.sqrt(count)), count)
    if count == 1:
        grid = images[0]
    else:
        step_y, step_x = height + 1, width + 1
        grid = np.zeros((math.ceil(count / columns) * step_y + 1, columns * step_x + 1, channels), np.uint8)
        for k, image in enumerate(images):
            row, column = divmod(k, columns)
            grid[row * step_y + 1:row * step_y + 1 + height, column * step_x + 1:column * step_x + 1 + width] = image
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def plot_training_curves(metrics_files: dict, path) -> None:
    """Loss against step, one line per run; ``metrics_files`` maps a label to a JSONL file."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, file in metrics_files.items():
        records = [json.loads(line) for line in Path(file).read_text().splitlines() if line]
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (objective total)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, [path], dpi=120)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def legend_below(fig, axes, fontsize: int = 7, columns: int = 3) -> None:
    """One legend for all ``axes`` under them, each label once (the first line drawn with it): a
    legend inside an axis hides its lines once a report draws twenty runs, and one per line repeats
    a label for each rung or seed drawn in the same style. The figure grows by the legend's rows, so
    the panels keep their size; then it lays itself out (``tight_layout``) above the legend."""
    handles = {}
    for axis in np.atleast_1d(axes):
        for handle, label in zip(*axis.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if not handles:
        fig.tight_layout()
        return
    columns = max(1, min(columns, len(handles)))
    rows = math.ceil(len(handles) / columns)
    width, height = fig.get_size_inches()
    legend_height = 0.2 + rows * fontsize * 1.9 / 72  # inches: a row of text and its spacing
    fig.set_size_inches(width, height + legend_height)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=columns, fontsize=fontsize,
               frameon=False)
    fig.tight_layout(rect=(0, legend_height / (height + legend_height), 1, 1))


def line_colours(count: int):
    """A colour map with distinct colours for ``count`` lines (call it with ``i % .N``): matplotlib's
    default cycle repeats after ten, and a ladder report draws more."""
    return _pyplot().get_cmap("tab10" if count <= 10 else "tab20")


def _save(fig, paths, dpi: int = 130) -> None:
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)


def plot_fid_vs_ratio(table5, paths) -> None:
    """FID against pruning ratio from Table 5's cells (igsm.paper.tables): U-Net and U-ViT panels,
    Diff-Pruning and IGSM, ours solid (where scored), the paper's dashed."""
    plt = _pyplot()
    fid = table5[table5.column == "fid"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, section in zip(axes, ("U-Net", "U-ViT")):
        cells = fid[fid.section == section]
        for method, colour in (("DP", "C0"), ("IGSM", "C3")):
            rows = cells[cells.method.str.startswith(f"{method}, PR ")]
            ratios = rows.method.str.split("PR ").str[1].astype(float)
            axis.plot(ratios, rows.paper.astype(float), "--", color=colour, marker="o", mfc="none",
                      label=f"{method} (paper)")
            ours = rows.status == "ours"
            if ours.any():
                axis.plot(ratios[ours], rows.ours[ours].astype(float), "-", color=colour, marker="o",
                          label=f"{method} (ours)")
        dense = cells[cells.method == "dense"]
        if len(dense):
            axis.axhline(float(dense.paper.iloc[0]), color="grey", lw=0.8, ls=":", label="dense (paper)")
        axis.set(title=f"{section}, CIFAR-10 (Table 5)", xlabel="pruning ratio (paper's label)", ylabel="FID")
        axis.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, paths)
    plt.close(fig)


def plot_fid_vs_lambda(table10, paths) -> None:
    """FID against λ_Jac at each pruning ratio from Table 10's cells: λ 0 (Diff-Pruning's NP) drawn
    one decade left of the smallest λ, ours solid, the paper's dashed."""
    plt = _pyplot()
    cells = table10[table10.column.str.startswith("fid@") & (table10.method != "PR 0 (dense)")]
    lambdas = sorted({float(c.split("@")[1]) for c in cells.column if c != "fid@0"})
    zero_at = lambdas[0] / 10
    fig, axis = plt.subplots(figsize=(6.5, 4))
    for i, (method, rows) in enumerate(cells.groupby("method", sort=False)):
        x = rows.column.str.split("@").str[1].astype(float).replace(0.0, zero_at)
        shown = rows.paper.notna()
        axis.plot(x[shown], rows.paper[shown].astype(float), "--", color=f"C{i}", marker="o", mfc="none",
                  label=f"{method} (paper)")
        ours = rows.status == "ours"
        if ours.any():
            axis.plot(x[ours], rows.ours[ours].astype(float), "-", color=f"C{i}", marker="o",
                      label=f"{method} (ours)")
    axis.set_xscale("log")
    ticks = [zero_at, *lambdas]
    axis.set_xticks(ticks, ["0"] + [f"{v:g}" for v in lambdas])
    axis.set(title="CIFAR-10 U-Net (Table 10)", xlabel="λ_Jac", ylabel="FID")
    axis.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, paths)
    plt.close(fig)


def plot_sample_comparison(grids: dict, paths, title: str = "") -> None:
    """Sample grids side by side: ``grids`` maps a row label (dataset) to {column label: PNG}."""
    from PIL import Image

    plt = _pyplot()
    columns = list(dict.fromkeys(c for row in grids.values() for c in row))
    fig, axes = plt.subplots(len(grids), len(columns), figsize=(3.2 * len(columns), 3.4 * len(grids)),
                             squeeze=False)
    for i, (row, files) in enumerate(grids.items()):
        for j, column in enumerate(columns):
            axis = axes[i][j]
            axis.axis("off")
            if column in files:
                with Image.open(files[column]) as img:
                    axis.imshow(np.asarray(img.convert("RGB")))
            axis.set_title(f"{row}: {column}" if j == 0 else column, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, paths)
    plt.close(fig)


def plot_reuse_plan(plan, path) -> None:
    """A block-reuse gate table (igsm.reuse.ReusePlan, cascaded): sampling steps down, blocks
    across, dark = the block runs, light = its cached output is reused."""
    plt = _pyplot()
    gates = plan.cascaded().recompute.numpy()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 + 0.35 * gates.shape[1]), 2.0 + min(8.0, 0.06 * gates.shape[0])))
    ax.imshow(gates, aspect="auto", cmap="Greys", vmin=0, vmax=1.4, interpolation="nearest")
    ax.set_xticks(range(len(plan.blocks)), plan.blocks, rotation=90, fontsize=7)
    ax.set_ylabel("sampling step")
    ax.set_title(f"{plan.method}: {plan.mac_fraction():.3f} of the dense MACs", fontsize=9)
    fig.tight_layout()
    _save(fig, [path], dpi=110)
    plt.close(fig)


def gradient_shares(records: list[dict], index: int) -> tuple[list[int], list[float]]:
    """(log steps, the Jacobian terms' share ‖g_jac‖ / (‖g_np‖ + ‖g_kd‖ + ‖g_jac‖) of the gradient
    norms from timestep range ``index``) over a run's metrics records with ``by_timestep``.
    Skipped: records without diagnostics, without rows in the range, or from a step that did not
    evaluate the Jacobian terms (``jacobian_every`` > 1: no share to show, not a share of 0)."""
    steps, shares = [], []
    for record in records:
        diagnosed = record.get("by_timestep")
        if not diagnosed or not diagnosed["rows"][index]:
            continue
        norms = {name: entry["grad_norm"][index] for name, entry in diagnosed.items()
                 if isinstance(entry, dict) and "grad_norm" in entry}
        jacobian = [v for name, v in norms.items() if name.startswith("jm")]
        total = sum(norms.values())
        if jacobian and total > 0:
            steps.append(record["step"])
            shares.append(sum(jacobian) / total)
    return steps, shares


def plot_gradient_share(runs: dict[str, list[dict]], path) -> None:
    """Where the Jacobian term's gradient comes from (issue 20): per run (``runs`` maps a label to
    its metrics records, the training loop's JSONL lines with its ``by_timestep`` diagnostics) and
    timestep range, the Jacobian terms' share ‖g_jac‖ / (‖g_np‖ + ‖g_kd‖ + ‖g_jac‖) of the gradient
    norms from that range's rows, over training. Records, not files: a caller may trim a run's
    records (a finetune scored at an earlier rung than its file reaches)."""
    plt = _pyplot()
    ranges = next((r["by_timestep"]["ranges"] for records in runs.values() for r in records
                   if "by_timestep" in r), None)
    if ranges is None:
        raise ValueError(f"no by_timestep diagnostics in the records of {sorted(runs)}")
    fig, axes = plt.subplots(1, len(ranges), figsize=(4 * len(ranges), 3.4), sharey=True)
    # one colour per run; past tab20's twenty colours, the next twenty runs are dashed
    colours = line_colours(len(runs))
    for axis, (index, (low, high)) in zip(np.atleast_1d(axes), enumerate(ranges)):
        for i, (label, records) in enumerate(runs.items()):
            steps, shares = gradient_shares(records, index)
            if steps:
                axis.plot(steps, shares, marker=".", label=label, color=colours(i % colours.N),
                          linestyle=("-", "--", ":")[i // colours.N % 3])
        axis.set_title(f"t in [{low:g}, {'T' if high is None else f'{high:g}'})", fontsize=9)
        axis.set_xlabel("training step")
        axis.set_ylim(-0.02, 1.02)
    np.atleast_1d(axes)[0].set_ylabel("Jacobian terms' share of ‖gradient‖")
    legend_below(fig, axes)
    _save(fig, [path], dpi=120)
    plt.close(fig)


def plot_flow_masks(report: dict, path) -> None:
    """Gradient-flow pruning's own report (igsm.pruning.gradient_flow): each group's mask over the flow
    (mean, and the spread max − min that ranks its channels for the hard prune) beside the overall
    density, and each group's width before and after the hard prune. ``report``: the prune
    report's 'gradient_flow' section."""
    plt = _pyplot()
    spreads = report["mask_spreads"]
    widths = report["final_widths"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for steps in spreads.values():
        lows, means, highs = np.array(steps).T if steps else ([], [], [])
        x = np.arange(1, len(means) + 1)
        axes[0].plot(x, means, color="0.6", lw=0.7)
        axes[1].plot(x, np.maximum(np.asarray(highs) - np.asarray(lows), 1e-9), lw=0.7)
    axes[0].plot(np.arange(1, len(report["densities"]) + 1), report["densities"], color="k", lw=2,
                 label="density (all masks)")
    axes[0].axhline(report["target_density"], ls="--", color="k", lw=0.8)
    axes[0].set(xlabel="flow step", ylabel="mask value", title="each group's mean mask (grey)")
    axes[0].legend(fontsize=7)
    axes[1].set(xlabel="flow step", ylabel="max − min within the group", yscale="log",
                title="spread that ranks a group's channels")
    names = list(widths)
    axes[2].barh(range(len(names)), [widths[n][0] for n in names], color="0.85", label="dense")
    axes[2].barh(range(len(names)), [widths[n][1] for n in names], color="C0", label="kept")
    axes[2].set_yticks(range(len(names)), names, fontsize=5)
    axes[2].invert_yaxis()
    axes[2].set(xlabel="channels", title="widths after the hard prune")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, [path], dpi=120)
    plt.close(fig)
