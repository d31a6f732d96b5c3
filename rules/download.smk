# Stage 1: datasets into results/data/<dataset>/train, an image store (igsm/data/store.py:
# memory-mapped uint8 N×H×W×C shards + labels, with their digests), published whole when complete.


rule download:
    output:
        data=directory("results/data/{dataset}/train"),
    log:
        "results/logs/download/{dataset}.log",
    benchmark:
        "results/benchmarks/download/{dataset}.tsv"
    conda:
        "../envs/download.yaml"
    threads: resource("download", "threads")
    resources:
        mem_mb=resource("download", "mem_mb"),
        runtime=resource("download", "runtime"),
        gpu=resource("download", "gpu"),
        gpu_mem_mb=gpu_memory("download"),
    params:
        settings=lambda w: as_json(config["datasets"][w.dataset]),
        cache="results/data/{dataset}/raw",
    shell:
        "python -m igsm download --settings {params.settings:q} --cache-dir {params.cache:q} "
        "--out {output.data:q} > {log:q} 2>&1"
