"""Model releases (issue 32, item 3): the release folder's files, its model card read back by
huggingface_hub's own parser, diffusers' loading of the dense demo U-Net (the same ε̂ as igsm's
loader) and its refusal of a pruned one, the upload's failures offline, and the config's repo ids.

huggingface_hub has no local, file-based stand-in for the Hub's upload API (HfApi talks HTTP to
HF_ENDPOINT only), so the upload itself is tested only up to its failures: offline, no token, an
unreachable endpoint."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml
from click.testing import CliRunner

from igsm import cli
from igsm.config import ConfigError, check_config, validate_schema
from igsm.diffusion import NoiseSchedule
from igsm.models import build_model, load_model, predict_noise, save_model
from igsm.paper.tables import published_fids
from igsm.plan import release_repo_name, released_models
from igsm.release import diffusers_form

from conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

DEMO = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
ARCHITECTURE = DEMO["experiments"]["digits_unet"]["architecture"]
FID = {"fid": 42.5, "num_images": 100, "mode": "clean", "reference_kind": "computed", "num_reference": 200,
       "sampler": "ddim", "sampler_kwargs": {"num_steps": 20}}
EFFICIENCY = {"params": 98381, "macs": 9145724}
PRUNE_REPORT = {"criterion": "magnitude", "channel_ratio": 0.3, "dense_params": 176849, "dense_macs": 16250960,
                "pruned_params": 98381, "pruned_macs": 9145724, "paper_label": "0.43"}
CONTEXT = {"experiment": "digits_unet", "dataset": "digits", "dataset_source": "sklearn-digits",
           "conditioning_kind": "none", "family": "unet", "family_title": "U-Net", "base_model": None,
           "dense_model": "", "repo_id": None}
DENSE_ROW = {"variant": "dense", "kind": "dense", "objective": "dense", "criterion": "", "channel_ratio": None,
             "weights": None, "pruned": None, "release": "dense"}
FINETUNED_ROW = {"variant": "magnitude-cr0.3/igsm", "kind": "finetuned", "objective": "igsm", "criterion": "magnitude",
                 "channel_ratio": 0.3, "weights": {"np": 1.0, "kd": 1.0, "jm2": 0.1}, "pruned": "magnitude-cr0.3",
                 "release": "finetuned/magnitude-cr0.3/igsm"}
PRUNED_ROW = {**FINETUNED_ROW, "variant": None, "kind": "pruned", "objective": "", "weights": None,
              "release": "pruned/magnitude-cr0.3"}
IGSM_FILES = {"README.md", "architecture.json", "model.safetensors"}
DIFFUSERS_FILES = {"config.json", "diffusion_pytorch_model.safetensors"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The demo's U-Net (config/demo.yaml's architecture, random weights) and its magnitude pruning at
    channel ratio 0.3, saved as the workflow saves them: (dense folder, pruned folder)."""
    from igsm import pruning

    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    dense = build_model(ARCHITECTURE).eval()
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    pruned, _ = pruning.prune(dense, criterion="magnitude", channel_ratio=0.3, images=images,
                              schedule=NoiseSchedule.linear(num_steps=20))
    save_model(dense, folder / "dense")
    save_model(pruned, folder / "pruned")
    for name, payload in (("fid", FID), ("efficiency", EFFICIENCY), ("summary", {"num_steps": 150}),
                          ("report", PRUNE_REPORT)):
        (folder / f"{name}.json").write_text(json.dumps(payload))
    return folder / "dense", folder / "pruned"


def release(model, out, row, context=None, objective=None, files=("fid", "efficiency", "summary", "report")):
    """`igsm release` as the workflow's rule runs it; the folder it wrote."""
    inputs = model.parent
    options = {"fid": "--fid", "efficiency": "--efficiency", "summary": "--summary", "report": "--prune-report"}
    args = ["release", "--model", str(model), "--out", str(out)]
    for name in files:
        args += [options[name], str(inputs / f"{name}.json")]
    settings = {"row": row, "context": {**CONTEXT, **(context or {})}, "objective": objective}
    result = CliRunner().invoke(cli.main, args + ["--settings", json.dumps(settings)])
    assert result.exit_code == 0, result.output
    return out


def load_card(folder):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def noise_prediction(net):
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return predict_noise(net, x, torch.tensor([1, 400, 999]))


def test_the_dense_release_loads_with_diffusers_and_predicts_igsms_noise(models, tmp_path):
    """A config.json that builds another network (a width, the time embedding) or weights under names
    diffusers does not use would load wrongly or not at all; the ε̂ of both loaders must agree."""
    from diffusers import UNet2DModel

    folder = release(models[0], tmp_path / "dense", DENSE_ROW, files=("fid", "efficiency", "summary"))
    assert {p.name for p in folder.iterdir()} == IGSM_FILES | DIFFUSERS_FILES
    theirs = UNet2DModel.from_pretrained(str(folder), low_cpu_mem_usage=False).eval()
    ours = load_model(folder)
    torch.testing.assert_close(noise_prediction(theirs), noise_prediction(ours), rtol=1e-5, atol=1e-6)
    card = load_card(folder)
    assert card.data.library_name == "diffusers" and "UNet2DModel.from_pretrained" in card.text


