# Shared helpers: naming of model variants, input functions, settings and resources per stage.
import json
import os
import re
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod

EXPERIMENTS = config["experiments"]

# Jobs run the package of this checkout (`python -m igsm`), whether it is pip-installed or not:
# the per-stage conda environments in envs/ hold only third-party dependencies. Without
# --use-conda, `python` is the interpreter running Snakemake (e.g. .venv/bin/snakemake called
# without activating the venv), not whichever python comes first on PATH.
_use_conda = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
_python_path = "" if _use_conda else f'export PATH={shlex.quote(os.path.dirname(sys.executable))}:"$PATH"; '
shell.prefix(f"{_python_path}export PYTHONPATH={shlex.quote(workflow.basedir)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")


def _one_of(names):
    """A wildcard matching exactly these configured names (the schema keeps them path-safe)."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


wildcard_constraints:
    # Only configured names: results/tables/all.md is the combined table, not an experiment, and
    # no wildcard can take a value that the config did not name.
    exp=_one_of(EXPERIMENTS),
    dataset=_one_of(config["datasets"]),
    autoencoder=_one_of(config["autoencoders"]),
    criterion="[a-z-]+",
    ratio="[0-9.]+",
    objective=_one_of(config["objectives"]),


# Every check the config allows, before any job: igsm.config (this checkout's package, as the
# jobs run it), each error naming its key.
sys.path.insert(0, workflow.basedir)
from igsm.conditioning import NONE as UNCONDITIONAL
from igsm.conditioning import sampling_section as conditioning_for_sampling
from igsm.conditioning import training_section as conditioning_for_training
from igsm.config import (
    ConfigError,
    apply_scale,
    check_config,
    check_writable,
    dataset_channels,
    pruning_method,
    training_job,
)
from igsm.data import write_text_atomically
from igsm.reuse_methods import METHODS as REUSE_METHODS
from igsm.families import FAMILY_KEY, MIGRATION_DEFAULT, assumed_family, family_of_architecture
from igsm.plan import scored_models
from igsm.pruning import report_pictures
from igsm.paper.reuse import published_for as published_reuse
from igsm.paper.tables import FIGURES as PAPER_FIGURES
from igsm.paper.tables import SAMPLE_FIGURES as PAPER_SAMPLE_FIGURES
from igsm.paper.tables import experiments_of, sample_grids, table_names

PAPER_TABLES = table_names()

apply_scale(config)  # `scale`: shrink every experiment for a quick look (before any check)

try:
    check_config(config)
    check_writable("results")
except ConfigError as err:
    raise WorkflowError(str(err)) from None


def variant_metadata(exp):
    """{variant: what it is} for every scored model of an experiment (igsm.plan: one row per
    model). Written to results/variants/<exp>/<variant>.json, which the tables read: nothing
    parses a folder name."""
    return scored_models(EXPERIMENTS[exp], config["objectives"])


def finetuned_variants(exp):
    """'<criterion>-cr<ratio>/<objective>' for every finetuning run of an experiment."""
    return [v for v, meta in variant_metadata(exp).items() if meta["kind"] == "finetuned"]


def scored_variants(exp):
    """Every model of an experiment that gets samples and an FID."""
    return list(variant_metadata(exp))


wildcard_constraints:
    variant=_one_of(sorted({variant for exp in EXPERIMENTS for variant in scored_variants(exp)})),


# Experiments whose pretrained teacher is loaded by the family the architecture names: it builds a
# network from the architecture (plain state dicts: U-ViT's), or it is not the U-Net that a bare
# hub id means (DiT, SD's U-Net: their own diffusers classes); check_config has named every
# experiment's family. Their rule passes the architecture; the U-Net rule's command is as it was.
ARCHITECTURE_PRETRAINED_EXPERIMENTS = [
    exp
    for exp, spec in EXPERIMENTS.items()
    if family_of_architecture(spec["architecture"]).pretrained_needs_architecture
    or family_of_architecture(spec["architecture"]).name != MIGRATION_DEFAULT
]


def dense_owner(exp):
    """The experiment whose dense model this one uses: itself, or its dense.from_experiment."""
    return EXPERIMENTS[exp]["dense"]["from_experiment"] or exp


def dense_folder(exp):
    owner = dense_owner(exp)
    kind = "pretrained" if EXPERIMENTS[owner]["dense"]["pretrained"] else "trained"
    return f"results/dense/{owner}/{kind}"


def dense_model(wildcards):
    return f"{dense_folder(wildcards.exp)}/model"


def variant_model_dir(exp, variant):
    """The folder of a scored model variant (a block-reuse or sampler variant samples its base model)."""
    meta = variant_metadata(exp)[variant]
    if meta["kind"] in ("reuse", "sampler"):
        return variant_model_dir(exp, meta["base"])
    if variant == "dense":
        return f"{dense_folder(exp)}/model"
    if variant == "untrained":
        return f"results/untrained/{exp}/model"
    return f"results/finetune/{exp}/{variant}/model"


def model_dir(wildcards):
    return variant_model_dir(wildcards.exp, wildcards.variant)


def autoencoder_folder(exp):
    """A latent experiment's stored autoencoder (rules/latents.smk), or None."""
    name = EXPERIMENTS[exp]["autoencoder"]
    return f"results/autoencoders/{name}/model" if name else None


