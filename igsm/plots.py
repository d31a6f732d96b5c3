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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, file in metrics_files.items():
        records = [json.loads(line) for line in Path(file).read_text().splitlines() if line]
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (objective total)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
