# Stage 7: tables (Markdown, CSV, LaTeX) built from the JSON files alone, with the paper's
# published FID beside ours where the paper has the same experiment.


def table_rows(exp):
    """One entry per scored model: its metadata and the JSON files that hold its numbers."""
    settings = EXPERIMENTS[exp]
    rows = []
    for variant in scored_variants(exp):
        row = {
            "variant": variant,
            "fid": f"results/fid/{exp}/{variant}.json",
            "efficiency": f"results/efficiency/{exp}/{variant}.json",
            "summary": None,
            "prune_report": None,
            "criterion": "",
            "channel_ratio": None,
            "objective": variant,
            "weights": None,
        }
        if variant == "dense" and not settings["dense"]["pretrained"]:
            row["summary"] = f"results/dense/{exp}/trained/summary.json"
        if "/" in variant:
            pruned, objective = variant.split("/")
            criterion, ratio = pruned.rsplit("-cr", 1)
            row.update(
                criterion=criterion,
                channel_ratio=float(ratio),
                objective=objective,
                weights=config["objectives"][objective]["weights"],
                summary=f"results/finetune/{exp}/{variant}/summary.json",
                prune_report=f"results/prune/{exp}/{pruned}/report.json",
            )
        rows.append(row)
    return rows


def table_inputs(exp):
    return [path for row in table_rows(exp) for key, path in row.items()
            if key in ("fid", "efficiency", "summary", "prune_report") and path]


rule tables:
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
        pretrained=lambda w: EXPERIMENTS[w.exp]["dense"]["pretrained"],
    log:
        "results/logs/tables/{exp}.log",
    threads: 1
    resources:
        mem_mb=resource("tables", "mem_mb"),
        runtime=resource("tables", "runtime"),
    script:
        "../scripts/tables.py"


rule combined_table:
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