def pixel_store(dataset):
    """The image store of a config dataset (rules/download.smk)."""
    return f"results/data/{dataset}/train"


def dataset_file(wildcards):
    """The store an experiment trains and prunes on: its dataset's images, or their latents."""
    exp = EXPERIMENTS[wildcards.exp]
    if exp["autoencoder"]:
        return f"results/data/{exp['dataset']}/latents-{exp['autoencoder']}"
    return pixel_store(exp["dataset"])


def autoencoder_input(wildcards):
    """The autoencoder a job of a latent experiment reads (its settings name the folder), or none."""
    return autoencoder_folder(wildcards.exp) or []


def as_json(payload):
    return json.dumps(payload, sort_keys=True)


def architecture_settings(exp):
    """JSON of the experiment's architecture as its jobs receive it: without 'family' where its keys
    alone imply that family (every config written before the key existed), so jobs made then stay
    valid; a family the keys do not imply is passed on."""
    architecture = dict(EXPERIMENTS[exp]["architecture"])
    if assumed_family(architecture).name == architecture.get(FAMILY_KEY):
        del architecture[FAMILY_KEY]
    return as_json(architecture)


def diffusion_settings(exp):
    """The experiment's forward process (its 'diffusion' section) as the stages receive it. DDPM
    goes without its 'process' key, as before the VP-SDE existed, so jobs made then stay valid
    (a settings change reruns them); igsm.diffusion reads a missing process as ddpm."""
    diffusion = EXPERIMENTS[exp]["diffusion"]
    # Likewise DDPM's linear β schedule goes without its beta_schedule key (added for SD's scaled_linear).
    return {
        k: v
        for k, v in diffusion.items()
        if not (k == "process" and v == "ddpm") and not (k == "beta_schedule" and v == "linear")
    }


def experiment_context(exp, runs_network=True):
    """What a stage's settings carry besides its own section: the experiment's forward process and,
    for a stage that runs the network on data or samples (``runs_network``), its conditioning and a
    latent experiment's autoencoder (``latents``: the folder, which the job also has as an input, and
    the images' channels it decodes to), each absent where the experiment has none, so that jobs
    made before they existed stay valid."""
    context = {"diffusion": diffusion_settings(exp)}
    if runs_network and EXPERIMENTS[exp]["conditioning"]["kind"] != UNCONDITIONAL:
        context["conditioning"] = conditioning_for_training(EXPERIMENTS[exp]["conditioning"])
    if runs_network and autoencoder_folder(exp):
        channels = dataset_channels(config["datasets"][EXPERIMENTS[exp]["dataset"]])
        context["latents"] = {"autoencoder": autoencoder_folder(exp), "image_channels": channels}
    return context


def sampling_conditioning(exp):
    """(the experiment's conditioning section as the jobs that read its samples get it, the store
    whose captions prompt them or None): a captions kind's sampling keys and prompt store
    (igsm.conditioning.sampling_section); (None, None) for an unconditional experiment."""
    if EXPERIMENTS[exp]["conditioning"]["kind"] == UNCONDITIONAL:
        return None, None
    return conditioning_for_sampling(EXPERIMENTS[exp]["conditioning"], EXPERIMENTS[exp]["dataset"], pixel_store)


