# Stage 6: Inception statistics of the training set (cached per dataset, mode and size; an
# image-folder dataset gets its own) and of each scored model's samples (from the samples array, no
# PNG files; GPU jobs), then the FID of each model from the two statistics files alone (a CPU job:
# if it fails, its rerun never recomputes features; a dense model shared through dense.from_experiment
# is sampled and featurised once, common.smk statistics_file); plus parameter and MAC counts and network
# throughput of each model.


# The FID from two statistics files: seconds on a CPU, in Snakemake's own process (tables.smk).
localrules:
    fid,


# With PRDC (prdc.enabled), the file also keeps some images' features and its name says which
# (common.smk reference_features); without, name, settings and command are those from before PRDC.
rule fid_reference:
    input:
        data="results/data/{dataset}/train",
    output:
        stats="results/fid_reference/{dataset}/{mode}-n{num}{features}.npz",
    log:
        "results/logs/fid_reference/{dataset}/{mode}-n{num}{features}.log",
    benchmark:
        "results/benchmarks/fid_reference/{dataset}/{mode}-n{num}{features}.tsv"
    wildcard_constraints:
        num="[0-9]+",
        features=REFERENCE_FEATURES,
    conda:
        "../envs/fid.yaml"
    threads: resource("fid", "threads")
    resources:
        mem_mb=resource("fid", "mem_mb"),
        runtime=resource("fid", "runtime"),
        gpu=resource("fid", "gpu"),
        gpu_mem_mb=gpu_memory("fid"),
    params:
        settings=reference_settings,
    shell:
        "python -m igsm fid-reference --data {input.data:q} --settings {params.settings:q} "
        "--out {output.stats:q} --threads {threads} > {log:q} 2>&1"


# Only the mode changes the features: another num_reference reruns the distance, not this. With
# PRDC, the file also keeps the first prdc.num_features images' features. A dense model borrowed
# with the same samples but other statistics settings (mode, PRDC) reads the owner's samples.
rule fid_statistics:
    input:
        samples=lambda w: scored_samples_file(w.exp, w.variant),
    output:
        stats="results/fid_stats/{exp}/{variant}.npz",
    log:
        "results/logs/fid_statistics/{exp}/{variant}.log",
    benchmark:
        "results/benchmarks/fid_statistics/{exp}/{variant}.tsv"
    conda:
        "../envs/fid.yaml"
    threads: resource("fid", "threads")
    resources:
        mem_mb=resource("fid", "mem_mb"),
        runtime=resource("fid", "runtime"),
        gpu=resource("fid", "gpu"),
        gpu_mem_mb=gpu_memory("fid"),
    params:
        settings=lambda w: as_json(statistics_settings(w.exp)),
    shell:
        "python -m igsm fid-statistics --samples {input.samples:q} --settings {params.settings:q} "
        "--out {output.stats:q} --threads {threads} > {log:q} 2>&1"


rule fid:
    input:
        statistics=lambda w: statistics_file(w.exp, w.variant),
        reference=lambda w: fid_reference_file(w.exp),
    output:
        score="results/fid/{exp}/{variant}.json",
    log:
        "results/logs/fid/{exp}/{variant}.log",
    wildcard_constraints:
        exp=_one_of([exp for exp in EXPERIMENTS if exp not in prdc_experiments()]),
    conda:
        "../envs/fid.yaml"
    threads: 1
    resources:
        mem_mb=resource("tables", "mem_mb"),
        runtime=resource("tables", "runtime"),
        gpu=0,
    params:
        settings=lambda w: stage_settings(w.exp, "fid"),
        prdc=[],
    shell:
        "python -m igsm fid --statistics {input.statistics:q} --reference {input.reference:q} "
        "--out {output.score:q} {params.prdc:q} --settings {params.settings:q} --threads {threads} > {log:q} 2>&1"


# Stage 6d (issue 32 item 4): with prdc.enabled, the FID job also writes precision, recall, density
# and coverage (Naeem et al. 2020; igsm/stages/prdc.py) of the model's samples against the FID
# reference images, from the Inception features both statistics files keep beside mu and sigma (no
# Inception run here): one process reads the two files for both (a job of its own was ~5 s of
# start-up each for milliseconds of work, BENCHMARKS.md). A cluster job, not the login node's: on
# 10k × 10k features PRDC holds three float32 distance matrices and argpartition's indices, ~2 GB.
use rule fid as fid_prdc with:
    output:
        score="results/fid/{exp}/{variant}.json",
        prdc="results/prdc/{exp}/{variant}.json",
    wildcard_constraints:
        exp=_one_of(prdc_experiments()),
    resources:
        mem_mb=resource("fid", "mem_mb"),
        runtime=resource("fid", "runtime"),
        gpu=0,
    params:
        prdc=lambda w, output: ["--prdc-out", output.prdc, "--nearest-k", EXPERIMENTS[w.exp]["prdc"]["nearest_k"]],


# Parameters and MACs everywhere; images/s of the network only where the job has a GPU (the
# sample stage's GPUs, precision and memory format), else null: the demo stays cheap on a CPU.
# Experiments with block reuse or sampler variants (compare_samplers) also get the sampler's MACs per
# image and, on a GPU, whole sampling chains per second (with the variant's gate table or sampler).
rule efficiency:
    input:
        model=model_dir,
        plan=lambda w: reuse_plan_file(w.exp, w.variant) or [],
        # The sampler's prompts (a captions kind), where the sampling chains are timed.
        prompts=lambda w: prompt_store_input(w) if times_samplers(w.exp) else [],
    output:
        info="results/efficiency/{exp}/{variant}.json",
    log:
        "results/logs/efficiency/{exp}/{variant}.log",
    conda:
        "../envs/prune.yaml"
    threads: 1
    resources:
        mem_mb=resource("sample", "mem_mb"),
        runtime=resource("tables", "runtime"),
        # The GPU alone, whatever the run's sharing limit: timings of shared GPUs are contention.
        gpu=exclusive_gpu_slots() if resource("sample", "gpu") else 0,
        gpu_mem_mb=gpu_memory("sample", min(1, resource("sample", "gpu"))),
    params:
        settings=lambda w: efficiency_settings(w.exp),
        batch_size=lambda w: EXPERIMENTS[w.exp]["efficiency"]["batch_size"],
        sampler=lambda w: (["--sampler-settings", sample_settings(w.exp, w.variant)] if times_samplers(w.exp) else []),
        plan=lambda w: plan_option(w.exp, w.variant),
    shell:
        "python -m igsm efficiency --model {input.model:q} --settings {params.settings:q} {params.sampler:q} "
        "{params.plan:q} --batch-size {params.batch_size:q} --out {output.info:q} --threads {threads} > {log:q} 2>&1"
