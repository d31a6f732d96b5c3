"""The workflow's stages: one module per stage (issue 30, item 5), each running the algorithms
below it (sampling, reuse, pruning, training, …) on the files a rule names. The CLI (igsm.cli)
is the only layer above; nothing below imports a stage.

* ``sample.py``: the sample stage's job (shards of an FID set, a block-reuse plan applied) and
  the efficiency stage's speed measurements.
"""
