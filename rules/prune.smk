# Stage 3: structural pruning of the dense model at one channel ratio (Diff-Pruning and baselines).


rule prune:
    conda:
        "../envs/prune.yaml"
    input:
        model=dense_model,
        data=dataset_file,
    output:
        model=directory("results/prune/{exp}/{criterion}-cr{ratio}/model"),
        report="results/prune/{exp}/{criterion}-cr{ratio}/report.json",
    params:
        settings=lambda w: stage_settings(w.exp, "prune"),
    log:
        "results/logs/prune/{exp}/{criterion}-cr{ratio}.log",
    benchmark:
        "results/benchmarks/prune/{exp}/{criterion}-cr{ratio}.tsv"
    threads: resource("prune", "threads")
    resources:
        mem_mb=resource("prune", "mem_mb"),
        runtime=resource("prune", "runtime"),
        gpu=resource("prune", "gpu"),
    shell:
        "python -m igsm prune --model {input.model} --data {input.data} --criterion {wildcards.criterion} "
        "--channel-ratio {wildcards.ratio} --settings {params.settings:q} --out {output.model} "
        "--report {output.report} --threads {threads} > {log} 2>&1"