def test_a_pruned_unet_is_no_diffusers_config_and_its_card_says_what_loads_it(models, tmp_path):
    """Pruned widths (the time projection keeps the dense block_out_channels[0] features while conv_in
    shrinks; attention narrows on its own) fit no UNet2DModel config: no config.json that would build
    a wrong network, and a card naming the layers and igsm's loader."""
    config, reason = diffusers_form(load_model(models[1]), json.loads((models[1] / "architecture.json").read_text())
                                    ["config"])
    assert config is None and "time_embedding.linear_1: in_features 16 (config: 12)" in reason, reason
    assert "down_blocks.1.attentions.0: inner_dim 22 (config: 24)" in reason, reason
    folder = release(models[1], tmp_path / "finetuned", FINETUNED_ROW)
    assert {p.name for p in folder.iterdir()} == IGSM_FILES
    card = load_card(folder)
    assert card.data.library_name == "igsm"
    assert "from igsm.models import load_model" in card.text and "cannot load it" in card.text
    torch.testing.assert_close(noise_prediction(load_model(folder)), noise_prediction(load_model(models[1])))


def test_the_card_parses_back_with_the_fid_and_its_image_count(models, tmp_path):
    """huggingface_hub's parser must read the model-index the card was written with: a malformed one
    (a missing dataset, a metric without a value) gives no eval_results or other numbers."""
    folder = release(models[1], tmp_path / "finetuned", FINETUNED_ROW,
                     context={"repo_id": "someone/igsm-digits_unet-finetuned-magnitude-cr0.3-igsm",
                              "base_model": "someone/igsm-digits_unet-dense"})
    data = load_card(folder).data
    (result,) = data.eval_results
    assert (result.metric_type, result.metric_value) == ("fid", FID["fid"])
    assert result.metric_name == "FID (100 images, clean mode, vs 200 training images of digits)"
    assert result.metric_args["num_images"] == 100 and result.task_type == "unconditional-image-generation"
    assert (result.dataset_name, result.dataset_type) == ("digits", "sklearn-digits")
    assert data.model_name == "someone/igsm-digits_unet-finetuned-magnitude-cr0.3-igsm"
    assert data.base_model == "someone/igsm-digits_unet-dense"
    assert {"igsm", "pruning", "magnitude"} <= set(data.tags)
    text = load_card(folder).text
    for shown in ("98,381 (dense: 176,849)", "9.15 M (dense: 16.3 M)", "channel ratio 0.3",
                  "label 0.43", "`igsm`: np 1, kd 1, jm2 0.1", "| finetune steps | 150 |",
                  "hf download someone/igsm-digits_unet-finetuned-magnitude-cr0.3-igsm"):
        assert shown in text, shown


def test_a_card_without_a_paper_number_omits_it_and_one_with_it_shows_it(models, tmp_path):
    """The paper's number only where igsm/paper has the same experiment, never a 'None' cell."""
    without = load_card(release(models[0], tmp_path / "a", DENSE_ROW, files=("fid", "efficiency", "summary")))
    assert "paper" not in without.text and "None" not in without.text
    entry = next(e for e in published_fids() if e["pr"] is None)  # a dense model the paper scores
    with_paper = load_card(release(models[0], tmp_path / "b", DENSE_ROW, files=("fid", "efficiency", "summary"),
                                   context={"dense_model": entry["dense"], "base_model": entry["dense"]}))
    assert f"the paper's FID of the same experiment ({entry['where']}) | {entry['fid']:g} |" in with_paper.text
    assert with_paper.data.base_model == entry["dense"]


def test_a_pruned_models_card_has_no_model_index(models, tmp_path):
    """A pruned model before finetuning is not sampled: its card reports params, MACs and the pruning,
    and no FID (an empty model-index would not parse)."""
    folder = release(models[1], tmp_path / "pruned", PRUNED_ROW, files=("report",))
    assert {p.name for p in folder.iterdir()} == IGSM_FILES
    card = load_card(folder)
    assert card.data.eval_results is None and "model-index" not in card.content
    assert "98,381 (dense: 176,849)" in card.text and "reports no FID" in card.text and "None" not in card.text


def publish(folder, repo_id, **env):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environment.update(HF_HOME=str(folder.parent / "hf_home"), **env)  # no stored token
    begin = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "igsm", "publish", "--folder", str(folder), "--repo-id", repo_id,
                           "--receipt", str(folder.parent / "receipt.json")],
                          capture_output=True, text=True, env=environment, cwd=REPO, timeout=120)
    return proc, time.perf_counter() - begin


