# Stage 4: finetune a pruned student against the dense teacher with a named objective (Sec. 4).


rule finetune:
    conda:
        "../envs/train.yaml"
    input:
        student="results/prune/{exp}/{criterion}-cr{ratio}/model",
        teacher=dense_model,
        data=dataset_file,
    output:
        model=directory("results/finetune/{exp}/{criterion}-cr{ratio}/{objective}/model"),
        metrics="results/finetune/{exp}/{criterion}-cr{ratio}/{objective}/metrics.jsonl",
        summary="results/finetune/{exp}/{criterion}-cr{ratio}/{objective}/summary.json",
    params:
        settings=lambda w: as_json(
            {
                "diffusion": EXPERIMENTS[w.exp]["diffusion"],
                "training": {
                    **EXPERIMENTS[w.exp]["finetune"]["training"],
                    "objective": objective_settings(w.objective),
                },
            }
        ),
        checkpoints="results/finetune/{exp}/{criterion}-cr{ratio}/{objective}/checkpoints",
    log:
        "results/logs/finetune/{exp}/{criterion}-cr{ratio}/{objective}.log",
    benchmark:
        "results/benchmarks/finetune/{exp}/{criterion}-cr{ratio}/{objective}.tsv"
    threads: resource("finetune", "threads")
    resources:
        mem_mb=resource("finetune", "mem_mb"),
        runtime=resource("finetune", "runtime"),
        gpu=resource("finetune", "gpu"),
    shell:
        "python -m igsm train --model {input.student} --teacher {input.teacher} --data {input.data} "
        "--settings {params.settings:q} --out {output.model} --checkpoint-dir {params.checkpoints} "
        "--metrics {output.metrics} --summary {output.summary} --threads {threads} > {log} 2>&1"
