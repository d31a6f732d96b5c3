# Table assembly for one experiment: glue between Snakemake and igsm.tables.
import sys

sys.path.insert(0, str(__import__("pathlib").Path(snakemake.scriptdir).parent))  # the package of this checkout

from igsm.tables import build_rows, write_tables

sys.stderr = open(snakemake.log[0], "w")
params = snakemake.params
table = build_rows(snakemake.wildcards.exp, params.dataset, params.pretrained, params.rows, params.objectives)
write_tables(table, snakemake.output.markdown, snakemake.output.csv, snakemake.output.latex,
             title=f"{snakemake.wildcards.exp} ({params.dataset})")
