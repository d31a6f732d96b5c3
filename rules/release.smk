# Stage 8: model releases (issue 32, item 3). Each released model (igsm.plan.released_models: the dense
# model trained here, every pruned model, every finetune) gets a folder of its own under
# results/release/<exp>/<release>/ (the model folders other rules own stay theirs): the model's files,
# a Hugging Face model card made from the workflow's JSON files and, where diffusers can express the
# network, diffusers' files. `publish_models` uploads them to the Hub under the config's
# publish.repo_prefix (off by default), with a receipt per model in results/publish/. Input functions
# and settings: rules/common.smk.


# Seconds each (a model loaded, its card written; an upload): in Snakemake's own process's node, where
# the Hub is reachable on a cluster (compute nodes often have no internet).
localrules:
    release,
    publish,


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
        "python -m igsm publish --folder {input.folder:q} --repo-id {params.repo_id:q} {params.visibility:q} "
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
