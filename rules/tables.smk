# Stage 7: tables (Markdown, CSV, LaTeX) built from the JSON files alone, with the paper's
# published FID (igsm/paper/tables.yaml) beside ours where the paper has the same experiment; then
# the paper's own tables (the same file) from those: targets table1, table2, table3, table4,
# table5, table8, table9, table10, table11, table12, table13; figures drawn from them;
# `snakemake --report` gathers all of it with captions.


# The published numbers (igsm/paper/tables.yaml) as a parameter of the rules that print them: a
# corrected number rebuilds the tables that show it.
import hashlib

from igsm.paper.tables import SPEC as PAPER_SPEC

PAPER_NUMBERS = hashlib.sha256(PAPER_SPEC.read_bytes()).hexdigest()[:16]


# Seconds of CPU and little memory each: run in Snakemake's own process (on a cluster, the login
# node) rather than waiting in SLURM's queue behind the GPU jobs.
localrules:
    variant_metadata,
    tables,
    combined_table,
    paper_table,
    reuse_published_table,
    paper_figure,
    paper_samples,


# What each scored model is (igsm/tables.py reads it): written from the config, in the workflow's
# own process (a few bytes; no job script needed).
rule variant_metadata:
    output:
        "results/variants/{exp}/{variant}.json",
    log:
        "results/logs/variants/{exp}/{variant}.log",
    params:
        metadata=lambda w: as_json(variant_metadata(w.exp)[w.variant]),
    run:
        write_text_atomically(output[0], f"{params.metadata}\n")
        Path(log[0]).write_text(f"{output[0]}: {params.metadata}\n")


rule tables:
    input:
        lambda w: table_inputs(w.exp),
    output:
        markdown="results/tables/{exp}.md",
        csv=report(
            "results/tables/{exp}.csv", caption="../report/table.rst", category="Tables", labels={"table": "{exp}"}
        ),
        latex="results/tables/{exp}.tex",
    log:
        "results/logs/tables/{exp}.log",
    conda:
        "../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=resource("tables", "mem_mb"),
        runtime=resource("tables", "runtime"),
    params:
        rows=lambda w: table_rows(w.exp),
        dataset=lambda w: EXPERIMENTS[w.exp]["dataset"],
        source=lambda w: config["datasets"][EXPERIMENTS[w.exp]["dataset"]]["source"],
        pretrained=lambda w: EXPERIMENTS[dense_owner(w.exp)]["dense"]["pretrained"],
        paper_numbers=PAPER_NUMBERS,
        # The settings of the experiment's objectives, matched against the paper's (igsm/tables.py).
        objectives=lambda w: {
            m["objective"]: config["objectives"][m["objective"]]
            for m in variant_metadata(w.exp).values()
            if m["weights"] is not None
        },
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
    conda:
        "../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=resource("tables", "mem_mb"),
        runtime=resource("tables", "runtime"),
    script:
        "../scripts/combine_tables.py"


for _dataset in config["datasets"]:

    rule:
        name:
            f"dataset_{_dataset}"
        input:
            [f"results/tables/{exp}.md" for exp, s in EXPERIMENTS.items() if s["dataset"] == _dataset],


# The paper's tables, in its layout, from the per-experiment tables of the experiments they name
# (those the config has; the others' cells say "missing").
rule paper_table:
    input:
        csv=lambda w: [f"results/tables/{exp}.csv" for exp in experiments_of(w.table) if exp in EXPERIMENTS],
    output:
        markdown="results/paper_tables/{table}.md",
        csv=report(
            "results/paper_tables/{table}.csv",
            caption="../report/paper_table.rst",
            category="Paper tables",
            labels={"table": "{table}"},
        ),
        latex="results/paper_tables/{table}.tex",
    log:
        "results/logs/paper_tables/{table}.log",
    wildcard_constraints:
        table="|".join(PAPER_TABLES),
    conda:
        "../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=resource("tables", "mem_mb"),
        runtime=resource("tables", "runtime"),
    params:
        paper_numbers=PAPER_NUMBERS,
    script:
        "../scripts/paper_table.py"


# An experiment's block reuse beside the published results of the same method, model, sampler and
# MAC share (igsm/paper/reuse.py; DiP-GO's SD-1.5 headline for mscoco_sd15).
rule reuse_published_table:
    input:
        csv="results/tables/{exp}.csv",
    output:
        markdown="results/paper_tables/reuse_{exp}.md",
        csv="results/paper_tables/reuse_{exp}.csv",
    log:
        "results/logs/paper_tables/reuse_{exp}.log",
    wildcard_constraints:
        exp=_one_of(EXPERIMENTS),
    conda:
        "../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=resource("tables", "mem_mb"),
        runtime=resource("tables", "runtime"),
    params:
        published=lambda w: reuse_published_of(w.exp),
    script:
        "../scripts/reuse_table.py"


# Figures drawn from the paper's tables (ours solid, the paper's dashed): PNG and PDF.
rule paper_figure:
    input:
        cells=lambda w: f"results/paper_tables/{PAPER_FIGURES[w.figure][0]}.csv",
    output:
        png=report(
            "results/paper_figures/{figure}.png",
            caption="../report/paper_figure.rst",
            category="Paper figures",
            labels={"figure": "{figure}"},
        ),
        pdf="results/paper_figures/{figure}.pdf",
    log:
        "results/logs/paper_figures/{figure}.log",
    wildcard_constraints:
        figure="|".join(PAPER_FIGURES),
    conda:
        "../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=resource("tables", "mem_mb"),
        runtime=resource("tables", "runtime"),
    script:
        "../scripts/paper_figure.py"


# The paper's qualitative figures: dense, Diff-Pruning and IGSM samples side by side per dataset.
rule paper_samples:
    input:
        grids=lambda w: [p for row in sample_grids(w.figure, EXPERIMENTS).values() for p in row.values()],
    output:
        png=report(
            "results/paper_figures/{figure}.png",
            caption="../report/paper_figure.rst",
            category="Paper figures",
            labels={"figure": "{figure}"},
        ),
        pdf="results/paper_figures/{figure}.pdf",
    log:
        "results/logs/paper_figures/{figure}.log",
    wildcard_constraints:
        figure="|".join(PAPER_SAMPLE_FIGURES),
    conda:
        "../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=resource("tables", "mem_mb"),
        runtime=resource("tables", "runtime"),
    params:
        grids=lambda w: sample_grids(w.figure, EXPERIMENTS),
    script:
        "../scripts/paper_samples.py"


for _table in PAPER_TABLES:

    rule:
        name:
            _table
        input:
            f"results/paper_tables/{_table}.md",
