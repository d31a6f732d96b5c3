"""Sampling (paper Sec. 5.1): samplers as pure functions of (network, initial noise, schedule,
per-image generators), and the sample files of the 50k-image FID sets.

* ``samplers.py``: DDIM, Euler–Maruyama and DPM-Solver as step objects, their registry (``REGISTRY``, by the
  config's ``sample.sampler``), the one loop that runs them (``run_sampler``) and one batch of
  images from their seeds (``generate``); DiP-GO's differentiable chains (``igsm.reuse``) run
  the same objects.
* ``noise.py``: per-image randomness (``ImageGenerators``: image k from seed k alone).
* ``denoiser.py``: the network as samplers call it (``Denoiser``: fixed-shape chunks, precision,
  channels_last, torch.compile).
* ``files.py``: sample files, partial batches of an interrupted job, gathering shards.

The sample stage's job (shards, partial batches, a block-reuse plan applied) and the speed
measurements live above, in igsm.stages.sample. The layers point one way: samplers → denoiser,
noise; ``igsm.reuse`` → samplers, denoiser, noise; igsm.stages.sample → all of them (the
import-linter contracts in pyproject.toml check it). The names below are re-exported for
``from igsm.sampling import …``, each imported on first use (PEP 562): a job that only reads or
writes sample files (igsm.sampling.files: numpy) does not start torch for them.
"""

import importlib

# Every re-exported name and the module that defines it.
_EXPORTS = {
    **dict.fromkeys(("COMPILE_MODES", "PRECISIONS", "ChannelStatsGroupNorm", "Denoiser", "as_denoiser",
                     "denoiser_from_settings", "guidance_from_settings", "numerics", "use_channel_stats_group_norm"),
                    "igsm.sampling.denoiser"),
    **dict.fromkeys(("SHARD_INVARIANTS", "PartialBatches", "gather_shards", "load_samples", "save_samples"),
                    "igsm.sampling.files"),
    "ImageGenerators": "igsm.sampling.noise",
    **dict.fromkeys(("DDIM", "REGISTRY", "SAMPLERS", "DPMSolver", "EulerMaruyama", "Sampler", "ddim_sample",
                     "ddim_step", "ddim_timesteps", "dpm_solver_grid", "dpm_solver_step", "dpm_solver_timesteps",
                     "euler_maruyama_grid", "euler_maruyama_sample", "euler_maruyama_step", "generate",
                     "make_sampler", "run_sampler", "sampler_class", "sampler_kwargs"),
                    "igsm.sampling.samplers"),
}
_SUBMODULES = ("denoiser", "files", "noise", "samplers")
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once: later uses are plain attribute reads
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
