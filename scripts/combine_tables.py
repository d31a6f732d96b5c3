# All experiments' tables in one Markdown and CSV file.
import sys

sys.path.insert(0, str(__import__("pathlib").Path(snakemake.scriptdir).parent))  # the package of this checkout

import pandas as pd

from igsm.tables import write_tables

sys.stderr = open(snakemake.log[0], "w")
table = pd.concat([pd.read_csv(path) for path in snakemake.input.csv], ignore_index=True)
write_tables(table, snakemake.output.markdown, snakemake.output.csv, title="All experiments", summary=True)
