"""The stages layer (igsm.stages) and the command table (igsm.cli): every command runs a stage
function that takes exactly its arguments, and the typed settings take their defaults from the
schema, refusing a key that is not the section's (issue 30, item 5)."""

import dataclasses
import importlib
import inspect

import pytest
from click.testing import CliRunner

from igsm import cli
from igsm.diffusion import VPSDE, NoiseSchedule, process_from_settings
from igsm.schema import schema_file, section_defaults
from igsm.stages.settings import ClipScoreSettings, FidSettings, NetworkSettings, PruneSettings

SECTIONS = {FidSettings: "fid", NetworkSettings: "sample", PruneSettings: "prune", ClipScoreSettings: "clip_score"}


@pytest.mark.parametrize("command", cli.COMMANDS, ids=lambda c: c.name)
def test_each_command_runs_a_stage_function_taking_exactly_its_arguments(command):
    """A typo in the table, or a stage function whose parameters drifted from its command's, would
    otherwise surface only when that command runs in a workflow."""
    module, function = command.stage.split(":")
    stage = getattr(importlib.import_module(f"igsm.stages.{module}"), function)
    assert list(inspect.signature(stage).parameters) == [param.name for param in command.params]
    assert set(cli.main.commands) == {c.name for c in cli.COMMANDS}


@pytest.mark.parametrize("settings_class", SECTIONS, ids=lambda c: c.__name__)
def test_typed_settings_are_the_schema_section_with_its_defaults(settings_class):
    """No second copy of a default: an empty --settings gives the schema's, and every field but the
    passed-along 'diffusion', 'conditioning', 'latents' and 'prdc' (and the methods' sections) is a key
    of the section."""
    section = SECTIONS[settings_class]
    keys = schema_file()["$defs"]["experiment"]["properties"][section]["properties"]
    fields = {f.name for f in dataclasses.fields(settings_class)} - {"diffusion", "conditioning", "latents", "sections",
                                                                     "prdc"}
    assert fields <= set(keys)
    settings = settings_class.from_dict({})
    defaults = section_defaults(section)
    assert {name: getattr(settings, name) for name in fields if name in defaults} == \
        {name: defaults[name] for name in fields if name in defaults}


def test_prune_settings_complete_a_method_section_with_its_schema_defaults():
    settings = PruneSettings.from_dict({"method": "gradient-flow", "gradient_flow": {"num_steps": 7}})
    flow = schema_file()["$defs"]["gradient_flow"]["properties"]
    assert settings.sections["gradient_flow"] == {**{k: v["default"] for k, v in flow.items()}, "num_steps": 7}
    assert settings.method == "gradient-flow" and PruneSettings.from_dict({}).method is None


def test_an_unknown_settings_key_is_an_error_naming_it(tmp_path):
    """A misspelt key (as a hand-run command would have it) is refused, not silently defaulted."""
    statistics = tmp_path / "s.npz"
    statistics.write_bytes(b"")
    result = CliRunner().invoke(cli.main, ["fid", "--statistics", str(statistics), "--reference", str(statistics),
                                           "--out", str(tmp_path / "fid.json"), "--settings", '{"mdoe": "clean"}'])
    assert result.exit_code == 1 and "--settings: mdoe: not a key of the 'fid' settings" in result.output
    assert not (tmp_path / "fid.json").exists()


def test_the_forward_process_takes_the_schema_defaults_of_its_own_process():
    """diffusion's defaults sit in the schema's if/then/else per process: a VP-SDE without its
    constants gets the VP-SDE's, a DDPM the DDPM's."""
    assert process_from_settings({"process": "vpsde"}) == VPSDE(0.1, 20.0)
    vpsde_defaults = section_defaults("diffusion", {"process": "vpsde"})
    assert "num_steps" not in vpsde_defaults and (vpsde_defaults["beta_min"], vpsde_defaults["beta_max"]) == (0.1, 20.0)
    ddpm = process_from_settings({"beta_end": 0.05})
    assert isinstance(ddpm, NoiseSchedule) and ddpm.identity() == NoiseSchedule.linear(1000, 1e-4, 0.05).identity()