def prompt_store(exp):
    """The store whose captions prompt a captions-conditioned experiment's samples (an input of the
    jobs that sample or score them), or None."""
    return sampling_conditioning(exp)[1]


def prompt_store_input(wildcards):
    return prompt_store(wildcards.exp) or []


def stage_settings(exp, section, runs_network=False):
    """JSON of one config section of an experiment, with the experiment's diffusion process (and,
    for a stage that runs the network on data: ``runs_network``, its conditioning and autoencoder)."""
    return as_json({**experiment_context(exp, runs_network), **EXPERIMENTS[exp][section]})


def objective_settings(name):
    """An 'objectives' entry as igsm.objectives.build_objective takes it: every option the schema
    gives it, bar those that mean nothing here (OTD's settings without OTD directions, an unset
    timestep range), so that a new option reaches the jobs without being listed here."""
    spec = config["objectives"][name]
    return {
        key: value
        for key, value in spec.items()
        if not (key == "otd" and spec["directions"] != "otd") and not (key == "jacobian_timesteps" and value is None)
    }


def resource(stage, key):
    """A job resource of a stage, from the config's 'resources.<stage>.<key>'."""
    return config["resources"][stage][key]


def gpu_memory(stage, gpus=None):
    """The `gpu_mem_mb` resource of a job of the stage on `gpus` GPUs (default: the stage's):
    what the run's `--resources gpu_mem_mb=<MB>` counts (resources.<stage>.gpu_mem_mb per GPU;
    none on CPU)."""
    return resource(stage, "gpu_mem_mb") * (resource(stage, "gpu") if gpus is None else gpus)


def fid_reference_file(exp):
    settings = EXPERIMENTS[exp]
    fid = settings["fid"]
    if fid["reference_statistics"]:  # the user's file (checked to exist by igsm.config)
        return os.path.expanduser(fid["reference_statistics"])
    # Another dataset's images (fid.reference_dataset: COCO val for a model finetuned on COCO train).
    dataset = fid.get("reference_dataset") or settings["dataset"]
    return f"results/fid_reference/{dataset}/{fid['mode']}-n{fid['num_reference']}{reference_features(exp)}.npz"


# The part of a reference statistics file's name that says which features it keeps for PRDC
# (prdc.enabled: '-features<num_features>-seed<seed>'; otherwise empty, the file as before PRDC).
REFERENCE_FEATURES = "(-features[0-9]+-seed[0-9]+)?"


def reference_features(exp):
    prdc = EXPERIMENTS[exp]["prdc"]
    return f"-features{prdc['num_features']}-seed{prdc['seed']}" if prdc["enabled"] else ""


def reference_settings(wildcards):
    """JSON 'fid' settings of a reference statistics job, from its file name (its dataset's
    experiments share it): the mode, the number of images and the features it keeps for PRDC."""
    settings = {"mode": wildcards.mode, "num_reference": int(wildcards.num)}
    if wildcards.features:
        num_features, seed = re.fullmatch(r"-features([0-9]+)-seed([0-9]+)", wildcards.features).groups()
        settings["prdc"] = {"num_features": int(num_features), "seed": int(seed)}
    return as_json(settings)


def statistics_settings(exp):
    """The 'fid' settings of a model's statistics job: the mode, and where PRDC is enabled, how
    many features it keeps (other experiments' jobs get the settings they had before PRDC)."""
    prdc = EXPERIMENTS[exp]["prdc"]
    kept = {"prdc": {"num_features": prdc["num_features"]}} if prdc["enabled"] else {}
    return {"mode": EXPERIMENTS[exp]["fid"]["mode"], **kept}


def paper_tables_of_config():
    """The paper's tables (igsm/paper/tables.yaml) that read at least one experiment of the config."""
    return [t for t in PAPER_TABLES if any(exp in EXPERIMENTS for exp in experiments_of(t))]


