"""The dense and finetune stages: both run the one training loop (igsm.training) — the dense model
from its initialisation, a pruned student with its objective (NP, KD, IGSM: paper Sec. 4) — on one
process or, several asked for, under torchrun (DDP, the global batch split evenly).

Exits with 75 (EX_TEMPFAIL) after SIGTERM/SIGUSR1, once a snapshot is written: rerun to resume."""

from __future__ import annotations

from igsm.stages.common import (StageError, conditioning_of, diffusion_of, forward_process, readable_inputs,
                                training_data, write_json)
from igsm.stages.process import relaunch_under_torchrun, start_process

EX_TEMPFAIL = 75  # a rerun continues from the snapshot


def train(model_dir, teacher_dir, data, out, checkpoint_dir, metrics, summary, nproc_per_node: int,
          nnodes: int, settings: dict, device: str, threads: int | None) -> None:
    """Train ``model_dir`` on the image store ``data`` (settings: 'training' + 'objective' +
    'diffusion', and a conditional experiment's 'conditioning'); the EMA model goes to ``out``, a
    line per log step to ``metrics``, the run's summary to ``summary``. A latent experiment's store
    must be the latents of the settings' ``latents.autoencoder`` (igsm.latents)."""
    from igsm import distributed
    from igsm.training import Interrupted, TrainingOptions, train as train_loop

    try:
        options = TrainingOptions.from_dict(settings["training"])
    except (KeyError, TypeError, ValueError) as err:
        raise StageError(f"--settings: {err}") from None
    if options.batch_size % (nproc_per_node * nnodes):
        raise StageError(f"--nproc-per-node: batch_size {options.batch_size} is not divisible "
                         f"by the {nproc_per_node * nnodes} processes (GPUs); the global "
                         f"batch is split evenly between them")
    relaunch_under_torchrun(nproc_per_node, nnodes, device)

    from igsm.models import load_model

    device = start_process(device, threads)
    images = training_data(data, settings.get("latents"))
    with readable_inputs():
        net = load_model(model_dir)
        teacher = load_model(teacher_dir) if teacher_dir else None
    try:
        ema, timing = train_loop(net, images, options, checkpoint_dir, metrics, teacher=teacher,
                                 schedule=forward_process(diffusion_of(settings)), device=device,
                                 conditioning=conditioning_of(settings))
    except Interrupted as err:
        distributed.shutdown()
        raise StageError(str(err), exit_code=EX_TEMPFAIL) from None
    except (FloatingPointError, ValueError) as err:
        raise StageError(str(err)) from None
    if distributed.get_rank() == 0:
        _save(ema, out, summary, model_dir=model_dir, teacher_dir=teacher_dir, options=options,
              timing=timing, settings=settings, device=device)
    distributed.barrier()
    distributed.shutdown()


def _save(ema, out, summary, *, model_dir, teacher_dir, options, timing, settings, device) -> None:
    """The trained (EMA) model and the run's summary, by rank 0."""
    from igsm import distributed, gpus
    from igsm.models import count_parameters, save_model

    save_model(ema.cpu(), out, extra={"trained_from": model_dir, "num_steps": options.num_steps})
    write_json(summary, {"num_steps": options.num_steps, "num_parameters": count_parameters(ema),
                         "num_processes": distributed.get_world_size(), "teacher": teacher_dir,
                         "device": gpus.device_name(device), "timing": timing.summary(),
                         "settings": settings})
