# IGSM workflow: download → dense → prune → finetune → sample → FID → tables → model releases.
# The paper's experiments by default; `--configfile config/demo.yaml` for the offline CPU demo.
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9.0")


# A config given on the command line replaces the paper config instead of merging into it:
# merged, the demo would also schedule every paper experiment.
if not config:

    configfile: "config/config.yaml"


# The config files re-read strictly (Snakemake's reading keeps the last of duplicate keys and does
# not bound YAML aliases), then the schema, every error at once, one line each naming its key
# (igsm/config.py; rules/common.smk checks the rest).
sys.path.insert(0, workflow.basedir)
from igsm.config import ConfigError, load_config_file, validate_schema
from igsm.plugins import PLUGINS_KEY, export, resolve

try:
    for _configfile in workflow.configfiles:
        load_config_file(_configfile)
    validate_schema(config)  # imports the config's plugins first (igsm/plugins.py)
except ConfigError as err:
    raise WorkflowError(str(err)) from None
export(resolve(config[PLUGINS_KEY]))  # and every job (python -m igsm) imports them too


# `snakemake --report report.html`: samples, tables, the paper's tables and figures, with captions.
report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/latents.smk"
include: "rules/dense.smk"
include: "rules/prune.smk"
include: "rules/finetune.smk"
include: "rules/reuse.smk"
include: "rules/sample.smk"
include: "rules/fid.smk"
include: "rules/clip_score.smk"
include: "rules/consistency.smk"
include: "rules/tables.smk"
include: "rules/release.smk"


# results/ belongs to one config (results/.config, igsm.results_owner): a run that executes jobs
# is refused here, before its first job, where another config's results are. Dry runs and
# reports write nothing into results/ and are not checked (Snakemake runs onstart for neither).
onstart:
    from igsm.results_owner import ResultsOwnerError, claim_results_folder

    try:
        claim_results_folder(".", workflow.configfiles)
    except ResultsOwnerError as err:
        raise WorkflowError(str(err)) from None


# The default target: every table and figure, and every released model's folder with its model card.
rule all_results:
    default_target: True
    input:
        all_table_files(),
        release_folders(),


rule all_tables:
    input:
        all_table_files(),