def reuse_published_of(exp):
    """The published block-reuse results (igsm/paper/tables.yaml `reuse_published`) of an experiment
    that samples with block reuse: those of its pretrained teacher, sampler and steps."""
    experiment = EXPERIMENTS[exp]
    pretrained = EXPERIMENTS[dense_owner(exp)]["dense"]["pretrained"]
    if not experiment["reuse"]["models"] or not pretrained:
        return []
    return published_reuse(pretrained, experiment["sample"]["sampler"], experiment["sample"]["num_steps"])


def all_table_files():
    return (
        [f"results/tables/{exp}.md" for exp in EXPERIMENTS]
        + (["results/tables/all.md"] if EXPERIMENTS else [])
        + [f"results/paper_tables/{table}.md" for table in paper_tables_of_config()]
        + [f"results/paper_tables/reuse_{exp}.md" for exp in EXPERIMENTS if reuse_published_of(exp)]
        + [
            f"results/paper_figures/{figure}.png"
            for figure, (table, _) in PAPER_FIGURES.items()
            if table in paper_tables_of_config()
        ]
        + [
            f"results/paper_figures/{figure}.png"
            for figure in PAPER_SAMPLE_FIGURES
            if sample_grids(figure, EXPERIMENTS)
        ]
    )


def table_rows(exp):
    """One entry per scored model: the JSON files that hold its metadata and its numbers."""
    rows = []
    for variant, meta in variant_metadata(exp).items():
        row = {
            "metadata": f"results/variants/{exp}/{variant}.json",
            "fid": f"results/fid/{exp}/{variant}.json",
            "efficiency": f"results/efficiency/{exp}/{variant}.json",
            "summary": None,
            "prune_report": None,
        }
        if meta["kind"] == "dense" and not EXPERIMENTS[dense_owner(exp)]["dense"]["pretrained"]:
            row["summary"] = f"{dense_folder(exp)}/summary.json"
        if meta["kind"] == "finetuned":
            row["summary"] = f"results/finetune/{exp}/{variant}/summary.json"
            row["prune_report"] = f"results/prune/{exp}/{meta['pruned']}/report.json"
        if exp in clip_score_experiments():  # only there: other experiments' table jobs stay as they were
            row["clip_score"] = f"results/clip_score/{exp}/{variant}.json"
        if exp in consistency_experiments() and variant != "dense":  # the dense model is the reference
            row["consistency"] = f"results/consistency/{exp}/{variant}.json"
        if exp in prdc_experiments():
            row["prdc"] = f"results/prdc/{exp}/{variant}.json"
        rows.append(row)
    return rows


def table_inputs(exp):
    return [path for row in table_rows(exp) for path in row.values() if path] + prune_report_pictures(exp)


def prune_report_pictures(exp):
    """The report picture of each pruning an experiment finetunes from whose method draws one
    (gradient flow's masks picture)."""
    pictures = set()
    for meta in variant_metadata(exp).values():
        if meta["kind"] == "finetuned":
            picture = pruning_method(EXPERIMENTS[exp], meta["criterion"]).report_picture
            if picture:
                pictures.add(f"results/prune/{exp}/{meta['pruned']}/{picture}")
    return sorted(pictures)


# ---- sampling (stage 5) and efficiency ------------------------------------------------------


def sample_settings(exp, variant=None):
    """The 'sample' settings that make a variant's images: not how many jobs make them, nor PNG
    export, so that changing those reruns nothing that exists. A block-reuse method may sample
    with its own number of steps (fewer-steps); a sampler variant (compare_samplers) overrides
    the experiment's settings with its entry."""
    context = experiment_context(exp)
    if "conditioning" in context:  # with a captions kind's sampling keys and prompt store
        context["conditioning"] = sampling_conditioning(exp)[0]
    # guidance_scale only where there is a condition (it is 1 elsewhere): older jobs stay valid.
    dropped = ("num_shards", "png_export") + (() if "conditioning" in context else ("guidance_scale",))
    sample = {k: v for k, v in EXPERIMENTS[exp]["sample"].items() if k not in dropped}
    meta = variant_metadata(exp)[variant] if variant else {}
    if meta.get("kind") == "reuse":
        method = REUSE_METHODS[meta["reuse_method"]]
        sample["num_steps"] = method.sampler_steps(sample["num_steps"], meta["mac_fraction"])
    if meta.get("kind") == "sampler":
        sample.update(meta["sample"])
    if sample["sampler"] != "dpm-solver":  # DPM-Solver's key only there: older jobs stay valid
        sample.pop("algorithm", None)
    return as_json({**context, **sample})


