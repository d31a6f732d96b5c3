# Stage 7: tables (Markdown, CSV, LaTeX) built from the JSON files alone, with the paper's
# published FID beside ours where the paper has the same experiment.


localrules:
    variant_metadata,


# What each scored model is (igsm/tables.py reads it): written from the config, in the workflow's
# own process (a few bytes; no job script needed).
rule variant_metadata:
    output:
        "results/variants/{exp}/{variant}.json",
    params:
        metadata=lambda w: as_json(variant_metadata(w.exp)[w.variant]),
    log:
        "results/logs/variants/{exp}/{variant}.log",
    run:
        write_text_atomically(output[0], f"{params.metadata}\n")
        Path(log[0]).write_text(f"{output[0]}: {params.metadata}\n")


rule tables:
    conda:
        "../envs/tables.yaml"
    input:
        lambda w: table_inputs(w.exp),
    output:
        markdown="results/tables/{exp}.md",
        csv="results/tables/{exp}.csv",
        latex="results/tables/{exp}.tex",
    params:
        rows=lambda w: table_rows(w.exp),
        dataset=lambda w: EXPERIMENTS[w.exp]["dataset"],
        source=lambda w: config["datasets"][EXPERIMENTS[w.exp]["dataset"]]["source"],
        pretrained=lambda w: EXPERIMENTS[dense_owner(w.exp)]["dense"]["pretrained"],
    log:
        "results/logs/tables/{exp}.log",
    threads: 1
    resources:
        mem_mb=resource("tables", "mem_mb"),
        runtime=resource("tables", "runtime"),
    script:
        "../scripts/tables.py"


rule combined_table:
    conda:
        "../envs/tables.yaml"
    input:
        csv=expand("results/tables/{exp}.csv", exp=EXPERIMENTS),
    output:
        markdown="results/tables/all.md",
        csv="results/tables/all.csv",
    log:
        "results/logs/tables/all.log",
    threads: 1
    resources:
        mem_mb=resource("tables", "mem_mb"),
        runtime=resource("tables", "runtime"),
    script:
        "../scripts/combine_tables.py"


for _dataset in config["datasets"]:

    rule:
        name: f"dataset_{_dataset}"
        input:
            [f"results/tables/{exp}.md" for exp, s in EXPERIMENTS.items() if s["dataset"] == _dataset],
