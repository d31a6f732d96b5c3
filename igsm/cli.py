"""Command-line entry points, one per workflow stage: thin shells around the package.

Paths come from Snakemake; each stage's settings come as one JSON object (``--settings``), the
validated config section of that stage, so a changed setting reruns exactly the jobs it feeds.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click

from igsm import reuse_methods  # torch-free: the method names of `reuse-plan --method`


def _json(ctx, param, value):
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise click.BadParameter(f"not valid JSON ({err})") from None


@contextlib.contextmanager
def _readable_inputs():
    """A missing or corrupt input file (model, samples, statistics): the loader's message, which
    names the file and what to do, instead of a traceback."""
    try:
        yield
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from None


def _device(name: str):
    import torch

    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        from igsm import distributed, gpus

        # Several visible GPUs and one process (Snakemake's local executor): take the least used.
        if distributed.get_world_size() == 1 and torch.cuda.device_count() > 1:
            return torch.device(f"cuda:{gpus.claim(1, torch.cuda.device_count())[0]}")
        return torch.device("cuda")
    return torch.device(name)


def _write_json(path, payload) -> None:
    from igsm.data import write_text_atomically

    write_text_atomically(path, json.dumps(payload, indent=2) + "\n")


def _schedule(settings: dict):
    """The experiment's forward process (settings' 'diffusion': DDPM or VP-SDE, igsm.diffusion)."""
    from igsm.diffusion import process_from_settings

    try:
        return process_from_settings(settings.get("diffusion", {}))
    except ValueError as err:
        raise click.ClickException(f"--settings: {err}") from None


def _relaunch_under_torchrun(nproc_per_node: int, nnodes: int = 1, device: str = "auto") -> None:
    """With several processes asked for, replace this one by torchrun running the same command.

    On one node with more GPUs visible than processes (``--device auto``), the job first claims
    the least used ones (igsm.gpus) and shows torchrun only those."""
    import os

    from igsm import distributed, gpus

    try:
        command = distributed.launch_command(sys.argv[1:], nproc_per_node, nnodes)
    except RuntimeError as err:
        raise click.ClickException(f"--nnodes: {err}") from None
    if command and device == "auto" and nnodes == 1:
        import torch

        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible > nproc_per_node:
            names = gpus.visible_ids(visible)
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(
                names[i] for i in gpus.claim(nproc_per_node, visible))
    if command:
        click.echo(" ".join(command), err=True)
        os.execvp(command[0], command)  # same process (pid), so SLURM's signals still reach it


def _start_process(device: str, threads: int | None):
    """This process's device and CPU threads (--threads = the job's CPUs on this node, shared by
    its processes), then the process group; returns the device."""
    from igsm import distributed

    device = _device(device)
    if device.type == "cuda" and device.index is None and distributed.get_world_size() > 1:
        device = _device(f"cuda:{distributed.get_local_rank()}")
    _setup(max(1, threads // distributed.get_local_world_size()) if threads else None)
    distributed.init(device)
    return device


def _denoiser(net, options: dict, micro_batch: int | None = None):
    """The network as the 'sample' settings run it (igsm.sampling.denoiser_from_settings)."""
    from igsm.sampling import denoiser_from_settings

    try:
        return denoiser_from_settings(net, options, micro_batch)
    except ValueError as err:
        raise click.ClickException(str(err)) from None


SETTINGS = click.option("--settings", callback=_json, default="{}", show_default=True,
                        help="This stage's config section, as JSON.")
DEVICE = click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
THREADS = click.option("--threads", type=click.IntRange(min=1), default=None,
                       help="CPU threads for torch (default: torch's choice).")


@click.group()
def main():
    """Prune diffusion models, finetune them with IGSM, sample and score them."""


def _setup(threads):
    import torch

    if threads:
        torch.set_num_threads(threads)


@main.command("check-config")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def check_config(files):
    """Check workflow config files as the workflow does before its first job (each file read
    strictly, the schema, then every cross-field check), every error at once, one line each naming
    its key (IGSM_CONFIG_DETAIL=1: with jsonschema's full report), or the file and line of a YAML
    error. Several files are merged in order, as `snakemake --configfile A B` does (needs snakemake
    installed)."""
    from igsm.config import ConfigError, load_config_file, validate

    try:
        from snakemake.utils import update_config

        config = {}
        for path in files:
            update_config(config, load_config_file(path))
        validate(config)
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"{', '.join(files)}: valid ({len(config['experiments'])} experiment(s))")


@main.command()
@click.option("--out", required=True, type=click.Path(), help="Image store (folder) to write.")
@click.option("--cache-dir", required=True, type=click.Path(file_okay=False), help="Where archives go.")
@SETTINGS
def download(out, cache_dir, settings):
    """Fetch and parse a dataset (config 'datasets.<name>') into an image store."""
    import faulthandler

    from igsm.data import DownloadError, prepare_dataset

    # Sources read archives through memory maps (LSUN's LMDB): should a damaged file still end in a
    # fatal signal, the log shows where instead of being empty.
    with contextlib.suppress(Exception):  # a stderr without a file descriptor (click's test runner)
        faulthandler.enable()
    try:
        store = prepare_dataset(settings, out, cache_dir)
    except (DownloadError, ValueError, OSError) as err:  # OSError: WriteError names the file, free space
        raise click.ClickException(str(err)) from None
    n, h, w, c = store.shape
    click.echo(f"{out}: {n} images of {h}×{w}×{c} in {len(store.index['shards'])} shard(s)")


@main.command()
@click.option("--model-id", required=True,
              help="Hub id (google/ddpm-cifar10-32) or local folder; for a U-ViT architecture, a "
                   "reference checkpoint (.pth or .safetensors file, or URL).")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where a checkpoint given by URL is downloaded (U-ViT).")
@SETTINGS
def pretrained(model_id, out, cache_dir, settings):
    """Fetch a pretrained dense model and store it in the project's format (settings: the
    experiment's 'architecture', whose family loads it; needed where the weights are plain state
    dicts, as U-ViT's; without it, a self-describing diffusers model: hub id or folder)."""
    from igsm.models import load_pretrained, save_model

    try:
        net = load_pretrained(model_id, settings, cache_dir or Path(out).parent / "download")
    except (RuntimeError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    save_model(net, out, extra={"source": model_id})


@main.command("convert-checkpoint")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.argument("target", type=click.Path(dir_okay=False))
def convert_checkpoint(source, target):
    """Keep the tensors of a pickled checkpoint (a U-ViT .pth, a diffusers .bin) in a safetensors
    file, running nothing in its pickle: anything but tensors is left out and listed. For a file
    whose pickle asks for more than tensors, which dense.pretrained refuses; its weights are only
    as trustworthy as its source."""
    from igsm.pickles import convert_checkpoint as convert

    try:
        left_out = convert(source, target)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"{target}: the tensors of {source}" + (f"; left out: {', '.join(left_out)}" if left_out else ""))


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@SETTINGS
def init(out, seed, settings):
    """A freshly initialised network from the experiment's 'architecture' (U-Net or U-ViT)."""
    import torch

    from igsm.models import build_model, save_model

    torch.manual_seed(seed)
    save_model(build_model(settings), out, extra={"source": f"random init (seed {seed})"})


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Network to train (dense init, or pruned student).")
@click.option("--teacher", "teacher_dir", type=click.Path(exists=True, file_okay=False),
              help="Frozen dense teacher (needed by kd/jm terms).")
@click.option("--data", required=True, type=click.Path(exists=True), help="Image store (results/data/<dataset>/train).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Final EMA model folder.")
@click.option("--checkpoint-dir", required=True, type=click.Path(file_okay=False))
@click.option("--metrics", required=True, type=click.Path(dir_okay=False), help="JSONL per log step.")
@click.option("--summary", required=True, type=click.Path(dir_okay=False), help="JSON summary.")
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes per node, one per GPU; more than one in all reruns this command "
                   "under torchrun (DDP; the batch is split between them).")