@pytest.mark.parametrize("env, cause", [
    ({"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_none"}, "HF_HUB_OFFLINE is set"),
    ({"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_none"}, "the Hub is unreachable"),
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "no Hugging Face token"),
], ids=["offline", "unreachable", "no-token"])
def test_publishing_without_the_hub_fails_fast_naming_the_repo_id(models, tmp_path, env, cause):
    """The real upload path (HfApi.create_repo + upload_folder) offline: one line naming the repo id
    and the cause, no traceback, no receipt, in seconds (no retries for a minute)."""
    folder = release(models[1], tmp_path / "finetuned", FINETUNED_ROW)
    proc, seconds = publish(folder, "someone/igsm-test", **env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("Error: publish someone/igsm-test: could not upload"), proc.stderr
    assert cause in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "receipt.json").exists() and seconds < 60


def test_publishing_refuses_a_repo_id_the_hub_would(models, tmp_path):
    folder = release(models[1], tmp_path / "finetuned", FINETUNED_ROW)
    proc, _ = publish(folder, "someone/igsm--test", HF_HUB_OFFLINE="1")
    assert proc.returncode == 1 and "publish someone/igsm--test: not a valid repo id" in proc.stderr, proc.stderr


def demo_with(**publish):
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config["publish"] = publish
    validate_schema(config)
    return config


def test_the_demo_releases_its_dense_pruned_and_finetuned_models():
    exp = demo_with()["experiments"]["digits_unet"]
    assert list(released_models(exp)) == ["dense", "pruned/diff-pruning-cr0.3", "finetuned/diff-pruning-cr0.3/np",
                                          "finetuned/diff-pruning-cr0.3/igsm"]
    assert release_repo_name("digits_unet", "finetuned/diff-pruning-cr0.3/igsm") == \
        "digits_unet-finetuned-diff-pruning-cr0.3-igsm"
    assert list(released_models({**exp, "dense": {**exp["dense"], "pretrained": "google/ddpm-cifar10-32"}}))[0] != \
        "dense"  # a pretrained dense model is its owner's release


def test_a_repo_prefix_the_hub_refuses_is_a_config_error_naming_the_key():
    """Before any job: an upload that fails on its name after the others went through helps no one."""
    assert demo_with()["publish"] == {"repo_prefix": "", "private": True, "revision": None}
    check_config(demo_with(repo_prefix="someone/igsm-"))
    for prefix in ("someone/igsm--", "someone/a/b-", "someone/" + "x" * 90):
        with pytest.raises(ConfigError, match=r"publish\.repo_prefix: .* makes the repo id"):
            check_config(demo_with(repo_prefix=prefix))


def dry_run(tmp_path, target, **publish):
    from conftest import run_snakemake

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "config" / "demo.yaml").read_text()),
                                    "publish": publish}))
    return run_snakemake("-n", "-p", target, "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                         "--configfile", str(path), check=False)


def test_publish_models_needs_a_repo_prefix_and_names_each_repository_from_it(tmp_path):
    """Off by default (the target says which key to set); with a prefix, one upload per released model to
    prefix + '<experiment>-<release>', after its release folder, with its receipt."""
    proc = dry_run(tmp_path, "publish_models")
    assert proc.returncode != 0 and "publish.repo_prefix is not set" in proc.stdout, proc.stdout[-3000:]
    proc = dry_run(tmp_path, "publish_models", repo_prefix="someone/igsm-", revision="v1")
    assert proc.returncode == 0, proc.stdout[-3000:]
    for release in released_models(demo_with()["experiments"]["digits_unet"]):
        repo_id = "someone/igsm-" + release_repo_name("digits_unet", release)
        assert (f"python -m igsm publish --folder results/release/digits_unet/{release} --repo-id {repo_id} "
                f"--private --revision v1 --receipt results/publish/digits_unet/{release}.json") in proc.stdout


def test_a_class_conditional_dense_unet_loads_with_diffusers_and_a_uvit_with_igsm_only(tmp_path):
    """diffusers' loading is checked with the network's own condition (a class-conditional U-Net's
    labels); U-ViT is igsm's own class: no diffusers files, and the card says why."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    conditional = build_model({**ARCHITECTURE, "num_class_embeds": 11})
    save_model(conditional, tmp_path / "conditional")
    folder = release(tmp_path / "conditional", tmp_path / "conditional-release", DENSE_ROW, files=())
    assert {p.name for p in folder.iterdir()} == IGSM_FILES | DIFFUSERS_FILES
    labels = torch.tensor([0, 3, 10])
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = predict_noise(UNet2DModel.from_pretrained(str(folder), low_cpu_mem_usage=False).eval(), x,
                               torch.tensor([1, 400, 999]), class_labels=labels)
        ours = predict_noise(load_model(folder), x, torch.tensor([1, 400, 999]), class_labels=labels)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)

    uvit = build_model({"family": "uvit", "img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 16,
                        "depth": 2, "num_heads": 2})
    save_model(uvit, tmp_path / "uvit")
    folder = release(tmp_path / "uvit", tmp_path / "uvit-release", DENSE_ROW, files=(),
                     context={"family": "uvit", "family_title": "U-ViT"})
    assert {p.name for p in folder.iterdir()} == IGSM_FILES
    card = load_card(folder)
    assert "it is igsm's own UViT, not a diffusers model" in card.text and card.data.eval_results is None
