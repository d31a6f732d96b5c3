"""Pictures people would rather look at: sample grids and training curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch


def save_grid(images: np.ndarray, path, nrow: int | None = None) -> None:
    """uint8 N×H×W×C images → one PNG grid (torchvision's make_grid layout)."""
    from torchvision.utils import save_image

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    # Tiny images (the 16×16 demo) are enlarged with nearest neighbours to stay legible.
    scale = max(1, 64 // x.shape[-1])
    x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(x, path, nrow=nrow or math.ceil(math.sqrt(len(x))), padding=1)


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


def _save(fig, paths, dpi: int = 130) -> None:
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)


def plot_fid_vs_ratio(table5, paths) -> None:
    """FID against pruning ratio from Table 5's cells (igsm.paper_tables): U-Net and U-ViT panels,
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
