"""The workflow's stages (issue 30, item 5): one module per stage, each a function of the paths a
rule names and the stage's settings, running the algorithms below it (pruning, training, sampling,
reuse, fid, …). The CLI (igsm.cli, a table of commands) is the only layer above; nothing below
imports a stage. A stage's failure the user can act on is a ``StageError`` (igsm.stages.common).

* ``download.py``: a dataset into an image store.
* ``dense.py``: a pretrained dense model fetched, a fresh one initialised, a checkpoint converted.
* ``train.py``: the dense and finetune stages, both the one training loop (igsm.training).
* ``prune.py``: structural pruning by a pruning method; the picture a method draws of its report.
* ``sample.py``: the FID sets (shards, batches that survive interruption), gathered, exported.
* ``fid.py``: Inception statistics and the FID.
* ``reuse.py``: a block-reuse gate table (DiP-GO and its baselines).
* ``efficiency.py``: parameters, MACs, network and sampler throughput.
* ``release.py``: a released model's folder with its model card; its upload to the Hub.
* ``check_config.py``: the workflow's config check as a command.
* ``settings.py``: the stages' typed settings, filled once from the schema's defaults.
* ``common.py``, ``process.py``: what stages share; a job's device, threads and torchrun.
"""
