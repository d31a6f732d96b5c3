"""Samplers as pure functions of (network, initial noise, schedule, per-image generators), and the
sharded, resumable generation of the paper's 50k-image FID sets (Sec. 5.1).

* DDIM (Song et al. 2021, Eq. 12) for the U-Nets: 100 steps, η = 0 in the paper (Sec. 5.1),
  "uniform" or "quad" timestep spacing as in the DDIM reference code (Diff-Pruning's numbers use
  "quad"). η = 1 with all 1000 steps is ancestral DDPM sampling (tests check it).
* Euler–Maruyama on the VP-SDE for U-ViT (Song et al. 2021b), exactly as U-ViT's ``sde.py``:
  β ∈ [0.1, 20], the time grid [0] + linspace(1e-3, 1, N) walked from 1 down, network time input
  t·999 at the upper end of each interval, the last interval (1e-3 → 0) without noise; N = 1000.

Reproducibility. Image k draws all its randomness from its own generator seeded with ``seed + k``
(edm's StackedRandomGenerator), on the CPU, so its noise is the same on any device. Its *network*
arithmetic must not depend on its neighbours either, and that is not free: CPU and GPU kernels of
convolutions and matrix products pick their blocking from the batch shape (on CPU, a batch of 1
and a batch of 64 give results 1e-6 apart in fp32). A ``Denoiser`` therefore calls the network on
fixed-shape chunks of ``micro_batch`` images, padding the last chunk; at a fixed shape the kernels
are the same and an image's result does not depend on its position or companions (tests check
this bitwise on CPU; ``benchmarks/sampling.py`` checks it on the GPU). So, for a fixed
``micro_batch``, precision and software/hardware, image k is bitwise identical at any batch size,
shard split or GPU count. The fast path (bf16 autocast, channels_last, torch.compile/CUDA graphs)
keeps the fixed shapes too, but its images are not the fp32 images: they differ by rounding, and
``precision`` is recorded with every sample file and carried into the FID JSON.

The elementwise sampler updates run in float64 on the batch; they are correctly rounded IEEE
operations, identical whatever the vector width that computes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from igsm.data import REMAKE, numpy_error_text, read_npz, save_arrays, to_uint8
from igsm.data.common import reporting_write_errors
from igsm.diffusion import VPSDE, NoiseSchedule, vp_log_alpha
from igsm.models import predict_noise

SAMPLERS = ("ddim", "euler-maruyama")
PRECISIONS = ("fp32", "tf32", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# ---------------------------------------------------------------------------------------------
# Per-image randomness
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# The network as samplers call it
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def numerics(precision: str, device: torch.device):
    """Global math flags of a precision, restored afterwards. fp32 is strict: cuDNN and cuBLAS TF32
    off (cuDNN's default TF32 convolutions are *not* fp32, reference NOTES §3) and deterministic
    cuDNN algorithms chosen by heuristics, so every process picks the same ones. tf32 and bf16 allow
    TF32 (bf16 autocast leaves some ops in fp32) and let cuDNN time its algorithms once per shape
    (``cudnn.benchmark``): faster, but two processes may pick different ones, so their bits may
    differ."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    strict = precision == "fp32"
    torch.backends.cuda.matmul.allow_tf32 = not strict
    torch.backends.cudnn.allow_tf32 = not strict
    torch.backends.cudnn.deterministic = strict
    torch.backends.cudnn.benchmark = not strict
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved


class ChannelStatsGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with the statistics taken per channel first, then combined per group: the
    group mean is the mean of its channel means, the group variance the mean of the channel variances
    plus the variance of the channel means (exact; no E[x²] − E[x]² cancellation). Same parameters,
    state_dict and result as ``nn.GroupNorm`` up to rounding.

    Why: in channels_last memory a group is a few adjacent channels of every pixel (4 of 128 here),
    so the per-(image, group) reduction that torch.compile makes of ``group_norm`` reads 8 bytes of
    every 256; a per-channel reduction over the pixels reads whole pixel rows. Under autocast the
    output is float32, as autocast makes ``group_norm``'s.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, g = x.shape[0], x.shape[1], self.num_groups
        acc = torch.promote_types(x.dtype, torch.float32)  # at least float32, float64 stays float64
        var_c, mean_c = torch.var_mean(x.to(acc), dim=tuple(range(2, x.ndim)), correction=0)
        mean_c, var_c = mean_c.view(n, g, c // g), var_c.view(n, g, c // g)
        mean = mean_c.mean(-1, keepdim=True)
        var = var_c.mean(-1, keepdim=True) + (mean_c - mean).square().mean(-1, keepdim=True)
        scale = torch.rsqrt(var + self.eps).expand(n, g, c // g)
        shift = -mean * scale
        if self.affine:
            weight = self.weight.to(acc).view(g, c // g)
            scale, shift = scale * weight, shift * weight + self.bias.to(acc).view(g, c // g)
        shape = (n, c) + (1,) * (x.ndim - 2)
        out = x.to(acc) * scale.reshape(shape) + shift.reshape(shape)
        return out if torch.is_autocast_enabled(x.device.type) else out.to(x.dtype)


def use_channel_stats_group_norm(net: nn.Module) -> nn.Module:
    """Turn every ``nn.GroupNorm`` of ``net`` into a ``ChannelStatsGroupNorm``, in place."""
    for module in net.modules():
        if type(module) is nn.GroupNorm:
            module.__class__ = ChannelStatsGroupNorm
    return net


class Denoiser:
    """ε̂(x, t) of a network, float32, computed on fixed-shape chunks of ``micro_batch`` images.

    ``micro_batch`` None: one call on the whole batch (its shape then follows the batch, and so do
    the last bits of every image). ``precision``: ``fp32`` (strict), ``tf32`` or ``bf16`` (autocast).
    ``channels_last`` converts the network (in place) and its inputs, and its GroupNorms into
    ``ChannelStatsGroupNorm`` (13% less GPU time per compiled bf16 call on an H100: BENCHMARKS.md).
    ``compile_mode``: None (eager) or a torch.compile mode; ``"reduce-overhead"`` replays CUDA
    graphs, whose outputs are copied out before the next call. ``net`` may be a diffusers model or
    any module ``net(x, t)`` → ε̂.
    """

    def __init__(self, net, *, micro_batch: int | None = None, precision: str = "fp32",
                 channels_last: bool = False, compile_mode: str | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: choose one of {PRECISIONS}")
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode {compile_mode!r}: choose one of {COMPILE_MODES} or None")
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"micro_batch {micro_batch}: must be ≥ 1 (or None)")
        self.net, self.micro_batch, self.precision = net, micro_batch, precision
        self.channels_last, self.compile_mode = channels_last, compile_mode
        if channels_last:
            use_channel_stats_group_norm(net.to(memory_format=torch.channels_last))
        self._forward = (torch.compile(net, mode=compile_mode, dynamic=False) if compile_mode else net)

    @property
    def metadata(self) -> dict:
        """What determines the bits of the images besides seeds and sampler settings."""
        return {"precision": self.precision, "micro_batch": self.micro_batch,
                "channels_last": self.channels_last, "compile_mode": self.compile_mode,
                "group_norm": "channel-stats" if self.channels_last else "native"}

    def _call(self, x, t):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        autocast = (torch.autocast(x.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                    else contextlib.nullcontext())
        with autocast:
            eps = predict_noise(self._forward, x, t)
        # A copy, always: CUDA-graph outputs are overwritten by the next replay.
        return eps.to(torch.float32, memory_format=torch.contiguous_format, copy=True)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with numerics(self.precision, x.device):
            m = self.micro_batch
            if m is None or len(x) == m:
                return self._call(x, t)
            out = []
            for start in range(0, len(x), m):
                xs, ts = x[start:start + m], t[start:start + m]
                n = len(xs)
                if n < m:  # pad with copies of the chunk's first image; their outputs are dropped
                    xs = torch.cat([xs, xs[:1].expand(m - n, *xs.shape[1:])])
                    ts = torch.cat([ts, ts[:1].expand(m - n)])
                out.append(self._call(xs, ts)[:n])
            return torch.cat(out)


def as_denoiser(net) -> Denoiser:
    return net if isinstance(net, Denoiser) else Denoiser(net)


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------

def ddim_timesteps(num_train_steps: int, num_steps: int, spacing: str = "uniform") -> list[int]:
    """Increasing timesteps visited by DDIM, as in the DDIM reference implementation."""
    if spacing == "uniform":
        skip = num_train_steps // num_steps
        return list(range(0, num_train_steps, skip))[:num_steps]
    if spacing == "quad":
        return [int(s) for s in np.linspace(0, math.sqrt(num_train_steps * 0.8), num_steps) ** 2]
    raise ValueError(f"unknown DDIM spacing {spacing!r}; choose 'uniform' or 'quad'")


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, a_next: torch.Tensor, eta: float = 0.0,
              clip_x0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update (Eq. 12) in float64 from x_t and ε̂: (the mean of x_{t−1}, σ_t); the caller
    adds σ_t·z where it draws noise. Differentiable (igsm.reuse trains through it)."""
    eps = eps.double()
    x0 = (x.double() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = (x.double() - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    # Eq. 12 of DDIM: σ_t = η·sqrt((1−ᾱ_{t−1})/(1−ᾱ_t))·sqrt(1−ᾱ_t/ᾱ_{t−1}).
    sigma = eta * ((1 - a_t / a_next) * (1 - a_next) / (1 - a_t)).sqrt()
    return a_next.sqrt() * x0 + (1 - a_next - sigma**2).sqrt() * eps, sigma


def euler_maruyama_grid(num_steps: int, t_min: float = 1e-3) -> torch.Tensor:
    """U-ViT's time grid [0] + linspace(t_min, 1, N), walked from 1 down (float64)."""
    return torch.cat([torch.zeros(1, dtype=torch.float64),
                      torch.linspace(t_min, 1.0, num_steps, dtype=torch.float64)]).flip(0)


def euler_maruyama_step(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, h: torch.Tensor,
                        beta_min: float = 0.1, beta_max: float = 20.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler–Maruyama step of the reverse VP-SDE from t to t − h, x float64: (the drift step,
    the noise scale √(β(t)h)); the caller adds the noise except on the last step."""
    beta = beta_min + t * (beta_max - beta_min)
    sigma = (1 - torch.exp(2 * vp_log_alpha(t, beta_min, beta_max))).sqrt()
    score = -eps.double() / sigma
    return x + h * (0.5 * beta * x + beta * score), (beta * h).sqrt()


@torch.no_grad()
def ddim_sample(net, noise: torch.Tensor, schedule: NoiseSchedule, num_steps: int = 100,
                eta: float = 0.0, spacing: str = "uniform", generators: ImageGenerators | None = None,
                clip_x0: bool = False) -> torch.Tensor:
    """x_T = ``noise`` → x_0 in [−1, 1] (unclamped unless ``clip_x0``). ``net``: a module or ``Denoiser``."""
    if eta > 0 and generators is None:
        raise ValueError("DDIM with eta > 0 draws noise at every step: pass generators")
    denoise = as_denoiser(net)
    abar = schedule.alphas_cumprod.to(noise.device)
    seq = ddim_timesteps(schedule.num_steps, num_steps, spacing)
    x = noise
    for i, j in zip(reversed(seq), reversed([-1] + seq[:-1])):
        a_t, a_next = abar[i], (abar[j] if j >= 0 else abar.new_tensor(1.0))
        t = torch.full((len(x),), i, device=x.device, dtype=torch.long)
        x_next, sigma = ddim_step(x, denoise(x, t), a_t, a_next, eta, clip_x0)
        if eta > 0 and j >= 0:
            x_next = x_next + sigma * generators.randn(x.shape[1:], device=x.device, dtype=torch.float64)
        x = x_next.to(noise.dtype)
    return x


@torch.no_grad()
def euler_maruyama_sample(net, noise: torch.Tensor, num_steps: int = 1000,
                          beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3,
                          generators: ImageGenerators | None = None) -> torch.Tensor:
    """Reverse VP-SDE dx = [−½β(t)x − β(t)∇log p_t(x)]dt + √β(t) dw̄ from t = 1 to 0 on U-ViT's grid
    [0] + linspace(t_min, 1, num_steps), the last step (t_min → 0) returning the mean."""
    if num_steps > 1 and generators is None:
        raise ValueError("Euler–Maruyama draws noise at every step: pass generators")
    denoise = as_denoiser(net)
    ts = euler_maruyama_grid(num_steps, t_min)
    x = noise.double()
    for step in range(num_steps):
        t, h = ts[step], ts[step] - ts[step + 1]
        t_in = torch.full((len(x),), float(t * 999), device=x.device)
        x, scale = euler_maruyama_step(x, denoise(x.to(noise.dtype), t_in), t, h, beta_min, beta_max)
        if step < num_steps - 1:  # the last step returns the mean, as U-ViT does
            x = x + scale * generators.randn(x.shape[1:], device=x.device, dtype=torch.float64)
    return x.to(noise.dtype)


def generate(net, *, sampler: str, seeds, image_shape, schedule: NoiseSchedule | VPSDE | None = None,
             device="cpu", micro_batch: int | None = None, noise_threads: int = 1,
             **sampler_kwargs) -> torch.Tensor:
    """One batch: image k of the batch from seed ``seeds[k]``. ``net``: a module (wrapped in a
    ``Denoiser`` with ``micro_batch``) or a ``Denoiser``. ``schedule``: the process the network
    was trained on (default: DDPM's for DDIM, U-ViT's VP-SDE for Euler–Maruyama). DDIM walks its
    integer steps (a VP-SDE at t = k/999); Euler–Maruyama integrates the VP-SDE and refuses DDPM."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if sampler == "euler-maruyama" and schedule is not None and not isinstance(schedule, VPSDE):
        raise ValueError("sampler euler-maruyama integrates the VP-SDE, but the model's process is "
                         f"{schedule.kind!r}; use diffusion.process vpsde or sampler ddim")
    if not isinstance(net, Denoiser):
        net = Denoiser(net, micro_batch=micro_batch)
    generators = ImageGenerators(seeds, noise_threads)
    noise = generators.randn(image_shape, device=device)
    if sampler == "ddim":
        schedule = schedule.integer_steps() if schedule is not None else NoiseSchedule.linear()
        return ddim_sample(net, noise, schedule, generators=generators, **sampler_kwargs)
    if schedule is not None:
        sampler_kwargs = {"beta_min": schedule.beta_min, "beta_max": schedule.beta_max, **sampler_kwargs}
    return euler_maruyama_sample(net, noise, generators=generators, **sampler_kwargs)


def sampler_kwargs(settings: dict) -> dict:
    """The sampler's keyword arguments from the config's 'sample' section, as the schema fills it.

    No defaults here: the schema holds them (``num_steps`` per sampler: 100 for DDIM, 1000 for
    Euler–Maruyama), so a second copy cannot disagree with it; a key it would have filled is an
    error naming it."""
    sampler = settings.get("sampler")
    if sampler not in SAMPLERS:
        raise ValueError(f"sample.sampler: unknown {sampler!r}; choose one of {SAMPLERS}")
    needed = ("num_steps", "eta", "spacing", "clip_x0") if sampler == "ddim" else ("num_steps",)
    missing = [key for key in needed if key not in settings]
    if missing:
        raise ValueError(f"sample.{missing[0]}: missing from the sample settings (the workflow's schema "
                         f"fills {', '.join(missing)} for the {sampler} sampler; give them with --settings)")
    return {key: settings[key] for key in needed}


# ---------------------------------------------------------------------------------------------
# Shards, resumable batches, several GPUs
# ---------------------------------------------------------------------------------------------

def denoiser_from_settings(net: nn.Module, options: dict, micro_batch: int | None = None) -> "Denoiser":
    """The network as the 'sample' settings run it: precision, channels_last, compile (+ compile_mode)."""
    return Denoiser(net, micro_batch=micro_batch, precision=options.get("precision", "fp32"),
                    channels_last=options.get("channels_last", False),
                    compile_mode=options.get("compile_mode", "default") if options.get("compile", False) else None)


def sample_shard(model_dir, out, *, seeds: np.ndarray, shard: tuple[int, int], options: dict,
                 sampler_kwargs: dict, schedule, device: torch.device, noise_threads: int = 1,
                 grid=None, plan=None) -> str | None:
    """The sample stage's job: images for ``seeds`` (one shard of a model's) into ``out``.

    Resumable: finished batches wait in ``out.partial/`` until ``out`` is written, and a rerun with
    the same model and settings (the fingerprint below) makes only the missing ones. Under
    torchrun the processes share the batches and rank 0 writes. Returns rank 0's one-line summary.
    ``plan``: a block-reuse gate table file (igsm.reuse) the network follows.
    """
    from igsm import distributed, gpus
    from igsm.models import image_shape, load_model
    from igsm.reuse import apply_plan, load_plan_for

    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    batch_size = options.get("batch_size", 256)
    net = load_model(model_dir, device)
    shape = image_shape(net)
    reuse = load_plan_for(plan, net, options, schedule) if plan else None
    denoiser = denoiser_from_settings(net, options, micro_batch=options.get("micro_batch", 0) or batch_size)
    # Everything that makes the bits of the images: a resumed job reuses batches only if equal.
    fingerprint = {"model_digest": model_digest(model_dir), "sampler": options["sampler"],
                   "sampler_kwargs": sampler_kwargs, "image_shape": list(shape), "batch_size": batch_size,
                   **denoiser.metadata, "schedule": options.get("diffusion", {}),
                   "first_seed": int(seeds[0]), "num_images": len(seeds),
                   "torch": torch.__version__, "device": gpus.device_name(device),
                   **({"reuse_plan": reuse.digest()} if reuse else {})}
    folder = str(out) + ".partial"
    partial = PartialBatches(folder, fingerprint) if rank == 0 else None
    distributed.barrier()  # rank 0 has emptied a stale folder before anyone writes
    if partial is None:
        partial = PartialBatches(folder, fingerprint, reset=False)
    with apply_plan(net, reuse) if reuse else contextlib.nullcontext():
        sample_images(denoiser, seeds=seeds, image_shape=shape, batch_size=batch_size, sampler=options["sampler"],
                      schedule=schedule, device=device, partial=partial, rank=rank, world_size=world_size,
                      noise_threads=noise_threads, progress=True, **sampler_kwargs)
    distributed.barrier()
    if rank != 0:
        return None
    images = partial.load(-(-len(seeds) // batch_size))  # an unreadable batch is deleted: a rerun redoes it
    save_samples(out, images, seeds, {**fingerprint, "model": str(model_dir), "shard": list(shard),
                                      "world_size": world_size})
    partial.remove()
    if grid:
        from igsm.plots import save_grid

        save_grid(images[:64], grid)
    return f"{out}: {len(images)} images, seeds {seeds[0]}..{seeds[-1]}, {denoiser.precision}"


def shard_range(num_images: int, num_shards: int, index: int) -> tuple[int, int]:
    """[start, stop) image offsets of shard ``index``: shard i covers i·n/shards … (i+1)·n/shards."""
    if not 0 <= index < num_shards:
        raise ValueError(f"shard {index} of {num_shards}: index must be in 0..{num_shards - 1}")
    if num_shards > num_images:
        raise ValueError(f"{num_shards} shards for {num_images} images: at most one shard per image")
    return index * num_images // num_shards, (index + 1) * num_images // num_shards


def model_digest(model_dir) -> str:
    """sha256 of a checkpoint folder's files: identifies the weights that made a batch."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
    return digest.hexdigest()


class PartialBatches:
    """Finished batches of an interrupted job, one ``.npy`` each, in ``folder``.

    ``fingerprint`` (JSON-able: model digest, sampler settings, precision, seeds, batch size …)
    says what made them; a folder with another fingerprint is emptied, so a rerun with changed
    settings never mixes old and new images. Every file is written under a temporary name and
    renamed, so a batch file that exists is complete; one that still cannot be read (cut short by a
    full disk or a copy) counts as missing and is redone (``done``), or, found only when the batches
    are gathered (``load``), is removed with a ``ValueError`` so that the rerun redoes it.
    """

    FINGERPRINT = "fingerprint.json"

    def __init__(self, folder, fingerprint: dict, *, reset: bool = True):
        self.folder = Path(folder)
        text = json.dumps(fingerprint, sort_keys=True)
        marker = self.folder / self.FINGERPRINT
        if reset and self.folder.exists() and (not marker.is_file() or marker.read_bytes() != text.encode()):
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if reset and not marker.exists():
            _atomic_write(marker, lambda f: f.write(text.encode()))

    def path(self, batch: int) -> Path:
        return self.folder / f"batch-{batch:06d}.npy"

    def done(self, batch: int) -> bool:
        """Whether ``batch`` is stored and readable; an unreadable one (cut short, changed) counts
        as missing, with a message, and is redone (its file replaced)."""
        path = self.path(batch)
        if not path.exists():
            return False
        problem = _npy_problem(path)
        if problem is not None:
            print(f"{path} is unreadable ({problem}); batch {batch} is redone", flush=True)
            return False
        return True

    def save(self, batch: int, images: np.ndarray) -> None:
        _atomic_write(self.path(batch), lambda f: np.save(f, images))

    def load(self, num_batches: int) -> np.ndarray:
        missing = [b for b in range(num_batches) if not self.path(b).exists()]
        if missing:
            raise RuntimeError(f"{self.folder}: batches {missing[:10]} missing")
        batches = []
        for b in range(num_batches):
            path = self.path(b)
            try:
                images = np.load(path, allow_pickle=False)
            except Exception as err:  # ValueError, EOFError, OSError, …
                images, problem = None, numpy_error_text(err)
            else:
                problem = _images_problem(images)
            if problem is not None:
                # Removed, so that the rerun redoes this batch instead of failing here again.
                path.unlink(missing_ok=True)
                raise ValueError(f"{path} is unreadable ({problem}); removed it: rerun the job, "
                                 f"which redoes that batch and keeps the others")
            batches.append(images)
        return np.concatenate(batches)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _images_problem(images) -> str | None:
    """What is wrong with an array meant to hold uint8 N×H×W×C images (None: nothing)."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        return (f"expected uint8 N×H×W×C images, found {getattr(images, 'dtype', type(images).__name__)} "
                f"of shape {getattr(images, 'shape', '?')}")
    return None


def _npy_problem(path: Path) -> str | None:
    """Why an .npy file of images cannot be read (None: it can), from its header and size only."""
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:  # a short file: "mmap length is greater than file size", EOFError, …
        return numpy_error_text(err)
    return _images_problem(images)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with reporting_write_errors(path), open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def sample_images(net, *, seeds, image_shape, batch_size: int, sampler: str = "ddim",
                  schedule: NoiseSchedule | VPSDE | None = None, device="cpu", partial: PartialBatches | None = None,
                  rank: int = 0, world_size: int = 1, noise_threads: int = 1, progress: bool = False,
                  **kwargs) -> np.ndarray | None:
    """uint8 N×H×W×C images of ``seeds``, generated ``batch_size`` at a time.

    With ``partial``, every finished batch is stored there and batches already stored are not
    redone (resume at batch granularity). With ``world_size`` > 1 this process does batches
    ``rank::world_size`` (needs ``partial``, a folder all ranks see) and returns None; the caller
    waits for all ranks, then reads ``partial.load``.
    """
    seeds = np.asarray(seeds)
    if world_size > 1 and partial is None:
        raise ValueError("several processes share their batches through a PartialBatches folder")
    num_batches = math.ceil(len(seeds) / batch_size)
    mine = range(rank, num_batches, world_size)
    chunks = []
    iterator = mine
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(mine, desc=f"sample (rank {rank})" if world_size > 1 else "sample", unit="batch")
    for b in iterator:
        if partial is not None and partial.done(b):
            continue
        x = generate(net, sampler=sampler, seeds=seeds[b * batch_size:(b + 1) * batch_size],
                     image_shape=image_shape, schedule=schedule, device=device,
                     noise_threads=noise_threads, **kwargs)
        images = to_uint8(x)
        if partial is not None:
            partial.save(b, images)
        else:
            chunks.append(images)
    if world_size > 1:
        return None
    return partial.load(num_batches) if partial is not None else np.concatenate(chunks)


# ---------------------------------------------------------------------------------------------
# Sample files
# ---------------------------------------------------------------------------------------------

# Metadata that must agree between the shards of one sample set (everything that makes the bits).
SHARD_INVARIANTS = ("model_digest", "sampler", "sampler_kwargs", "image_shape", "batch_size",
                    "precision", "micro_batch", "channels_last", "compile_mode", "group_norm", "schedule")


def save_samples(path, images: np.ndarray, seeds: np.ndarray, metadata: dict) -> None:
    """images (uint8 N×H×W×C), seeds and JSON metadata, written atomically."""
    save_arrays(path, images=images, seeds=np.asarray(seeds, dtype=np.int64),
                metadata=np.array(json.dumps(metadata, sort_keys=True)))


def load_samples(path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(images, seeds, metadata) of a samples file; metadata {} for files without it.

    A missing, unreadable (truncated, not an .npz) or malformed file raises ``ValueError`` naming it.
    """
    arrays, keys = read_npz(path, ("images", "seeds", "metadata"), "samples")
    if "images" not in arrays:
        raise ValueError(f"{path}: no 'images' array; keys are {keys}; {REMAKE}")
    images = arrays["images"]
    problem = _images_problem(images)
    if problem is not None:
        raise ValueError(f"{path}: {problem}; {REMAKE}")
    seeds = arrays["seeds"] if "seeds" in arrays else np.arange(len(images))
    if seeds.ndim != 1 or len(seeds) != len(images) or not np.issubdtype(seeds.dtype, np.integer):
        raise ValueError(f"{path}: {len(images)} images but seeds of shape {seeds.shape} ({seeds.dtype}); "
                         f"expected one integer seed per image; {REMAKE}")
    try:
        metadata = json.loads(str(arrays["metadata"])) if "metadata" in arrays else {}
        if not isinstance(metadata, dict):
            raise ValueError(f"a JSON {type(metadata).__name__}, not an object")
    except ValueError as err:
        raise ValueError(f"{path}: malformed metadata ({err}); {REMAKE}") from None
    return images, seeds, metadata


def gather_shards(paths, first_seed: int, num_images: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Concatenate shard files in seed order; check that they hold exactly seeds
    first_seed … first_seed+num_images−1 once each, made with the same settings. An unreadable
    shard raises ``ValueError`` naming it (:func:`load_samples`)."""
    shards = [load_samples(p) for p in paths]
    if not shards:
        raise ValueError("no shards to gather")
    order = sorted(range(len(shards)), key=lambda i: int(shards[i][1][0]) if len(shards[i][1]) else 0)
    for i in order[1:]:
        if shards[i][0].shape[1:] != shards[order[0]][0].shape[1:]:
            raise ValueError(f"{paths[i]}: images of shape {shards[i][0].shape[1:]}, but {paths[order[0]]} "
                             f"has {shards[order[0]][0].shape[1:]}; shards of one set must be made alike")
    images = np.concatenate([shards[i][0] for i in order])
    seeds = np.concatenate([shards[i][1] for i in order])
    expected = np.arange(first_seed, first_seed + num_images)
    if len(seeds) != num_images or not np.array_equal(seeds, expected):
        raise ValueError(f"shards hold {len(seeds)} images with seeds {_describe(seeds)}; expected "
                         f"{num_images} images with seeds {first_seed}..{first_seed + num_images - 1}")
    first_meta = shards[order[0]][2]
    for i in order[1:]:
        meta = shards[i][2]
        for key in SHARD_INVARIANTS:
            if meta.get(key) != first_meta.get(key):
                raise ValueError(f"{paths[i]}: {key} = {meta.get(key)!r}, but {paths[order[0]]} has "
                                 f"{first_meta.get(key)!r}; shards of one set must be made alike")
    metadata = {k: v for k, v in first_meta.items() if k not in ("first_seed", "num_images", "shard", "device")}
    metadata.update(first_seed=int(first_seed), num_images=int(num_images), num_shards=len(shards),
                    devices=sorted({str(shards[i][2].get("device")) for i in order}))
    return images, seeds, metadata


def _describe(seeds: np.ndarray) -> str:
    if len(seeds) == 0:
        return "(none)"
    gaps = np.flatnonzero(np.diff(seeds) != 1)
    text = f"{seeds[0]}..{seeds[-1]}"
    return text + (f" (not contiguous after seed {seeds[gaps[0]]})" if len(gaps) else "")


# ---------------------------------------------------------------------------------------------
# Throughput (efficiency stage, benchmarks)
# ---------------------------------------------------------------------------------------------

def sampling_images_per_s(denoiser: Denoiser, image_shape, batch_size: int, device, *, sampler: str,
                          schedule, sampler_kwargs: dict, plan=None) -> float:
    """Whole sampling chains per second × images per chain: one batch of ``batch_size`` images
    through ``sampler`` (with a block-reuse ``plan`` if given), timed after a warm-up batch."""
    import time

    from igsm.reuse import apply_plan

    def chain():
        generate(denoiser, sampler=sampler, seeds=range(batch_size), image_shape=image_shape,
                 schedule=schedule, device=device, **sampler_kwargs)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    with apply_plan(denoiser, plan) if plan else contextlib.nullcontext():
        chain()  # warm-up: kernel selection, allocator
        begin = time.perf_counter()
        chain()
        return batch_size / (time.perf_counter() - begin)


@torch.no_grad()
def forward_images_per_s(denoiser: Denoiser, image_shape, batch_size: int, device, *,
                         warmup: int = 3, iters: int = 10) -> float:
    """Network calls per second × images per call, after ``warmup`` calls; CUDA events on GPUs."""
    device = torch.device(device)
    x = torch.randn(batch_size, *image_shape, device=device)
    t = torch.full((batch_size,), 500, device=device, dtype=torch.long)
    for _ in range(warmup):
        denoiser(x, t)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(iters):
            denoiser(x, t)
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1e3
    else:
        import time

        begin = time.perf_counter()
        for _ in range(iters):
            denoiser(x, t)
        seconds = time.perf_counter() - begin
    return batch_size * iters / seconds
