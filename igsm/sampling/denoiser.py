"""The network as the samplers call it: ε̂(x, t) in float32 on fixed-shape chunks (``Denoiser``), under
the math flags of a precision (``numerics``), with the fast path's memory format and GroupNorm.

Why fixed shapes: CPU and GPU kernels of convolutions and matrix products pick their blocking from the
batch shape (on CPU, a batch of 1 and a batch of 64 give results 1e-6 apart in fp32), so a
``Denoiser`` calls the network on chunks of ``micro_batch`` images, padding the last one; at a fixed
shape an image's result does not depend on its position or companions. The fast path (bf16 autocast,
channels_last, torch.compile/CUDA graphs) keeps the fixed shapes too, but its images are not the fp32
images: they differ by rounding, and ``precision`` is recorded with every sample file.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from igsm.conditioning import guided
from igsm.models import check_condition, condition_keyword, predict_noise
from igsm.schema import section_defaults

PRECISIONS = ("fp32", "tf32", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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

    A conditional network is called with each image's condition (``condition`` of
    :meth:`__call__`, sliced and padded with the images). ``guidance_scale`` w ≠ 1 and its
    ``conditioning`` (igsm.conditioning, which knows the null condition) give classifier-free
    guidance, ε̂_∅ + w·(ε̂_c − ε̂_∅): the unconditional prediction is a second call at the same
    fixed shape, so guidance keeps the batch invariance.
    """

    def __init__(self, net, *, micro_batch: int | None = None, precision: str = "fp32",
                 channels_last: bool = False, compile_mode: str | None = None,
                 guidance_scale: float = 1.0, conditioning=None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: choose one of {PRECISIONS}")
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode {compile_mode!r}: choose one of {COMPILE_MODES} or None")
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"micro_batch {micro_batch}: must be ≥ 1 (or None)")
        if guidance_scale != 1.0 and conditioning is None:
            raise ValueError(f"guidance_scale {guidance_scale}: guidance needs a conditioning (its null condition)")
        self.net, self.micro_batch, self.precision = net, micro_batch, precision
        self.channels_last, self.compile_mode = channels_last, compile_mode
        self.guidance_scale, self.conditioning = guidance_scale, conditioning
        self.keyword = condition_keyword(net) if isinstance(net, nn.Module) else None
        if channels_last:
            use_channel_stats_group_norm(net.to(memory_format=torch.channels_last))
        self._forward = (torch.compile(net, mode=compile_mode, dynamic=False) if compile_mode else net)

    @property
    def metadata(self) -> dict:
        """What determines the bits of the images besides seeds and sampler settings."""
        conditional = {"conditioning": self.conditioning.describe(), "guidance_scale": self.guidance_scale} \
            if self.conditioning is not None else {}
        return {"precision": self.precision, "micro_batch": self.micro_batch,
                "channels_last": self.channels_last, "compile_mode": self.compile_mode,
                "group_norm": "channel-stats" if self.channels_last else "native", **conditional}

    def _call(self, x, t, condition=None):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        autocast = (torch.autocast(x.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                    else contextlib.nullcontext())
        with autocast:
            eps = predict_noise(self._forward, x, t, **({} if condition is None else {self.keyword: condition}))
        # A copy, always: CUDA-graph outputs are overwritten by the next replay.
        return eps.to(torch.float32, memory_format=torch.contiguous_format, copy=True)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """ε̂ of the images ``x`` at network times ``t`` (and, for a conditional network, under
        their ``condition``; guided where ``guidance_scale`` ≠ 1)."""
        check_condition(self.net, self.keyword, condition)
        with numerics(self.precision, x.device):
            eps = self._chunked(x, t, condition)
            if condition is None or self.guidance_scale == 1.0:
                return eps
            return guided(eps, self._chunked(x, t, self.conditioning.null_like(condition)), self.guidance_scale)

    def _chunked(self, x, t, condition):
        m = self.micro_batch
        if m is None or len(x) == m:
            return self._call(x, t, condition)
        out = []
        for start in range(0, len(x), m):
            inputs = [x[start:start + m], t[start:start + m]]
            inputs += [] if condition is None else [condition[start:start + m]]
            n = len(inputs[0])
            if n < m:  # pad with copies of the chunk's first image; their outputs are dropped
                inputs = [torch.cat([v, v[:1].expand(m - n, *v.shape[1:])]) for v in inputs]
            out.append(self._call(*inputs)[:n])
        return torch.cat(out)


def as_denoiser(net) -> Denoiser:
    return net if isinstance(net, Denoiser) else Denoiser(net)


def guidance_from_settings(options: dict) -> tuple[object | None, float]:
    """(the conditioning kind, None if unconditional; the guidance scale) of 'sample' settings, the
    schema's default where unset: what sampling, DiP-GO's chains and the sampling MACs all read."""
    from igsm.conditioning import conditioning_from_settings

    run = {**section_defaults("sample"), **options}
    return conditioning_from_settings(run.get("conditioning")), run["guidance_scale"]


def denoiser_from_settings(net: nn.Module, options: dict, micro_batch: int | None = None) -> "Denoiser":
    """The network as the 'sample' settings run it: precision, channels_last, compile (+ compile_mode),
    the schema's defaults where unset."""
    run = {**section_defaults("sample"), **options}
    conditioning, guidance_scale = guidance_from_settings(options)
    return Denoiser(net, micro_batch=micro_batch, precision=run["precision"], channels_last=run["channels_last"],
                    compile_mode=run["compile_mode"] if run["compile"] else None,
                    guidance_scale=guidance_scale, conditioning=conditioning)

