"""The one training loop: dense training from scratch and finetuning of pruned students (Sec. 5.1).

What differs between variants is only the objective (NP alone for a dense model; NP, KD and the
Jacobian terms against a frozen dense teacher for a pruned student: Sec. 4, Eq. 7) and the
hyperparameters (App. B, Tables 6–7).

Resume by rerunning (edm2 style): the loop writes ``step-<7-digit step>.pt`` snapshots into its
checkpoint folder every ``checkpoint_every`` steps and when SLURM signals the end of the job
(SIGTERM or SIGUSR1: it finishes the step, writes a snapshot and raises :class:`Interrupted`); the
same call continues from the newest one. Step s draws its images, flips, timesteps, noise,
directions and dropout masks from generators seeded by (seed, s), and the snapshot holds the
weights, EMA, optimizer state and the metrics so far, so a run stopped at any step, or killed,
and rerun ends with bitwise the same weights as an uninterrupted one (same hardware, software and
thread count). A snapshot carries the fingerprint of its run (:func:`run_fingerprint`); one from a
different run (other settings, data, initial weights or teacher) is deleted, never resumed.
Snapshots are written under a temporary name and renamed, so a killed job leaves none half-written;
one that still cannot be read (cut short by a full disk or a copy, or lacking what resuming needs)
is renamed ``<name>.corrupt``, with a message, and the next older snapshot of the run is resumed
(training starts over if there is none), so a rerun never trips on it again.

Several processes (torchrun, igsm.distributed): ``batch_size`` is the global batch. Every process
draws the whole global batch (indices, flips, timesteps, noise, Jacobian directions) from the same
generators and keeps its own rows; gradients are averaged by one all-reduce per step, which also
carries the logged values and the stop flag, so that every process stops after the same step. The
result therefore does not depend on the number of processes, up to the order of float reductions,
except for dropout, whose masks each process draws for its own rows. Only rank 0 writes files.

Diagnostics (issue 20; ``diagnostics``, on by default): at each log step the metrics line also holds
``by_timestep``: for the timestep ranges cut at ``diagnostic_timesteps`` (default [0, 10), [10, 100),
[100, T)), the rows of that step's batch in each range, every term's mean value there and the norm
of the gradient the term's share from those rows gives the network (:func:`term_diagnostics`), so
one can see where a term's weight goes, e.g. the Jacobian term's at t ≈ 0. They cost one backward
per term and range on log steps (timed apart: ``diagnostics_s``, not in ``sec_per_step``) and
change nothing else: the weights are bitwise those of a run without them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from igsm import distributed
from igsm.data import ImageStore, to_model_range
from igsm.data.common import reporting_write_errors
from igsm.diffusion import NoiseSchedule, VPSDE

# Options that do not change the weights: a snapshot stays resumable when only these change.
# num_steps among them: nothing in a step depends on it (constant learning rate after warm-up,
# EMA warm-up by step), so the state at step s is the same for any run of at least s steps, and
# raising num_steps continues a finished run instead of restarting it (snapshots past a lowered
# num_steps are not resumed).
# deterministic among them: it picks kernels, not the computation (like the number of processes).
# The diagnostics read the step's graph without changing it or drawing random numbers.
BOOKKEEPING_OPTIONS = ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "deterministic",
                       "diagnostics", "diagnostic_timesteps")


@dataclass
class TrainingOptions:
    """One training's settings: the config's ``training`` section plus the objective. No defaults
    here: the schema (``$defs.training``) holds them, and :meth:`from_dict` fills what a partial
    dict leaves out from it, so the two cannot disagree (tests/test_training.py compares them)."""

    num_steps: int
    batch_size: int
    lr: float
    betas: tuple
    eps: float
    weight_decay: float
    optimizer: str                    # "adam" | "adamw" (U-ViT, Table 7)
    grad_clip: float
    ema_decay: float
    warmup_steps: int
    hflip: bool                       # random horizontal flips (CIFAR-10, as DDPM trains)
    precision: str                    # "fp32" | "bf16" (autocast)
    deterministic: bool               # GPU: deterministic kernels, so a rerun repeats the bits
    seed: int
    log_every: int
    diagnostics: bool                 # per-term values and gradient norms by timestep range, at log steps
    diagnostic_timesteps: list        # the ranges' inner edges, in network time (DDPM steps)
    checkpoint_every: int
    keep_checkpoints: int
    objective: dict                   # build_objective's keyword arguments (an objectives entry)

    @classmethod
    def from_dict(cls, settings: dict) -> "TrainingOptions":
        """From a ``training`` section (+ ``objective``), the schema's defaults filling the rest."""
        from igsm.schema import schema_defaults

        known = set(cls.__dataclass_fields__)
        unknown = set(settings) - known
        if unknown:
            raise ValueError(f"unknown training setting(s) {sorted(unknown)}; known: {sorted(known)}")
        filled = {**schema_defaults("training"), **settings}
        missing = sorted(known - set(filled))
        if missing:
            raise ValueError(f"training setting(s) {missing} missing (no default: num_steps, and the "
                             f"objective, e.g. {{'weights': {{'np': 1.0}}}})")
        return cls(**filled)


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


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """Seed of the draws of ``step`` (stream 0: batch noise; 1 + rank: that process's dropout)."""
    # Reseeded every step: step s draws the same numbers whether the run was resumed or not.
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0] >> 1)


