"""The one training loop: dense training from scratch and finetuning of pruned students (Sec. 5.1).

What differs between variants is only the objective (NP alone for a dense model; NP, KD and the
Jacobian terms against a frozen dense teacher for a pruned student: Sec. 4, Eq. 7) and the
hyperparameters (App. B, Tables 6–7).

Resume by rerunning (edm2 style): the loop writes ``step-XXXXXXX.pt`` snapshots into its
checkpoint folder every ``checkpoint_every`` steps and when SLURM signals the end of the job
(SIGTERM or SIGUSR1); the same call continues from the newest one. Data order, noise and dropout
come from generators whose states are in the snapshot, so a resumed run ends with the same weights
as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from igsm.data import to_model_range
from igsm.diffusion import NoiseSchedule, antithetic_timesteps


@dataclass
class TrainingOptions:
    num_steps: int
    batch_size: int = 128
    lr: float = 2e-4
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    optimizer: str = "adam"          # "adam" | "adamw" (U-ViT, Table 7)
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    warmup_steps: int = 0
    hflip: bool = False               # random horizontal flips (CIFAR-10, as DDPM trains)
    precision: str = "fp32"           # "fp32" | "bf16" (autocast)
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    objective: dict = field(default_factory=lambda: {"weights": {"np": 1.0}})

    @classmethod
    def from_dict(cls, settings: dict) -> "TrainingOptions":
        known = set(cls.__dataclass_fields__)
        unknown = set(settings) - known
        if unknown:
            raise ValueError(f"unknown training setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**settings)


class _StopRequested:
    """Remembers SIGTERM/SIGUSR1 so the loop can checkpoint before the scheduler kills the job."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Interrupted(RuntimeError):
    """Training stopped on a signal after writing a checkpoint; rerun to continue."""


def _epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    # Stateless in the epoch: step s always sees the same images, resumed or not.
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_indices(step: int, batch_size: int, num_items: int, seed: int) -> torch.Tensor:
    """Indices of the images of ``step``: epochs of shuffled passes, wrapping across epochs."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), num_items)
        perm = _epoch_permutation(num_items, seed, epoch)
        out.extend(perm[offset: offset + batch_size - len(out)].tolist())
    return torch.tensor(out)


def _snapshots(directory: Path) -> list[Path]:
    return sorted(directory.glob("step-*.pt"))


def _update_ema(ema: nn.Module, net: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), net.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)


def train(
    net: nn.Module,
    images: np.ndarray,
    options: TrainingOptions,
    checkpoint_dir: str | os.PathLike,
    metrics_path: str | os.PathLike,
    teacher: nn.Module | None = None,
    schedule: NoiseSchedule | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Train ``net`` on uint8 ``images`` (N×H×W×C) and return its EMA copy."""
    from igsm.objectives import build_objective

    schedule = schedule or NoiseSchedule.linear()
    device = torch.device(device)
    objective = build_objective(**options.objective)
    if objective.needs_teacher and teacher is None:
        raise ValueError("the objective uses the dense teacher (kd/jm terms) but no teacher was given")

    net = net.to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
    optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[options.optimizer]
    optimizer = optimizer_class(net.parameters(), lr=options.lr, betas=tuple(options.betas),
                                eps=options.eps, weight_decay=options.weight_decay)
    # Noise, timesteps, flips and directions: one generator, saved in every snapshot.
    generator = torch.Generator(device=device).manual_seed(options.seed)
    torch.manual_seed(options.seed)  # dropout draws from the global generator

    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = Path(metrics_path)
    start_step = 0
    snapshots = _snapshots(checkpoint_dir)
    if snapshots:
        state = torch.load(snapshots[-1], map_location=device, weights_only=False)
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"].to(generator.get_state().device))
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        start_step = state["step"]
        print(f"resuming from {snapshots[-1]} (step {start_step})", flush=True)
    # Metrics past the snapshot belong to steps that will be redone.
    _truncate_metrics(metrics_path, start_step)
    (checkpoint_dir / "training_options.json").write_text(json.dumps(asdict(options), indent=2))

    def save_snapshot(step: int) -> None:
        state = {
            "step": step, "net": net.state_dict(), "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }
        path = checkpoint_dir / f"step-{step:07d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
        for old in _snapshots(checkpoint_dir)[: -options.keep_checkpoints]:
            old.unlink()

    data = torch.from_numpy(images)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.precision == "bf16")
    progress = tqdm(range(start_step, options.num_steps), initial=start_step,
                    total=options.num_steps, desc="train", mininterval=2.0)
    running, count, started = {}, 0, time.perf_counter()
    with _StopRequested() as stop, open(metrics_path, "a") as metrics:
        for step in progress:
            x0 = to_model_range(data[batch_indices(step, options.batch_size, len(data), options.seed)]).to(device)
            if options.hflip:
                flip = torch.rand(len(x0), generator=generator, device=device) < 0.5
                x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(3), x0)
            t = antithetic_timesteps(len(x0), schedule.num_steps, generator, device)
            noise = torch.randn(x0.shape, generator=generator, device=device)
            x_t = schedule.add_noise(x0, noise, t)

            for group in optimizer.param_groups:
                group["lr"] = options.lr * min(1.0, (step + 1) / max(1, options.warmup_steps))
            with autocast:
                total, terms = objective(net, teacher, x_t, t, noise, generator)
            loss = total.float().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), options.grad_clip)
            optimizer.step()
            # Short runs would keep the EMA at its initial weights: warm the decay up (DDPM codes do).
            _update_ema(ema, net, min(options.ema_decay, (1 + step) / (10 + step)))

            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}: lower the lr or check data")
            for name, value in {"loss": loss, "grad_norm": grad_norm, **terms}.items():
                running[name] = running.get(name, 0.0) + float(value.float().mean())
            count += 1
            done = step + 1
            if done % options.log_every == 0 or done == options.num_steps:
                record = {"step": done, **{k: v / count for k, v in running.items()},
                          "lr": optimizer.param_groups[0]["lr"],
                          "sec_per_step": (time.perf_counter() - started) / count}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                progress.set_postfix(loss=f"{record['loss']:.4f}")
                running, count, started = {}, 0, time.perf_counter()
            if done % options.checkpoint_every == 0 or done == options.num_steps:
                save_snapshot(done)
            if stop.signal is not None:
                save_snapshot(done)
                raise Interrupted(f"stopped by signal {stop.signal} after step {done}; "
                                  f"rerun to resume from {checkpoint_dir}")
    return ema


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
