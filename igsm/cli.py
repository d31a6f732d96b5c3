"""The command line: a table of commands, each a name, its arguments and the stage function
(igsm.stages) it runs. Nothing else lives here: no algorithm, no default of a setting.

Paths come from Snakemake; each stage's settings come as one JSON object (``--settings``), the
validated config section of that stage, so a changed setting reruns exactly the jobs it feeds.
Stage modules are imported when their command runs: the CLI itself starts without torch.
"""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass

import click

from igsm import reuse_methods  # torch-free: the method names of `reuse-plan --method`
from igsm.schema import section_defaults
from igsm.stages.common import StageError
from igsm.stages.settings import ClipScoreSettings, FidSettings, NetworkSettings, PruneSettings


def _json(ctx, param, value):
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise click.BadParameter(f"not valid JSON ({err})") from None


def _shard(ctx, param, value):
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected INDEX/COUNT, e.g. 0/8") from None
    if count < 1 or not 0 <= index < count:
        raise click.BadParameter(f"{value!r}: INDEX must be in 0..COUNT−1")
    return index, count


def _option(*names, **spec) -> click.Option:
    return click.Option(list(names), **spec)


def _file(exists=False, **spec):
    return click.Path(exists=exists, dir_okay=False, **spec)


def _folder(exists=False):
    return click.Path(exists=exists, file_okay=False)


SETTINGS = _option("--settings", callback=_json, default="{}", show_default=True,
                   help="This stage's config section, as JSON.")
DEVICE = _option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
THREADS = _option("--threads", type=click.IntRange(min=1), default=None,
                  help="CPU threads for torch (default: torch's choice).")
RUNS_ON = (SETTINGS, DEVICE, THREADS)
# The tiny random models written offline (tiny-text-encoder, tiny-clip): what they share.
TINY_MODEL_OPTIONS = (
    _option("--out", required=True, type=_folder(), help="Folder to write (transformers' save_pretrained)."),
    _option("--prompt", "prompts", required=True, multiple=True,
            help="A prompt whose words the tokenizer keeps whole (repeat: one per label)."),
    _option("--layers", type=click.IntRange(min=1), default=2, show_default=True),
    _option("--heads", type=click.IntRange(min=1), default=2, show_default=True),
    _option("--seed", type=int, default=0, show_default=True))
MODEL = _option("--model", "model_dir", required=True, type=_folder(exists=True))
DATA = _option("--data", required=True, type=click.Path(exists=True),
               help="Image store (results/data/<dataset>/train).")
FID_BATCH = _option("--batch-size", type=click.IntRange(min=1), default=200, show_default=True,
                    help="Images per Inception call.")
NEAREST_K = _option("--nearest-k", type=click.IntRange(min=1), default=lambda: section_defaults("prdc")["nearest_k"],
                    show_default="the schema's prdc.nearest_k", help="k of PRDC's k-nearest-neighbour balls.")
GRID = _option("--grid", type=_file(), help="PNG grid of the first 64 images.")
# Mirrors igsm.sampling.PRECISIONS (not imported here: the CLI starts without torch).
PRECISION_CHOICES = ("fp32", "tf32", "bf16")


@dataclass(frozen=True)
class Command:
    name: str
    stage: str  # "<module>:<function>" of igsm.stages
    help: str
    params: tuple[click.Parameter, ...]
    settings: type | None = None  # the typed settings --settings is read into (igsm.stages.settings)