def _hash_tensors(digest, tensors: dict) -> None:
    for name, tensor in sorted(tensors.items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tensor.numel()};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())


def run_fingerprint(net: nn.Module, images: "ImageStore | np.ndarray", options: "TrainingOptions",
                    teacher: nn.Module | None, schedule: NoiseSchedule | VPSDE, conditioning=None) -> str:
    """sha256 of what the trained weights depend on: the options (bar BOOKKEEPING_OPTIONS), the
    forward process (kind and parameters: igsm.diffusion), the conditioning (igsm.conditioning;
    nothing for an unconditional run, whose fingerprint stays what it was before conditioning
    existed), the training images (a store by the digests in its index, with its labels, an array by
    its bytes), the initial weights and the teacher's weights.

    Not the number of processes: a run may resume on another GPU count (or device).
    """
    digest = hashlib.sha256()
    settings = {k: v for k, v in asdict(options).items() if k not in BOOKKEEPING_OPTIONS}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(schedule.identity())
    if conditioning is not None:
        digest.update(b"conditioning:" + conditioning.identity())
    if isinstance(images, ImageStore):  # by the shard digests its index recorded when written
        digest.update(f"images:store:{images.fingerprint()};".encode())
    else:
        digest.update(f"images:{images.dtype}:{images.shape};".encode())
        digest.update(np.ascontiguousarray(images).data)
    _hash_tensors(digest, net.state_dict())
    digest.update(b"teacher;")
    if teacher is not None:
        _hash_tensors(digest, teacher.state_dict())
    return digest.hexdigest()


def _snapshots(directory: Path) -> list[Path]:
    return sorted(directory.glob("step-*.pt"))


# What train() reads from a snapshot, and the type each must have.
SNAPSHOT_KEYS = {"step": int, "fingerprint": str, "net": dict, "ema": dict, "optimizer": dict,
                 "metrics": list, "running": dict, "running_steps": int}


