"""The registry of block-reuse methods (igsm.reuse_methods): the schema, the CLI and the workflow
read its names; it imports without torch; fewer-steps is a member like the others."""

import subprocess
import sys

import click
import pytest

from conftest import REPO
from igsm import reuse_methods
from igsm.config import ConfigError, _schema, validate_schema
from test_config import demo_config, experiment


def test_importing_the_registry_does_not_import_torch():
    """rules/common.smk reads it to build the jobs: torch there costs seconds per dry run."""
    code = "import sys, igsm.reuse_methods; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_schema_enum_and_cli_choices_are_the_registry():
    """No second list of names: the schema's enum is the registry's, the CLI offers the members
    that make a gate table (not fewer-steps, which changes the sampler's steps)."""
    from igsm.cli import main

    methods = _schema()["$defs"]["experiment"]["properties"]["reuse"]["properties"]["methods"]
    assert methods["items"]["enum"] == list(reuse_methods.METHODS) == ["dipgo", "deepcache", "reuse-eps", "fewer-steps"]
    assert set(methods["default"]) <= set(reuse_methods.METHODS)
    (choice,) = [p.type for p in main.commands["reuse-plan"].params if p.name == "method"]
    assert isinstance(choice, click.Choice) and list(choice.choices) == ["dipgo", "deepcache", "reuse-eps"]


def test_an_unknown_reuse_method_is_an_error_naming_the_key():
    config = demo_config()
    experiment(config)["reuse"]["methods"] = ["dipgo", "deep-cache"]
    with pytest.raises(ConfigError, match=r"experiments\.digits_unet\.reuse\.methods\[1\]: 'deep-cache' is not one "
                                          r"of dipgo, deepcache, reuse-eps, fewer-steps; did you mean 'deepcache'\?"):
        validate_schema(config)


def test_a_registered_method_is_accepted_by_the_schema(monkeypatch):
    """A new member is one registration: the schema's enum follows without editing the YAML."""

    class EveryOtherStep(reuse_methods.ReuseMethod):
        name = "every-other-step"
        alters_sampler_steps = True

        def sampler_steps(self, num_steps, mac_fraction):
            return num_steps // 2

    monkeypatch.setattr(reuse_methods, "METHODS", dict(reuse_methods.METHODS))
    reuse_methods.register(EveryOtherStep())
    config = demo_config()
    experiment(config)["reuse"]["methods"] = ["every-other-step"]
    validate_schema(config)
    assert "every-other-step" not in reuse_methods.plan_methods()


def test_fewer_steps_keeps_at_least_one_step():
    fewer = reuse_methods.get("fewer-steps")
    assert fewer.sampler_steps(10, 0.6) == 6 and fewer.sampler_steps(20, 0.05) == 1
    with pytest.raises(ValueError, match="0.04 of 20 sampler steps is less than one step"):
        fewer.sampler_steps(20, 0.04)
    assert reuse_methods.get("dipgo").sampler_steps(20, 0.04) == 20  # the gate-table methods keep the sampler
