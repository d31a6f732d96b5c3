# Block reuse at sampling time (experiments.<name>.reuse; igsm/reuse.py): the gate table of each
# reuse variant (DiP-GO learns it on the sampler's own chains; DeepCache and reuse-eps are fixed
# rules at the same MAC fraction), stored next to the variant's samples; the sample stage applies
# it. A method that alters the sampler's steps instead (fewer-steps, igsm/reuse_methods.py) needs
# no table: it samples with fewer steps (common.smk).


rule reuse_plan:
    input:
        model=model_dir,
        prompts=prompt_store_input,  # DiP-GO's chains are prompted as the samples are (a captions kind)
    output:
        plan="results/reuse/{exp}/{variant}/plan.json",
        picture="results/reuse/{exp}/{variant}/plan.png",
    log:
        "results/logs/reuse_plan/{exp}/{variant}.log",
    benchmark:
        "results/benchmarks/reuse_plan/{exp}/{variant}.tsv"
    conda:
        "../envs/sample.yaml"
    threads: resource("sample", "threads")
    resources:
        mem_mb=resource("sample", "mem_mb"),
        runtime=resource("sample", "runtime"),
        gpu=min(1, resource("sample", "gpu")),
        gpu_mem_mb=gpu_memory("sample", min(1, resource("sample", "gpu"))),
    params:
        method=lambda w: variant_metadata(w.exp)[w.variant]["reuse_method"],
        mac_fraction=lambda w: variant_metadata(w.exp)[w.variant]["mac_fraction"],
        sample=lambda w: sample_settings(w.exp, w.variant),
        learn=lambda w: as_json(EXPERIMENTS[w.exp]["reuse"]["learn"]),
    shell:
        "python -m igsm reuse-plan --model {input.model:q} --method {params.method:q} "
        "--mac-fraction {params.mac_fraction:q} --sample-settings {params.sample:q} "
        "--learn-settings {params.learn:q} --out {output.plan:q} --picture {output.picture:q} "
        "--threads {threads} > {log:q} 2>&1"
