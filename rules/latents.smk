# Stage 1b, latent experiments (igsm/latents.py): each autoencoder stored once with its identity
# (source, scale factor, weights' digest), and each dataset encoded once per autoencoder into a
# store of latents, which training and pruning read; sampling decodes with the same folder.


rule autoencoder:
    output:
        model=directory("results/autoencoders/{autoencoder}/model"),
    log:
        "results/logs/autoencoder/{autoencoder}.log",
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=resource("download", "mem_mb"),
        runtime=resource("download", "runtime"),
    params:
        # Not the encoder's batch size: another one encodes the same latents.
        settings=lambda w: as_json(
            {k: v for k, v in config["autoencoders"][w.autoencoder].items() if k != "encode_batch_size"}
        ),
        cache="results/autoencoders/{autoencoder}/download",
    shell:
        "python -m igsm autoencoder --settings {params.settings:q} --cache-dir {params.cache:q} "
        "--out {output.model:q} > {log:q} 2>&1"


rule encode:
    input:
        data="results/data/{dataset}/train",
        autoencoder="results/autoencoders/{autoencoder}/model",
    output:
        data=directory("results/data/{dataset}/latents-{autoencoder}"),
    log:
        "results/logs/encode/{dataset}/{autoencoder}.log",
    benchmark:
        "results/benchmarks/encode/{dataset}/{autoencoder}.tsv"
    conda:
        "../envs/train.yaml"
    threads: resource("fid", "threads")
    resources:
        mem_mb=resource("fid", "mem_mb"),
        runtime=resource("fid", "runtime"),
        gpu=resource("fid", "gpu"),
        gpu_mem_mb=gpu_memory("fid"),
    params:
        batch_size=lambda w: config["autoencoders"][w.autoencoder]["encode_batch_size"],
    shell:
        "python -m igsm encode --data {input.data:q} --autoencoder {input.autoencoder:q} --out {output.data:q} "
        "--batch-size {params.batch_size:q} --threads {threads} > {log:q} 2>&1"
