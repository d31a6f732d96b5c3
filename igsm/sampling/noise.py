"""Per-image randomness for the samplers (Sec. 5.1's 50k-image sets): image k draws all its noise from
its own generator seeded with ``seed + k`` (edm's StackedRandomGenerator), on the CPU, so its noise is
the same at any batch size, shard split, GPU count or device.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=4)
def _pool(num_threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(num_threads, thread_name_prefix="igsm-noise")


class ImageGenerators:
    """One CPU torch.Generator per image; ``randn`` stacks one float32 draw from each.

    Drawing is the cost of per-image seeds (~20 µs per 32×32×3 image on one core), so with
    ``num_threads`` > 1 the generators are split into contiguous groups drawn in parallel: each
    generator is still used by one thread, in order, so the numbers do not change.
    """

    def __init__(self, seeds, num_threads: int = 1):
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        self.num_threads = max(1, min(int(num_threads), len(self.generators)))

    def __len__(self):
        return len(self.generators)

    def randn(self, shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
        device = torch.device(device)
        out = torch.empty((len(self.generators), *shape), dtype=torch.float32,
                          pin_memory=device.type == "cuda")

        def draw(indices):
            for i in indices:
                torch.randn(shape, generator=self.generators[i], out=out[i])

        if self.num_threads == 1:
            draw(range(len(self.generators)))
        else:
            groups = np.array_split(np.arange(len(self.generators)), self.num_threads)
            list(_pool(self.num_threads).map(draw, groups))
        return out.to(device, dtype, non_blocking=True)
