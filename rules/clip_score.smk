# Stage 6b (issue 31, item 5): the CLIP score of each scored model of an experiment with
# clip_score.enabled (text-conditioned: igsm.config refuses it elsewhere): its samples against the
# prompt of each image's seed, by torchmetrics' CLIPScore (a feature network over the samples, as
# fid_statistics: the fid stage's resources), one JSON per model, read by the experiment's table.


rule clip_score:
    input:
        samples=lambda w: scored_samples_file(w.exp, w.variant),
        prompts=prompt_store_input,  # a captions kind's prompts: the captions of a store
    output:
        score="results/clip_score/{exp}/{variant}.json",
    log:
        "results/logs/clip_score/{exp}/{variant}.log",
    benchmark:
        "results/benchmarks/clip_score/{exp}/{variant}.tsv"
    wildcard_constraints:
        exp=_one_of(clip_score_experiments()),
    conda:
        "../envs/clip_score.yaml"
    threads: resource("fid", "threads")
    resources:
        mem_mb=resource("fid", "mem_mb"),
        runtime=resource("fid", "runtime"),
        gpu=resource("fid", "gpu"),
        gpu_mem_mb=gpu_memory("fid"),
    params:
        settings=lambda w: clip_score_settings(w.exp),
    shell:
        "python -m igsm clip-score --samples {input.samples:q} --settings {params.settings:q} "
        "--out {output.score:q} --threads {threads} > {log:q} 2>&1"
