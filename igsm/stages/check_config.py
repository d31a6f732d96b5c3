"""The config check the workflow runs before its first job, as a command of its own."""

from __future__ import annotations

from igsm.stages.common import StageError


def check_config(files) -> str:
    """Check workflow config files as the workflow does before its first job (each file read
    strictly, the schema, then every cross-field check), every error at once, one line each naming
    its key, or the file and line of a YAML error. Several files are merged in order, as
    `snakemake --configfile A B` does (needs snakemake installed)."""
    from igsm.config import ConfigError, load_config_file, validate

    try:
        from snakemake.utils import update_config

        config = {}
        for path in files:
            update_config(config, load_config_file(path))
        validate(config)
    except ConfigError as err:
        raise StageError(str(err)) from None
    return f"{', '.join(files)}: valid ({len(config['experiments'])} experiment(s))"
