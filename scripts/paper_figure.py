# One figure drawn from one of the paper's tables: glue between Snakemake and igsm.plots.
import sys

sys.path.insert(0, str(__import__("pathlib").Path(snakemake.scriptdir).parent))  # the package of this checkout

import pandas as pd

from igsm import plots
from igsm.paper.tables import FIGURES

sys.stderr = open(snakemake.log[0], "w")
_, function = FIGURES[snakemake.wildcards.figure]
getattr(plots, function)(pd.read_csv(snakemake.input.cells), [snakemake.output.png, snakemake.output.pdf])