COMMANDS = (
    Command("check-config", "check_config:check_config",
            "Check workflow config files as the workflow does before its first job (each file read "
            "strictly, the schema, then every cross-field check), every error at once, one line each naming "
            "its key (IGSM_CONFIG_DETAIL=1: with jsonschema's full report), or the file and line of a YAML "
            "error. Several files are merged in order, as `snakemake --configfile A B` does (needs snakemake "
            "installed).",
            (click.Argument(["files"], nargs=-1, required=True, type=_file()),)),
    Command("download", "download:download",
            "Fetch and parse a dataset (config 'datasets.<name>') into an image store.",
            (_option("--out", required=True, type=click.Path(), help="Image store (folder) to write."),
             _option("--cache-dir", required=True, type=_folder(), help="Where archives go."), SETTINGS)),
    Command("autoencoder", "latents:autoencoder",
            "Store a latent experiment's autoencoder (settings: its 'autoencoders.<name>' entry: a pretrained "
            "diffusers AutoencoderKL, hub id or local folder, or an architecture with random weights) with its "
            "identity (source, scale factor, weights' sha256).",
            (_option("--out", required=True, type=_folder()),
             _option("--cache-dir", type=_folder(), default=None, help="The hub's download cache."), SETTINGS)),
    Command("encode", "latents:encode",
            "Encode an image store into a store of the autoencoder's latents (posterior means × scale factor, "
            "float16), once, for a latent experiment's training and pruning.",
            (DATA, _option("--autoencoder", "autoencoder_dir", type=_folder(exists=True), required=True,
                           help="The stored autoencoder (results/autoencoders/<name>/model)."),
             _option("--out", required=True, type=click.Path(), help="Latent store (folder)."),
             _option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
                     help="Images per autoencoder call."), DEVICE, THREADS)),
    Command("pretrained", "dense:pretrained",
            "Fetch a pretrained dense model and store it in the project's format (settings: the "
            "experiment's 'architecture', whose family loads it; needed where the weights are plain state "
            "dicts, as U-ViT's; without it, a self-describing diffusers model: hub id or folder).",
            (_option("--model-id", required=True,
                     help="Hub id (google/ddpm-cifar10-32) or local folder; for a U-ViT architecture, a "
                          "reference checkpoint (.pth or .safetensors file, or URL)."),
             _option("--out", required=True, type=_folder()),
             _option("--cache-dir", type=_folder(), default=None,
                     help="Where a checkpoint given by URL is downloaded (U-ViT)."), SETTINGS)),
    Command("convert-checkpoint", "dense:convert_checkpoint",
            "Keep the tensors of a pickled checkpoint (a U-ViT .pth, a diffusers .bin) in a safetensors "
            "file, running nothing in its pickle: anything but tensors is left out and listed. For a file "
            "whose pickle asks for more than tensors, which dense.pretrained refuses; its weights are only "
            "as trustworthy as its source.",
            (click.Argument(["source"], type=_file(exists=True)), click.Argument(["target"], type=_file()))),
    Command("init", "dense:init",
            "A freshly initialised network from the experiment's 'architecture' (U-Net or U-ViT).",
            (_option("--out", required=True, type=_folder()),
             _option("--seed", type=int, default=0, show_default=True), SETTINGS)),
    Command("train", "train:train",
            "Train or finetune with the one training loop (settings: 'training' + 'objective').\n\n"
            "Exits with 75 (EX_TEMPFAIL) after SIGTERM/SIGUSR1, once a snapshot is written: rerun to resume.",
            (_option("--model", "model_dir", required=True, type=_folder(exists=True),
                     help="Network to train (dense init, or pruned student)."),
             _option("--teacher", "teacher_dir", type=_folder(exists=True),
                     help="Frozen dense teacher (needed by kd/jm terms)."),
             DATA,
             _option("--out", required=True, type=_folder(), help="Final EMA model folder."),
             _option("--checkpoint-dir", required=True, type=_folder()),
             _option("--metrics", required=True, type=_file(), help="JSONL per log step."),
             _option("--summary", required=True, type=_file(), help="JSON summary."),
             _option("--nproc-per-node", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Processes per node, one per GPU; more than one in all reruns this command "
                          "under torchrun (DDP; the batch is split between them)."),
             _option("--nnodes", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Nodes (> 1: inside a SLURM allocation, one torchrun per node through srun)."),
             *RUNS_ON)),
    Command("prune", "prune:prune",
            "Structural pruning at one channel ratio by the pruning method of CRITERION (settings: the "
            "experiment's 'prune'; its 'method', if set, must take the criterion).",
            (MODEL, DATA, _option("--criterion", required=True),
             _option("--channel-ratio", required=True, type=float),
             _option("--out", required=True, type=_folder()),
             _option("--report", required=True, type=_file()), *RUNS_ON), PruneSettings),
    Command("draw-prune-report", "prune:draw_report",
            "The picture a pruning method draws of its report (gradient flow: masks over the flow, final widths).",
            (_option("--report", "report_file", required=True, type=_file(exists=True),
                     help="A prune report (report.json)."),
             _option("--criterion", required=True, help="The criterion it was pruned with (names the method)."),
             _option("--out", required=True, type=_file(), help="PNG picture."))),
    Command("sample", "sample:sample",
            "Generate images first_seed … first_seed+num_images−1, or one shard of them (settings: 'sample')."
            "\n\nResumable: finished batches are kept in OUT.partial/ until OUT is written, and a rerun with "
            "the same model and settings does only the missing ones. Under torchrun, the processes share "
            "the batches (one GPU each) and rank 0 writes OUT.",
            (MODEL,
             _option("--out", required=True, type=_file(),
                     help="Images .npz: uint8 images, their seeds, JSON metadata."),
             GRID,
             _option("--first-seed", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Seed of the first image of the whole set; image k uses first_seed + k."),
             _option("--num-images", type=click.IntRange(min=1), required=True, help="Images in the whole set."),
             _option("--shard", default="0/1", show_default=True, callback=_shard,
                     help="INDEX/COUNT: make only shard INDEX of COUNT (images i·N/COUNT … (i+1)·N/COUNT − 1)."),
             _option("--precision", type=click.Choice(PRECISION_CHOICES), default=None,
                     help="fp32 (strict, TF32 off), tf32, or bf16 autocast. [default: sample.precision]"),
             _option("--compile/--no-compile", "compile_", default=None,
                     help="torch.compile the network. [default: sample.compile]"),
             _option("--channels-last/--no-channels-last", default=None,
                     help="channels_last memory format. [default: sample.channels_last]"),
             _option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Images per sampler batch. [default: sample.batch_size]"),
             _option("--micro-batch", type=click.IntRange(min=0), default=None,
                     help="Images per network call, 0 = batch size. [default: sample.micro_batch]"),
             _option("--nproc-per-node", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Processes, one per GPU; more than one reruns this command under torchrun."),
             _option("--plan", type=_file(exists=True), default=None,
                     help="A block-reuse gate table (igsm reuse-plan) the network follows."),
             *RUNS_ON)),
    Command("gather-samples", "sample_files:gather_samples",
            "Concatenate shard files in seed order, checking that every seed is there exactly once.",
            (click.Argument(["shards"], nargs=-1, required=True, type=_file(exists=True)),
             _option("--out", required=True, type=_file(), help="The whole set, .npz."), GRID,
             _option("--first-seed", type=click.IntRange(min=0), required=True),
             _option("--num-images", type=click.IntRange(min=1), required=True))),
    Command("export-png", "sample_files:export_png",
            "Write a samples file's images as PNG files (lossless: their FID equals the array's).",
            (_option("--samples", required=True, type=_file(exists=True)),
             _option("--out", required=True, type=_folder(),
                     help="Folder to create: one PNG per image, named by its seed."))),
    Command("fid-reference", "fid:fid_reference", "Inception statistics of the training images (settings: 'fid').",
            (DATA, _option("--out", required=True, type=_file(), help="Statistics .npz."), *RUNS_ON, FID_BATCH),
            FidSettings),
    Command("fid-statistics", "fid:fid_statistics",
            "Inception statistics of generated images (settings: 'fid' mode): the costly half of the FID.",
            (_option("--samples", required=True, type=_file(exists=True)),
             _option("--out", required=True, type=_file(), help="Statistics .npz."), *RUNS_ON, FID_BATCH), FidSettings),
    Command("fid", "fid:fid_score",
            "FID of generated images' statistics against reference statistics (settings: 'fid').\n\n"
            "Reads two statistics files only: a failure here never costs the Inception features again. With "
            "--prdc-out, also precision, recall, density and coverage of the features both files kept (as "
            "`igsm prdc`), in the same process.",
            (_option("--statistics", required=True, type=_file(exists=True),
                     help="Statistics .npz of the generated images (igsm fid-statistics)."),
             _option("--reference", required=True, type=_file(exists=True)),
             _option("--out", required=True, type=_file(), help="FID JSON."),
             _option("--prdc-out", type=_file(), default=None,
                     help="PRDC JSON to write too (both files must keep features: prdc.enabled)."),
             NEAREST_K, SETTINGS, THREADS), FidSettings),
    Command("clip-score", "clip_score:clip_score",
            "CLIP score of a text-conditioned model's samples against the prompt of each image's seed "
            "(torchmetrics' CLIPScore; settings: 'clip_score' + the experiment's 'conditioning').",
            (_option("--samples", required=True, type=_file(exists=True), help="Samples .npz (images, seeds)."),
             _option("--out", required=True, type=_file(), help="CLIP score JSON."), *RUNS_ON), ClipScoreSettings),
    Command("consistency", "consistency:consistency",
            "SSIM and PSNR of a model's samples to the dense model's samples of the same seeds (torchmetrics; "
            "Diff-Pruning's consistency).",
            (_option("--samples", required=True, type=_file(exists=True), help="Samples .npz of the model."),
             _option("--reference", required=True, type=_file(exists=True),
                     help="Samples .npz of the dense model, holding every seed of --samples."),
             _option("--out", required=True, type=_file(), help="Consistency JSON."),
             _option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Image pairs per metric call."), THREADS)),
    Command("prdc", "prdc:prdc",
            "Precision, recall, density and coverage (Naeem et al. 2020; the prdc package) of a model's samples "
            "against the FID reference images, from the Inception features their statistics files kept "
            "(prdc.enabled).",
            (_option("--statistics", required=True, type=_file(exists=True),
                     help="Statistics .npz of the generated images, with kept features (igsm fid-statistics)."),
             _option("--reference", required=True, type=_file(exists=True),
                     help="Reference statistics .npz with kept features (igsm fid-reference)."),
             _option("--out", required=True, type=_file(), help="PRDC JSON."),
             NEAREST_K, THREADS)),
    Command("reuse-plan", "reuse:reuse_plan",
            "The block-reuse gate table of METHOD for MODEL's sampler at MAC_FRACTION (igsm.reuse_methods): "
            "DiP-GO learns it on the sampler's own chains; deepcache and reuse-eps follow a rule.",
            (MODEL, _option("--method", required=True, type=click.Choice(reuse_methods.plan_methods())),
             _option("--mac-fraction", required=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     help="Share of the dense sampler's MACs still executed, averaged over the steps."),
             _option("--sample-settings", required=True, callback=_json,
                     help="JSON 'sample' settings (+ 'diffusion')."),
             _option("--learn-settings", callback=_json, default="{}", show_default=True,
                     help="JSON 'reuse.learn' settings (dipgo)."),
             _option("--out", required=True, type=_file(), help="The plan, JSON."),
             _option("--picture", type=_file(), default=None, help="PNG of the gate table."), DEVICE, THREADS)),
    Command("efficiency", "efficiency:efficiency",
            "Parameters and MACs (one image, one network call) and network throughput (settings: how the "
            "network runs, as in 'sample': precision, channels_last, compile, compile_mode).",
            (MODEL, _option("--out", required=True, type=_file(), help="JSON: params, MACs, images/s."),
             _option("--batch-size", type=click.IntRange(min=1),
                     default=lambda: section_defaults("efficiency")["batch_size"],
                     show_default="the schema's efficiency.batch_size", help="Images per timed network call."),
             _option("--throughput/--no-throughput", default=None,
                     help="Time network calls. [default: on a GPU only; on a CPU images_per_s is null]"),
             _option("--sampler-settings", callback=_json, default=None,
                     help="JSON 'sample' settings: also the sampler's MACs per image and, where throughput is "
                          "measured, whole sampling chains per second."),
             _option("--plan", type=_file(exists=True), default=None,
                     help="A block-reuse gate table the sampler follows (needs --sampler-settings)."),
             *RUNS_ON), NetworkSettings),
    Command("release", "release:release",
            "A released model's folder: the model's files, a Hugging Face model card (README.md, with model-index "
            "metadata) made from the workflow's JSON files and, where diffusers can express the network, diffusers' "
            "config.json and weights (settings: the release's row and context, as the workflow's release rule "
            "gives them).",
            (MODEL, _option("--out", required=True, type=_folder(), help="Release folder to write."),
             _option("--fid", type=_file(exists=True), default=None, help="The model's FID JSON."),
             _option("--efficiency", type=_file(exists=True), default=None, help="Its efficiency JSON."),
             _option("--summary", type=_file(exists=True), default=None, help="Its training summary JSON."),
             _option("--prune-report", type=_file(exists=True), default=None,
                     help="The prune report of its pruning."),
             _option("--settings", callback=_json, required=True, help="JSON: row, context, objective."))),
    Command("publish", "release:publish",
            "Upload a release folder to a Hugging Face Hub model repository (created if missing) with "
            "huggingface_hub; needs a token (HF_TOKEN or `hf auth login`) and the Hub (HF_ENDPOINT).",
            (_option("--folder", required=True, type=_folder(exists=True),
                     help="A release folder (results/release/<experiment>/<release>)."),
             _option("--repo-id", required=True, help="owner/name of the model repository."),
             _option("--private/--public", default=True, show_default=True,
                     help="Visibility of a repository this creates (an existing one keeps its own)."),
             _option("--revision", default=None, help="Branch to upload to (made if missing). [default: main]"),
             _option("--receipt", type=_file(), default=None,
                     help="JSON to write: repo id, commit url and oid, each file's sha256."))),
    Command("tiny-text-encoder", "text_encoder:tiny_text_encoder",
            "Write a random-initialised tiny CLIP text encoder and a tokenizer knowing the prompts' words, offline: "
            "a conditioning.text_encoder (kind text) for toy configs and tests, where no real one can be downloaded.",
            (*TINY_MODEL_OPTIONS,
             _option("--hidden-size", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Embedding width (the SD U-Net's cross_attention_dim)."))),
    Command("tiny-clip", "text_encoder:tiny_clip",
            "Write a random-initialised tiny CLIP model (text and vision towers) and its processor, whose tokenizer "
            "knows the prompts' words, offline: a clip_score.model for toy configs and tests (its scores measure "
            "the path, not the images).",
            (*TINY_MODEL_OPTIONS,
             _option("--hidden-size", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Width of both towers and of the embedding."),
             _option("--image-size", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Side the processor resizes and crops images to."),
             _option("--patch-size", type=click.IntRange(min=1), default=8, show_default=True))),
)


def run_stage(command: Command, **arguments) -> None:
    """Run a command's stage function with the parsed arguments (``--settings`` typed, where the
    command says how): its one-line summary, if any, to stdout; its StageError as a message and
    exit status, never a traceback."""
    if command.settings is not None:
        try:
            arguments["settings"] = command.settings.from_dict(arguments["settings"])
        except (TypeError, ValueError) as err:
            raise click.ClickException(f"--settings: {err}") from None
    module, function = command.stage.split(":")
    run = getattr(importlib.import_module(f"igsm.stages.{module}"), function)
    try:
        summary = run(**arguments)
    except StageError as err:
        if err.exit_code == 1:
            raise click.ClickException(str(err)) from None
        click.echo(str(err), err=True)
        sys.exit(err.exit_code)
    if summary:
        click.echo(summary)


@click.group()
def main():
    """Prune diffusion models, finetune them with IGSM, sample and score them."""


for _command in COMMANDS:
    main.add_command(click.Command(
        _command.name, params=list(_command.params), help=_command.help,
        callback=lambda _run=_command, **arguments: run_stage(_run, **arguments)))
