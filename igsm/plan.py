"""The plan of an experiment: one row per scored model (issue 30).

Every model the workflow samples and scores is one row here: the dense model, the untrained
baseline (``untrained_baseline``), each finetuning run's pruning criterion × channel ratio ×
objective, each block-reuse variant of ``reuse.models`` × ``reuse.methods`` ×
``reuse.mac_fractions``, and each sampler variant of ``compare_samplers.models`` ×
``compare_samplers.settings``. The config checks (igsm/config.py), the workflow's rules
(rules/common.smk) and the paper tables (igsm/paper/tables.py) all read these rows instead of
enumerating ``finetune.runs`` themselves; result paths are named from them
(``<criterion>-cr<ratio>/<objective>``, ``…/reuse-<method>-f<fraction>``, ``…/<sampler>-<num_steps>``).

Torch-free on purpose: Snakemake builds its DAG from this module.
"""

from __future__ import annotations


def pruned_model_name(criterion: str, ratio: float) -> str:
    """The name of a pruned model in result paths: '<criterion>-cr<ratio>'."""
    return f"{criterion}-cr{float(ratio):g}"


def variant_of(criterion: str, channel_ratio: float | None, objective: str) -> str:
    """The result-path name of the scored model with these columns: 'dense' and 'untrained' as
    such, a finetuned model '<criterion>-cr<ratio>/<objective>'."""
    if objective in ("dense", "untrained"):
        return objective
    return f"{pruned_model_name(criterion, channel_ratio)}/{objective}"


def reuse_variant(base: str, method: str, fraction: float) -> str:
    """The name of a block-reuse variant of the scored model ``base``."""
    return f"{base}/reuse-{method}-f{float(fraction):g}"


def sampler_variant(base: str, settings: dict) -> str:
    """The name of the scored model ``base`` sampled with other sampler ``settings`` (an entry of
    ``compare_samplers.settings``): '<base>/<sampler>-<num_steps>', '-<algorithm>' where it names one."""
    algorithm = f"-{settings['algorithm']}" if settings.get("algorithm") else ""
    return f"{base}/{settings['sampler']}-{settings['num_steps']}{algorithm}"


def scored_models(exp: dict, objectives: dict | None = None) -> dict[str, dict]:
    """{variant: row} for every scored model of one experiment's (validated) settings ``exp``, in
    table order; ``objectives`` is the config's 'objectives' (each row carries its weights; without
    it, for the names alone, weights are None).

    A row: variant, kind (dense / untrained / finetuned / reuse / sampler), objective, criterion,
    channel_ratio, weights, pruned (the pruned model's name); reuse rows add base, reuse_method and
    mac_fraction, sampler rows base and sample (the 'sample' settings they override), and both
    otherwise repeat their base model's row."""
    plain = {"criterion": "", "channel_ratio": None, "weights": None, "pruned": None}
    rows = {"dense": {"variant": "dense", "kind": "dense", "objective": "dense", **plain}}
    if exp["untrained_baseline"]:
        rows["untrained"] = {"variant": "untrained", "kind": "untrained", "objective": "untrained", **plain}
    for run in exp["finetune"]["runs"]:
        criterion = run.get("criterion", exp["prune"]["criterion"])
        pruned = pruned_model_name(criterion, run["channel_ratio"])
        for objective in run["objectives"]:
            variant = variant_of(criterion, run["channel_ratio"], objective)
            rows[variant] = {"variant": variant, "kind": "finetuned", "objective": objective,
                             "criterion": criterion, "channel_ratio": run["channel_ratio"],
                             "weights": objectives[objective]["weights"] if objectives else None,
                             "pruned": pruned}
    reuse = exp["reuse"]
    for base in reuse["models"]:
        if base not in rows:  # igsm.config names it as an error; the plan only skips it
            continue
        for method in reuse["methods"]:
            for fraction in reuse["mac_fractions"]:
                variant = reuse_variant(base, method, fraction)
                rows[variant] = {**rows[base], "variant": variant, "kind": "reuse", "base": base,
                                 "reuse_method": method, "mac_fraction": fraction}
    compare = exp.get("compare_samplers", {})
    for base in compare.get("models", []):
        if base not in rows or rows[base]["kind"] in ("reuse", "sampler"):  # igsm.config names the error
            continue
        for settings in compare["settings"]:
            variant = sampler_variant(base, settings)
            rows[variant] = {**rows[base], "variant": variant, "kind": "sampler", "base": base,
                             "sample": dict(settings)}
    return rows


def scored_model_names(exp: dict) -> list[str]:
    """The models an experiment samples and scores, bar block-reuse and sampler variants."""
    return [variant for variant, row in scored_models(exp).items() if row["kind"] not in ("reuse", "sampler")]


def released_models(exp: dict, objectives: dict | None = None) -> dict[str, dict]:
    """{release: row} of the models an experiment releases (results/release/<exp>/<release>/: model
    files and a model card, igsm.release): the dense model where the workflow trains it (a
    pretrained one is someone else's release; one taken through dense.from_experiment is released
    by that experiment), every pruned model before finetuning ('pruned/<criterion>-cr<ratio>') and
    every finetuned one ('finetuned/<criterion>-cr<ratio>/<objective>'). The kind prefix keeps the
    folders apart: a pruned model's release does not hold its finetunes'.

    A row: release, kind (dense / pruned / finetuned), variant (the scored model whose FID and
    efficiency files it reports; None for a pruned model, which is not sampled), objective,
    criterion, channel_ratio, weights, pruned."""
    rows = {}
    scored = scored_models(exp, objectives)
    if not exp["dense"].get("pretrained") and not exp["dense"].get("from_experiment"):
        rows["dense"] = {**scored["dense"], "release": "dense"}
    for variant, row in scored.items():
        if row["kind"] != "finetuned":
            continue
        pruned = f"pruned/{row['pruned']}"
        rows.setdefault(pruned, {**row, "release": pruned, "kind": "pruned", "variant": None, "objective": "",
                                 "weights": None})
    for variant, row in scored.items():
        if row["kind"] == "finetuned":
            rows[f"finetuned/{variant}"] = {**row, "release": f"finetuned/{variant}"}
    return rows


def release_repo_name(experiment: str, release: str) -> str:
    """The Hub repository name of a release (after the config's publish.repo_prefix):
    '<experiment>-<release with / as ->', e.g. 'digits_unet-finetuned-diff-pruning-cr0.3-igsm'."""
    return f"{experiment}-{release.replace('/', '-')}"
