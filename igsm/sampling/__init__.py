"""Sampling (paper Sec. 5.1): samplers as pure functions of (network, initial noise, schedule,
per-image generators), and the sharded, resumable generation of the 50k-image FID sets.

* ``samplers.py``: DDIM and Euler–Maruyama as step objects, their registry (``REGISTRY``, by the
  config's ``sample.sampler``) and the one loop that runs them (``run_sampler``); DiP-GO's
  differentiable chains (``igsm.reuse``) run the same objects.
* ``noise.py``: per-image randomness (``ImageGenerators``: image k from seed k alone).
* ``denoiser.py``: the network as samplers call it (``Denoiser``: fixed-shape chunks, precision,
  channels_last, torch.compile).
* ``files.py``: sample files, partial batches of an interrupted job, gathering shards.
* ``job.py``: one batch from seeds (``generate``), the sample stage's job (``sample_shard``) and the
  efficiency stage's speed measurements.

The layers point one way: samplers → denoiser; job → samplers, denoiser, noise, files (and
``igsm.reuse`` inside the functions that apply a block-reuse plan); ``igsm.reuse`` → samplers,
denoiser, noise. The names below are re-exported for ``from igsm.sampling import …``.
"""

from igsm.sampling.denoiser import (COMPILE_MODES, PRECISIONS, ChannelStatsGroupNorm, Denoiser, as_denoiser,
                                    denoiser_from_settings, numerics, use_channel_stats_group_norm)
from igsm.sampling.files import SHARD_INVARIANTS, PartialBatches, gather_shards, load_samples, save_samples
from igsm.sampling.noise import ImageGenerators
from igsm.sampling.samplers import (DDIM, REGISTRY, SAMPLERS, EulerMaruyama, Sampler, ddim_sample, ddim_step,
                                    ddim_timesteps, euler_maruyama_grid, euler_maruyama_sample,
                                    euler_maruyama_step, make_sampler, run_sampler, sampler_class, sampler_kwargs)
from igsm.sampling.job import (forward_images_per_s, generate, model_digest, sample_images, sample_shard,
                               sampling_images_per_s, shard_range)