def same_sampler_as_base(exp, variant):
    """Whether a sampler variant (compare_samplers) samples as its base model does (an entry equal
    to the experiment's own sampler): then it reads its base's samples instead of making them again."""
    meta = variant_metadata(exp)[variant]
    return meta["kind"] == "sampler" and sample_settings(exp, variant) == sample_settings(exp, meta["base"])


def statistics_file(exp, variant):
    """The Inception statistics a model's FID reads. A dense model taken from another experiment
    (dense.from_experiment) and sampled with the same settings (seeds, count, sampler) in the same
    FID mode makes the same images: its FID reads the owner's statistics instead of sampling
    10k images a second time (if it also keeps the same features for PRDC); a sampler variant with its
    base model's sampler reads its base's."""
    if same_sampler_as_base(exp, variant):
        return statistics_file(exp, variant_metadata(exp)[variant]["base"])
    owner = owner_of_same_samples(exp, variant)
    if owner and statistics_settings(exp) == statistics_settings(owner):  # the same mode and kept features
        return f"results/fid_stats/{owner}/dense.npz"
    return f"results/fid_stats/{exp}/{variant}.npz"


def owner_of_same_samples(exp, variant):
    """The experiment whose dense samples are this variant's images (a dense model taken from it
    through dense.from_experiment, sampled with the same settings), or None."""
    owner = dense_owner(exp)
    if variant == "dense" and owner != exp and sample_settings(exp, "dense") == sample_settings(owner, "dense"):
        return owner
    return None


def scored_samples_file(exp, variant):
    """The samples a model's CLIP score reads: as statistics_file, a dense model taken from another
    experiment and sampled with the same settings (seeds, count, sampler, conditioning) has the same
    images, so the owner's are read instead of sampling them a second time."""
    if same_sampler_as_base(exp, variant):
        return scored_samples_file(exp, variant_metadata(exp)[variant]["base"])
    owner = owner_of_same_samples(exp, variant)
    return f"results/samples/{owner or exp}/{variant}/samples.npz"


def prdc_experiments():
    """The experiments whose models get precision, recall, density and coverage (prdc.enabled)."""
    return [exp for exp, spec in EXPERIMENTS.items() if spec["prdc"]["enabled"]]


def consistency_experiments():
    """The experiments whose models are compared with their dense model's samples (consistency.enabled)."""
    return [exp for exp, spec in EXPERIMENTS.items() if spec["consistency"]["enabled"]]


def clip_score_experiments():
    """The experiments whose models get a CLIP score (clip_score.enabled; igsm.config has checked
    that their conditioning gives each image a prompt)."""
    return [exp for exp, spec in EXPERIMENTS.items() if spec["clip_score"]["enabled"]]


def clip_score_settings(exp):
    """JSON of what a CLIP score job needs: the CLIP model and its batch, and the experiment's
    conditioning as the sample jobs get it (each image's prompt from its seed; a captions kind's
    sampling keys and prompt store, prompt_store_input); not 'enabled', which only makes the job."""
    settings = {k: v for k, v in EXPERIMENTS[exp]["clip_score"].items() if k != "enabled"}
    return as_json({"conditioning": sampling_conditioning(exp)[0], **settings})


def reuse_plan_file(exp, variant):
    """The gate table a variant samples with, or None (not a reuse variant, or a reuse method
    that alters the sampler's steps instead)."""
    meta = variant_metadata(exp)[variant]
    if meta["kind"] != "reuse" or REUSE_METHODS[meta["reuse_method"]].alters_sampler_steps:
        return None
    return f"results/reuse/{exp}/{variant}/plan.json"


def plan_option(exp, variant):
    """The `--plan FILE` arguments of a job, as a list for Snakemake's :q quoting, or []."""
    plan = reuse_plan_file(exp, variant)
    return ["--plan", plan] if plan else []


