"""The prune stage (paper Sec. 5.1): structural pruning of the dense model at one channel ratio by
the pruning method of a criterion (igsm.pruning), and the picture a method draws of its report."""

from __future__ import annotations

import json
from pathlib import Path

from igsm.stages.common import StageError, conditioning_of, forward_process, training_data, write_json
from igsm.stages.process import device as torch_device, set_threads
from igsm.stages.settings import PruneSettings


def prune(model_dir, data, criterion: str, channel_ratio: float, out, report, settings: PruneSettings,
          device: str, threads: int | None) -> None:
    """Prune ``model_dir`` at ``channel_ratio`` by the method of ``criterion`` (settings: the
    experiment's 'prune'; its 'method', if set, must take the criterion) into ``out``, with the
    method's result in ``report``. A latent experiment's store must be the latents of the settings'
    ``latents.autoencoder`` (igsm.latents)."""
    from igsm.models import load_model, save_model
    from igsm.pruning import method_for

    set_threads(threads)
    try:
        method = method_for(criterion, settings.method, criterion_key="--criterion",
                            method_key="--settings: method")
    except ValueError as err:
        raise StageError(str(err)) from None
    images = training_data(data, settings.latents or None)
    check_teacher_fits(model_dir, data, images.shape)
    try:
        pruned, result = method.prune(load_model(model_dir), images, criterion=criterion, channel_ratio=channel_ratio,
                                      settings=settings, schedule=forward_process(settings.diffusion),
                                      conditioning=conditioning_of(settings.as_dict()),
                                      folder=Path(out).parent, device=torch_device(device))
    except ValueError as err:
        raise StageError(str(err)) from None
    save_model(pruned.cpu(), out, extra={"pruned_from": model_dir, "pruning": result})
    write_json(report, result)


def check_teacher_fits(model_dir, data, shape) -> None:
    """A hub teacher (``dense.pretrained``: its config is known only once fetched; local folders are
    checked with the config) must make images of the training data's size and channels, or it would be
    pruned, finetuned on them and sampled at its own size without a word. Checked here, in the first
    job that has both, so that the fetching rule's command (and every result made from it) stays as it was."""
    from igsm.families import family_of_class
    from igsm.models import ARCHITECTURE_FILE, declared_images, pretrained_mismatches

    spec = json.loads((Path(model_dir) / ARCHITECTURE_FILE).read_text())
    family = family_of_class(spec.get("class"))
    if family is None:
        return
    folder = Path(model_dir)  # results/dense/<experiment>/<kind>/model
    source = spec.get("source")
    where = f"the model {source!r}" if source else f"the model in {model_dir}"
    problems = pretrained_mismatches(declared_images(spec["class"], spec.get("config", {}), where),
                                     family.name, Path(data).parent.name, shape[1], shape[3])
    if problems:
        key = f"experiments.{folder.parent.parent.name}.dense.pretrained" if folder.parent.name == "pretrained" \
            else f"the dense model {model_dir}"
        raise StageError("\n".join(f"{key}: {problem}" for problem in problems))


def draw_report(report_file, criterion: str, out) -> None:
    """The picture that the pruning method of ``criterion`` draws of its report (report_picture)."""
    from igsm.pruning import method_for

    try:
        method = method_for(criterion, criterion_key="--criterion")
    except ValueError as err:
        raise StageError(str(err)) from None
    if not method.report_picture:
        raise StageError(f"--criterion: pruning method {method.name!r} draws no picture of its report")
    try:
        method.draw_report(json.loads(Path(report_file).read_text()), out)
    except ValueError as err:
        raise StageError(f"{report_file}: {err}") from None
