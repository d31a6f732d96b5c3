# Stage 4: finetune a pruned student against the dense teacher with a named objective (Sec. 4).
# With several GPUs `igsm train` runs itself under torchrun (DDP, same global batch); a job stopped
# by SLURM (time limit, preemption) leaves a snapshot in checkpoints/ and its rerun continues.


rule finetune:
    input:
        student="results/prune/{exp}/{criterion}-cr{ratio}/model",
        teacher=dense_model,
        data=dataset_file,
        autoencoder=autoencoder_input,
    output:
        model=directory("results/finetune/{exp}/{criterion}-cr{ratio}/{objective}/model"),
        metrics="results/finetune/{exp}/{criterion}-cr{ratio}/{objective}/metrics.jsonl",
        summary="results/finetune/{exp}/{criterion}-cr{ratio}/{objective}/summary.json",
    log:
        "results/logs/finetune/{exp}/{criterion}-cr{ratio}/{objective}.log",
    benchmark:
        "results/benchmarks/finetune/{exp}/{criterion}-cr{ratio}/{objective}.tsv"
    # The longest chain first (rules/dense.smk).
    priority: 10
    conda:
        "../envs/train.yaml"
    threads: training_threads("finetune")
    resources:
        **training_resources("finetune"),
    params:
        settings=lambda w: as_json(
            {
                **experiment_context(w.exp),
                "training": {
                    **EXPERIMENTS[w.exp]["finetune"]["training"],
                    "objective": objective_settings(w.objective),
                },
            }
        ),
        checkpoints="results/finetune/{exp}/{criterion}-cr{ratio}/{objective}/checkpoints",
    # exec: the training is the job's process, so SLURM's SIGTERM (time limit, preemption) reaches
    # it with no shell in between to die first; it snapshots and the rerun continues.
    shell:
        "exec python -m igsm train --model {input.student:q} --teacher {input.teacher:q} --data {input.data:q} "
        "--settings {params.settings:q} --out {output.model:q} --checkpoint-dir {params.checkpoints:q} "
        "--metrics {output.metrics:q} --summary {output.summary:q} --threads {threads} "
        "--nproc-per-node {resources.nproc_per_node} --nnodes {resources.nnodes} > {log:q} 2>&1"