def sample_shard_files(exp, variant):
    num_shards = EXPERIMENTS[exp]["sample"]["num_shards"]
    return [f"results/samples/{exp}/{variant}/shard-{i}-of-{num_shards}.npz" for i in range(num_shards)]


def sample_png_dirs():
    """PNG folders of every scored model of the experiments with sample.png_export (bar sampler
    variants that read their base model's samples)."""
    return [
        f"results/samples/{exp}/{variant}/png"
        for exp in EXPERIMENTS
        if EXPERIMENTS[exp]["sample"]["png_export"]
        for variant in scored_variants(exp)
        if not same_sampler_as_base(exp, variant)
    ]


def exclusive_gpu_slots():
    """GPU slots of a job that must have its GPU to itself (the efficiency timing): all of them
    when the run limits `gpu` globally above 1 (jobs sharing GPUs: profiles/local), else 1."""
    limit = workflow.global_resources.get("gpu")
    limit = getattr(limit, "value", limit)
    return limit if isinstance(limit, int) and limit > 1 else 1


def times_samplers(exp):
    """Whether an experiment's efficiency jobs count (and on a GPU time) the sampler of each model:
    where models differ in their sampler's steps or gate table (block reuse, compare_samplers)."""
    return bool(EXPERIMENTS[exp]["reuse"]["models"] or EXPERIMENTS[exp]["compare_samplers"]["models"])


def efficiency_settings(exp):
    """How the efficiency stage runs the network: PyTorch's defaults, eager (the paper's way), or
    as the sample stage runs it."""
    if EXPERIMENTS[exp]["efficiency"]["network"] == "eager":
        return as_json({"precision": "tf32"})
    sample = EXPERIMENTS[exp]["sample"]
    return as_json({k: sample[k] for k in ("precision", "channels_last", "compile", "compile_mode")})


# ---- training jobs (dense, finetune): resources, processes, SLURM's signals --------------------
import signal

# SLURM's `--signal=USR1@<seconds>` (profiles/slurm) goes to every process of the job step, and
# Snakemake and the job's shell die of it (the default action), taking the training with them
# before it has written its snapshot. Inside a SLURM job they ignore it (their children inherit
# that); the training loop sets its own handler: snapshot, exit 75, Snakemake's retry resumes.
if "SLURM_JOB_ID" in os.environ:
    try:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    except ValueError:  # not the main thread (Snakemake's API used from a thread): nothing to do
        pass


def training_threads(stage):
    return lambda wildcards: training_job(config, stage, wildcards.get("exp"))["threads"]


def training_resources(stage):
    """Resources of a training job as functions of its wildcards (None: not set, for SLURM too).

    One node: gpu (`--gpus`), cpus_per_gpu. Several nodes: gres = GPUs per node, nodes, one task
    per node, and mpi = "srun" so that the SLURM plugin runs the command in the batch step, where
    `igsm train --nnodes` starts one torchrun per node with srun. tasks_per_gpu = 0 keeps the
    plugin from turning tasks into --ntasks-per-gpu. nproc_per_node and nnodes are read by the
    rule's command, not by the scheduler.
    """

    def settings(wildcards):
        return training_job(config, stage, wildcards.get("exp"))

    def several_nodes(value):
        return lambda w: value(settings(w)) if settings(w)["nodes"] > 1 else None

    return {
        "mem_mb": lambda w: settings(w)["mem_mb"],
        "runtime": lambda w: settings(w)["runtime"],
        "gpu": lambda w: settings(w)["gpu"] if settings(w)["gpu"] and settings(w)["nodes"] == 1 else None,
        "cpus_per_gpu": lambda w: (settings(w)["cpus_per_gpu"] if settings(w)["gpu"] else 0) or None,
        "gres": several_nodes(lambda s: f"gpu:{s['gpu']}" if s["gpu"] else None),
        "nodes": several_nodes(lambda s: s["nodes"]),
        "tasks": several_nodes(lambda s: s["nodes"]),
        "tasks_per_gpu": several_nodes(lambda s: 0),
        "mpi": several_nodes(lambda s: "srun"),
        "gpu_mem_mb": lambda w: settings(w)["gpu_mem_mb"] * settings(w)["gpu"] * settings(w)["nodes"],
        "nproc_per_node": lambda w: max(1, settings(w)["gpu"]),
        "nnodes": lambda w: settings(w)["nodes"],
    }


