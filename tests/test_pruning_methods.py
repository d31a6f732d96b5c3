"""The registry of pruning methods (igsm.pruning.methods): the schema's enums are its names and
criteria, the config's prune.method must take each criterion used, and `igsm prune` asks the
registry (a method registered here prunes through the CLI with its own importance)."""

import json

import pytest
import torch
from click.testing import CliRunner

from igsm import pruning
from igsm.pruning import structural
from igsm.cli import main
from igsm.config import ConfigError, _schema, check_config, validate_schema
from igsm.plan import pruned_model_name
from test_config import demo_config, experiment

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def checked(config):
    validate_schema(config)
    check_config(config)


def test_schema_enums_are_the_registry():
    experiment_schema = _schema()["$defs"]["experiment"]["properties"]
    prune = experiment_schema["prune"]["properties"]
    run = experiment_schema["finetune"]["properties"]["runs"]["items"]["properties"]
    assert prune["method"]["enum"] == list(pruning.METHODS) == ["diff-pruning", "gradient-flow"]
    assert prune["criterion"]["enum"] == run["criterion"]["enum"] == pruning.criteria() == [
        *pruning.CRITERIA, "gradient-flow"]
    assert prune["criterion"]["default"] in pruning.criteria()


@pytest.mark.parametrize("criterion, method", [("diff-pruning", "diff-pruning"), ("reinit", "diff-pruning"),
                                               ("gradient-flow", "gradient-flow")])
def test_the_method_is_the_criterion_s_unless_named(criterion, method):
    """Existing configs name no method: the criterion decides it, and the pruned model keeps its name."""
    assert pruning.method_for(criterion).name == method == pruning.method_for(criterion, method).name
    assert pruned_model_name(criterion, 0.3) == f"{criterion}-cr0.3"


def test_an_unknown_pruning_method_is_an_error_naming_the_key():
    config = demo_config()
    experiment(config)["prune"]["method"] = "obd"
    with pytest.raises(ConfigError, match=r"experiments\.digits_unet\.prune\.method: 'obd' is not one of "
                                          r"diff-pruning, gradient-flow"):
        validate_schema(config)


def test_a_criterion_the_method_does_not_take_is_an_error_naming_both_keys():
    config = demo_config()
    experiment(config)["prune"].update(method="diff-pruning", criterion="magnitude")
    experiment(config)["finetune"]["runs"][0]["criterion"] = "gradient-flow"
    with pytest.raises(ConfigError, match=r"experiments\.digits_unet\.prune\.method: 'diff-pruning' does not take "
                                          r"criterion 'gradient-flow' \(experiments\.digits_unet\.finetune\.runs\[0\]"
                                          r"\.criterion\); its criteria are diff-pruning, taylor"):
        checked(config)
    experiment(config)["finetune"]["runs"][0]["criterion"] = "random"
    checked(config)  # the method takes both criteria


def test_cli_names_the_bad_criterion_or_method_before_loading_anything(tmp_path):
    (tmp_path / "data").write_text("not read")
    base = ["prune", "--model", str(tmp_path), "--data", str(tmp_path / "data"), "--channel-ratio", "0.5",
            "--out", str(tmp_path / "out" / "model"), "--report", str(tmp_path / "out" / "report.json")]
    result = CliRunner().invoke(main, [*base, "--criterion", "l1"])
    assert result.exit_code == 1 and "--criterion: unknown 'l1'; valid criteria are diff-pruning" in result.output
    result = CliRunner().invoke(main, [*base, "--criterion", "magnitude", "--settings", '{"method": "gradient-flow"}'])
    assert result.exit_code == 1 and ("--settings: method: 'gradient-flow' does not take criterion 'magnitude' "
                                      "(--criterion)") in result.output
    assert not (tmp_path / "out").exists()


class _FirstChannels:
    """A toy importance: the earlier a channel, the more important (keeps each layer's first ones)."""

    def __call__(self, group, **kwargs):
        return -torch.arange(len(group[0].idxs), dtype=torch.float32)


class _KeepFirst(pruning.PruningMethod):
    name = "keep-first"
    criteria = ("first",)

    def prune(self, net, images, *, criterion, channel_ratio, settings, schedule, conditioning, folder, device):
        from igsm.data import to_model_range

        model, counts = structural.prune_with_importance(net, _FirstChannels(), channel_ratio=channel_ratio,
                                                      images=to_model_range(images[:1]))
        return model, {"criterion": criterion, "channel_ratio": channel_ratio, **counts}


def test_a_registered_method_prunes_through_the_cli(tiny_training, tmp_path):
    """`igsm prune` has no branch per method: a method registered here is found by its criterion and
    its own importance decides which channels survive."""
    from igsm.models import load_model

    method = pruning.register(_KeepFirst())
    try:
        out = tmp_path / "first-cr0.5"
        result = CliRunner().invoke(main, [
            "prune", "--model", str(tiny_training / "teacher"), "--data", str(tiny_training / "data"),
            "--criterion", "first", "--channel-ratio", "0.5", "--out", str(out / "model"),
            "--report", str(out / "report.json"), "--settings", "{}", "--device", "cpu", "--threads", "1"])
        assert result.exit_code == 0, result.output
        config = demo_config()
        experiment(config)["prune"].update(method=method.name, criterion="first")
        validate_schema(config)  # the schema's enums follow the registry
    finally:
        del pruning.METHODS[method.name]
    report = json.loads((out / "report.json").read_text())
    assert report["criterion"] == "first" and report["pruned_params"] < report["dense_params"]
    dense, pruned = load_model(tiny_training / "teacher"), load_model(out / "model")
    kept = pruned.time_embedding.linear_1  # a layer without GroupNorm coupling: its first half survives
    torch.testing.assert_close(kept.weight, dense.time_embedding.linear_1.weight[:kept.out_features])
    assert kept.out_features < dense.time_embedding.linear_1.out_features


def test_a_report_picture_is_drawn_only_by_a_method_that_declares_one(tmp_path):
    # Bugs caught: draw-prune-report drawing gradient flow's picture for any criterion (the rule
    # was gradient flow's alone before), or a foreign report drawn as if it were the method's.
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"criterion": "magnitude", "pruned_params": 10}))
    out = tmp_path / "picture.png"
    base = ["draw-prune-report", "--report", str(report), "--out", str(out)]
    result = CliRunner().invoke(main, [*base, "--criterion", "magnitude"])
    assert result.exit_code == 1 and "pruning method 'diff-pruning' draws no picture of its report" in result.output
    result = CliRunner().invoke(main, [*base, "--criterion", "gradient-flow"])
    assert result.exit_code == 1 and "not a gradient-flow prune report" in result.output
    assert not out.exists()
    assert "masks.png" in pruning.report_pictures()  # the constraint of rule prune_report_picture
