"""scikit-learn's 8×8 digits (1,797 real images shipped inside its wheel), upsampled: the data of
the embedded offline demo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from igsm.data.sources import register


def load_sklearn_digits(image_size: int) -> dict:
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 intensities, dark digits on white in sklearn's convention are bright-on-dark here.
    small = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)
    big = torch.nn.functional.interpolate(small, size=image_size, mode="bilinear", align_corners=False)
    images = (big.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return {"images": np.ascontiguousarray(images), "labels": digits.target.astype(np.int64)}




def check(spec: dict, fail) -> None:
    pass  # any image_size ≥ 8 (the schema's minimum)


def prepare(spec: dict, cache_dir: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    data = load_sklearn_digits(spec["image_size"])
    yield data["images"], data["labels"]


register("sklearn-digits", check, prepare)
