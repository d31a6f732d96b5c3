# Stage 6: Inception statistics of the training set (cached per dataset, mode and size; an
# image-folder dataset gets its own), then the FID of each scored model against them, from the
# samples array (no PNG files); plus parameter and MAC counts and network throughput of each model.


rule fid_reference:
    conda:
        "../envs/fid.yaml"
    input:
        data="results/data/{dataset}/train.npz",
    output:
        stats="results/fid_reference/{dataset}/{mode}-n{num}.npz",
    params:
        settings=lambda w: as_json({"mode": w.mode, "num_reference": int(w.num)}),
    log:
        "results/logs/fid_reference/{dataset}/{mode}-n{num}.log",
    benchmark:
        "results/benchmarks/fid_reference/{dataset}/{mode}-n{num}.tsv"
    threads: resource("fid", "threads")
    resources:
        mem_mb=resource("fid", "mem_mb"),
        runtime=resource("fid", "runtime"),
        gpu=resource("fid", "gpu"),
    shell:
        "python -m igsm fid-reference --data {input.data} --settings {params.settings:q} --out {output.stats} "
        "--threads {threads} > {log} 2>&1"


rule fid:
    conda:
        "../envs/fid.yaml"
    input:
        samples="results/samples/{exp}/{variant}/samples.npz",
        reference=lambda w: fid_reference_file(w.exp),
    output:
        score="results/fid/{exp}/{variant}.json",
    params:
        settings=lambda w: stage_settings(w.exp, "fid"),
    log:
        "results/logs/fid/{exp}/{variant}.log",
    benchmark:
        "results/benchmarks/fid/{exp}/{variant}.tsv"
    threads: resource("fid", "threads")
    resources:
        mem_mb=resource("fid", "mem_mb"),
        runtime=resource("fid", "runtime"),
        gpu=resource("fid", "gpu"),
    shell:
        "python -m igsm fid --samples {input.samples} --reference {input.reference} "
        "--settings {params.settings:q} --out {output.score} --threads {threads} > {log} 2>&1"


# Parameters and MACs everywhere; images/s of the network only where the job has a GPU (the
# sample stage's GPUs, precision and memory format), else null: the demo stays cheap on a CPU.
rule efficiency:
    conda:
        "../envs/prune.yaml"
    input:
        model=model_dir,
    output:
        info="results/efficiency/{exp}/{variant}.json",
    params:
        settings=lambda w: efficiency_settings(w.exp),
        batch_size=lambda w: EXPERIMENTS[w.exp]["efficiency"]["batch_size"],
    log:
        "results/logs/efficiency/{exp}/{variant}.log",
    threads: 1
    resources:
        mem_mb=resource("sample", "mem_mb"),
        runtime=resource("tables", "runtime"),
        gpu=min(resource("sample", "gpu"), 1),
    shell:
        "python -m igsm efficiency --model {input.model} --settings {params.settings:q} "
        "--batch-size {params.batch_size} --out {output.info} --threads {threads} > {log} 2>&1"
