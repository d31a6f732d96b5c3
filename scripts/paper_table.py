# One of the paper's tables: glue between Snakemake and igsm.paper.tables.
import sys

sys.path.insert(0, str(__import__("pathlib").Path(snakemake.scriptdir).parent))  # the package of this checkout

import pandas as pd

from igsm.paper.tables import build, write

sys.stderr = open(snakemake.log[0], "w")
frames = [pd.read_csv(path) for path in snakemake.input.csv]
tables = {frame.experiment.iloc[0]: frame for frame in frames}
name = snakemake.wildcards.table
write(name, build(name, tables), snakemake.output.markdown, snakemake.output.csv, snakemake.output.latex)
