# Stage 5: generate images from every scored model (DDIM for U-Nets, Euler–Maruyama for U-ViT;
# a block-reuse variant with its gate table, rules/reuse.smk).
# `sample.num_shards` jobs per model, each making a contiguous range of seeds (resources.sample.gpu
# > 1 runs torchrun inside each job); a gather step joins them in seed order and checks that every
# seed is there once. A job that dies keeps its finished batches in <shard>.npz.partial/ and its
# rerun does only the missing ones; a finished shard is never redone.


rule sample:
    input:
        model=model_dir,
        plan=lambda w: reuse_plan_file(w.exp, w.variant) or [],
        autoencoder=autoencoder_input,
        prompts=prompt_store_input,
    output:
        shard="results/samples/{exp}/{variant}/shard-{shard}-of-{num_shards}.npz",
    log:
        "results/logs/sample/{exp}/{variant}/shard-{shard}-of-{num_shards}.log",
    benchmark:
        "results/benchmarks/sample/{exp}/{variant}/shard-{shard}-of-{num_shards}.tsv"
    wildcard_constraints:
        shard="[0-9]+",
        num_shards="[0-9]+",
    conda:
        "../envs/sample.yaml"
    threads: resource("sample", "threads")
    resources:
        mem_mb=resource("sample", "mem_mb"),
        runtime=resource("sample", "runtime"),
        gpu=resource("sample", "gpu"),
        gpu_mem_mb=gpu_memory("sample"),
        # A resource, not a param: another GPU count does not make finished shards stale (images
        # do not depend on it).
        nproc_per_node=max(1, resource("sample", "gpu")),
    params:
        settings=lambda w: sample_settings(w.exp, w.variant),
        plan=lambda w: plan_option(w.exp, w.variant),
        num_images=lambda w: EXPERIMENTS[w.exp]["sample"]["num_images"],
        first_seed=lambda w: EXPERIMENTS[w.exp]["sample"]["seed"],
    shell:
        "python -m igsm sample --model {input.model:q} --num-images {params.num_images:q} "
        "--first-seed {params.first_seed:q} --shard {wildcards.shard:q}/{wildcards.num_shards:q} "
        "--nproc-per-node {resources.nproc_per_node} --settings {params.settings:q} {params.plan:q} --out {output.shard:q} "
        "--threads {threads} > {log:q} 2>&1"


rule sample_gather:
    input:
        shards=lambda w: sample_shard_files(w.exp, w.variant),
    output:
        samples="results/samples/{exp}/{variant}/samples.npz",
        grid=report(
            "results/samples/{exp}/{variant}/grid.png",
            caption="../report/samples.rst",
            category="Samples",
            subcategory="{exp}",
            labels={"experiment": "{exp}", "model": "{variant}"},
        ),
    log:
        "results/logs/sample_gather/{exp}/{variant}.log",
    conda:
        "../envs/sample.yaml"
    threads: 1
    resources:
        mem_mb=resource("tables", "mem_mb"),
        runtime=resource("tables", "runtime"),
    params:
        num_images=lambda w: EXPERIMENTS[w.exp]["sample"]["num_images"],
        first_seed=lambda w: EXPERIMENTS[w.exp]["sample"]["seed"],
    shell:
        "python -m igsm gather-samples --first-seed {params.first_seed:q} --num-images {params.num_images:q} "
        "--out {output.samples:q} --grid {output.grid:q} {input.shards:q} > {log:q} 2>&1"


# PNG files of a model's samples, for users who want them (FID reads samples.npz directly):
# `snakemake all_sample_pngs` with `sample.png_export: true`, or ask for one folder.
rule sample_png:
    input:
        samples="results/samples/{exp}/{variant}/samples.npz",
    output:
        folder=directory("results/samples/{exp}/{variant}/png"),
    log:
        "results/logs/sample_png/{exp}/{variant}.log",
    conda:
        "../envs/sample.yaml"
    threads: 1
    resources:
        mem_mb=resource("tables", "mem_mb"),
        runtime=resource("tables", "runtime"),
    shell:
        "python -m igsm export-png --samples {input.samples:q} --out {output.folder:q} > {log:q} 2>&1"


rule all_sample_pngs:
    input:
        sample_png_dirs(),
