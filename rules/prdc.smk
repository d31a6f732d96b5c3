# Stage 6d (issue 32 item 4): precision, recall, density and coverage (Naeem et al. 2020) of each
# scored model's samples against the FID reference images, for experiments with prdc.enabled
# (igsm/stages/prdc.py), from the Inception features the statistics files keep beside mu and sigma
# (no Inception run here), one JSON per model, read by the experiment's table.


rule prdc:
    input:
        statistics=lambda w: statistics_file(w.exp, w.variant),
        reference=lambda w: fid_reference_file(w.exp),
    output:
        score="results/prdc/{exp}/{variant}.json",
    log:
        "results/logs/prdc/{exp}/{variant}.log",
    benchmark:
        "results/benchmarks/prdc/{exp}/{variant}.tsv"
    wildcard_constraints:
        exp=_one_of(prdc_experiments()),
    conda:
        "../envs/fid.yaml"
    threads: 1
    resources:
        # 10k × 10k features: three float32 distance matrices and argpartition's int64 indices, ~2 GB.
        mem_mb=resource("fid", "mem_mb"),
        runtime=resource("fid", "runtime"),
        gpu=0,
    params:
        nearest_k=lambda w: EXPERIMENTS[w.exp]["prdc"]["nearest_k"],
    shell:
        "python -m igsm prdc --statistics {input.statistics:q} --reference {input.reference:q} "
        "--out {output.score:q} --nearest-k {params.nearest_k:q} --threads {threads} > {log:q} 2>&1"
