"""Plugins (config ``plugins:``, igsm/plugins.py; issue 30): a model family, a pruning method and a
block-reuse method added from files outside the package (tests/plugins/), each registering itself
on import, run through the whole workflow; a plugin that is missing, fails to import or takes a
registered name is an error naming the key and the file before any job."""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, command_env, snakemake_in
from igsm import families, plugins, pruning, reuse_methods
from igsm.config import ConfigError, validate, validate_schema

PLUGIN_FILES = ["plugins/toy_family.py", "plugins/toy_pruning.py", "plugins/toy_reuse.py"]


def toy_config(plugin_files=PLUGIN_FILES):
    """The toy family pruned by the toy method, finetuned with NP and IGSM, its dense model sampled
    with the toy reuse method: every stage, in tiny settings (8×8 digits, a few steps and images)."""
    return {
        "plugins": list(plugin_files),
        "datasets": {"digits": {"source": "sklearn-digits", "image_size": 8}},
        "objectives": {"np": {"weights": {"np": 1.0}}, "igsm": {"weights": {"np": 1.0, "kd": 1.0, "jm2": 0.1}}},
        "experiments": {"toy": {
            "dataset": "digits",
            "architecture": {"family": "toy-conv", "image_size": 8, "channels": 1, "width": 16, "num_blocks": 2},
            "dense": {"training": {"num_steps": 20, "batch_size": 16, "lr": 2e-3, "log_every": 10,
                                   "checkpoint_every": 10}},
            "prune": {"method": "geometric-median", "criterion": "fpgm", "num_images": 8},
            "finetune": {"runs": [{"channel_ratio": 0.5, "objectives": ["np", "igsm"]}],
                         "training": {"num_steps": 4, "batch_size": 8, "log_every": 2, "checkpoint_every": 2}},
            "sample": {"num_images": 8, "num_steps": 4, "batch_size": 8},
            "reuse": {"models": ["dense"], "methods": ["periodic"], "mac_fractions": [0.6]},
            "fid": {"mode": "clean", "num_reference": 16},
        }},
    }


