"""Command-line entry points, one per workflow stage: thin shells around the package.

Paths come from Snakemake; each stage's settings come as one JSON object (``--settings``), the
validated config section of that stage, so a changed setting reruns exactly the jobs it feeds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


def _json(ctx, param, value):
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise click.BadParameter(f"not valid JSON ({err})") from None


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _write_json(path, payload) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def _schedule(settings: dict):
    from igsm.diffusion import NoiseSchedule

    diffusion = settings.get("diffusion", {})
    return NoiseSchedule.linear(diffusion.get("num_steps", 1000), diffusion.get("beta_start", 1e-4),
                                diffusion.get("beta_end", 2e-2))


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


@main.command()
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Dataset .npz to write.")
@click.option("--cache-dir", required=True, type=click.Path(file_okay=False), help="Where archives go.")
@SETTINGS
def download(out, cache_dir, settings):
    """Fetch and parse a dataset (config 'datasets.<name>')."""
    from igsm.data import DownloadError, prepare_dataset

    try:
        data = prepare_dataset(settings, out, cache_dir)
    except (DownloadError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    images = data["images"]
    click.echo(f"{out}: {images.shape[0]} images of {images.shape[1]}×{images.shape[2]}×{images.shape[3]}")


@main.command()
@click.option("--model-id", required=True, help="Hub id (google/ddpm-cifar10-32) or local folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False))
def pretrained(model_id, out):
    """Fetch a pretrained dense diffusers U-Net and store it in the project's format."""
    from igsm.models import load_pretrained, save_model

    try:
        net = load_pretrained(model_id)
    except RuntimeError as err:
        raise click.ClickException(str(err)) from None
    save_model(net, out, extra={"source": model_id})


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@SETTINGS
def init(out, seed, settings):
    """A freshly initialised network from the experiment's 'architecture'."""
    import torch

    from igsm.models import build_unet, save_model

    torch.manual_seed(seed)
    save_model(build_unet(settings), out, extra={"source": f"random init (seed {seed})"})


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Network to train (dense init, or pruned student).")
@click.option("--teacher", "teacher_dir", type=click.Path(exists=True, file_okay=False),
              help="Frozen dense teacher (needed by kd/jm terms).")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Final EMA model folder.")
