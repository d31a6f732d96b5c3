# Stage 5: generate images from every scored model (DDIM for U-Nets, Euler–Maruyama for U-ViT).


rule sample:
    conda:
        "../envs/sample.yaml"
    input:
        model=model_dir,
    output:
        samples="results/samples/{exp}/{variant}/samples.npz",
        grid="results/samples/{exp}/{variant}/grid.png",
    params:
        settings=lambda w: stage_settings(w.exp, "sample"),
        num_images=lambda w: EXPERIMENTS[w.exp]["sample"]["num_images"],
        first_seed=lambda w: EXPERIMENTS[w.exp]["sample"]["seed"],
    log:
        "results/logs/sample/{exp}/{variant}.log",
    benchmark:
        "results/benchmarks/sample/{exp}/{variant}.tsv"
    threads: resource("sample", "threads")
    resources:
        mem_mb=resource("sample", "mem_mb"),
        runtime=resource("sample", "runtime"),
        gpu=resource("sample", "gpu"),
    shell:
        "python -m igsm sample --model {input.model} --num-images {params.num_images} "
        "--first-seed {params.first_seed} --settings {params.settings:q} --out {output.samples} "
        "--grid {output.grid} --threads {threads} > {log} 2>&1"
