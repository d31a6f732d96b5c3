# Stage 8: model releases (issue 32, item 3). Each released model (igsm.plan.released_models: the dense
# model trained here, every pruned model, every finetune) gets a folder of its own under
# results/release/<exp>/<release>/ (the model folders other rules own stay theirs): the model's files,
# a Hugging Face model card made from the workflow's JSON files and, where diffusers can express the
# network, diffusers' files. `publish_models` uploads them to the Hub under the config's
# publish.repo_prefix (off by default), with a receipt per model in results/publish/.
from igsm.hub import looks_like_local_path
from igsm.plan import release_repo_name, released_models


# Seconds each (a model loaded, its card written; an upload): in Snakemake's own process's node, where
# the Hub is reachable on a cluster (compute nodes often have no internet).
localrules:
    release,
    publish,


def releases(exp):
    """{release: row} of the models an experiment releases."""
    return released_models(EXPERIMENTS[exp], config["objectives"])


def release_folders():
    return [f"results/release/{exp}/{release}" for exp in EXPERIMENTS for release in releases(exp)]


def publish_repo_id(exp, release):
    """The Hub repository of a release: publish.repo_prefix + '<exp>-<release>' (igsm.config has
    checked every one against the Hub's rules); a WorkflowError where the prefix is not set."""
    prefix = config["publish"]["repo_prefix"]
    if not prefix:
        raise WorkflowError(
            "publish.repo_prefix is not set: give it (e.g. publish: {repo_prefix: 'your-name/igsm-'}) to upload the "
            "released models to the Hugging Face Hub"
        )
    return prefix + release_repo_name(exp, release)


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
        base_model = prefix + release_repo_name(owner, "dense")
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
        "repo_id": prefix + release_repo_name(exp, release) if prefix else None,
    }
    objective = objective_settings(row["objective"]) if row["kind"] == "finetuned" else None
    return as_json({"row": row, "context": context, "objective": objective})


rule release:
    input:
        unpack(release_inputs),
    output:
        folder=directory("results/release/{exp}/{release}"),
    log:
        "results/logs/release/{exp}/{release}.log",
    wildcard_constraints:
        release=_one_of(sorted({release for exp in EXPERIMENTS for release in releases(exp)})),
    conda:
        "../envs/prune.yaml"
    threads: 1
    resources:
        mem_mb=resource("tables", "mem_mb"),
        runtime=resource("tables", "runtime"),
    params:
        files=release_file_options,
        settings=lambda w: release_settings(w.exp, w.release),
    shell:
        "python -m igsm release --model {input.model:q} --out {output.folder:q} {params.files:q} "
        "--settings {params.settings:q} > {log:q} 2>&1"


# Every released model's folder and card; part of the default target (all_results).
rule model_cards:
    input:
        release_folders(),


rule publish:
    input:
        folder="results/release/{exp}/{release}",
    output:
        receipt="results/publish/{exp}/{release}.json",
    log:
        "results/logs/publish/{exp}/{release}.log",
    wildcard_constraints:
        release=_one_of(sorted({release for exp in EXPERIMENTS for release in releases(exp)})),
    conda:
        "../envs/prune.yaml"
    threads: 1
    resources:
        mem_mb=resource("tables", "mem_mb"),
        runtime=resource("tables", "runtime"),
    params:
        repo_id=lambda w: publish_repo_id(w.exp, w.release),
        visibility="--private" if config["publish"]["private"] else "--public",
        revision=["--revision", config["publish"]["revision"]] if config["publish"]["revision"] else [],
    shell:
        "python -m igsm publish --folder {input.folder:q} --repo-id {params.repo_id:q} {params.visibility} "
        "{params.revision:q} --receipt {output.receipt:q} > {log:q} 2>&1"


# Upload every released model (publish.repo_prefix must be set; not part of any other target).
rule publish_models:
    input:
        lambda w: [
            f"results/publish/{exp}/{release}.json"
            for exp in EXPERIMENTS
            for release in releases(exp)
            if publish_repo_id(exp, release)
        ],
