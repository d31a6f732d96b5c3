"""Time and memory of one finetuning step per objective (paper App. C Table 8; NOTES §1 costs).

A step is what the training loop does: objective forward, total.mean().backward(), gradient
clipping and an Adam step, on the CIFAR-10 DDPM U-Net teacher (35.7M) and its student pruned with
``igsm.pruning.prune`` (magnitude, channel ratio 0.3: 19.85M), or a narrower U-Net of about the
same size when pruning is unavailable (the output says which). Times are CUDA-event medians over
``--steps`` steps after ``--warmup``; memory is torch.cuda.max_memory_allocated over the timed
steps (weights, Adam state and gradients included).

Methods: NP; NP+KD; the authors' formulation (NOTES §1, defects kept: teacher forward with a graph
and parameter gradients, teacher VJP with create_graph then detached); exact IGSM through
igsm.objectives in both projections; IGSM whose Jacobian-term gradient comes from mixed partials
(``jacobian_method`` "mixed_fd", central and forward finite differences, and "mixed_jvp": no double
backward); and the approximation igsm.objectives offers (Jacobian terms on a fraction of the
batch). Gradient errors relative to the exact objective on the same batch and directions are
reported for the approximate methods, for the total and for the Jacobian term alone, beside the
gradient noise of the exact objective itself (another direction draw; another batch) for scale.
With --precision bf16 the bf16 gradient's error against fp32 is reported too.

    python benchmarks/objective_step.py --batch 128 --precision fp32 --out results.json
    python benchmarks/objective_step.py --device cpu --batch 2 --tiny --steps 2 --warmup 1
    python benchmarks/objective_step.py --family uvit --batch 128 --precision bf16 --out uvit.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a bare checkout

from igsm.diffusion import NoiseSchedule, antithetic_timesteps  # noqa: E402
from igsm.models import count_parameters, image_shape, predict_noise  # noqa: E402
from igsm.objectives import (build_objective, jacobian_rows, math_attention,  # noqa: E402
                             orthonormalize, sq_norm)

CIFAR10_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
    layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_eps=1e-6,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None, dropout=0.1)
# Fallback student: width 96/128 of the teacher's, (96/128)² × 35.7M ≈ 20.1M parameters.
NARROW_WIDTHS = (96, 192, 192, 192)
TINY_UNET = dict(CIFAR10_UNET, sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
TINY_NARROW_WIDTHS = (24, 48)
TINY_UVIT = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=4, num_heads=4, mlp_ratio=4.0)
# U-ViT has LayerNorms: forward-mode AD through them gives wrong second derivatives in torch
# (igsm.objectives refuses mixed_jvp there), so the jvp-based methods are left out for it.
JVP_METHODS = ("IGSM exact, jvp", "IGSM mixed partials (jvp)")
FRACTIONS = (0.5, 0.25)
MIXED = {"IGSM mixed partials (fd)": dict(jacobian_method="mixed_fd"),
         "IGSM mixed partials (fd, forward)": dict(jacobian_method="mixed_fd", fd_scheme="forward"),
         "IGSM mixed partials (jvp)": dict(jacobian_method="mixed_jvp")}


def authors_loss(student, teacher, x_t, t, noise, direction, weights=None):
    """The authors' step (NOTES §1), defects included; ``direction`` is one unit v̂ per sample.

    Student: Jᵀv̂ = autograd.grad(Σ s(x)·v̂, x, create_graph=True). Teacher: the same with
    create_graph, then detached; its forward keeps a graph and, through KD, its parameters get
    .grad. Loss λ_NP·NP + λ_KD·KD + λ_Jac·(‖J_Dᵀv̂‖² − ‖Jᵀv̂‖²)², NP/KD summed over pixels, every
    term averaged over the batch. Returns (scalar loss, batch means of the three terms).
    """
    weights = {"np": 1.0, "kd": 1.0, "jm2": 0.1, **(weights or {})}
    x = x_t.detach().requires_grad_(True)
    with math_attention():  # their patched diffusers computes attention with plain matmuls
        s = predict_noise(student, x, t)
        s_dense = predict_noise(teacher, x, t)
    (jv,) = torch.autograd.grad((s * direction).sum(), x, create_graph=True)
    (jv_dense,) = torch.autograd.grad((s_dense * direction).sum(), x, create_graph=True)
    jv_dense = jv_dense.detach()
    terms = {"np": sq_norm(s - noise).mean(), "kd": sq_norm(s - s_dense).mean(),
             "jm2": (sq_norm(jv_dense) - sq_norm(jv)).square().mean()}
    return sum(weights[name] * value for name, value in terms.items()), terms


def build_uvit_networks(tiny: bool, device, ratio: float = 0.5):
    """U-ViT teacher (the paper's CIFAR-10 config, 44.26M, or a tiny one) and its student pruned
    by igsm.pruning at ``ratio`` (Table 5: 0.5 → 22.7M)."""
    from igsm.pruning import prune
    from igsm.uvit import CIFAR10_UVIT, UViT

    torch.manual_seed(0)
    config = TINY_UVIT if tiny else CIFAR10_UVIT
    teacher = UViT(**config).to(device)
    images = torch.rand(2, 3, config["img_size"], config["img_size"], device=device) * 2 - 1
    student, _ = prune(teacher, criterion="magnitude", channel_ratio=ratio, images=images,
                       schedule=NoiseSchedule.linear())
    teacher.eval().requires_grad_(False)
    student.train().requires_grad_(True)
    return teacher, student, f"igsm.pruning.prune(criterion='magnitude', channel_ratio={ratio})"


def build_networks(tiny: bool, device, batch: int, teacher_path: str | None = None):
    """Teacher (CIFAR-10 U-Net or a tiny one) and a student of ~55% of its parameters.

    ``teacher_path``: trained weights instead of a random initialisation (a checkpoint folder of
    igsm.models.save_model, a diffusers folder or a hub id), for representative error numbers.
    """
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    config = TINY_UNET if tiny else CIFAR10_UNET
    if teacher_path is None:
        teacher = UNet2DModel(**config).to(device)
    else:
        from igsm.models import ARCHITECTURE_FILE, load_model, load_pretrained

        is_checkpoint = (Path(teacher_path) / ARCHITECTURE_FILE).exists()
        teacher = (load_model(teacher_path) if is_checkpoint else load_pretrained(teacher_path)).to(device)
        config = dict(teacher.config)
    try:
        from igsm.pruning import prune

        images = torch.rand(min(batch, 16), 3, config["sample_size"], config["sample_size"],
                            device=device) * 2 - 1
        student, _ = prune(teacher, criterion="magnitude", channel_ratio=0.3, images=images,
                           schedule=NoiseSchedule.linear())
        source = "igsm.pruning.prune(criterion='magnitude', channel_ratio=0.3)"
    except Exception as err:  # pruning is optional here: fall back to a narrower U-Net
        widths = TINY_NARROW_WIDTHS if tiny else NARROW_WIDTHS
        student = UNet2DModel(**{k: v for k, v in dict(config, block_out_channels=widths).items()
                                 if not k.startswith("_")}).to(device)
        source = f"narrow UNet2DModel block_out_channels={widths} (pruning failed: {type(err).__name__}: {err})"
    teacher.eval().requires_grad_(False)
    student.train().requires_grad_(True)
    return teacher, student, source


def make_batches(count, batch, size, device, seed):
    schedule = NoiseSchedule.linear()
    generator = torch.Generator(device).manual_seed(seed)
    batches = []
    for _ in range(count):
        x0 = torch.rand(batch, 3, size, size, generator=generator, device=device) * 2 - 1
        t = antithetic_timesteps(batch, schedule.num_steps, generator, device)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        batches.append((schedule.add_noise(x0, noise, t), t, noise))
    return batches


def objective_loss(objective):
    def loss(student, teacher, x_t, t, noise, generator):
        total, _ = objective(student, teacher, x_t, t, noise, generator)
        return total.float().mean()
    return loss


def authors_step_loss(student, teacher, x_t, t, noise, generator):
    v = orthonormalize(torch.randn((1, *x_t.shape), generator=generator, device=x_t.device))[0]
    return authors_loss(student, teacher, x_t, t, noise, v)[0].float()


def methods(lambda_jac: float) -> dict:
    igsm = {"np": 1.0, "kd": 1.0, "jm2": lambda_jac}
    table = {
        "NP": objective_loss(build_objective({"np": 1.0})),
        "NP+KD": objective_loss(build_objective({"np": 1.0, "kd": 1.0})),
        "authors (NOTES §1)": authors_step_loss,
        "IGSM exact, vjp": objective_loss(build_objective(igsm, "vjp")),
        "IGSM exact, jvp": objective_loss(build_objective(igsm, "jvp")),
    }
    for name, options in MIXED.items():
        table[name] = objective_loss(build_objective(igsm, "vjp", **options))
    # Exact, with the batch split into micro-batches whose gradients accumulate: the per-sample
    # loss (GroupNorm is per sample) makes this the same gradient at a fraction of the memory.
    for chunks in (2, 4):
        loss_fn = objective_loss(build_objective(igsm, "vjp"))
        loss_fn.micro_batches = chunks
        table[f"IGSM exact, vjp, {chunks} micro-batches"] = loss_fn
    for fraction in FRACTIONS:
        table[f"IGSM vjp, Jacobian on {fraction:g} of batch"] = objective_loss(
            build_objective(igsm, "vjp", jacobian_fraction=fraction))
    return table


def time_method(loss_fn, student, teacher, batches, args, autocast):
    cuda = args.device.startswith("cuda")
    optimizer = torch.optim.Adam(student.parameters(), lr=2e-4)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    authors = loss_fn is authors_step_loss
    teacher.requires_grad_(authors)  # their teacher's parameters take part in the graph
    times = []
    try:
        for step in range(args.warmup + args.steps):
            if step == args.warmup and cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            x_t, t, noise = batches[step % len(batches)]
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            else:
                started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            chunks = getattr(loss_fn, "micro_batches", 1)
            for part in zip(x_t.chunk(chunks), t.chunk(chunks), noise.chunk(chunks)):
                with autocast():
                    loss = loss_fn(student, teacher, *part, generator) / chunks
                loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            if cuda:
                end.record()
                times.append((start, end))
            else:
                times.append(time.perf_counter() - started)
        if cuda:
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) / 1e3 for s, e in times]
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        return {"ms_per_step": 1e3 * statistics.median(times[args.warmup:]), "peak_gib": peak}
    except Exception as err:  # one method failing (out of memory, say) must not end the table
        return {"ms_per_step": None, "peak_gib": None, "error": f"{type(err).__name__}: {str(err)[:200]}"}
    finally:
        teacher.requires_grad_(False)
        teacher.zero_grad(set_to_none=True)
        del optimizer
        if cuda:
            torch.cuda.empty_cache()


def gradient(student, teacher, weights, batch, directions, autocast=contextlib.nullcontext, **kwargs):
    """Flat student gradient of total.mean() for fixed directions (k=1, shape of x_t)."""
    x_t, t, noise = batch
    rows = jacobian_rows(x_t.shape[0], kwargs.get("jacobian_fraction", 1.0))
    chosen = directions if rows is None else directions[rows.to(x_t.device)]
    objective = build_objective(weights, directions=lambda x, t_, g: chosen, **kwargs)
    student.zero_grad(set_to_none=True)
    with autocast():
        total, _ = objective(student, teacher, x_t, t, noise, None)
    total.float().mean().backward()
    flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten().float()
                      for p in student.parameters()])
    student.zero_grad(set_to_none=True)
    return flat


def relative(a, b):
    return float((a - b).norm() / b.norm())


def measure_errors(student, teacher, batches, args, autocast):
    """Gradient errors of the approximations vs exact IGSM, and the exact estimator's own noise."""
    was_training = student.training
    student.eval()  # dropout off: the comparisons must see the same network
    generator = torch.Generator(args.device).manual_seed(args.seed + 1)
    x_t = batches[0][0]
    draw = lambda: orthonormalize(torch.randn((1, *x_t.shape), generator=generator,  # noqa: E731
                                              device=x_t.device))[0]
    v, other_v = draw(), draw()
    igsm = {"np": 1.0, "kd": 1.0, "jm2": args.lambda_jac}
    jac_only = {"jm2": args.lambda_jac}
    exact = gradient(student, teacher, igsm, batches[0], v)
    exact_jac = gradient(student, teacher, jac_only, batches[0], v)
    errors = {
        "exact: another direction draw, same batch": relative(gradient(student, teacher, igsm, batches[0], other_v), exact),
        "exact: another batch": relative(gradient(student, teacher, igsm, batches[1 % len(batches)], v), exact),
    }
    approximations = {f"IGSM vjp, Jacobian on {fraction:g} of batch": dict(jacobian_fraction=fraction)
                      for fraction in FRACTIONS}
    mixed = {name: options for name, options in MIXED.items()
             if not (args.family == "uvit" and name in JVP_METHODS)}
    for name, options in {**mixed, **approximations}.items():
        errors[name] = relative(gradient(student, teacher, igsm, batches[0], v, **options), exact)
        errors[name + " (Jacobian term alone)"] = relative(
            gradient(student, teacher, jac_only, batches[0], v, **options), exact_jac)
    if args.precision == "bf16":
        for projection in ("vjp",) if args.family == "uvit" else ("vjp", "jvp"):
            reference = exact if projection == "vjp" else gradient(student, teacher, igsm, batches[0], v, projection="jvp")
            errors[f"IGSM exact, {projection}: bf16 vs fp32"] = relative(
                gradient(student, teacher, igsm, batches[0], v, autocast, projection=projection), reference)
        for name, options in mixed.items():  # against the exact fp32 gradient
            errors[f"{name}: bf16 vs exact fp32"] = relative(
                gradient(student, teacher, igsm, batches[0], v, autocast, **options), exact)
    student.train(was_training)
    return errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="batch size")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32 with TF32 off, or torch.autocast bf16")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per method")
    parser.add_argument("--lambda-jac", type=float, default=0.1, help="λ_Jac of IGSM (paper, PR 0.44)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="8×8 two-level U-Nets (CPU check)")
    parser.add_argument("--family", choices=("unet", "uvit"), default="unet",
                        help="unet: CIFAR-10 DDPM U-Net, student at channel ratio 0.3; uvit: CIFAR-10 "
                             "U-ViT (paper Table 7), student at ratio 0.5 (Table 5)")
    parser.add_argument("--teacher", default=None,
                        help="trained teacher (checkpoint folder, diffusers folder or hub id); default: random init")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results.json"), help="JSON output")
    args = parser.parse_args(argv)
    if args.batch < 2 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch must be ≥ 2, --steps ≥ 1, --warmup ≥ 0")

    device_type = torch.device(args.device).type
    if device_type == "cuda":
        # Strict fp32: TF32 would also perturb the error measurements (NOTES §3).
        torch.backends.cuda.matmul.allow_tf32 = args.precision != "fp32" and torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = args.precision != "fp32" and torch.backends.cudnn.allow_tf32
    autocast = ((lambda: torch.autocast(device_type, dtype=torch.bfloat16))
                if args.precision == "bf16" else contextlib.nullcontext)

    if args.family == "uvit":
        if args.teacher:
            parser.error("--teacher is for --family unet")
        teacher, student, source = build_uvit_networks(args.tiny, args.device)
    else:
        teacher, student, source = build_networks(args.tiny, args.device, args.batch, args.teacher)
    size = image_shape(teacher)[1]
    batches = make_batches(4, args.batch, size, args.device, args.seed)
    results = []
    for name, loss_fn in methods(args.lambda_jac).items():
        if args.family == "uvit" and name in JVP_METHODS:
            continue
        results.append({"method": name, **time_method(loss_fn, student, teacher, batches, args, autocast)})
        print(f"{name}: {results[-1]}", file=sys.stderr, flush=True)
    errors = measure_errors(student, teacher, batches, args, autocast)

    base = next(r for r in results if r["method"] == "NP+KD")
    for r in results:
        r["time_vs_np_kd"] = r["ms_per_step"] / base["ms_per_step"] if r["ms_per_step"] and base["ms_per_step"] else None
        r["memory_vs_np_kd"] = r["peak_gib"] / base["peak_gib"] if r["peak_gib"] and base["peak_gib"] else None
        r["grad_rel_error_vs_exact"] = errors.get(r["method"])
    fmt = lambda x, spec: "–" if x is None else format(x, spec)  # noqa: E731
    print(f"\nbatch {args.batch}, {args.precision}, {args.device}"
          f" ({torch.cuda.get_device_name() if device_type == 'cuda' else 'cpu'}), torch {torch.__version__};"
          f" teacher {count_parameters(teacher) / 1e6:.2f}M, student {count_parameters(student) / 1e6:.2f}M: {source}\n")
    print("| method | ms/step | peak GiB | time / NP+KD | memory / NP+KD | grad rel. error vs exact |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {fmt(r['ms_per_step'], '.1f')} | {fmt(r['peak_gib'], '.2f')} | "
              f"{fmt(r['time_vs_np_kd'], '.2f')} | {fmt(r['memory_vs_np_kd'], '.2f')} | "
              f"{fmt(r['grad_rel_error_vs_exact'], '.3g')} |")
    print("\nrelative gradient errors (‖g − g_exact‖ / ‖g_exact‖, dropout off):")
    for name, value in errors.items():
        print(f"  {name}: {value:.3g}")

    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": torch.cuda.get_device_name() if device_type == "cuda" else "cpu",
        "torch": torch.__version__,
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "teacher_params": count_parameters(teacher),
        "student_params": count_parameters(student),
        "student_source": source,
        "teacher_source": args.teacher or "random initialisation",
        "methods": results,
        "gradient_relative_errors": errors,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