def _read_snapshot(path: Path, fingerprint: str) -> tuple[dict | None, str | None]:
    """(snapshot, None), or (None, why it cannot be resumed) for a file that torch.load cannot read
    or that lacks what train() needs. A snapshot of another run (another fingerprint) is returned
    as read: the caller deletes it whatever else it holds."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or garbage files raise RuntimeError, EOFError, KeyError, …
        # The first sentence: torch appends a paragraph of advice to its zip errors.
        text = str(err).strip().splitlines()[0].split(". ")[0][:200] if str(err).strip() else ""
        size = path.stat().st_size if path.exists() else 0
        return None, f"{type(err).__name__}{': ' + text if text else ''} ({size} bytes)"
    if not isinstance(state, dict):
        return None, f"it holds a {type(state).__name__}, not a snapshot"
    if isinstance(state.get("fingerprint"), str) and state["fingerprint"] != fingerprint:
        return state, None
    wrong = [key for key, kind in SNAPSHOT_KEYS.items()
             if not isinstance(state.get(key), kind) or (kind is int and isinstance(state[key], bool))]
    if not wrong and not {"state", "param_groups"} <= set(state["optimizer"]):
        wrong = ["optimizer"]
    if wrong:
        return None, f"missing or malformed: {', '.join(wrong)}"
    return state, None


def _newest_snapshot_of_run(directory: Path, fingerprint: str, num_steps: int) -> dict | None:
    """The newest snapshot with this fingerprint at step ≤ num_steps; newer ones of another run are
    deleted (rank 0); those of this run past num_steps are left for a later, longer run. A snapshot
    that cannot be read, or that lacks what resuming needs, is renamed ``<name>.corrupt`` (rank 0),
    so that no rerun trips on it again, and the next older one is tried."""
    state, stale, corrupt = None, [], []
    for path in reversed(_snapshots(directory)):
        candidate, problem = _read_snapshot(path, fingerprint)
        if problem is not None:
            corrupt.append(path)
            distributed.print0(f"snapshot {path} is unreadable: {problem}; renaming it to "
                               f"{path.name}.corrupt; trying the previous snapshot", flush=True)
            continue
        if candidate["fingerprint"] == fingerprint and candidate["step"] > num_steps:
            continue
        if candidate["fingerprint"] == fingerprint:
            state = candidate
            distributed.print0(f"resuming from {path} (step {state['step']})", flush=True)
            break
        stale.append(path)
    if corrupt and state is None:
        distributed.print0(f"no readable snapshot of this run in {directory}: training starts "
                           f"from step 0", flush=True)
    distributed.barrier()  # every process has read its snapshot before any file goes
    if distributed.get_rank() == 0:
        for path in stale:
            print(f"discarding {path}: written by a different run (settings, data, initial "
                  f"weights or teacher differ); not resumed", flush=True)
            path.unlink()
        for path in corrupt:  # kept for inspection, out of the step-*.pt pattern
            path.replace(path.with_name(path.name + ".corrupt"))
    return state


def _update_ema(ema: nn.Module, net: nn.Module, decay: float) -> None:
    # One multi-tensor call instead of a kernel launch per parameter (the loop's steps are bound
    # by launches on a GPU: docs/experiments/fashion_mnist); the same lerp as Tensor.lerp_.
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in net.parameters()], 1.0 - decay)


@dataclass
class Timing:
    """Wall-clock cost of a training run over all its attempts (resumed runs included), for the
    summary: the benchmark file of a rerun job holds only its last attempt."""

    attempts: int = 0
    wall_time_s: float = 0.0       # from the start of each attempt to its last snapshot or the end
    step_time_s: float = 0.0       # inside the step loop only (no model loading, no resume)
    steps_timed: int = 0
    peak_memory_mib: float | None = None  # CUDA only: the largest of the attempts'

    def summary(self) -> dict:
        return {**asdict(self), "sec_per_step": self.step_time_s / max(1, self.steps_timed)}


def _use_deterministic_kernels() -> None:
    """PyTorch's deterministic algorithms for this process; ops without one only warn (an error
    would end a long run for one op). cuBLAS reads its workspace setting when it starts, which
    is after this: the training's first matrix product. Attention takes the math path: the fused
    kernels' backward passes are not deterministic (on an H100 the memory-efficient one warned
    and a rerun on 2 GPUs differed by 1e-4: docs/experiments/multi_gpu/README.md)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)


def _average_gradients(params: list[nn.Parameter], stats: torch.Tensor) -> torch.Tensor:
    """Sum the gradients and ``stats`` over the processes in one all-reduce (in place)."""
    if distributed.get_world_size() == 1:
        return stats
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [stats.float()])
    distributed.all_reduce_sum_(flat)
    offset = 0
    for p, g in zip(params, grads):
        if p.grad is not None:
            p.grad.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat[offset:]


