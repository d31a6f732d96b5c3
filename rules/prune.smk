# Stage 3: structural pruning of the dense model at one channel ratio (Diff-Pruning and baselines).


rule prune:
    input:
        model=dense_model,
        data=dataset_file,
        autoencoder=autoencoder_input,
    output:
        model=directory("results/prune/{exp}/{criterion}-cr{ratio}/model"),
        report="results/prune/{exp}/{criterion}-cr{ratio}/report.json",
    log:
        "results/logs/prune/{exp}/{criterion}-cr{ratio}.log",
    benchmark:
        "results/benchmarks/prune/{exp}/{criterion}-cr{ratio}.tsv"
    # The longest chain first (rules/dense.smk).
    priority: 10
    conda:
        "../envs/prune.yaml"
    threads: resource("prune", "threads")
    resources:
        mem_mb=resource("prune", "mem_mb"),
        runtime=resource("prune", "runtime"),
        gpu=resource("prune", "gpu"),
        gpu_mem_mb=gpu_memory("prune"),
    params:
        settings=lambda w: stage_settings(w.exp, "prune", runs_network=True),
    shell:
        "python -m igsm prune --model {input.model:q} --data {input.data:q} --criterion {wildcards.criterion:q} "
        "--channel-ratio {wildcards.ratio:q} --settings {params.settings:q} --out {output.model:q} "
        "--report {output.report:q} --threads {threads} > {log:q} 2>&1"


# The picture a pruning method draws of its report (its report_picture; gradient flow: the masks over
# the flow, final widths), for the methods that declare one.
rule prune_report_picture:
    input:
        report="results/prune/{exp}/{criterion}-cr{ratio}/report.json",
    output:
        picture=report(
            "results/prune/{exp}/{criterion}-cr{ratio}/{picture}",
            caption="../report/prune_picture.rst",
            category="Pruning",
            labels={"experiment": "{exp}", "pruning": "{criterion}-cr{ratio}"},
        ),
    log:
        "results/logs/prune_report_picture/{exp}/{criterion}-cr{ratio}/{picture}.log",
    wildcard_constraints:
        picture="|".join(re.escape(name) for name in report_pictures()) or "(?!)",
    conda:
        "../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=resource("tables", "mem_mb"),
        runtime=resource("tables", "runtime"),
    shell:
        "python -m igsm draw-prune-report --report {input.report:q} --criterion {wildcards.criterion:q} "
        "--out {output.picture:q} > {log:q} 2>&1"
