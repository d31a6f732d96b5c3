"""Does the paper's term fit at latent-model scale? One finetuning step of NP+KD and of IGSM (λ_Jac
0.1: the Jacobian term's double backward) on full-size Stable Diffusion 1.5's U-Net (859.5M) and
DiT-XL/2 (675M, 750M as diffusers holds it), random weights, bf16 autocast, with and without
gradient checkpointing (issue 31, item 9).

A step is what the training loop does (igsm.training): the objective through igsm.objectives with
a condition for student and teacher (SD: a random 77-token text embedding; DiT: class labels),
backward, gradient clipping, an AdamW step. The student is the teacher's architecture (a pruned
student is smaller: this is the ceiling). Time: CUDA-event median over ``--steps`` after
``--warmup``; memory: torch.cuda.max_memory_allocated over the timed steps (weights, AdamW state and
gradients included). A configuration that runs out of memory or fails is recorded with its error.

    python benchmarks/large_model_step.py --out large_model_step.json           # on the GPU
    python benchmarks/large_model_step.py --tiny --device cpu --steps 1 --warmup 0  # a CPU check
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a bare checkout

from igsm.diffusion import NoiseSchedule  # noqa: E402
from igsm.families import family_named  # noqa: E402
from igsm.models import count_parameters  # noqa: E402
from igsm.objectives import build_objective  # noqa: E402
from igsm.objectives.products import math_attention  # noqa: E402

SD15_UNET = dict(family="sd-unet", sample_size=64, in_channels=4, out_channels=4,
                 block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
DIT_XL2 = dict(family="dit", sample_size=32, in_channels=4, out_channels=8, patch_size=2, num_layers=28,
               num_attention_heads=16, attention_head_dim=72, num_embeds_ada_norm=1000)
TINY = {"sd-unet": dict(SD15_UNET, sample_size=8, block_out_channels=[16, 32], cross_attention_dim=32,
                        attention_head_dim=4, norm_num_groups=4, layers_per_block=1,
                        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]),
        "dit": dict(DIT_XL2, sample_size=8, num_layers=2, num_attention_heads=2, attention_head_dim=16)}
FULL = {"sd-unet": SD15_UNET, "dit": DIT_XL2}
OBJECTIVES = {"NP+KD": {"np": 1.0, "kd": 1.0}, "IGSM": {"np": 1.0, "kd": 1.0, "jm2": 0.1}}


def condition_for(name: str, architecture: dict, batch: int, device) -> dict:
    if name == "sd-unet":
        return torch.randn(batch, 77, architecture["cross_attention_dim"], device=device)
    return torch.randint(0, architecture["num_embeds_ada_norm"], (batch,), device=device)


def measure(name, architecture, objective_name, batch, checkpointing, steps, warmup, device) -> dict:
    torch.manual_seed(0)
    family = family_named(name)
    with torch.device(device):  # initialised there: 0.86B parameters on a CPU take minutes
        teacher = family.build(architecture).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    if checkpointing:
        student.enable_gradient_checkpointing()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    objective = build_objective(OBJECTIVES[objective_name])
    # With checkpointing, the backward recomputes each segment, and a segment recomputed with another
    # attention kernel than its forward saves other tensors (torch's CheckpointError): the Jacobian
    # products ran their forwards under the math kernel (igsm.objectives.products.math_attention), so
    # their backward must too. Without checkpointing nothing is recomputed and NP+KD keeps the fused one.
    backward_kernel = (math_attention if checkpointing and objective.needs_jacobian else contextlib.nullcontext)
    schedule = NoiseSchedule.linear()
    generator = torch.Generator(device).manual_seed(0)
    shape = (batch, architecture["in_channels"], architecture["sample_size"], architecture["sample_size"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    for i in range(warmup + steps):
        x0 = torch.randn(shape, device=device)
        t = schedule.sample_times(batch, generator, device)
        noise = torch.randn(shape, device=device)
        x_t = schedule.add_noise(x0, noise, t)
        condition = condition_for(name, architecture, batch, device)
        if i == warmup and device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        with autocast:
            total, _ = objective(student, teacher, x_t, schedule.network_time(t), noise, generator, condition=condition)
        optimizer.zero_grad(set_to_none=True)
        with backward_kernel():
            total.float().mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"family": name, "params_M": count_parameters(student) / 1e6, "objective": objective_name,
            "batch": batch, "gradient_checkpointing": checkpointing, "sec_per_step": statistics.median(times),
            "peak_memory_GiB": peak}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny networks of the same classes (CPU check)")
    parser.add_argument("--families", nargs="+", default=["sd-unet", "dit"])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32], help="per family, in order")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("large_model_step.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for name, batch in zip(args.families, args.batches):
        architecture = (TINY if args.tiny else FULL)[name]
        for checkpointing in (False, True):
            for objective_name in OBJECTIVES:
                try:
                    row = measure(name, architecture, objective_name, batch, checkpointing, args.steps,
                                  args.warmup, device)
                except Exception as err:  # out of memory, or a backward the checkpointing refuses
                    row = {"family": name, "objective": objective_name, "batch": batch,
                           "gradient_checkpointing": checkpointing,
                           "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                rows.append(row)
                args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                                                else "cpu", "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
