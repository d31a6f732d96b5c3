# Stage 6c (issue 31 item 8, issue 32 item 4): SSIM and PSNR of each scored model's samples to the
# dense model's of the same seeds, for experiments with consistency.enabled (igsm/stages/consistency.py),
# one JSON per model, read by the experiment's table.


rule consistency:
    input:
        samples=lambda w: scored_samples_file(w.exp, w.variant),
        reference=lambda w: scored_samples_file(w.exp, "dense"),
    output:
        score="results/consistency/{exp}/{variant}.json",
    log:
        "results/logs/consistency/{exp}/{variant}.log",
    wildcard_constraints:
        exp=_one_of(consistency_experiments()),
    conda:
        "../envs/clip_score.yaml"  # torchmetrics, torch, numpy: what the stage imports
    threads: 1
    resources:
        mem_mb=resource("fid", "mem_mb"),
        runtime=resource("fid", "runtime"),
    params:
        batch_size=lambda w: EXPERIMENTS[w.exp]["consistency"]["batch_size"],
    shell:
        "python -m igsm consistency --samples {input.samples:q} --reference {input.reference:q} "
        "--batch-size {params.batch_size:q} --out {output.score:q} --threads {threads} > {log:q} 2>&1"
