# Shared helpers: naming of model variants, input functions, settings and resources per stage.
import json

from snakemake.exceptions import WorkflowError

EXPERIMENTS = config["experiments"]

# Jobs run the package of this checkout (`python -m igsm`), whether it is pip-installed or not:
# the per-stage conda environments in envs/ hold only third-party dependencies.
shell.prefix(f"export PYTHONPATH={workflow.basedir}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")


wildcard_constraints:
    exp="[^/]+",
    dataset="[^/]+",
    criterion="[a-z-]+",
    ratio="[0-9.]+",
    objective="[^/]+",


def check_config():
    """Cross-references the schema cannot express, named by their config keys."""
    for name, exp in EXPERIMENTS.items():
        key = f"experiments.{name}"
        if exp["dataset"] not in config["datasets"]:
            raise WorkflowError(
                f"{key}.dataset: unknown dataset {exp['dataset']!r}; defined: {sorted(config['datasets'])}"
            )
        dense = exp["dense"]
        if not dense["pretrained"] and "training" not in dense:
            raise WorkflowError(f"{key}.dense: give 'pretrained' or 'training'")
        if not dense["pretrained"] and not exp["architecture"]:
            raise WorkflowError(f"{key}.architecture: needed to train the dense model")
        if exp["untrained_baseline"] and not exp["architecture"]:
            raise WorkflowError(f"{key}.architecture: needed by untrained_baseline")
        runs = exp["finetune"]["runs"]
        if runs and "training" not in exp["finetune"]:
            raise WorkflowError(f"{key}.finetune.training: needed by finetune.runs")
        for i, run in enumerate(runs):
            for objective in run["objectives"]:
                if objective not in config["objectives"]:
                    raise WorkflowError(
                        f"{key}.finetune.runs[{i}].objectives: unknown objective {objective!r}; "
                        f"defined under 'objectives': {sorted(config['objectives'])}"
                    )


check_config()


def ratio_label(ratio):
    return f"{float(ratio):g}"


def pruned_variant(criterion, ratio):
    return f"{criterion}-cr{ratio_label(ratio)}"


def finetuned_variants(exp):
    """'<criterion>-cr<ratio>/<objective>' for every finetuning run of an experiment."""
    settings = EXPERIMENTS[exp]
    out = []
    for run in settings["finetune"]["runs"]:
        criterion = run.get("criterion", settings["prune"]["criterion"])
        for objective in run["objectives"]:
            out.append(f"{pruned_variant(criterion, run['channel_ratio'])}/{objective}")
    return out


def scored_variants(exp):
    """Every model of an experiment that gets samples and an FID."""
    baseline = ["untrained"] if EXPERIMENTS[exp]["untrained_baseline"] else []
    return ["dense"] + baseline + finetuned_variants(exp)


def dense_model(wildcards):
    kind = "pretrained" if EXPERIMENTS[wildcards.exp]["dense"]["pretrained"] else "trained"
    return f"results/dense/{wildcards.exp}/{kind}/model"


def model_dir(wildcards):
    """The folder of a scored model variant."""
    if wildcards.variant == "dense":
        return dense_model(wildcards)
    if wildcards.variant == "untrained":
        return f"results/untrained/{wildcards.exp}/model"
    return f"results/finetune/{wildcards.exp}/{wildcards.variant}/model"


def dataset_file(wildcards):
    return f"results/data/{EXPERIMENTS[wildcards.exp]['dataset']}/train.npz"


def as_json(payload):
    return json.dumps(payload, sort_keys=True)


def stage_settings(exp, section):
    """JSON of one config section of an experiment, with the experiment's diffusion schedule."""
    return as_json({"diffusion": EXPERIMENTS[exp]["diffusion"], **EXPERIMENTS[exp][section]})


def objective_settings(name):
    """An 'objectives' entry as igsm.objectives.build_objective takes it."""
    spec = config["objectives"][name]
    settings = {key: spec[key] for key in ("weights", "projection", "num_directions", "directions")}
    if spec["directions"] == "otd":
        settings["otd"] = spec["otd"]
    return settings


def resource(stage, key):
    """A job resource of a stage, from the config's 'resources.<stage>.<key>'."""
    return config["resources"][stage][key]


def fid_reference_file(exp):
    settings = EXPERIMENTS[exp]
    fid = settings["fid"]
    return f"results/fid_reference/{settings['dataset']}/{fid['mode']}-n{fid['num_reference']}.npz"


def all_table_files():
    return [f"results/tables/{exp}.md" for exp in EXPERIMENTS] + (
        ["results/tables/all.md"] if EXPERIMENTS else []
    )


def table_rows(exp):
    """One entry per scored model: its metadata and the JSON files that hold its numbers."""
    settings = EXPERIMENTS[exp]
    rows = []
    for variant in scored_variants(exp):
        row = {
            "variant": variant,
            "fid": f"results/fid/{exp}/{variant}.json",
            "efficiency": f"results/efficiency/{exp}/{variant}.json",
            "summary": None,
            "prune_report": None,
            "criterion": "",
            "channel_ratio": None,
            "objective": variant,
            "weights": None,
        }
        if variant == "dense" and not settings["dense"]["pretrained"]:
            row["summary"] = f"results/dense/{exp}/trained/summary.json"
        if "/" in variant:
            pruned, objective = variant.split("/")
            criterion, ratio = pruned.rsplit("-cr", 1)
            row.update(
                criterion=criterion,
                channel_ratio=float(ratio),
                objective=objective,
                weights=config["objectives"][objective]["weights"],
                summary=f"results/finetune/{exp}/{variant}/summary.json",
                prune_report=f"results/prune/{exp}/{pruned}/report.json",
            )
        rows.append(row)
    return rows


def table_inputs(exp):
    return [path for row in table_rows(exp) for key, path in row.items()
            if key in ("fid", "efficiency", "summary", "prune_report") and path]
