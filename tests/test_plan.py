"""igsm.plan: the one enumeration of an experiment's scored models (issue 30)."""

from igsm.plan import pruned_model_name, reuse_variant, scored_model_names, scored_models

EXPERIMENT = {
    "untrained_baseline": True,
    "prune": {"criterion": "diff-pruning"},
    "finetune": {"runs": [{"channel_ratio": 0.3, "objectives": ["np_kd", "igsm"]},
                          {"channel_ratio": 0.5, "criterion": "magnitude", "objectives": ["igsm"]}]},
    "reuse": {"models": ["diff-pruning-cr0.3/igsm"], "methods": ["dipgo", "fewer-steps"],
              "mac_fractions": [0.6]},
}
OBJECTIVES = {"np_kd": {"weights": {"np": 1.0, "kd": 1.0}}, "igsm": {"weights": {"np": 1.0, "kd": 1.0, "jm2": 0.1}}}


def test_one_row_per_scored_model_in_table_order():
    # Bug caught: a run's own criterion ignored (its folder named after prune.criterion), or a
    # reuse variant missing its base model's criterion and ratio (the tables group by them).
    rows = scored_models(EXPERIMENT, OBJECTIVES)
    assert list(rows) == ["dense", "untrained", "diff-pruning-cr0.3/np_kd", "diff-pruning-cr0.3/igsm",
                          "magnitude-cr0.5/igsm", "diff-pruning-cr0.3/igsm/reuse-dipgo-f0.6",
                          "diff-pruning-cr0.3/igsm/reuse-fewer-steps-f0.6"]
    assert rows["magnitude-cr0.5/igsm"]["criterion"] == "magnitude"
    assert rows["magnitude-cr0.5/igsm"]["weights"] == OBJECTIVES["igsm"]["weights"]
    reuse = rows["diff-pruning-cr0.3/igsm/reuse-dipgo-f0.6"]
    assert (reuse["kind"], reuse["base"], reuse["reuse_method"], reuse["mac_fraction"]) == \
        ("reuse", "diff-pruning-cr0.3/igsm", "dipgo", 0.6)
    assert (reuse["criterion"], reuse["channel_ratio"], reuse["objective"]) == ("diff-pruning", 0.3, "igsm")


def test_names_without_reuse_variants_and_as_paths_spell_them():
    assert scored_model_names(EXPERIMENT) == ["dense", "untrained", "diff-pruning-cr0.3/np_kd",
                                              "diff-pruning-cr0.3/igsm", "magnitude-cr0.5/igsm"]
    # Paths of existing results: 0.50 and 0.5 are one folder, fractions as written by %g.
    assert pruned_model_name("taylor", 0.50) == "taylor-cr0.5"
    assert reuse_variant("dense", "deepcache", 0.40) == "dense/reuse-deepcache-f0.4"


def test_every_objective_option_of_the_schema_reaches_the_finetune_job(tmp_path):
    # Bug caught: an option the schema accepts but rules/common.smk does not pass on (a hand list
    # of keys there once dropped new options silently: the job ran the default instead).
    import json
    import re

    import yaml
    from conftest import REPO, snakemake_in, tiny_demo_config

    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())
    options = set(schema["$defs"]["objective"]["properties"])
    config = tiny_demo_config()
    config["objectives"]["igsm"].update(directions="otd", jacobian_timesteps=[10, 1000])
    proc = snakemake_in(tmp_path, config, "-n", "-p",
                        "results/finetune/digits_unet/diff-pruning-cr0.3/igsm/summary.json")
    assert proc.returncode == 0, proc.stdout[-3000:]
    settings = [json.loads(found) for found in re.findall(r"--settings '(\{.*?\})'", proc.stdout)]
    igsm = [s["training"]["objective"] for s in settings
            if s.get("training", {}).get("objective", {}).get("weights") == config["objectives"]["igsm"]["weights"]]
    assert len(igsm) == 1 and set(igsm[0]) == options


def test_sampler_variants_follow_their_base_models():
    # Bug caught: a sampler variant without its base model's columns (the tables group by them),
    # two entries with another algorithm under one name, a variant of an unknown model planned.
    from igsm.plan import sampler_variant

    experiment = {**EXPERIMENT, "compare_samplers": {
        "models": ["dense", "magnitude-cr0.5/igsm", "nope"],
        "settings": [{"sampler": "dpm-solver", "num_steps": 10},
                     {"sampler": "dpm-solver", "num_steps": 10, "algorithm": "dpmsolver"}]}}
    rows = scored_models(experiment, OBJECTIVES)
    added = [name for name, row in rows.items() if row["kind"] == "sampler"]
    assert added == ["dense/dpm-solver-10", "dense/dpm-solver-10-dpmsolver",
                     "magnitude-cr0.5/igsm/dpm-solver-10", "magnitude-cr0.5/igsm/dpm-solver-10-dpmsolver"]
    row = rows["magnitude-cr0.5/igsm/dpm-solver-10-dpmsolver"]
    assert (row["base"], row["criterion"], row["channel_ratio"], row["objective"]) == \
        ("magnitude-cr0.5/igsm", "magnitude", 0.5, "igsm")
    assert row["sample"] == {"sampler": "dpm-solver", "num_steps": 10, "algorithm": "dpmsolver"}
    assert sampler_variant("dense", {"sampler": "ddim", "num_steps": 25}) == "dense/ddim-25"
    # Not bases of block reuse or of other sampler variants: scored_model_names leaves them out.
    assert scored_model_names(experiment) == scored_model_names(EXPERIMENT)
