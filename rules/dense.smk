# Stage 2: the dense teacher, either a pretrained diffusers U-Net or trained here from scratch
# (with the same training loop and the NP objective). Also the untrained baseline.


rule untrained:
    output:
        model=directory("results/untrained/{exp}/model"),
    log:
        "results/logs/untrained/{exp}.log",
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=resource("download", "mem_mb"),
        runtime=resource("download", "runtime"),
    params:
        settings=lambda w: architecture_settings(w.exp),
        seed=lambda w: EXPERIMENTS[w.exp]["dense"].get("training", {}).get("seed", 0),
    shell:
        "python -m igsm init --settings {params.settings:q} --seed {params.seed:q} --out {output.model:q} > {log:q} 2>&1"


rule dense_pretrained:
    output:
        model=directory("results/dense/{exp}/pretrained/model"),
    log:
        "results/logs/dense/{exp}.log",
    wildcard_constraints:
        exp=_one_of([e for e in EXPERIMENTS if e not in ARCHITECTURE_PRETRAINED_EXPERIMENTS]),
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=resource("download", "mem_mb"),
        runtime=resource("download", "runtime"),
    params:
        model_id=lambda w: EXPERIMENTS[w.exp]["dense"]["pretrained"],
    shell:
        "python -m igsm pretrained --model-id {params.model_id:q} --out {output.model:q} > {log:q} 2>&1"


# Families whose checkpoints are plain state dicts (U-ViT's: the architecture builds their skeleton),
# or whose hub ids are not U-Nets (DiT, SD's U-Net: the architecture names their family). A rule of
# its own, so that the U-Net rule's params (and the results made with it) stay as they were.
rule dense_pretrained_uvit:
    output:
        model=directory("results/dense/{exp}/pretrained/model"),
    log:
        "results/logs/dense/{exp}.log",
    wildcard_constraints:
        exp=_one_of(ARCHITECTURE_PRETRAINED_EXPERIMENTS),
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=resource("download", "mem_mb"),
        runtime=resource("download", "runtime"),
    params:
        model_id=lambda w: EXPERIMENTS[w.exp]["dense"]["pretrained"],
        settings=lambda w: architecture_settings(w.exp),
        cache="results/dense/{exp}/pretrained/download",
    shell:
        "python -m igsm pretrained --model-id {params.model_id:q} --settings {params.settings:q} "
        "--cache-dir {params.cache:q} --out {output.model:q} > {log:q} 2>&1"


rule dense_trained:
    input:
        init="results/untrained/{exp}/model",
        data=dataset_file,
        autoencoder=autoencoder_input,
    output:
        model=directory("results/dense/{exp}/trained/model"),
        metrics="results/dense/{exp}/trained/metrics.jsonl",
        summary="results/dense/{exp}/trained/summary.json",
    log:
        "results/logs/dense/{exp}.log",
    benchmark:
        "results/benchmarks/dense/{exp}.tsv"
    # The longest chain (dense → prune → finetune → sample → FID) starts each link as soon as it can: Snakemake
    # otherwise runs whatever is ready first (the demo's prune waited 90 s behind the dense model's
    # sampler variants and reuse plans, BENCHMARKS.md "CPU demo").
    priority: 10
    conda:
        "../envs/train.yaml"
    threads: training_threads("dense")
    resources:
        **training_resources("dense"),
    params:
        settings=lambda w: as_json(
            {
                **experiment_context(w.exp),
                "training": {**EXPERIMENTS[w.exp]["dense"]["training"], "objective": {"weights": {"np": 1.0}}},
            }
        ),
        checkpoints="results/dense/{exp}/trained/checkpoints",
    shell:  # exec and processes: as rule finetune
        "exec python -m igsm train --model {input.init:q} --data {input.data:q} --settings {params.settings:q} "
        "--out {output.model:q} --checkpoint-dir {params.checkpoints:q} --metrics {output.metrics:q} "
        "--summary {output.summary:q} --threads {threads} "
        "--nproc-per-node {resources.nproc_per_node} --nnodes {resources.nnodes} > {log:q} 2>&1"