def timestep_ranges(edges) -> list[tuple[float, float]]:
    """[0, e1), [e1, e2), …, [e_n, ∞) from the inner edges (network time)."""
    bounds = [0.0, *map(float, edges), math.inf]
    return list(zip(bounds[:-1], bounds[1:]))


def term_diagnostics(parts: dict, values: dict, t: torch.Tensor, params: list, global_batch: int,
                     edges) -> dict:
    """What each term weighs in the step, by timestep range (issue 20): per range, the rows of the
    global batch in it, each term's mean (unweighted) value on them, and the norm of the gradient
    its weighted share of the batch-mean loss gives the parameters, ‖∇θ λ·Σ_{i in range} term_i / B‖
    (before clipping); ``grad_norm_all`` is the norm of the term's whole gradient (the sum over the
    ranges). ``parts``: the objective's contributions (``Objective(..., contributions=True)``).
    One backward per (term, range), through the step's retained graph: log steps only."""
    from igsm.objectives import retained_subgraphs

    ranges = timestep_ranges(edges)
    masks = [(t >= low) & (t < high) for low, high in ranges]
    wide = torch.promote_types(next(iter(values.values())).dtype, torch.float32)
    sums = torch.stack([torch.stack([m.sum().to(wide) for m in masks])] +
                       [torch.stack([(v.to(wide) * m).sum() for m in masks]) for v in values.values()])
    if distributed.get_world_size() > 1:
        distributed.all_reduce_sum_(sums)
    rows = sums[0].tolist()
    record = {"ranges": [[low, None if math.isinf(high) else high] for low, high in ranges],
              "rows": [int(r) for r in rows]}
    for name, row in zip(values, sums[1:].tolist()):
        record[name] = {"value": [total / r if r else None for total, r in zip(row, rows)]}
    for name, part in parts.items():
        norms, whole = [], None
        for mask in masks:
            share = (part * mask).to(torch.promote_types(part.dtype, torch.float32)).sum() / global_batch
            with retained_subgraphs():
                grads = torch.autograd.grad(share, params, retain_graph=True, allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])
            if distributed.get_world_size() > 1:
                distributed.all_reduce_sum_(flat)
            norms.append(float(flat.norm()))
            whole = flat if whole is None else whole + flat
        record.setdefault(name, {}).update(grad_norm=norms, grad_norm_all=float(whole.norm()))
    return record


def train(
    net: nn.Module,
    images: "ImageStore | np.ndarray",
    options: TrainingOptions,
    checkpoint_dir: str | os.PathLike,
    metrics_path: str | os.PathLike,
    teacher: nn.Module | None = None,
    schedule: NoiseSchedule | VPSDE | None = None,
    device: str | torch.device = "cpu",
    step_hook=None,
    conditioning=None,
) -> tuple[nn.Module, Timing]:
    """Train ``net`` on uint8 ``images`` (N×H×W×C: an image store, read a batch at a time, or an
    array); return its EMA copy and the run's timing.

    ``schedule``: the forward process (igsm.diffusion: DDPM, the default, or the VP-SDE); the
    objective sees its noisy images and the network's time input (t, resp. t·999).

    ``conditioning`` (igsm.conditioning, None: unconditional): each image's condition from the
    store's labels, dropped to the null condition with the kind's ``drop_prob``, goes to the student
    and the teacher alike (``images`` must then be a store, which holds the labels).

    Under torchrun (igsm.distributed.init() called first) every process calls this with the same
    arguments; ``options.batch_size`` is the global batch and must divide by the process count.

    ``step_hook`` (e.g. igsm.pruning.soft_masks.MaskFlow) joins the loop without a loop of its own:
    ``hook.applied(net)`` wraps each step's forward, ``hook.after_step(net, x_t, t,
    noise, condition)`` runs after each optimizer step, its ``state_dict()`` travels in the snapshots (a
    resumed run continues it bitwise) and its ``identity()`` in the run's fingerprint.
    """
    # Signals are caught from the first snapshot read on: one arriving while the run starts is acted
    # on after its first step.
    attempt_started = time.perf_counter()
    run = _Run(net, images, options, teacher, schedule or NoiseSchedule.linear(), torch.device(device),
               step_hook, Path(checkpoint_dir), attempt_started, conditioning)
    with _StopRequested() as stop:
        run.resume_from_newest_snapshot()
        run.restart_metrics_file(Path(metrics_path))
        run.run_steps(stop, Path(metrics_path))
        run.update_timing()
        return run.ema, run.timing