@pytest.fixture
def registries():
    """After the test, the registries and modules without the plugins it loaded in this process
    (the shipped members stay: the families' are registered on first use, once per process)."""
    yield
    for registry in (families._registry, pruning.METHODS, reuse_methods.METHODS):
        for name, member in list(registry.items()):
            if type(member).__module__.startswith("igsm_plugin_"):
                del registry[name]
    for name in [name for name in sys.modules if name.startswith("igsm_plugin_")]:
        del sys.modules[name]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding the toy plugins (the config names them relative to it)."""
    shutil.copytree(REPO / "tests" / "plugins", tmp_path / "plugins")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(plugins.ENVIRONMENT_VARIABLE, raising=False)
    return tmp_path


def test_the_plugins_members_pass_the_config_checks(workdir, registries):
    """Catches an enum that is not the registry's (the family's is filled from it like the
    methods'), or plugins imported after the schema is built: the toy family, pruning method and
    reuse method are valid values only once their files are imported."""
    without = toy_config(plugin_files=[])
    with pytest.raises(ConfigError) as info:
        validate_schema(without)
    for key in ("architecture.family: 'toy-conv'", "prune.method: 'geometric-median'", "reuse.methods[0]: 'periodic'"):
        assert f"experiments.toy.{key} is not one of" in str(info.value), str(info.value)
    validate(toy_config())  # schema and every cross-field check
    assert families.family_named("toy-conv").name == "toy-conv"


def test_loading_twice_imports_once(workdir, registries):
    """The Snakefile's parse and each `igsm check-config` validate: a second load of the same file
    must find the first (else its members would be registered twice)."""
    first = plugins.load(PLUGIN_FILES)
    assert plugins.load(PLUGIN_FILES) == first == [str(workdir / f) for f in PLUGIN_FILES]


@pytest.mark.parametrize("entries, message", [
    (["plugins/missing.py"], r"plugins\[0\]: plugin file plugins/missing.py does not exist \(looked for .*missing.py\)"),
    (["plugins/toy_family.py", "plugins/"], r"plugins\[1\]: plugin file plugins/ is not a .py file"),
    ("plugins/toy_family.py", r"plugins: 'plugins/toy_family.py' is not a list"),
    (["no_such_module_here"], r"plugins\[0\]: plugin no_such_module_here failed to import: ModuleNotFoundError"),
], ids=["missing-file", "folder", "not-a-list", "missing-module"])
def test_a_plugin_that_cannot_be_loaded_is_an_error_naming_the_key_and_file(workdir, registries, entries, message):
    config = toy_config()
    config["plugins"] = entries
    with pytest.raises(ConfigError, match=message):
        validate_schema(config)


def write_plugin(folder, name, code):
    path = folder / name
    path.write_text(textwrap.dedent(code))
    return path


# (plugin code taking a name a shipped member has, the existing member the error must name)
TAKEN = {
    "family": ("""
        from igsm.families import Family, register

        class AnotherUNet(Family):
            name = "unet"

        register(AnotherUNet())
        """, "model family 'unet': the name 'unet' is registered twice: by igsm.families.unet.UNetFamily and by "
             "igsm_plugin_taken_[0-9a-f]{8}.AnotherUNet"),
    "family-class": ("""
        from igsm.families import Family, register

        class MyViT(Family):
            name, class_name = "my-vit", "UViT"

        register(MyViT())
        """, "model family 'my-vit': the network class 'UViT' \\(a checkpoint names its family by it\\) is "
             "registered twice: by igsm.families.uvit.UViTFamily and by igsm_plugin_taken_[0-9a-f]{8}.MyViT"),
    "pruning": ("""
        from igsm.pruning import PruningMethod, register

        class MyMagnitude(PruningMethod):
            name = "my-magnitude"
            criteria = ("magnitude",)

        register(MyMagnitude())
        """, "pruning method 'my-magnitude': the criterion 'magnitude' is registered twice: by "
             "igsm.pruning.diff_pruning.DiffPruning and by igsm_plugin_taken_[0-9a-f]{8}.MyMagnitude"),
    "reuse": ("""
        from igsm.reuse_methods import ReuseMethod, register

        class MyDeepCache(ReuseMethod):
            name = "deepcache"

        register(MyDeepCache())
        """, "reuse method 'deepcache': the name 'deepcache' is registered twice: by igsm.reuse_methods.DeepCache and by "
             "igsm_plugin_taken_[0-9a-f]{8}.MyDeepCache"),
    "data source": ("""
        from igsm.data.sources import register

        def prepare(spec, cache_dir):
            raise NotImplementedError

        register("cifar10", lambda spec, fail: None, prepare)
        """, "data source 'cifar10': the name 'cifar10' is registered twice: by igsm.data.cifar10.prepare and by "
             "igsm_plugin_taken_[0-9a-f]{8}.prepare"),
    "sampler": ("""
        from igsm.sampling.samplers import DDIM, register

        class MyDDIM(DDIM):
            pass

        register(MyDDIM)
        """, "sampler 'ddim': the name 'ddim' is registered twice: by igsm.sampling.samplers.DDIM and by "
             "igsm_plugin_taken_[0-9a-f]{8}.MyDDIM"),
}


@pytest.mark.parametrize("kind", sorted(TAKEN))
def test_a_plugin_taking_a_registered_name_is_an_error_naming_both(workdir, registries, kind):
    """Catches a registry that silently replaces a member (the family registry did: every job would
    then build the plugin's network for a config naming 'unet'), and two families whose checkpoints
    could not be told apart (loading takes the first family of the class name)."""
    code, both = TAKEN[kind]
    write_plugin(workdir, "taken.py", code)
    before = {name: dict(registry) for name, registry in
              (("families", families._registry), ("pruning", pruning.METHODS), ("reuse", reuse_methods.METHODS))}
    config = toy_config(plugin_files=["taken.py"])
    with pytest.raises(ConfigError, match=rf"^plugins\[0\]: plugin taken.py failed to import: ValueError: {both}"):
        validate_schema(config)
    assert pruning.METHODS == before["pruning"] and reuse_methods.METHODS == before["reuse"]
    assert all(families._registry.get(name) is family for name, family in before["families"].items())


def test_a_plugin_that_raises_is_an_error_naming_the_file(workdir, registries):
    write_plugin(workdir, "broken.py", "raise RuntimeError('half-written plugin')\n")
    with pytest.raises(ConfigError, match=r"^plugins\[0\]: plugin broken.py failed to import: RuntimeError: "
                                          r"half-written plugin$"):
        validate_schema(toy_config(plugin_files=["broken.py"]))


def igsm_command(*args, plugin_value=None):
    env = command_env()
    env.pop(plugins.ENVIRONMENT_VARIABLE, None)
    if plugin_value is not None:
        env[plugins.ENVIRONMENT_VARIABLE] = plugin_value
    return subprocess.run([sys.executable, "-m", "igsm", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_job_process_loads_the_exported_plugins(workdir, registries):
    """Catches `python -m igsm` building its commands before importing the plugins (the CLI's
    --method choices are the reuse registry's): the workflow's jobs inherit the variable that the
    Snakefile exports."""
    plugins.export(plugins.resolve(["plugins/toy_reuse.py"]))
    try:
        value = os.environ[plugins.ENVIRONMENT_VARIABLE]
    finally:
        plugins.export([])
    assert json.loads(value) == [str(workdir / "plugins" / "toy_reuse.py")]
    with_plugin, without = igsm_command("reuse-plan", "--help", plugin_value=value), igsm_command("reuse-plan", "--help")
    assert with_plugin.returncode == 0 and without.returncode == 0, with_plugin.stderr + without.stderr
    assert "periodic" in with_plugin.stdout and "periodic" not in without.stdout, with_plugin.stdout


def test_a_job_whose_plugin_is_gone_stops_with_one_line(workdir):
    """A plugin file removed between the parse and a job: a short error naming it, not a traceback."""
    missing = str(workdir / "plugins" / "gone.py")
    result = igsm_command("--help", plugin_value=json.dumps([missing]))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == (f"Error: plugins (from IGSM_PLUGINS)[0]: plugin file {missing} does not exist "
                                     f"(looked for {missing}); give a Python file relative to the working directory "
                                     f"{workdir}, or a module name")


@pytest.mark.slow
def test_the_toy_plugins_run_through_the_workflow(tmp_path):
    """download → dense → prune → finetune (NP, IGSM) → sample → FID → tables on the toy family, pruned
    by the toy method, its dense model sampled with the toy reuse method; no file of the package
    names any of them. Every job process must import the plugins (Snakemake runs in the repository,
    the plugin paths are relative to the working directory -d)."""
    import pandas as pd

    shutil.copytree(REPO / "tests" / "plugins", tmp_path / "plugins")
    proc = snakemake_in(tmp_path, toy_config())
    assert proc.returncode == 0, proc.stdout[-8000:]
    results = tmp_path / "results"
    table = pd.read_csv(results / "tables" / "toy.csv").set_index("model")
    variants = ["dense", "fpgm-cr0.5/np", "fpgm-cr0.5/igsm", "dense/reuse-periodic-f0.6"]
    assert sorted(table.index) == sorted(variants)
    assert all(math.isfinite(table.loc[v, "fid"]) and table.loc[v, "fid"] > 0 for v in variants), table.fid
    assert set(table.loc[["fpgm-cr0.5/np", "fpgm-cr0.5/igsm"], "objective"]) == {"np", "igsm"}
    report = json.loads((results / "prune/toy/fpgm-cr0.5/report.json").read_text())
    assert report["criterion"] == "fpgm" and report["pruned_params"] < report["dense_params"]
    # The method's extra output, drawn by the workflow's rule for any method that declares one.
    assert (results / "prune/toy/fpgm-cr0.5/params.png").read_bytes()[:4] == b"\x89PNG"
    for model in ("dense/toy/trained/model", "finetune/toy/fpgm-cr0.5/igsm/model"):
        assert json.loads((results / model / "architecture.json").read_text())["class"] == "ToyConvNet"
    plan = json.loads((results / "reuse/toy/dense/reuse-periodic-f0.6/plan.json").read_text())
    assert plan["method"] == "periodic" and plan["metadata"]["period"] == 2
    assert table.loc["dense/reuse-periodic-f0.6", "mac_fraction"] <= 0.6
