# Stage 7: tables (Markdown, CSV, LaTeX) built from the JSON files alone, with the paper's
# published FID beside ours where the paper has the same experiment.


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
