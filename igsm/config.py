"""The workflow's config beyond its schema: every check that the config alone allows, made before
any job runs, each error naming its key (``experiments.<name>.…``), and the YAML reading behind
``igsm check-config``.

The schema (schemas/config.schema.yaml) types and defaults every key; this module checks what
JSON Schema cannot: references between sections, sizes and channels that must agree, batch sizes
that must split over the GPUs, counts that cannot exceed a dataset of known size, local paths that
must exist. The Snakefile calls :func:`check_config` on the validated config; ``igsm check-config``
does the same for a file, with the line of a YAML syntax error.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import yaml

from igsm.data import (CIFAR10_SHA256, DEBIAN_FASHION_MNIST_SHA256, FASHION_MNIST_FILES, FASHION_MNIST_SHA256,
                       check_dataset_spec)
from igsm.models import architecture_family, looks_like_local_path

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"

SPLIT_SIZES = {"cifar10": {"train": 50_000, "test": 10_000},
               "fashion-mnist": {"train": 60_000, "test": 10_000}}
CHANNELS = {"cifar10": 3, "fashion-mnist": 1, "sklearn-digits": 1, "lsun": 3}
SKLEARN_DIGITS_SIZE = 1797
# diffusers' UNet2DModel defaults, for architecture keys a config leaves out (U-ViT's in_chans too).
UNET_DEFAULT_CHANNELS = 3
# Each forward process's own keys under experiments.<name>.diffusion (schema: defaults per process).
PROCESS_KEYS = {"ddpm": ("num_steps", "beta_start", "beta_end"), "vpsde": ("beta_min", "beta_max")}
UVIT_CHECKPOINT_SUFFIXES = (".pth", ".pt")
CHECKPOINT_URL_SCHEMES = ("http://", "https://", "file://")


class ConfigError(ValueError):
    """One or more config errors, one per line, each starting with its key."""


def dataset_channels(spec: dict) -> int:
    return CHANNELS.get(spec["source"], spec.get("channels", 3))


def dataset_size(spec: dict) -> int | None:
    """Number of images of a dataset whose content the config pins down (official archives or a
    known copy of them; scikit-learn's digits), else None."""
    source = spec["source"]
    split = spec.get("split", "train")
    if source == "sklearn-digits":
        return SKLEARN_DIGITS_SIZE
    if source == "cifar10" and spec.get("sha256", CIFAR10_SHA256).lower() in ("", CIFAR10_SHA256):
        return SPLIT_SIZES[source][split]
    if source == "fashion-mnist":
        files = FASHION_MNIST_FILES[split]
        digests = spec.get("sha256") or FASHION_MNIST_SHA256
        if isinstance(digests, dict) and all(
                str(digests.get(f, "")).lower() in (FASHION_MNIST_SHA256[f], DEBIAN_FASHION_MNIST_SHA256[f])
                for f in files):
            return SPLIT_SIZES[source][split]
    return None


def training_job(config: dict, stage: str, exp: str | None) -> dict:
    """resources.<stage> of a training stage with experiments.<exp>.resources.<stage> laid over it."""
    merged = dict(config["resources"][stage])
    if exp is not None:
        merged.update({k: v for k, v in config["experiments"][exp]["resources"][stage].items() if v is not None})
    if merged["cpus_per_gpu"] and merged["gpu"]:
        merged["threads"] = merged["cpus_per_gpu"] * merged["gpu"]
    return merged


def apply_scale(config: dict) -> None:
    """The config's ``scale`` applied in place: every training's num_steps and every sample
    num_images multiplied by its factor (rounded, at least 1; sample shards at most one per image)."""
    scale = config.get("scale") or {}
    steps, samples = scale.get("steps", 1), scale.get("samples", 1)
    if steps == 1 and samples == 1:
        return
    for exp in config["experiments"].values():
        for stage in ("dense", "finetune"):
            training = (exp.get(stage) or {}).get("training")
            if training and "num_steps" in training:
                training["num_steps"] = max(1, round(training["num_steps"] * steps))
        sample = exp.get("sample") or {}
        if "num_images" in sample:
            sample["num_images"] = max(1, round(sample["num_images"] * samples))
            if "num_shards" in sample:
                sample["num_shards"] = min(sample["num_shards"], sample["num_images"])


def check_config(config: dict) -> None:
    """Raise ConfigError listing every problem of a schema-validated config (defaults filled)."""
    errors = []
    datasets, objectives, experiments = config["datasets"], config["objectives"], config["experiments"]
    for name, spec in datasets.items():
        try:
            check_dataset_spec(name, spec)
        except ValueError as err:
            errors.append(str(err))
    for name, spec in objectives.items():
        key = f"objectives.{name}"
        if not any(spec["weights"].values()):
            errors.append(f"{key}.weights: every weight is 0; give at least one term a weight")
        if spec["jacobian_method"] != "double_backward" and spec["projection"] != "vjp":
            errors.append(f"{key}.jacobian_method: {spec['jacobian_method']!r} needs projection 'vjp'")
        window = spec.get("jacobian_timesteps")
        if window is not None and not window[0] < window[1]:
            errors.append(f"{key}.jacobian_timesteps: {window} is not a range [lo, hi) with lo < hi")
    for name, exp in experiments.items():
        errors += _experiment_errors(config, name, exp)
        errors += _pretrained_folder_errors(config, name, exp)
    if errors:
        raise ConfigError("\n".join(errors))


def _experiment_errors(config: dict, name: str, exp: dict) -> list[str]:
    key = f"experiments.{name}"
    experiments = config["experiments"]
    if exp["dataset"] not in config["datasets"]:
        return [f"{key}.dataset: unknown dataset {exp['dataset']!r}; defined: {sorted(config['datasets'])}"]
    errors = []
    data = config["datasets"][exp["dataset"]]
    dense = exp["dense"]
    sources = [k for k in ("pretrained", "training", "from_experiment") if dense.get(k)]
    if len(sources) != 1:
        errors.append(f"{key}.dense: give exactly one of 'pretrained', 'training' or 'from_experiment' "
                      f"(got {sources or 'none'})")
    owner = dense["from_experiment"]
    if owner:
        if owner not in experiments or owner == name or experiments[owner]["dense"]["from_experiment"]:
            errors.append(f"{key}.dense.from_experiment: {owner!r} is not another experiment with its own "
                          f"dense model; experiments: {sorted(experiments)}")
        elif experiments[owner]["dataset"] != exp["dataset"]:
            errors.append(f"{key}.dense.from_experiment: {owner!r} trains on dataset "
                          f"{experiments[owner]['dataset']!r}, this experiment on {exp['dataset']!r}")
    pretrained = dense["pretrained"]
    arch = exp["architecture"]
    family = architecture_family(arch)
    if pretrained and family == "uvit":
        if not pretrained.startswith(CHECKPOINT_URL_SCHEMES) and not Path(pretrained).expanduser().is_file():
            errors.append(f"{key}.dense.pretrained: U-ViT checkpoint file {pretrained} does not exist "
                          f"(give a local .pth file or an http(s):// / file:// URL)")
    elif pretrained and pretrained.endswith(UVIT_CHECKPOINT_SUFFIXES):
        errors.append(f"{key}.architecture: dense.pretrained {pretrained} is a U-ViT checkpoint (a plain "
                      f"state dict); give U-ViT's architecture (img_size, patch_size, …) to build it")
    elif pretrained and looks_like_local_path(pretrained) and not Path(pretrained).expanduser().is_dir():
        errors.append(f"{key}.dense.pretrained: local folder {pretrained} does not exist")
    if "training" in dense and not arch:
        errors.append(f"{key}.architecture: needed to train the dense model")
    if exp["untrained_baseline"] and not arch:
        errors.append(f"{key}.architecture: needed by untrained_baseline")
    if arch:
        # U-ViT's keys (igsm.uvit: one in_chans for input and output) or diffusers U-Net's.
        size_key, channel_keys = ("img_size", ("in_chans",)) if family == "uvit" else \
            ("sample_size", ("in_channels", "out_channels"))
        size = arch.get(size_key)
        if size is not None and size != data["image_size"]:
            errors.append(f"{key}.architecture.{size_key}: {size}, but datasets.{exp['dataset']}.image_size "
                          f"is {data['image_size']}; the network would train on one size and sample another")
        channels = dataset_channels(data)
        for side in channel_keys:
            value = arch.get(side, UNET_DEFAULT_CHANNELS)
            if value != channels:
                errors.append(f"{key}.architecture.{side}: {value}, but dataset {exp['dataset']!r} "
                              f"({data['source']}) has {channels} channel(s)")
    errors += _process_errors(config, name, exp, family)
    runs = exp["finetune"]["runs"]
    if runs and "training" not in exp["finetune"]:
        errors.append(f"{key}.finetune.training: needed by finetune.runs")
    for i, run in enumerate(runs):
        for objective in run["objectives"]:
            if objective not in config["objectives"]:
                errors.append(f"{key}.finetune.runs[{i}].objectives: unknown objective {objective!r}; "
                              f"defined under 'objectives': {sorted(config['objectives'])}")
    for stage, training in (("dense", dense.get("training")), ("finetune", exp["finetune"].get("training"))):
        if training is None or (stage == "finetune" and not runs):
            continue
        edges = training["diagnostic_timesteps"]
        if any(b <= a for a, b in zip(edges, edges[1:])):
            errors.append(f"{key}.{stage}.training.diagnostic_timesteps: {edges} is not increasing")
        job = training_job(config, stage, name)
        processes = max(1, job["gpu"]) * job["nodes"]
        if training["batch_size"] % processes:
            errors.append(f"{key}.{stage}.training.batch_size: {training['batch_size']} does not split over "
                          f"the {processes} training processes (resources.{stage}: gpu × nodes); the "
                          "global batch is divided evenly between GPUs")
    sample = exp["sample"]
    errors += _reuse_errors(key, exp)
    if sample["num_shards"] > sample["num_images"]:
        errors.append(f"{key}.sample.num_shards: {sample['num_shards']} shards for {sample['num_images']} "
                      "images; at most one shard per image")
    supplied = exp["fid"]["reference_statistics"]
    if supplied and not (supplied.endswith(".npz") and Path(supplied).expanduser().is_file()):
        errors.append(f"{key}.fid.reference_statistics: {supplied} is not an existing .npz file (give "
                      "the path of a file holding 'mu' and 'sigma', or leave it empty)")
    known = dataset_size(data)
    if known is not None:
        for path, value in ((f"{key}.fid.num_reference", exp["fid"]["num_reference"]),
                            (f"{key}.prune.num_images", exp["prune"]["num_images"])):
            if value > known:
                errors.append(f"{path}: {value} images asked, dataset {exp['dataset']!r} holds {known}")
    return errors


def _pretrained_folder_errors(config: dict, name: str, exp: dict) -> list[str]:
    """A local folder as a U-Net experiment's dense.pretrained, against the experiment: the network
    its config file declares (architecture.json or diffusers' config.json) must be a U-Net taking
    the dataset's image size and channels. Hub models are checked by the job that fetches them
    (igsm pretrained --expect); U-ViT experiments take a checkpoint file, checked above."""
    from igsm.models import local_pretrained_declaration, pretrained_mismatches

    pretrained, key = exp["dense"]["pretrained"], f"experiments.{name}.dense.pretrained"
    family = architecture_family(exp["architecture"])
    if not pretrained or family == "uvit" or not Path(pretrained).expanduser().is_dir() \
            or exp["dataset"] not in config["datasets"]:
        return []
    folder = Path(pretrained).expanduser()
    try:
        declared = local_pretrained_declaration(folder)
    except ValueError as err:
        return [f"{key}: {err}"]
    if declared is None:
        return [f"{key}: local folder {folder} holds no model: neither a diffusers U-Net (config.json or "
                f"unet/config.json) nor a model written by the workflow (architecture.json)"]
    data = config["datasets"][exp["dataset"]]
    problems = pretrained_mismatches(declared, family, exp["dataset"], data["image_size"], dataset_channels(data))
    return [f"{key}: {problem}" for problem in problems]


def pruned_model_name(criterion: str, ratio: float) -> str:
    """The name of a pruned model in result paths: '<criterion>-cr<ratio>'."""
    return f"{criterion}-cr{float(ratio):g}"


def scored_model_names(exp: dict) -> list[str]:
    """The models an experiment samples and scores, bar block-reuse variants: dense, untrained
    (with untrained_baseline), '<criterion>-cr<ratio>/<objective>' per finetuning run."""
    names = ["dense"] + (["untrained"] if exp["untrained_baseline"] else [])
    for run in exp["finetune"]["runs"]:
        pruned = pruned_model_name(run.get("criterion", exp["prune"]["criterion"]), run["channel_ratio"])
        names += [f"{pruned}/{objective}" for objective in run["objectives"]]
    return names


def _reuse_errors(key: str, exp: dict) -> list[str]:
    reuse, sample = exp["reuse"], exp["sample"]
    if not reuse["models"]:
        return []
    errors = []
    known = scored_model_names(exp)
    for model in reuse["models"]:
        if model not in known or model == "untrained":
            errors.append(f"{key}.reuse.models: {model!r} is not a scored model of this experiment; "
                          f"choose among {[m for m in known if m != 'untrained']}")
    if sample["compile"]:
        errors.append(f"{key}.sample.compile: block reuse (reuse.models) runs the network eagerly; "
                      "set compile: false")
    if "fewer-steps" in reuse["methods"]:
        for fraction in reuse["mac_fractions"]:
            if sample["num_steps"] * fraction < 1:
                errors.append(f"{key}.reuse.mac_fractions: {fraction} of {sample['num_steps']} sampler "
                              "steps is less than one step (method fewer-steps)")
    return errors


def _process_errors(config: dict, name: str, exp: dict, family: str) -> list[str]:
    """The forward process against what it must agree with: its own keys, the sampler, the
    process a pretrained teacher was trained on, and a shared teacher's process."""
    key = f"experiments.{name}.diffusion"
    diffusion = exp["diffusion"]
    process = diffusion["process"]
    errors = [f"{key}.{k}: a key of process {other!r}, but process is {process!r} (it takes "
              f"{', '.join(PROCESS_KEYS[process])})"
              for other, keys in PROCESS_KEYS.items() if other != process for k in keys if k in diffusion]
    if exp["sample"]["sampler"] == "euler-maruyama" and process != "vpsde":
        errors.append(f"{key}.process: {process!r}, but sample.sampler 'euler-maruyama' integrates the "
                      f"VP-SDE; set process: vpsde (a network trained on it), or sampler: ddim")
    if exp["dense"]["pretrained"]:
        # A teacher is finetuned on the process it learned: the released U-Nets (diffusers) are
        # DDPM models, U-ViT's released checkpoints VP-SDE ones (t ~ U(0, 1), input t·999).
        expected = "vpsde" if family == "uvit" else "ddpm"
        if process != expected:
            what = "U-ViT's released checkpoints were trained on the VP-SDE" if family == "uvit" else \
                "pretrained diffusers U-Nets are DDPM models"
            errors.append(f"{key}.process: {process!r}, but {what}; set process: {expected}")
    owner = exp["dense"]["from_experiment"]
    if owner in config["experiments"] and owner != name:
        theirs = config["experiments"][owner]["diffusion"]
        if theirs != diffusion:
            errors.append(f"{key}: {diffusion}, but the dense model of experiments.{owner} (dense."
                          f"from_experiment) was trained with {theirs}; a student learns its teacher's process")
    return errors


def check_writable(folder: str | os.PathLike) -> None:
    """The workflow writes only under ``folder`` (results/): say so now if it cannot."""
    path = Path(folder).resolve()
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{existing}: not writable, and the workflow writes its results under {path}; "
                          "run it from a folder you can write to (snakemake -d DIR), or fix the permissions")


def load_config_file(path: str | os.PathLike) -> dict:
    """A YAML config file; a syntax error names the file, line and column."""
    import yaml

    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror})") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise ConfigError(f"{path}: not valid YAML at {where}: {err.problem or err.context}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (datasets:, objectives:, experiments:)")
    return config


@functools.cache
def schema_defaults(definition: str) -> dict:
    """The defaults the schema gives the keys of ``$defs.<definition>``: the one copy of them that
    code filling a partial section (igsm.training.TrainingOptions.from_dict) reads."""
    schema = yaml.safe_load(SCHEMA.read_text())
    properties = schema["$defs"][definition]["properties"]
    return {key: spec["default"] for key, spec in properties.items() if "default" in spec}


def validate(config: dict) -> None:
    """The schema's checks with its defaults filled in, as the Snakefile's ``validate`` does."""
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate as snakemake_validate

    try:
        snakemake_validate(config, str(SCHEMA))
    except WorkflowError as err:
        raise ConfigError(str(err)) from None
    apply_scale(config)
    check_config(config)