@click.option("--nnodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Nodes (> 1: inside a SLURM allocation, one torchrun per node through srun).")
@SETTINGS
@DEVICE
@THREADS
def train(model_dir, teacher_dir, data, out, checkpoint_dir, metrics, summary, nproc_per_node, nnodes,
          settings, device, threads):
    """Train or finetune with the one training loop (settings: 'training' + 'objective').

    Exits with 75 (EX_TEMPFAIL) after SIGTERM/SIGUSR1, once a snapshot is written: rerun to resume.
    """

    from igsm import distributed, gpus
    from igsm.training import Interrupted, TrainingOptions, train as train_loop

    try:
        options = TrainingOptions.from_dict(settings["training"])
    except (KeyError, TypeError, ValueError) as err:
        raise click.ClickException(f"--settings: {err}") from None
    if options.batch_size % (nproc_per_node * nnodes):
        raise click.ClickException(f"--nproc-per-node: batch_size {options.batch_size} is not divisible "
                                   f"by the {nproc_per_node * nnodes} processes (GPUs); the global "
                                   f"batch is split evenly between them")
    _relaunch_under_torchrun(nproc_per_node, nnodes, device)

    from igsm.data import load_images
    from igsm.models import count_parameters, load_model, save_model

    device = _start_process(device, threads)
    with _readable_inputs():
        net = load_model(model_dir)
        teacher = load_model(teacher_dir) if teacher_dir else None
    try:
        ema, timing = train_loop(net, load_images(data), options, checkpoint_dir, metrics, teacher=teacher,
                                 schedule=_schedule(settings), device=device)
    except Interrupted as err:
        click.echo(str(err), err=True)
        distributed.shutdown()
        sys.exit(75)  # EX_TEMPFAIL: a rerun continues
    except (FloatingPointError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    if distributed.get_rank() == 0:
        save_model(ema.cpu(), out, extra={"trained_from": model_dir, "num_steps": options.num_steps})
        _write_json(summary, {"num_steps": options.num_steps, "num_parameters": count_parameters(ema),
                              "num_processes": distributed.get_world_size(), "teacher": teacher_dir,
                              "device": gpus.device_name(device), "timing": timing.summary(),
                              "settings": settings})
    distributed.barrier()
    distributed.shutdown()


def _check_teacher_fits(model_dir, data, shape) -> None:
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
        raise click.ClickException("\n".join(f"{key}: {problem}" for problem in problems))


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True), help="Image store (results/data/<dataset>/train).")
@click.option("--criterion", required=True)
@click.option("--channel-ratio", required=True, type=float)
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--report", required=True, type=click.Path(dir_okay=False))
@SETTINGS
@DEVICE
@THREADS
def prune(model_dir, data, criterion, channel_ratio, out, report, settings, device, threads):
    """Structural pruning at one channel ratio by the pruning method of CRITERION (settings: the
    experiment's 'prune'; its 'method', if set, must take the criterion)."""
    from igsm.data import load_images
    from igsm.models import load_model, save_model
    from igsm.pruning import method_for
    from igsm.schema import schema_defaults

    _setup(threads)
    try:
        method = method_for(criterion, settings.get("method"), criterion_key="--criterion",
                            method_key="--settings: method")
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    if method.settings_key:  # the method's own section, completed with the schema's defaults
        settings = {**settings, method.settings_key: {**schema_defaults(method.settings_key),
                                                      **settings.get(method.settings_key, {})}}
    with _readable_inputs():
        images = load_images(data)
    _check_teacher_fits(model_dir, data, images.shape)
    try:
        pruned, result = method.prune(load_model(model_dir), images, criterion=criterion, channel_ratio=channel_ratio,
                                      settings=settings, schedule=_schedule(settings), folder=Path(out).parent,
                                      device=_device(device))
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    save_model(pruned.cpu(), out, extra={"pruned_from": model_dir, "pruning": result})
    _write_json(report, result)


