"""The model-family registry (igsm/families/): each family found by name, by network, by checkpoint
class and by config; the config names the family, checked against its keys; importing the registry
imports no torch (the workflow reads it while building the DAG)."""

import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, TINY_ARCHITECTURE, command_env
from igsm import families
from igsm.config import ConfigError, validate

TINY_UVIT = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2)
TINY_SD_UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
                    norm_num_groups=4, attention_head_dim=2, cross_attention_dim=16,
                    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
ARCHITECTURES = {"unet": TINY_ARCHITECTURE, "uvit": TINY_UVIT, "sd-unet": TINY_SD_UNET}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_each_family_is_found_by_name_network_class_and_config(name):
    """Catches a member registered under another name, an owns() that claims another family's
    networks (two owners are an error), a class_name that does not match what save_model records,
    and build() passing 'family' on to the network's constructor (a TypeError)."""
    from igsm.models import image_shape

    family = families.family_named(name)
    assert family.name == name
    architecture = {"family": name, **ARCHITECTURES[name]}
    assert families.family_of_architecture(architecture) is family
    net = family.build(architecture)
    assert families.family_of(net) is family
    assert families.family_of_class(type(net).__name__) is family
    channels, size = architecture[family.channel_keys[0]], architecture[family.size_key]
    assert image_shape(net) == (channels, size, size)


def test_a_registered_family_is_found_like_the_shipped_ones():
    """A family registered from outside the package (a toy third family's route) is listed, found
    by name and owns its networks; unregistered again, its name is unknown."""
    class Toy(families.Family):
        name, title, class_name = "toy", "Toy", "ToyNet"

        def owns(self, net):
            return type(net).__name__ == "ToyNet"

    class ToyNet:
        pass

    toy = families.register(Toy())
    try:
        assert "toy" in families.names() and families.family_named("toy") is toy
        assert families.family_of(ToyNet()) is toy
    finally:
        del families._registry["toy"]
    with pytest.raises(ValueError, match="unknown model family 'toy'"):
        families.family_named("toy")


def test_unknown_family_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown model family 'mlp'; valid families: dit, sd-unet, unet, uvit"):
        families.family_named("mlp")
    with pytest.raises(ValueError, match=r"list is of no model family; known families: dit: .*; unet: .*; uvit: "):
        families.family_of([])


def demo_config():
    return yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


def test_unknown_family_in_the_config_is_an_error_naming_the_key():
    config = demo_config()
    config["experiments"]["digits_unet"]["architecture"]["family"] = "mlp"
    with pytest.raises(ConfigError, match=r"experiments\.digits_unet\.architecture\.family: 'mlp' is not one "
                                          r"of dit, sd-unet, unet, uvit"):
        validate(config)


def test_a_family_that_the_keys_contradict_is_an_error_naming_the_key():
    """family unet with U-ViT's img_size: the network would be built by the wrong class, or the
    config's size checks read the wrong key; refused before any job."""
    config = demo_config()
    config["experiments"]["digits_unet"]["architecture"] = {"family": "unet", **TINY_UVIT, "img_size": 16}
    with pytest.raises(ConfigError) as info:
        validate(config)
    assert re.search(r"experiments\.digits_unet\.architecture\.family: 'unet', but the architecture has "
                     r"U-ViT's key\(s\) img_size, patch_size, in_chans, embed_dim, depth, num_heads; set family: uvit",
                     str(info.value)), str(info.value)


def test_a_unet_with_cross_attention_keys_is_told_to_be_an_sd_unet():
    """UNet2DModel takes no cross_attention_dim: a config giving it means Stable Diffusion's U-Net."""
    config = demo_config()
    config["experiments"]["digits_unet"]["architecture"] = {"family": "unet", **TINY_ARCHITECTURE,
                                                             "cross_attention_dim": 16}
    with pytest.raises(ConfigError, match=r"architecture\.family: 'unet', but the architecture has SD U-Net's "
                                          r"key\(s\) cross_attention_dim; set family: sd-unet"):
        validate(config)


@pytest.mark.parametrize("architecture, assumed", [
    (TINY_ARCHITECTURE, "unet"), ({**TINY_UVIT, "img_size": 16}, "uvit"), ({}, "unet")])
def test_a_config_without_family_warns_once_naming_the_key_and_the_family(capsys, architecture, assumed):
    """The migration path: the old reading of the keys, said once per experiment (not once per
    check: Snakemake's parse and `igsm check-config` each check), and written into the config so
    that the rules see the family."""
    from igsm.config import check_config

    config = demo_config()
    config["experiments"]["digits_unet"]["architecture"] = dict(architecture)
    if assumed == "uvit":
        config["experiments"]["digits_unet"]["diffusion"] = {"process": "vpsde"}
    try:
        validate(config)
        check_config(config)
    except ConfigError as err:  # the architecture's fit is not what this test is about
        assert "architecture.family" not in str(err), str(err)
    err = capsys.readouterr().err
    warnings = re.findall(r"warning: experiments\.digits_unet\.architecture\.family is not set; "
                          rf"assuming '{assumed}'", err)
    assert len(warnings) == 1, err
    assert config["experiments"]["digits_unet"]["architecture"]["family"] == assumed


def test_shipped_configs_name_every_family(capsys):
    for path in sorted((REPO / "config").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        assert all("family" in exp["architecture"] for exp in config["experiments"].values()), path


def test_importing_the_registry_imports_neither_torch_nor_diffusers():
    """The workflow builds its DAG from config-level facts (keys, forward process, how pretrained
    weights load); a member module importing torch at its top would make that take seconds and
    need torch."""
    code = ("import sys, igsm.families as f\n"
            "for name in f.names():\n"
            "    family = f.family_named(name)\n"
            "    family.process, family.size_key, family.pretrained_needs_architecture\n"
            "f.family_of_architecture({'img_size': 8})\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'timm') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=command_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_schema_enum_is_the_registry():
    """A family added to the registry but not to the schema (or the reverse) is refused by one of them."""
    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())
    found = [node["properties"]["family"]["enum"] for node in _walk(schema)
             if isinstance(node, dict) and "family" in node.get("properties", {})]
    assert found == [families.names()]


def _walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from _walk(child)


def test_experiments_sharing_one_architecture_each_warn(capsys):
    """YAML merges (<<: *exp, config/fashion_mnist.yaml) give experiments one shared architecture
    dict: filling the family into it would silence every experiment after the first."""
    config = demo_config()
    first = config["experiments"]["digits_unet"]
    del first["architecture"]["family"]
    config["experiments"]["digits_copy"] = {**first, "sample": dict(first["sample"])}
    assert config["experiments"]["digits_copy"]["architecture"] is first["architecture"]
    validate(config)
    err = capsys.readouterr().err
    for name in ("digits_unet", "digits_copy"):
        assert err.count(f"warning: experiments.{name}.architecture.family is not set") == 1, err
