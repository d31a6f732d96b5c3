# An experiment's block reuse against the published results: glue between Snakemake and igsm.paper.reuse.
import sys

sys.path.insert(0, str(__import__("pathlib").Path(snakemake.scriptdir).parent))  # the package of this checkout

import pandas as pd

from igsm.paper.reuse import comparison, write

sys.stderr = open(snakemake.log[0], "w")
table = pd.read_csv(snakemake.input.csv)
models = table.clip_model.dropna().unique() if "clip_model" in table else []
write(comparison(table, snakemake.params.published), snakemake.wildcards.exp, snakemake.output.markdown,
      snakemake.output.csv, clip_model=", ".join(models))