@main.command("plot-flow-masks")
@click.option("--report", "report_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A gradient-flow prune report (report.json).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG picture.")
def plot_flow_masks(report_file, out):
    """Picture of a gradient-flow pruning run: masks over the flow, final widths."""
    from igsm.plots import plot_flow_masks as plot

    report = json.loads(Path(report_file).read_text())
    if "gradient_flow" not in report:
        raise click.ClickException(f"{report_file}: not a gradient-flow prune report (no 'gradient_flow')")
    plot(report["gradient_flow"], out)


def _shard(ctx, param, value):
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected INDEX/COUNT, e.g. 0/8") from None
    if count < 1 or not 0 <= index < count:
        raise click.BadParameter(f"{value!r}: INDEX must be in 0..COUNT−1")
    return index, count


# Mirrors igsm.sampling.PRECISIONS (not imported here: the CLI starts without torch).
PRECISION_CHOICES = ("fp32", "tf32", "bf16")


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Images .npz: uint8 images, their seeds, JSON metadata.")
@click.option("--grid", type=click.Path(dir_okay=False), help="PNG grid of the first 64 images.")
@click.option("--first-seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the first image of the whole set; image k uses first_seed + k.")
@click.option("--num-images", type=click.IntRange(min=1), required=True, help="Images in the whole set.")
@click.option("--shard", default="0/1", show_default=True, callback=_shard,
              help="INDEX/COUNT: make only shard INDEX of COUNT (images i·N/COUNT … (i+1)·N/COUNT − 1).")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), default=None,
              help="fp32 (strict, TF32 off), tf32, or bf16 autocast. [default: sample.precision]")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="torch.compile the network. [default: sample.compile]")