# ---- model releases (rules/release.smk) and their upload ------------------------------------------
from igsm.hub import looks_like_local_path
from igsm.plan import release_repo_name, released_models


def releases(exp):
    """{release: row} of the models an experiment releases."""
    return released_models(EXPERIMENTS[exp], config["objectives"])


def release_folders():
    return [f"results/release/{exp}/{release}" for exp in EXPERIMENTS for release in releases(exp)]


def publish_repo_id(exp, release):
    """The Hub repository of a release: publish.repo_prefix, then '<exp>-<release>' (igsm.config has
    checked every one against the Hub's rules); a WorkflowError where the prefix is not set."""
    prefix = config["publish"]["repo_prefix"]
    if not prefix:
        raise WorkflowError(
            "publish.repo_prefix is not set: give it (e.g. publish: {repo_prefix: 'your-name/igsm-'}) to upload the "
            "released models to the Hugging Face Hub"
        )
    return f"{prefix}{release_repo_name(exp, release)}"


def release_inputs(wildcards):
    """The files a release's folder is made from: the model and, where it has them, its FID,
    efficiency, training summary and prune report."""
    row = releases(wildcards.exp)[wildcards.release]
    variant = row["variant"]
    inputs = {}
    if row["kind"] == "dense":
        inputs["model"] = f"{dense_folder(wildcards.exp)}/model"
        inputs["summary"] = f"{dense_folder(wildcards.exp)}/summary.json"
    elif row["kind"] == "pruned":
        inputs["model"] = f"results/prune/{wildcards.exp}/{row['pruned']}/model"
    else:
        inputs["model"] = f"results/finetune/{wildcards.exp}/{variant}/model"
        inputs["summary"] = f"results/finetune/{wildcards.exp}/{variant}/summary.json"
    if variant:
        inputs["fid"] = f"results/fid/{wildcards.exp}/{variant}.json"
        inputs["efficiency"] = f"results/efficiency/{wildcards.exp}/{variant}.json"
    if row["pruned"]:
        inputs["prune_report"] = f"results/prune/{wildcards.exp}/{row['pruned']}/report.json"
    return inputs


def release_file_options(wildcards, input):
    """`--fid FILE` … for the inputs a release has, as a list for Snakemake's :q quoting."""
    return [
        word
        for key in ("fid", "efficiency", "summary", "prune_report")
        if key in input.keys()
        for word in (f"--{key.replace('_', '-')}", input[key])
    ]


def release_settings(exp, release):
    """JSON of what a release's card says besides its files: the row, the experiment's context (its
    dataset, family, conditioning; the dense model's hub id as base_model and for the paper's numbers;
    the repo id where publishing is configured) and the finetune objective's settings."""
    row = releases(exp)[release]
    owner = dense_owner(exp)
    pretrained = EXPERIMENTS[owner]["dense"]["pretrained"]
    prefix = config["publish"]["repo_prefix"]
    base_model = None
    if pretrained and not looks_like_local_path(pretrained):
        base_model = pretrained
    elif prefix and row["kind"] != "dense" and "dense" in releases(owner):
        base_model = f"{prefix}{release_repo_name(owner, 'dense')}"
    family = family_of_architecture(EXPERIMENTS[exp]["architecture"])
    dataset = EXPERIMENTS[exp]["dataset"]
    context = {
        "experiment": exp,
        "dataset": dataset,
        "dataset_source": config["datasets"][dataset]["source"],
        "conditioning_kind": EXPERIMENTS[exp]["conditioning"]["kind"],
        "family": family.name,
        "family_title": family.title,
        "base_model": base_model,
        "dense_model": pretrained or "",
        "repo_id": f"{prefix}{release_repo_name(exp, release)}" if prefix else None,
    }
    objective = objective_settings(row["objective"]) if row["kind"] == "finetuned" else None
    return as_json({"row": row, "context": context, "objective": objective})