@click.option("--checkpoint-dir", required=True, type=click.Path(file_okay=False))
@click.option("--metrics", required=True, type=click.Path(dir_okay=False), help="JSONL per log step.")
@click.option("--summary", required=True, type=click.Path(dir_okay=False), help="JSON summary.")
@SETTINGS
@DEVICE
@THREADS
def train(model_dir, teacher_dir, data, out, checkpoint_dir, metrics, summary, settings, device, threads):
    """Train or finetune with the one training loop (settings: 'training' + 'objective')."""
    from igsm.data import load_images
    from igsm.models import count_parameters, load_model, save_model
    from igsm.training import Interrupted, TrainingOptions, train as train_loop

    _setup(threads)
    try:
        options = TrainingOptions.from_dict(settings["training"])
    except (KeyError, TypeError, ValueError) as err:
        raise click.ClickException(f"--settings: {err}") from None
    device = _device(device)
    net = load_model(model_dir)
    teacher = load_model(teacher_dir) if teacher_dir else None
    try:
        ema = train_loop(net, load_images(data), options, checkpoint_dir, metrics, teacher=teacher,
                         schedule=_schedule(settings), device=device)
    except Interrupted as err:
        click.echo(str(err), err=True)
        sys.exit(75)  # EX_TEMPFAIL: a rerun continues
    except FloatingPointError as err:
        raise click.ClickException(str(err)) from None
    save_model(ema.cpu(), out, extra={"trained_from": model_dir, "num_steps": options.num_steps})
    _write_json(summary, {"num_steps": options.num_steps, "num_parameters": count_parameters(ema),
                          "teacher": teacher_dir, "settings": settings})


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--criterion", required=True)
@click.option("--channel-ratio", required=True, type=float)
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--report", required=True, type=click.Path(dir_okay=False))
@SETTINGS
@DEVICE
@THREADS
def prune(model_dir, data, criterion, channel_ratio, out, report, settings, device, threads):
    """Structural pruning at one channel ratio (settings: the experiment's 'prune')."""
    import torch

    from igsm.data import load_images, to_model_range
    from igsm.models import load_model, save_model
    from igsm.pruning import prune as prune_net

    _setup(threads)
    images = load_images(data)
    generator = torch.Generator().manual_seed(settings.get("seed", 0))
    pick = torch.randperm(len(images), generator=generator)[: settings.get("num_images", 128)]
    x0 = to_model_range(images[pick.numpy()]).to(_device(device))
    try:
        pruned, result = prune_net(load_model(model_dir).to(x0.device), criterion=criterion,
                                   channel_ratio=channel_ratio, images=x0, schedule=_schedule(settings),
                                   thr=settings.get("thr", 0.05), seed=settings.get("seed", 0))
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    save_model(pruned.cpu(), out, extra={"pruned_from": model_dir, "pruning": result})
    _write_json(report, result)


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Images .npz (uint8).")
@click.option("--grid", type=click.Path(dir_okay=False), help="PNG grid of the first 64 images.")
@click.option("--first-seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--num-images", type=click.IntRange(min=1), required=True)
@SETTINGS
@DEVICE
@THREADS
def sample(model_dir, out, grid, first_seed, num_images, settings, device, threads):
    """Generate images with seeds first_seed .. first_seed+num_images−1 (settings: 'sample')."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from igsm.data import save_arrays, to_uint8
    from igsm.models import load_model
    from igsm.sampling import generate

    _setup(threads)
    device = _device(device)
    net = load_model(model_dir, device)
    cfg = net.config
    shape = (cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
    sampler = settings.get("sampler", "ddim")
    kwargs = {"num_steps": settings.get("num_steps", 100)}
    if sampler == "ddim":
        kwargs.update(eta=settings.get("eta", 0.0), spacing=settings.get("spacing", "uniform"),
                      clip_x0=settings.get("clip_x0", False))
    batch_size = settings.get("batch_size", 256)
    seeds = np.arange(first_seed, first_seed + num_images)
    chunks = []
    for start in tqdm(range(0, num_images, batch_size), desc="sample", unit="batch"):
        batch_seeds = seeds[start:start + batch_size]
        x = generate(net, sampler=sampler, seeds=batch_seeds, image_shape=shape,
                     schedule=_schedule(settings), device=device, **kwargs)
        chunks.append(to_uint8(x))
    images = np.concatenate(chunks)
    save_arrays(out, images=images, seeds=seeds)
    if grid:
        from igsm.plots import save_grid

        save_grid(images[:64], grid)


def _features(images, settings, device):
    from igsm import fid

    extractor = fid.feature_extractor(settings.get("mode", "clean"), device=_device(device))
    return fid.image_features(images, extractor=extractor), extractor.metadata


@main.command("fid-reference")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Statistics .npz.")
@SETTINGS
@DEVICE
@THREADS
def fid_reference(data, out, settings, device, threads):
    """Inception statistics of the training images (settings: 'fid')."""
    from igsm import fid
    from igsm.data import load_images

    _setup(threads)
    images = load_images(data)
    num = settings.get("num_reference") or len(images)
    if num > len(images):
        raise click.ClickException(f"fid.num_reference: {num} images asked, {data} holds {len(images)}")
    features, metadata = _features(images[:num], settings, device)
    fid.save_statistics(out, features, source=data, **metadata)


@main.command("fid")
@click.option("--samples", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--reference", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="FID JSON.")
@SETTINGS
@DEVICE
@THREADS
def fid_score(samples, reference, out, settings, device, threads):
    """FID of generated images against reference statistics (settings: 'fid')."""
    from igsm import fid
    from igsm.data import load_images

    _setup(threads)
    reference_stats = fid.load_statistics(reference)
    features, metadata = _features(load_images(samples), settings, device)
    try:
        score = fid.frechet_distance(fid.statistics(features, **metadata), reference_stats)
    except ValueError as err:
        raise click.ClickException(f"{reference}: {err}") from None
    _write_json(out, {"fid": score, "num_images": len(features), "samples": samples,
                      "reference": reference, "num_reference": reference_stats.num_images,
                      **metadata})


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSON with params, MACs.")
def efficiency(model_dir, out):
    """Parameter and MAC counts of a model (one image, one network call)."""
    from igsm.models import load_model
    from igsm.pruning import count_params_macs

    net = load_model(model_dir)
    params, macs = count_params_macs(net, net.config["sample_size"], net.config["in_channels"])
    _write_json(out, {"params": params, "macs": macs, "model": model_dir})