@click.option("--channels-last/--no-channels-last", default=None,
              help="channels_last memory format. [default: sample.channels_last]")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per sampler batch. [default: sample.batch_size]")
@click.option("--micro-batch", type=click.IntRange(min=0), default=None,
              help="Images per network call, 0 = batch size. [default: sample.micro_batch]")
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes, one per GPU; more than one reruns this command under torchrun.")
@click.option("--plan", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A block-reuse gate table (igsm reuse-plan) the network follows.")
@SETTINGS
@DEVICE
@THREADS
def sample(model_dir, out, grid, first_seed, num_images, shard, precision, compile_, channels_last,
           batch_size, micro_batch, nproc_per_node, plan, settings, device, threads):
    """Generate images first_seed … first_seed+num_images−1, or one shard of them (settings: 'sample').

    Resumable: finished batches are kept in OUT.partial/ until OUT is written, and a rerun with
    the same model and settings does only the missing ones. Under torchrun, the processes share
    the batches (one GPU each) and rank 0 writes OUT.
    """

    import numpy as np
    import torch

    from igsm import distributed, sampling
    from igsm.stages import sample as sample_stage

    _relaunch_under_torchrun(nproc_per_node, device=device)
    flags = {"precision": precision, "compile": compile_, "channels_last": channels_last,
             "batch_size": batch_size, "micro_batch": micro_batch}
    options = {**settings, **{k: v for k, v in flags.items() if v is not None}}
    index, count = shard
    try:
        start, stop = sample_stage.shard_range(num_images, count, index)
        kwargs = sampling.sampler_kwargs(options)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    device = _start_process(device, threads)
    try:
        with _readable_inputs():
            written = sample_stage.sample_shard(
                model_dir, out, seeds=np.arange(first_seed + start, first_seed + stop), shard=(index, count),
                options=options, sampler_kwargs=kwargs, schedule=_schedule(options), device=device,
                noise_threads=torch.get_num_threads() if threads else 1, grid=grid, plan=plan)
        if written:
            click.echo(written)
    finally:
        distributed.shutdown()


@main.command("gather-samples")
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The whole set, .npz.")
@click.option("--grid", type=click.Path(dir_okay=False), help="PNG grid of the first 64 images.")
@click.option("--first-seed", type=click.IntRange(min=0), required=True)
@click.option("--num-images", type=click.IntRange(min=1), required=True)
def gather_samples(shards, out, grid, first_seed, num_images):
    """Concatenate shard files in seed order, checking that every seed is there exactly once."""
    from igsm import sampling

    try:
        images, seeds, metadata = sampling.gather_shards(list(shards), first_seed, num_images)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    sampling.save_samples(out, images, seeds, metadata)
    if grid:
        from igsm.plots import save_grid

        save_grid(images[:64], grid)
    click.echo(f"{out}: {len(images)} images from {len(shards)} shards")


@main.command("export-png")
@click.option("--samples", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder to create: one PNG per image, named by its seed.")
def export_png(samples, out):
    """Write a samples file's images as PNG files (lossless: their FID equals the array's)."""
    import os
    import shutil

    from PIL import Image

    from igsm.sampling import load_samples

    with _readable_inputs():
        images, seeds, _ = load_samples(samples)
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for image, seed in zip(images, seeds):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp / f"{int(seed):06d}.png")
    if Path(out).exists():
        shutil.rmtree(out)
    os.replace(tmp, out)  # the folder appears complete or not at all
    click.echo(f"{out}: {len(images)} PNG files")


def _features(images, settings, device, threads, batch_size):
    from igsm import fid

    extractor = fid.feature_extractor(settings.get("mode", "clean"), device=_device(device))
    # clean-fid resizes every image on the CPU (PIL): worker processes keep the GPU fed.
    workers = threads if threads and threads > 1 else 0
    features = fid.image_features(images, extractor=extractor, batch_size=batch_size, num_workers=workers)
    return features, extractor.metadata


FID_BATCH = click.option("--batch-size", type=click.IntRange(min=1), default=200, show_default=True,
                         help="Images per Inception call.")


@main.command("fid-reference")
@click.option("--data", required=True, type=click.Path(exists=True), help="Image store (results/data/<dataset>/train).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Statistics .npz.")
@SETTINGS
@DEVICE
@THREADS
@FID_BATCH
def fid_reference(data, out, settings, device, threads, batch_size):
    """Inception statistics of the training images (settings: 'fid')."""
    from igsm import fid
    from igsm.data import load_images

    _setup(threads)
    with _readable_inputs():
        images = load_images(data)
    num = settings.get("num_reference") or len(images)
    if num > len(images):
        raise click.ClickException(f"fid.num_reference: {num} images asked, {data} holds {len(images)}")
    features, metadata = _features(images.limit(num), settings, device, threads, batch_size)
    fid.save_statistics(out, features, source=data, **metadata)


# Sample metadata that the FID JSON reports, carried from the samples file by the statistics file.
# "precision" is the features'; "image_precision" is the sampler network's (fp32, tf32, bf16).
SAMPLE_KEYS = ("samples", "image_precision", "sampler", "sampler_kwargs")


@main.command("fid-statistics")
@click.option("--samples", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Statistics .npz.")
@SETTINGS
@DEVICE
@THREADS
@FID_BATCH
def fid_statistics(samples, out, settings, device, threads, batch_size):
    """Inception statistics of generated images (settings: 'fid' mode): the costly half of the FID."""
    from igsm import fid
    from igsm.sampling import load_samples

    _setup(threads)
    with _readable_inputs():
        images, _, sample_metadata = load_samples(samples)
    features, metadata = _features(images, settings, device, threads, batch_size)
    fid.save_statistics(out, features, samples=samples,
                        image_precision=sample_metadata.get("precision", "unknown"),
                        sampler=sample_metadata.get("sampler"),
                        sampler_kwargs=sample_metadata.get("sampler_kwargs"), **metadata)


@main.command("fid")
@click.option("--statistics", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Statistics .npz of the generated images (igsm fid-statistics).")
@click.option("--reference", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="FID JSON.")
@SETTINGS
@THREADS
def fid_score(statistics, reference, out, settings, threads):
    """FID of generated images' statistics against reference statistics (settings: 'fid').

    Reads two statistics files only: a failure here never costs the Inception features again.
    """
    from igsm import fid

    _setup(threads)
    with _readable_inputs():
        stats = fid.load_statistics(statistics)
        reference_stats = fid.load_statistics(reference)
    mode = settings.get("mode")
    if mode and stats.metadata.get("mode") != mode:
        raise click.ClickException(f"{statistics}: features of mode {stats.metadata.get('mode')!r}, "
                                   f"but the settings ask for {mode!r}; recompute them.")
    try:
        score = fid.frechet_distance(stats, reference_stats)
    except ValueError as err:
        raise click.ClickException(f"{statistics} against {reference}: {err}") from None
    sample_metadata = {key: stats.metadata.get(key) for key in SAMPLE_KEYS}
    extractor_metadata = {k: v for k, v in stats.metadata.items() if k not in SAMPLE_KEYS}
    _write_json(out, {"fid": score, "num_images": stats.num_images, "samples": sample_metadata["samples"],
                      "statistics": statistics, "reference": reference,
                      # The user's file (fid.reference_statistics), or the workflow's own statistics.
                      "reference_kind": "supplied" if settings.get("reference_statistics") else "computed",
                      "num_reference": reference_stats.num_images,
                      "image_precision": sample_metadata["image_precision"] or "unknown",
                      "sampler": sample_metadata["sampler"],
                      "sampler_kwargs": sample_metadata["sampler_kwargs"], **extractor_metadata})


@main.command("reuse-plan")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--method", required=True, type=click.Choice(reuse_methods.plan_methods()))
@click.option("--mac-fraction", required=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Share of the dense sampler's MACs still executed, averaged over the steps.")
@click.option("--sample-settings", required=True, callback=_json, help="JSON 'sample' settings (+ 'diffusion').")
@click.option("--learn-settings", callback=_json, default="{}", show_default=True,
              help="JSON 'reuse.learn' settings (dipgo).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The plan, JSON.")
@click.option("--picture", type=click.Path(dir_okay=False), default=None, help="PNG of the gate table.")
@DEVICE
@THREADS
def reuse_plan(model_dir, method, mac_fraction, sample_settings, learn_settings, out, picture, device, threads):
    """The block-reuse gate table of METHOD for MODEL's sampler at MAC_FRACTION (igsm.reuse_methods):
    DiP-GO learns it on the sampler's own chains; deepcache and reuse-eps follow a rule."""
    from igsm.models import load_model

    _setup(threads)
    device = _device(device)
    with _readable_inputs():
        net = load_model(model_dir, device)
    try:
        plan = reuse_methods.make_plan(net, method, mac_fraction, sample_settings, _schedule(sample_settings),
                                       learn_settings, device=device)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    if picture:
        from igsm.plots import plot_reuse_plan

        plot_reuse_plan(plan, picture)
    plan.save(out)
    click.echo(f"{out}: {method}, {plan.mac_fraction():.4f} of the dense MACs executed "
               f"(target {mac_fraction})")


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSON: params, MACs, images/s.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per timed network call.")
@click.option("--throughput/--no-throughput", default=None,
              help="Time network calls. [default: on a GPU only; on a CPU images_per_s is null]")
@click.option("--sampler-settings", callback=_json, default=None,
              help="JSON 'sample' settings: also the sampler's MACs per image and, where throughput is "
                   "measured, whole sampling chains per second.")
@click.option("--plan", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A block-reuse gate table the sampler follows (needs --sampler-settings).")
@SETTINGS
@DEVICE
@THREADS
def efficiency(model_dir, out, batch_size, throughput, sampler_settings, plan, settings, device, threads):
    """Parameters and MACs (one image, one network call) and network throughput (settings: how the
    network runs, as in 'sample': precision, channels_last, compile, compile_mode)."""
    from igsm import gpus
    from igsm.models import image_shape, load_model
    from igsm.pruning.structural import count_params_macs
    from igsm.sampling import sampler_kwargs
    from igsm.stages.sample import forward_images_per_s, sampling_images_per_s

    _setup(threads)
    with _readable_inputs():
        net = load_model(model_dir)
    shape = image_shape(net)
    params, macs = count_params_macs(net, shape[1], shape[0])
    device = _device(device)
    measure = throughput if throughput is not None else device.type == "cuda"
    result = {"params": params, "macs": macs, "model": model_dir, "images_per_s": None,
              "images_per_s_note": "not measured: no GPU (--throughput measures on a CPU)"}
    if plan and sampler_settings is None:
        raise click.UsageError("--plan needs --sampler-settings")
    if sampler_settings is not None:
        schedule = _schedule(sampler_settings)
        reuse = None
        if plan:
            from igsm.reuse import load_plan_for

            with _readable_inputs():
                reuse = load_plan_for(plan, net, sampler_settings, schedule)
        fraction = reuse.mac_fraction() if reuse else 1.0
        result.update(sampler_steps=sampler_settings["num_steps"], reuse_mac_fraction=fraction,
                      sampling_macs=macs * sampler_settings["num_steps"] * fraction,
                      sampling_images_per_s=None)
        if measure:
            denoiser = _denoiser(net.to(device), {**sampler_settings, "compile": False})
            result["sampling_images_per_s"] = sampling_images_per_s(
                denoiser, shape, batch_size, device, sampler=sampler_settings["sampler"], schedule=schedule,
                sampler_kwargs=sampler_kwargs(sampler_settings), plan=reuse)
    if measure:
        denoiser = _denoiser(net.to(device), settings)
        mode = denoiser.compile_mode
        how = f"torch.compile {mode}, after 3 warm-up calls (compilation among them)" if mode else \
            "eager, after 3 warm-up calls"
        result.update(
            images_per_s=forward_images_per_s(denoiser, shape, batch_size, device),
            images_per_s_note=(f"network forward passes (one per sampler step), batch {batch_size}, "
                               f"{denoiser.precision}, {how}"),
            batch_size=batch_size, precision=denoiser.precision, channels_last=denoiser.channels_last,
            compile_mode=mode, device=gpus.device_name(device))
    _write_json(out, result)
