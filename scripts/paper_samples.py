# The paper's qualitative figure: sample grids side by side (glue between Snakemake and igsm.plots).
import sys

sys.path.insert(0, str(__import__("pathlib").Path(snakemake.scriptdir).parent))  # the package of this checkout

from igsm.plots import plot_sample_comparison

sys.stderr = open(snakemake.log[0], "w")
plot_sample_comparison(snakemake.params.grids, [snakemake.output.png, snakemake.output.pdf],
                       title="Samples: dense, Diff-Pruning and IGSM")