class _Run:
    """One attempt at a training run (:func:`train`): the models, optimizer and objective its steps
    share, the metrics so far and what its snapshots carry."""

    def __init__(self, net, images, options: TrainingOptions, teacher, schedule, device: torch.device,
                 step_hook, checkpoint_dir: Path, attempt_started: float, conditioning=None):
        self.images, self.options, self.schedule, self.device = images, options, schedule, device
        self.conditioning, self.labels = conditioning, None
        if conditioning is not None:
            if not isinstance(images, ImageStore):
                raise ValueError("conditional training reads the labels of an image store; got an array")
            self.labels = images.labels
            self.conditioning = conditioning = conditioning.for_data(images)  # a captions kind takes its captions
            conditioning.check_labels(self.labels, f"dataset {images.directory}")
        self.step_hook, self.checkpoint_dir, self.attempt_started = step_hook, checkpoint_dir, attempt_started
        self.rank, self.world_size = distributed.get_rank(), distributed.get_world_size()
        self.rows = _rows_of_this_process(options.batch_size, self.rank, self.world_size)
        self.objective = _objective_of_this_process(options, teacher, self.rows, self.world_size)
        self.fingerprint = run_fingerprint(net, images, options, teacher, schedule, conditioning)
        if step_hook is not None:
            self.fingerprint = hashlib.sha256(f"{self.fingerprint};{step_hook.identity()}".encode()).hexdigest()

        if options.deterministic and device.type == "cuda":
            _use_deterministic_kernels()
        self.net = net.to(device).train()
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        if teacher is not None:
            teacher = teacher.to(device).eval().requires_grad_(False)
        self.teacher = teacher
        self.params = list(self.net.parameters())
        optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[options.optimizer]
        self.optimizer = optimizer_class(self.params, lr=options.lr, betas=tuple(options.betas),
                                         eps=options.eps, weight_decay=options.weight_decay)
        # Images, flips, timesteps, noise and directions (reseeded every step).
        self.generator = torch.Generator(device=device)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.precision == "bf16")
        checkpoint_dir.mkdir(parents=True, exist_ok=True)

    def resume_from_newest_snapshot(self) -> None:
        """Weights, EMA, optimizer, metrics and timing from the run's newest snapshot, if any."""
        self.start_step, self.records, self.running, self.count, self.timing = 0, [], {}, 0, Timing()
        state = _newest_snapshot_of_run(self.checkpoint_dir, self.fingerprint, self.options.num_steps)
        if state is not None:
            self.net.load_state_dict(state["net"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.start_step, self.records = state["step"], state["metrics"]
            self.running, self.count = state["running"], state["running_steps"]
            self.timing = Timing(**state.get("timing", {}))
            if self.step_hook is not None:
                self.step_hook.load_state_dict(state["hook"])
        self.timing.attempts += 1
        self.earlier_wall_time = self.timing.wall_time_s
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def restart_metrics_file(self, metrics_path: Path) -> None:
        """The metrics file restarts from the snapshot's records: lines past it are redone, and a
        file deleted by Snakemake after an interrupted job comes back whole."""
        if self.rank == 0:
            metrics_path.parent.mkdir(parents=True, exist_ok=True)
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            (self.checkpoint_dir / "training_options.json").write_text(json.dumps(asdict(self.options), indent=2))

    def run_steps(self, stop: _StopRequested, metrics_path: Path) -> None:
        """The steps from the resumed one to ``num_steps``: log lines, snapshots, and a stop (with a
        snapshot) after the step in which any process was signalled."""
        options = self.options
        self.progress = tqdm(range(self.start_step, options.num_steps), initial=self.start_step,
                             total=options.num_steps, desc="train", mininterval=2.0, disable=self.rank != 0)
        self._start_log_interval()
        metrics = open(metrics_path, "a") if self.rank == 0 else None
        try:
            for step in self.progress:
                done = step + 1
                log_step = done % options.log_every == 0 or done == options.num_steps
                values, stop_votes, by_timestep = self.step(step, stop, options.diagnostics and log_step)
                for name, value in values.items():
                    self.running[name] = self.running.get(name, 0.0) + value
                self.count, self.timed = self.count + 1, self.timed + 1
                if log_step:
                    self.log(done, by_timestep, metrics)
                stopping = stop_votes > 0 and done < options.num_steps
                if done % options.checkpoint_every == 0 or done == options.num_steps or stopping:
                    self.save_snapshot(done)
                if stopping:
                    cause = signal.Signals(stop.signal).name if stop.signal else "another process's signal"
                    raise Interrupted(f"stopped by {cause} after step {done}; rerun to resume from "
                                      f"{self.checkpoint_dir}")
        finally:
            if metrics is not None:
                metrics.close()

    def draw_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Step ``step``'s noisy images x_t, network times, noise and condition (None if
        unconditional): the global batch's draws (from generators seeded by (seed, step)), of which
        this process keeps its rows."""
        options, schedule, generator, device = self.options, self.schedule, self.generator, self.device
        batch, rows = options.batch_size, self.rows
        generator.manual_seed(step_seed(options.seed, step))
        torch.manual_seed(step_seed(options.seed, step, 1 + self.rank))  # dropout
        indices = batch_indices(step, batch, len(self.images), options.seed)
        x0 = to_model_range(self.images[indices[rows].numpy()]).to(device)
        if options.hflip:
            flip = (torch.rand(batch, generator=generator, device=device) < 0.5)[rows]
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(3), x0)
        t = schedule.sample_times(batch, generator, device)[rows]
        noise = torch.randn((batch, *x0.shape[1:]), generator=generator, device=device)[rows]
        x_t = schedule.add_noise(x0, noise, t)
        condition = None
        if self.conditioning is not None:  # drawn after the rest: unconditional runs draw as before
            labels = self.labels[indices.numpy()]
            condition = self.conditioning.training_condition(labels, generator, device)[rows]
        return x_t, schedule.network_time(t), noise, condition  # network time: what the networks see

    def step(self, step: int, stop: _StopRequested, diagnose: bool) -> tuple[dict, float, dict | None]:
        """One optimizer step; returns the step's logged values (loss, grad_norm, each term's mean),
        the number of processes signalled to stop and, when ``diagnose``, its term diagnostics."""
        net, ema, options, params, hook = self.net, self.ema, self.options, self.params, self.step_hook
        batch = options.batch_size
        x_t, t, noise, condition = self.draw_batch(step)
        for group in self.optimizer.param_groups:
            group["lr"] = options.lr * min(1.0, (step + 1) / max(1, options.warmup_steps))
        with self.autocast, (hook.applied(net) if hook is not None else contextlib.nullcontext()):
            total, terms, *parts = self.objective(net, self.teacher, x_t, t, noise, self.generator, step=step,
                                                  contributions=diagnose, condition=condition)
        loss = total.float().sum() / batch  # this process's share of the global batch mean
        by_timestep = None
        if diagnose:  # before the step's backward frees the graph; its time is not the step's
            diagnostics_started = time.perf_counter()
            by_timestep = term_diagnostics(parts[0], terms, t, params, batch, options.diagnostic_timesteps)
            self.excluded += time.perf_counter() - diagnostics_started
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # One all-reduce: gradients, the logged values and whether any process was signalled.
        stats = torch.stack([loss.detach(), *[v.float().sum() / batch for v in terms.values()],
                             torch.tensor(float(stop.signal is not None), device=self.device)])
        loss_value, *term_values, stop_votes = _average_gradients(params, stats).tolist()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {step}: lower the lr or check data")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, options.grad_clip))
        self.optimizer.step()
        # Short runs would keep the EMA at its initial weights: warm the decay up (DDPM codes do).
        _update_ema(ema, net, min(options.ema_decay, (1 + step) / (10 + step)))
        if hook is not None:
            hook.after_step(net, x_t, t, noise, condition)
        return {"loss": loss_value, "grad_norm": grad_norm, **dict(zip(terms, term_values))}, stop_votes, by_timestep

    def _start_log_interval(self) -> None:
        """Steps and seconds of the steps since the last log line (diagnostics' time excluded)."""
        self.timed, self.started, self.excluded = 0, time.perf_counter(), 0.0

    def log(self, done: int, by_timestep: dict | None, metrics) -> None:
        """A metrics line: the values averaged since the last one (the diagnostics: this step's
        batch alone), the learning rate and the seconds per step."""
        elapsed = time.perf_counter() - self.started - self.excluded
        self.timing.step_time_s += elapsed
        self.timing.steps_timed += self.timed
        record = {"step": done, **{k: v / self.count for k, v in self.running.items()},
                  "lr": self.optimizer.param_groups[0]["lr"], "sec_per_step": elapsed / self.timed}
        if by_timestep is not None:
            record["by_timestep"] = by_timestep
            record["diagnostics_s"] = self.excluded
        self.records.append(record)
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        self.progress.set_postfix(loss=f"{record['loss']:.4f}")
        self.running, self.count = {}, 0
        self._start_log_interval()

    def update_timing(self) -> None:
        self.timing.wall_time_s = self.earlier_wall_time + time.perf_counter() - self.attempt_started
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.timing.peak_memory_mib = max(self.timing.peak_memory_mib or 0.0, peak)

    def save_snapshot(self, step: int) -> None:
        """``step-<step>.pt``, written under a temporary name and renamed; older ones beyond
        ``keep_checkpoints`` go. Rank 0 writes; every process waits for it."""
        if self.rank == 0:
            self.update_timing()
            state = {
                "step": step, "fingerprint": self.fingerprint, "net": self.net.state_dict(),
                "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                "metrics": self.records, "running": self.running, "running_steps": self.count,
                "world_size": self.world_size, "timing": asdict(self.timing),
                **({"hook": self.step_hook.state_dict()} if self.step_hook is not None else {}),
            }
            path = self.checkpoint_dir / f"step-{step:07d}.pt"
            tmp = path.with_suffix(".tmp")
            with reporting_write_errors(tmp, also=(RuntimeError,)):  # torch's: "unexpected pos"
                torch.save(state, tmp)
            tmp.replace(path)
            # Older snapshots beyond keep_checkpoints go; later ones (of a longer run of the same
            # trajectory, num_steps since lowered) stay.
            earlier = [p for p in _snapshots(self.checkpoint_dir) if p.name <= path.name]
            for old in earlier[: -self.options.keep_checkpoints]:
                old.unlink()
        distributed.barrier()


def _rows_of_this_process(batch_size: int, rank: int, world_size: int) -> slice:
    """This process's rows of the global batch, which splits evenly between the processes."""
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world_size} "
                         f"processes (GPUs); the global batch is split evenly between them")
    return slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)


def _objective_of_this_process(options: TrainingOptions, teacher, rows: slice, world_size: int):
    """The run's objective; with several processes, its directions drawn for the global batch."""
    from igsm.objectives import build_objective

    objective = build_objective(**options.objective)
    if objective.needs_teacher and teacher is None:
        raise ValueError("the objective uses the dense teacher (kd/jm terms) but no teacher was given")
    return objective.for_global_batch(rows, options.batch_size) if world_size > 1 else objective
