"""The workflow's config beyond its schema: every check that the config alone allows, made before
any job runs, each error naming its key (``experiments.<name>.…``), and the YAML reading behind
``igsm check-config``.

The schema (schemas/config.schema.yaml) types and defaults every key; this module checks what
JSON Schema cannot: references between sections, sizes and channels that must agree, batch sizes
that must split over the GPUs, counts that cannot exceed a dataset of known size, local paths that
must exist. The Snakefile re-reads each config file with :func:`load_config_file` (duplicate
keys, alias bombs), checks the schema with :func:`validate_schema` (every error at once, one short
line each) and the rest with :func:`check_config`; ``igsm check-config`` does the same for files.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import reprlib
import sys
from pathlib import Path

import yaml

from igsm import conditioning, latents, plugins, pruning, reuse_methods
from igsm.data import (CIFAR10_SHA256, DEBIAN_FASHION_MNIST_SHA256, FASHION_MNIST_FILES, FASHION_MNIST_SHA256,
                       check_dataset_spec)
from igsm.data.sources import is_captioned, with_defaults
from igsm.families import (FAMILY_KEY, Family, assumed_family, contradicting_keys, family_named,
                            family_of_architecture, names)
from igsm.hub import looks_like_local_path
from igsm.plan import release_repo_name, released_models, scored_model_names
from igsm.schema import schema_file


SPLIT_SIZES = {"cifar10": {"train": 50_000, "test": 10_000},
               "fashion-mnist": {"train": 60_000, "test": 10_000}}
CHANNELS = {"cifar10": 3, "fashion-mnist": 1, "sklearn-digits": 1, "lsun": 3, "mscoco": 3}
SKLEARN_DIGITS_SIZE = 1797
# Each forward process's own keys under experiments.<name>.diffusion (schema: defaults per process).
PROCESS_KEYS = {"ddpm": ("num_steps", "beta_start", "beta_end", "beta_schedule"), "vpsde": ("beta_min", "beta_max")}
# Values (scalars, lists, mappings) a config file may hold once its YAML aliases are expanded: the
# paper config has ~1,200. An alias bomb (aliases of aliases, 10^9 values from 1 kB) is refused
# before anything walks it.
MAX_CONFIG_VALUES = 100_000
MERGE_TAG = "tag:yaml.org,2002:merge"  # the key << of a YAML merge (<<: *name)
# Images the FID of a model needs (a covariance): sample.num_images after `scale`.
FID_MIN_IMAGES = 2
# IGSM_CONFIG_DETAIL=1: each schema error also with jsonschema's full report (schema and value).
DETAIL_VARIABLE = "IGSM_CONFIG_DETAIL"
# The workflow's rules (rules/*.smk, Snakefile; tests/test_config.py checks this list against
# `snakemake --list-rules`): each is a target name, as are the paper's tables (table1 …), each
# dataset's dataset_<name> and 'all', the combined table results/tables/all.md beside each
# experiment's results/tables/<experiment>.md. A config name equal to one of them is refused: an
# experiment 'all' would have two rules write results/tables/all.md, and `snakemake table1` could
# not mean an experiment table1.
WORKFLOW_RULES = (
    "all_results", "all_sample_pngs", "all_tables", "autoencoder", "clip_score", "combined_table", "consistency",
    "dense_pretrained", "dense_pretrained_uvit", "dense_trained", "download", "efficiency", "encode", "fid",
    "fid_prdc", "fid_reference", "fid_statistics", "finetune", "model_cards", "paper_figure", "paper_samples",
    "paper_table", "prune", "prune_report_picture", "publish", "publish_models", "release", "reuse_plan",
    "reuse_published_table", "sample", "sample_gather", "sample_png", "tables", "untrained",
    "variant_metadata",
)


class ConfigError(ValueError):
    """One or more config errors, one per line, each starting with its key."""


def dataset_channels(spec: dict) -> int:
    return CHANNELS.get(spec["source"], with_defaults(spec)["channels"])


def dataset_size(spec: dict) -> int | None:
    """Number of images of a dataset whose content the config pins down (official archives or a
    known copy of them; scikit-learn's digits), else None."""
    source = spec["source"]
    split = with_defaults(spec)["split"]
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
    num_images multiplied by its factor (rounded; steps at least 1, sample shards at most one per
    image). :func:`check_config` then refuses, naming ``scale.samples``, an experiment left with
    fewer images than its FID needs."""
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
            sample["num_images"] = round(sample["num_images"] * samples)
            if "num_shards" in sample:
                sample["num_shards"] = max(1, min(sample["num_shards"], sample["num_images"]))


def check_config(config: dict) -> None:
    """Raise ConfigError listing every problem of a schema-validated config (defaults filled)."""
    errors = []
    datasets, objectives, experiments = config["datasets"], config["objectives"], config["experiments"]
    targets = target_names(config)
    for section in ("datasets", "objectives", "experiments"):
        errors += [f"{section}.{name}: {name!r} is already {targets[name]}; choose another name"
                   for name in config[section] if name in targets]
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
    for name, spec in config["autoencoders"].items():
        given = [k for k in ("pretrained", "architecture") if spec[k]]
        if len(given) != 1:
            errors.append(f"autoencoders.{name}: give exactly one of 'pretrained' or 'architecture' (got "
                          f"{given or 'none'})")
    errors += name_families(config)
    for name, exp in experiments.items():
        if FAMILY_KEY not in exp["architecture"]:  # an unknown family, reported above
            continue
        errors += _experiment_errors(config, name, exp)
        errors += _pretrained_folder_errors(config, name, exp)
    errors += publish_errors(config)
    if errors:
        raise ConfigError("\n".join(sorted(errors)))


def publish_errors(config: dict) -> list[str]:
    """publish.repo_prefix against the Hub's rules for repository ids (huggingface_hub's own check):
    every release's whole id (prefix + '<experiment>-<release>', igsm.plan), before any job, so that
    no upload fails on a name after the others went through. Nothing to check while it is empty."""
    prefix = config.get("publish", {}).get("repo_prefix", "")
    if not prefix:
        return []
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    errors = []
    for name, exp in config["experiments"].items():
        for release in released_models(exp, config["objectives"]):
            repo_id = prefix + release_repo_name(name, release)
            try:
                validate_repo_id(repo_id)
            except HFValidationError as err:
                errors.append(f"publish.repo_prefix: {prefix!r} makes the repo id {repo_id!r} for "
                              f"experiments.{name}'s release {release}, which the Hub refuses ({err})")
    return errors


def name_families(config: dict) -> list[str]:
    """Each experiment's model family (``experiments.<name>.architecture.family``, igsm.families)
    against its architecture's keys: errors for a family that its keys contradict (family unet with
    U-ViT's img_size). A config written before the key existed (none given) gets the family its keys
    imply, the old reading (igsm.families.assumed_family), written into the config with one warning
    per experiment naming the key: this migration path is the only place a family is guessed."""
    errors = []
    for name, exp in config["experiments"].items():
        key, arch = f"experiments.{name}.architecture.{FAMILY_KEY}", exp["architecture"]
        if FAMILY_KEY not in arch:
            family = assumed_family(arch)
            print(f"warning: {key} is not set; assuming {family.name!r} ({family.title}) from the "
                  f"architecture's keys; set it (valid: {', '.join(names())}).", file=sys.stderr)
            # A new dict: YAML merges (<<: *exp) share one architecture between experiments.
            exp["architecture"] = {**arch, FAMILY_KEY: family.name}
            continue
        try:
            family = family_named(arch[FAMILY_KEY])
        except ValueError as err:
            errors.append(f"{key}: {err}")
            exp["architecture"] = {k: v for k, v in arch.items() if k != FAMILY_KEY}  # not checked further
            continue
        for other, keys in contradicting_keys(family, arch).items():
            errors.append(f"{key}: {family.name!r}, but the architecture has {family_named(other).title}'s "
                          f"key(s) {', '.join(keys)}; set family: {other}, or give {family.title}'s keys")
    return errors


def target_names(config: dict) -> dict[str, str]:
    """{name: what it is} of the workflow's target names (WORKFLOW_RULES, the paper's tables, the
    datasets' dataset_<name>, the combined table 'all'): no dataset, objective or experiment may
    take one."""
    from igsm.paper.tables import table_names

    return {**{rule: f"the name of the workflow's rule {rule}" for rule in WORKFLOW_RULES},
            **{table: f"the target of the paper's {table}" for table in table_names()},
            **{f"dataset_{name}": f"the target of datasets.{name}" for name in config["datasets"]},
            "all": "the combined table's name (results/tables/all.md)"}


def _experiment_errors(config: dict, name: str, exp: dict) -> list[str]:
    key = f"experiments.{name}"
    if exp["dataset"] not in config["datasets"]:
        return [f"{key}.dataset: unknown dataset {exp['dataset']!r}; defined: {sorted(config['datasets'])}"]
    errors = _dense_source_errors(config, name, exp)
    family = family_of_architecture(exp["architecture"])
    errors += _architecture_errors(config, name, exp, family)
    errors += _process_errors(config, name, exp, family)
    errors += _finetune_errors(config, name, exp)
    errors += _pruning_errors(key, exp)
    errors += _reuse_errors(key, exp)
    errors += _compare_samplers_errors(key, exp)
    errors += _sample_and_fid_errors(config, name, exp)
    errors += _conditioning_errors(config, key, exp, family)
    errors += _clip_score_errors(key, exp)
    errors += _prdc_errors(config, key, exp)
    errors += _latent_errors(config, key, exp)
    return errors


def _prdc_errors(config: dict, key: str, exp: dict) -> list[str]:
    """PRDC (prdc.enabled) reads features the FID reference job keeps of the reference images: none
    beside a supplied reference file (mu and sigma only); and each set needs nearest_k + 2 features
    (the prdc package's least, igsm.fid.prdc_min_features), where the config fixes the set's size."""
    prdc = exp["prdc"]
    if not prdc["enabled"]:
        return []
    if exp["fid"]["reference_statistics"]:
        return [f"{key}.prdc.enabled: true beside fid.reference_statistics: a file of mu and sigma keeps no "
                "features of its images, which PRDC needs; leave fid.reference_statistics empty (the reference "
                "computed from the dataset's images) or set prdc.enabled: false"]
    reference = exp["fid"].get("reference_dataset") or exp["dataset"]
    reference_size = exp["fid"]["num_reference"] or (dataset_size(config["datasets"][reference])
                                                     if reference in config["datasets"] else None)
    sizes = {"prdc.num_features": prdc["num_features"], "sample.num_images": exp["sample"]["num_images"],
             "fid.num_reference": reference_size}
    least = prdc["nearest_k"] + 2  # igsm.fid.prdc_min_features (not imported here: igsm.fid pulls torch)
    return [f"{key}.prdc.nearest_k: {prdc['nearest_k']} needs at least {least} features in each set, "
            f"but {name} is {size}; lower prdc.nearest_k or raise {name}"
            for name, size in sizes.items() if size is not None and size < least]


def _latent_errors(config: dict, key: str, exp: dict) -> list[str]:
    """A latent experiment's autoencoder exists, is given one way, takes the dataset's images (whose
    side its downsampling divides), and no training flips its latents."""
    name = exp["autoencoder"]
    if not name:
        return []
    if name not in config["autoencoders"]:
        return [f"{key}.autoencoder: unknown autoencoder {name!r}; defined under 'autoencoders': "
                f"{sorted(config['autoencoders'])}"]
    errors = []
    for stage in ("dense", "finetune"):
        if exp[stage].get("training", {}).get("hflip"):
            errors.append(f"{key}.{stage}.training.hflip: a latent experiment trains on latents encoded once, "
                          "and a flipped latent is not the latent of the flipped image; set it false")
    facts = latents.autoencoder_facts(config["autoencoders"][name])
    if facts is None:
        return errors
    data = config["datasets"][exp["dataset"]]
    channels = dataset_channels(data)
    if facts["in_channels"] != channels and not (channels == 1 and facts["in_channels"] == 3):
        errors.append(f"{key}.autoencoder: {name!r} takes {facts['in_channels']}-channel images, dataset "
                      f"{exp['dataset']!r} has {channels}")
    if data["image_size"] % facts["downsample_factor"]:
        errors.append(f"{key}.autoencoder: {name!r} divides the image side by {facts['downsample_factor']}, "
                      f"which does not divide datasets.{exp['dataset']}.image_size {data['image_size']}")
    return errors


def model_space(config: dict, exp: dict) -> dict | None:
    """What the experiment's networks model: the dataset's images, or a latent experiment's latents
    (None where its autoencoder's are known only once fetched): {side, channels, and the phrases
    naming where each comes from in errors}."""
    name, data = exp["autoencoder"], config["datasets"][exp["dataset"]]
    if not name:
        return {"side": data["image_size"], "channels": dataset_channels(data),
                "side_is": f"datasets.{exp['dataset']}.image_size is {data['image_size']}",
                "source": f"dataset {exp['dataset']!r} ({data['source']})"}
    facts = latents.autoencoder_facts(config["autoencoders"].get(name, {}))
    if facts is None:
        return None
    side = data["image_size"] // facts["downsample_factor"]
    source = f"the latent space of autoencoder {name!r} on dataset {exp['dataset']!r}"
    return {"side": side, "channels": facts["latent_channels"], "side_is": f"{source} is {side}×{side}",
            "source": source}


def _conditioning_errors(config: dict, key: str, exp: dict, family: Family) -> list[str]:
    """The conditioning's settings, what the family's networks take, the datasets a captions kind
    reads captions from, and the settings that need a condition (guidance)."""
    try:
        kind = conditioning.conditioning_from_settings(exp["conditioning"])
    except ValueError as err:
        return [f"{key}.{err}"]
    errors = kind.config_errors(key) if hasattr(kind, "config_errors") else []
    if hasattr(kind, "prompt_dataset"):  # each image's own caption, and samples prompted by a dataset's
        for what, dataset in (("dataset", exp["dataset"]),
                              ("conditioning.prompts_dataset", kind.prompt_dataset(exp["dataset"]))):
            spec = config["datasets"].get(dataset)
            if spec is None:
                errors.append(f"{key}.{what}: unknown dataset {dataset!r}; defined: {sorted(config['datasets'])}")
            elif not is_captioned(spec.get("source")):
                errors.append(f"{key}.{what}: dataset {dataset!r} (source {spec.get('source')}) stores no "
                              f"captions, but conditioning.kind {kind.kind} reads them (source mscoco stores them)")
    if kind is None and exp["sample"]["guidance_scale"] != 1.0:
        errors.append(f"{key}.sample.guidance_scale: {exp['sample']['guidance_scale']}, but the experiment is "
                      "unconditional (conditioning.kind none): guidance needs a condition")
    # A pretrained network given without an architecture is checked once fetched (its first job).
    known = family.network_arguments(exp["architecture"]) or not exp["dense"]["pretrained"]
    errors += family.conditioning_errors(key, exp["architecture"] if known else None, kind)
    return errors


def _clip_score_errors(key: str, exp: dict) -> list[str]:
    """A CLIP score asked for (clip_score.enabled) needs images with prompts: a conditioning that
    has ``sampling_prompts`` (asked, never a kind's name: every kind with prompts qualifies), and a
    local CLIP folder that exists (a hub id is checked by its job)."""
    settings = exp["clip_score"]
    if not settings["enabled"]:
        return []
    try:
        kind = conditioning.conditioning_from_settings(exp["conditioning"])
    except ValueError:
        return []  # reported by _conditioning_errors
    errors = []
    if not hasattr(kind, "sampling_prompts"):
        errors.append(f"{key}.clip_score.enabled: true, but conditioning.kind {exp['conditioning']['kind']!r} gives "
                      "its images no prompts to score them against; a CLIP score needs a text-conditioned experiment "
                      "(set enabled: false or remove clip_score)")
    model = settings["model"]
    if looks_like_local_path(model) and not Path(model).expanduser().is_dir():
        errors.append(f"{key}.clip_score.model: local folder {model} does not exist (offline, `python -m igsm "
                      f"tiny-clip --out {model} --prompt …` writes a random one for the prompts)")
    return errors


def _dense_source_errors(config: dict, name: str, exp: dict) -> list[str]:
    """Exactly one source of the dense model; one shared from another experiment must be that
    experiment's own, on the same dataset."""
    key, experiments, dense = f"experiments.{name}", config["experiments"], exp["dense"]
    errors = []
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
    return errors


def _architecture_errors(config: dict, name: str, exp: dict, family: Family) -> list[str]:
    """The pretrained model's reference, and an architecture where one is needed, fitting what the
    networks model: the dataset's images' size and channels, or a latent experiment's latents'."""
    key, dense = f"experiments.{name}", exp["dense"]
    errors = []
    pretrained = dense["pretrained"]
    # The architecture without its family: the network's keyword arguments.
    arch = family.network_arguments(exp["architecture"])
    if pretrained:
        errors += family.pretrained_errors(key, pretrained)
    if "training" in dense and not arch:
        errors.append(f"{key}.architecture: needed to train the dense model")
    if exp["untrained_baseline"] and not arch:
        errors.append(f"{key}.architecture: needed by untrained_baseline")
    space = model_space(config, exp)
    if arch and space is not None:
        size = arch.get(family.size_key)
        if size is not None and size != space["side"]:
            errors.append(f"{key}.architecture.{family.size_key}: {size}, but {space['side_is']}; the network "
                          "would train on one size and sample another")
        for side in family.channel_keys:
            value = arch.get(side, family.key_defaults[side])
            if value != space["channels"]:
                errors.append(f"{key}.architecture.{side}: {value}, but {space['source']} has {space['channels']} "
                              "channel(s)")
    return errors


def _finetune_errors(config: dict, name: str, exp: dict) -> list[str]:
    """The finetuning runs' objectives exist; each training (dense, finetune) that runs has
    increasing diagnostic timesteps and a batch that splits over its processes."""
    key, runs = f"experiments.{name}", exp["finetune"]["runs"]
    errors = []
    if runs and "training" not in exp["finetune"]:
        errors.append(f"{key}.finetune.training: needed by finetune.runs")
    for i, run in enumerate(runs):
        for objective in run["objectives"]:
            if objective not in config["objectives"]:
                errors.append(f"{key}.finetune.runs[{i}].objectives: unknown objective {objective!r}; "
                              f"defined under 'objectives': {sorted(config['objectives'])}")
    for stage, training in (("dense", exp["dense"].get("training")), ("finetune", exp["finetune"].get("training"))):
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
    return errors


def _sample_and_fid_errors(config: dict, name: str, exp: dict) -> list[str]:
    """Enough images for FID, at most one shard per image, a supplied reference statistics file
    that exists, and no more reference or pruning images than the dataset holds."""
    key, sample, data = f"experiments.{name}", exp["sample"], config["datasets"][exp["dataset"]]
    errors = []
    if sample["num_images"] < FID_MIN_IMAGES:  # the schema's minimum, so only after `scale`
        errors.append(f"scale.samples: {config['scale']['samples']} leaves {key}.sample.num_images at "
                      f"{sample['num_images']} image(s); its FID needs at least {FID_MIN_IMAGES}")
    elif sample["num_shards"] > sample["num_images"]:
        errors.append(f"{key}.sample.num_shards: {sample['num_shards']} shards for {sample['num_images']} "
                      "images; at most one shard per image")
    supplied = exp["fid"]["reference_statistics"]
    if supplied and not (supplied.endswith(".npz") and Path(supplied).expanduser().is_file()):
        errors.append(f"{key}.fid.reference_statistics: {supplied} is not an existing .npz file (give "
                      "the path of a file holding 'mu' and 'sigma', or leave it empty)")
    errors += _reference_dataset_errors(config, key, exp)
    known = dataset_size(data)
    if known is not None:
        for path, value in ((f"{key}.fid.num_reference", exp["fid"]["num_reference"]),
                            (f"{key}.prune.num_images", exp["prune"]["num_images"])):
            if value > known:
                errors.append(f"{path}: {value} images asked, dataset {exp['dataset']!r} holds {known}")
    return errors


def _reference_dataset_errors(config: dict, key: str, exp: dict) -> list[str]:
    """``fid.reference_dataset``: another config dataset of the experiment's image size and channels
    (text-to-image models are scored against held-out images: COCO val), not beside a reference file."""
    reference = exp["fid"].get("reference_dataset")
    if not reference:
        return []
    if exp["fid"]["reference_statistics"]:
        return [f"{key}.fid.reference_dataset: {reference!r} beside fid.reference_statistics; give one of them"]
    if reference not in config["datasets"]:
        return [f"{key}.fid.reference_dataset: unknown dataset {reference!r}; defined: {sorted(config['datasets'])}"]
    own, other = (with_defaults(config["datasets"][d]) for d in (exp["dataset"], reference))
    for what, of in (("image_size", lambda d: d["image_size"]), ("channels", dataset_channels)):
        if of(own) != of(other):
            return [f"{key}.fid.reference_dataset: dataset {reference!r} has {what} {of(other)}, the experiment's "
                    f"dataset {exp['dataset']!r} {of(own)}: its samples are compared with images like its own"]
    return []


def _pretrained_folder_errors(config: dict, name: str, exp: dict) -> list[str]:
    """A local folder as dense.pretrained (of a family that takes folders: the U-Net), against the
    experiment: the network its config file declares (architecture.json or diffusers' config.json)
    must be of the experiment's family, taking the dataset's image size and channels. Hub models are
    checked by their prune job, the first that has both the model and the data (igsm.stages.prune); U-ViT
    experiments take a checkpoint file, checked above."""
    pretrained, key = exp["dense"]["pretrained"], f"experiments.{name}.dense.pretrained"
    family = family_of_architecture(exp["architecture"])
    if not pretrained or not family.pretrained_folders or not Path(pretrained).expanduser().is_dir() \
            or exp["dataset"] not in config["datasets"]:
        return []
    from igsm.models import local_pretrained_declaration, pretrained_mismatches  # torch: only for a folder
    folder = Path(pretrained).expanduser()
    try:
        declared = local_pretrained_declaration(folder)
    except ValueError as err:
        return [f"{key}: {err}"]
    if declared is None:
        return [f"{key}: local folder {folder} holds no model: neither a diffusers U-Net (config.json or "
                f"unet/config.json) nor a model written by the workflow (architecture.json)"]
    data = config["datasets"][exp["dataset"]]
    problems = pretrained_mismatches(declared, family.name, exp["dataset"], data["image_size"], dataset_channels(data))
    return [f"{key}: {problem}" for problem in problems]


def pruning_method(exp: dict, criterion: str) -> pruning.PruningMethod:
    """The pruning method that makes '<criterion>-cr<ratio>' of a checked experiment: its
    prune.method, or the method taking the criterion (igsm.pruning.methods)."""
    return pruning.method_for(criterion, exp["prune"].get("method"))


def _pruning_errors(key: str, exp: dict) -> list[str]:
    """prune.method against each criterion used: prune.criterion and the runs' own."""
    used = [(f"{key}.prune.criterion", exp["prune"]["criterion"])]
    used += [(f"{key}.finetune.runs[{i}].criterion", run["criterion"])
             for i, run in enumerate(exp["finetune"]["runs"]) if "criterion" in run]
    errors = []
    for criterion_key, criterion in used:
        try:
            pruning.method_for(criterion, exp["prune"].get("method"), criterion_key=criterion_key,
                               method_key=f"{key}.prune.method")
        except ValueError as err:
            errors.append(str(err))
    return errors


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
    for name in reuse["methods"]:
        try:  # the schema's enum is the registry's names: this only fails on an unvalidated config
            method = reuse_methods.get(name, f"{key}.reuse.methods")
        except ValueError as err:
            errors.append(str(err))
            continue
        for fraction in reuse["mac_fractions"]:
            try:
                method.sampler_steps(sample["num_steps"], fraction)
            except ValueError as err:
                errors.append(f"{key}.reuse.mac_fractions: {err} (method {name})")
    return errors


def _compare_samplers_errors(key: str, exp: dict) -> list[str]:
    """compare_samplers: its models are scored models, its entries samplers the model's process runs."""
    compare = exp["compare_samplers"]
    known = scored_model_names(exp)
    errors = [f"{key}.compare_samplers.models: {model!r} is not a scored model of this experiment; "
              f"choose among {known}" for model in compare["models"] if model not in known]
    for index, entry in enumerate(compare["settings"]):  # the schema refuses two equal entries
        where = f"{key}.compare_samplers.settings[{index}]"
        if "algorithm" in entry and entry["sampler"] != "dpm-solver":
            errors.append(f"{where}.algorithm: only sampler dpm-solver takes an algorithm, not {entry['sampler']!r}")
        if entry["sampler"] == "euler-maruyama" and exp["diffusion"]["process"] != "vpsde":
            errors.append(f"{where}.sampler: 'euler-maruyama' integrates the VP-SDE, but diffusion.process is "
                          f"{exp['diffusion']['process']!r}; choose ddim or dpm-solver")
    return errors


def _process_errors(config: dict, name: str, exp: dict, family: Family) -> list[str]:
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
        # A teacher is finetuned on the process it learned (its family's released checkpoints').
        if process != family.process:
            errors.append(f"{key}.process: {process!r}, but {family.process_reason}; set process: {family.process}")
        errors += [f"{key}.{k}: {diffusion.get(k)!r}, but the {family.title}'s released checkpoints learned "
                   f"{k} {v!r}; set {k}: {v}" for k, v in family.pretrained_diffusion.items() if diffusion.get(k) != v]
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
    """A JSON or YAML config file, read as Snakemake reads --configfile but strictly: a syntax
    error names the file, line and column; a key given twice in one mapping (YAML and JSON keep the
    last without a word), aliases that expand beyond MAX_CONFIG_VALUES values (an alias bomb) or
    refer to their own container, tags beyond plain YAML and a YTE template (__use_yte__) are errors
    naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        hint = ""
        if not Path(path).suffix and not Path(path).exists():
            hint = "; a target? Snakemake reads every word after --configfile as a config file: put targets first"
        raise ConfigError(f"{path}: cannot read it ({err.strerror}){hint}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    try:  # JSON first, as Snakemake does
        config = json.loads(text, object_pairs_hook=lambda pairs: _json_mapping(pairs, path))
    except json.JSONDecodeError:
        config = _load_yaml(text, path)
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (datasets:, objectives:, experiments:)")
    if "__use_yte__" in config:
        raise ConfigError(f"{path}: __use_yte__ makes it a YTE template, whose expressions Snakemake runs as "
                          "Python code when it reads the file; the workflow takes plain YAML")
    return config


def _json_mapping(pairs: list, path) -> dict:
    keys = [key for key, _ in pairs]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise ConfigError(f"{path}: key(s) {', '.join(map(repr, twice))} given twice in one object; "
                          "JSON keeps only the last, so remove one")
    return dict(pairs)


def _load_yaml(text: str, path) -> object:
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _check_yaml_nodes(root, path)  # before construction, which would share aliases, not expand them
        return loader.construct_document(root)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise ConfigError(f"{path}: not valid YAML at {where}: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{path}: lists or mappings nested too deeply") from None
    finally:
        loader.dispose()


def _check_yaml_nodes(root: yaml.Node, path) -> None:
    """Raise ConfigError for a YAML document whose aliases expand beyond MAX_CONFIG_VALUES values
    or into their own container, or with keys given twice in one mapping (all of them, sorted by
    line). One pass over the node graph, each node once: sizes are counted, not expanded."""
    expanded = {}  # id(node) → values it holds, aliases expanded
    inside = set()  # the nodes being walked, from the root down
    twice = []
    stack = [(root, "", False)]
    while stack:
        node, where, done = stack.pop()
        children = _child_nodes(node, where)
        if done:
            inside.discard(id(node))
            expanded[id(node)] = 1 + sum(expanded[id(child)] for child, _ in children)
            if expanded[id(node)] > MAX_CONFIG_VALUES:
                raise ConfigError(f"{path}: its YAML aliases (*name) expand to more than {MAX_CONFIG_VALUES:,} "
                                  f"values (at line {node.start_mark.line + 1}); a config has a few thousand")
            continue
        if id(node) in expanded:
            continue
        if id(node) in inside:
            raise ConfigError(f"{path}, line {node.start_mark.line + 1}: an alias refers to the list or mapping "
                              "that contains it (a config has no cycles)")
        inside.add(id(node))
        if isinstance(node, yaml.MappingNode):
            twice += _duplicate_keys(node, where, path)
        stack.append((node, where, True))
        # Reversed: walked in document order, a node shared by aliases is reached at its anchor first,
        # and errors name that key.
        stack.extend((child, child_where, False) for child, child_where in reversed(children)
                     if id(child) not in expanded)
    if twice:
        raise ConfigError("\n".join(line for _, line in sorted(twice)))


def _child_nodes(node: yaml.Node, where: str) -> list[tuple[yaml.Node, str]]:
    """(child node, its dotted key) of a list or mapping node (mapping keys count as values)."""
    if isinstance(node, yaml.SequenceNode):
        return [(child, f"{where}[{i}]") for i, child in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):  # the keys of a merge (<<: *name) are this mapping's
        return [pair for key, value in node.value
                for pair in ((key, where), (value, where if key.tag == MERGE_TAG else _join(where, key.value)))]
    return []


def _duplicate_keys(node: yaml.MappingNode, where: str, path) -> list[tuple[int, str]]:
    """(line, message) for each key written a second time in this mapping; keys a merge (<<: *name)
    brings in are meant to be overridden and do not count."""
    first_line, found = {}, []
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == MERGE_TAG:
            continue
        line = key.start_mark.line + 1
        if (key.tag, key.value) in first_line:
            found.append((line, f"{path}, line {line}: {_join(where, key.value)} given twice in one mapping "
                                f"(first at line {first_line[key.tag, key.value]}); YAML keeps only the last, so "
                                "remove one"))
        else:
            first_line[key.tag, key.value] = line
    return found


def _join(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def _schema() -> dict:
    """The schema, with the enums that registries own filled in from them as they are now (a
    member registered after the first validation counts too, e.g. by a plugin): architecture.family,
    reuse.methods, prune.method and the criteria (prune.criterion, finetune.runs[].criterion)."""
    schema = copy.deepcopy(schema_file())
    experiment = schema["$defs"]["experiment"]["properties"]
    experiment["architecture"]["properties"][FAMILY_KEY]["enum"] = names()
    experiment["conditioning"]["properties"]["kind"]["enum"] = conditioning.kinds()
    experiment["reuse"]["properties"]["methods"]["items"]["enum"] = list(reuse_methods.METHODS)
    prune = experiment["prune"]["properties"]
    prune["method"]["enum"] = list(pruning.METHODS)
    prune["criterion"]["enum"] = pruning.criteria()
    experiment["finetune"]["properties"]["runs"]["items"]["properties"]["criterion"]["enum"] = pruning.criteria()
    return schema


def _filling_defaults(validator_class):
    """A jsonschema validator class that also fills in the schema's defaults, as Snakemake's
    ``validate`` does, but each default a copy of its own: two sections left out of two
    experiments must not become one object (`scale` would shrink it twice)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def properties(validator, properties, instance, schema):
        if validator.is_type(instance, "object"):
            for key, subschema in properties.items():
                if "default" in subschema and key not in instance:
                    instance[key] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    from jsonschema import validators

    return validators.extend(validator_class, {"properties": properties})


def validate_schema(config: dict) -> None:
    """The config's plugins imported (igsm.plugins), then the schema's checks, its defaults filled
    in; ConfigError with every error at once, sorted by key, each one line: the key's dotted path,
    what is wrong, what would be valid. With IGSM_CONFIG_DETAIL=1 each also carries jsonschema's
    full report."""
    from jsonschema import Draft202012Validator

    try:  # first: the plugins' members are in the enums and the checks
        plugins.load(config.get(plugins.PLUGINS_KEY))
    except plugins.PluginError as err:
        raise ConfigError(str(err)) from None
    schema = _schema()
    validator = _filling_defaults(Draft202012Validator)(schema)
    detail = os.environ.get(DETAIL_VARIABLE, "") not in ("", "0")
    lines = set()
    for error in validator.iter_errors(config):
        for where, text in _schema_error_lines(error, schema):
            lines.add((where, text + ("\n    " + str(error).replace("\n", "\n    ") if detail else "")))
    if lines:
        footer = (f"({len(lines)} error(s); schemas/config.schema.yaml describes every key"
                  + ("" if detail else f"; {DETAIL_VARIABLE}=1 adds jsonschema's full report") + ")")
        raise ConfigError("\n".join([text for _, text in sorted(lines)] + [footer]))


def _short(value) -> str:
    """repr of a config value, cut short: an error line quotes it, it does not dump it."""
    short = reprlib.Repr()
    short.maxlevel, short.maxdict, short.maxlist, short.maxstring, short.maxother = 2, 3, 3, 60, 60
    return short.repr(value)


def _schema_error_lines(error, schema: dict) -> list[tuple[str, str]]:
    """(dotted key, line) for one jsonschema error."""
    where = ""
    for part in error.absolute_path:
        where = f"{where}[{part}]" if isinstance(part, int) else _join(where, part)
    kind, value = error.validator, error.instance
    if "propertyNames" in error.absolute_schema_path:
        rule = " ".join(schema["$defs"]["name"]["description"].split())
        return [(where, f"{where}: {_short(value)} is not a valid name. {rule}")]
    if kind == "additionalProperties":
        known = list(error.schema.get("properties", {}))
        lines = []
        for key in value:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                lines.append((_join(where, key), f"{_join(where, key)}: unknown key; {hint}valid here: "
                                                 f"{', '.join(known)}"))
        return lines
    if kind == "required":
        return [(_join(where, key), f"{_join(where, key)}: missing (required here)")
                for key in error.validator_value if key not in value]
    if kind == "enum":
        close = difflib.get_close_matches(str(value), [str(v) for v in error.validator_value], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return [(where, f"{where or 'config'}: {_short(value)} is not one of "
                        f"{', '.join(map(str, error.validator_value))}{hint}")]
    if kind in ("oneOf", "anyOf") and error.context:
        from jsonschema.exceptions import best_match

        # The alternative of the value's own type says most ('abc' is not a sha256; not: not an object).
        same_type = [e for e in error.context if e.validator != "type"]
        return _schema_error_lines(best_match(same_type or error.context), schema)
    message = error.message
    if message.startswith(repr(value)):  # jsonschema's messages start with the whole value
        message = _short(value) + message[len(repr(value)):]
    return [(where, f"{where or 'config'}: {message}")]


def validate(config: dict) -> None:
    """Every check the workflow makes of a config before its first job (the Snakefile and
    rules/common.smk): the schema with its defaults, ``scale``, then :func:`check_config`."""
    validate_schema(config)
    apply_scale(config)
    check_config(config)
