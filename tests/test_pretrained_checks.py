"""dense.pretrained against the experiment, and pickled weights that ask for more than tensors
(issue 29, hostile cases 1 and 8), as a user meets them: Snakemake on the real Snakefile in an empty
folder, and `python -m igsm`.

Case 1: a teacher of another image size, channel count or family ran to the end without a word
(a 32-px teacher of 16-px data finetuned on 16-px images and sampled at 32 px). A local folder is
checked with the config, before any job; a hub model by its prune job, before it writes.
Case 8: a refused pickle was reported with advice for a damaged download and torch's own advice to
turn the guard off; now it says what the file is and a way on that runs nothing in it either."""

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, TINY_ARCHITECTURE, command_env, snakemake_in
from igsm.models import build_unet, load_model, save_model
from igsm.uvit import UViT

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

TINY_UVIT = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)


def demo_with_teachers(teachers: dict) -> dict:
    """config/demo.yaml with one copy of its experiment per {name: dense.pretrained}."""
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    template = config["experiments"].pop("digits_unet")
    for name, pretrained in teachers.items():
        config["experiments"][name] = {**copy.deepcopy(template), "dense": {"pretrained": str(pretrained)}}
    return config


def igsm(*args, env=None):
    return subprocess.run([sys.executable, "-m", "igsm", *map(str, args)], text=True, capture_output=True,
                          timeout=300, env={**command_env(), **(env or {})})


# ---- case 1: local folders, before any job --------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_folders(tmp_path_factory):
    """The demo's data is 16×16, 1 channel. One folder per kind of teacher the loader reads."""
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    save_model(build_unet(TINY_ARCHITECTURE), root / "fits")                                  # architecture.json
    save_model(build_unet({**TINY_ARCHITECTURE, "sample_size": 32}), root / "px32")
    save_model(UViT(**TINY_UVIT), root / "uvit")
    build_unet({**TINY_ARCHITECTURE, "in_channels": 3, "out_channels": 3}).save_pretrained(root / "rgb")   # config.json
    build_unet({**TINY_ARCHITECTURE, "sample_size": 32}).save_pretrained(root / "pipeline" / "unet")
    (root / "pipeline" / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    (root / "empty").mkdir()
    return root


def test_teacher_of_another_size_channels_or_family_is_refused_before_any_job(teacher_folders, tmp_path):
    config = demo_with_teachers({name: teacher_folders / name for name in ("px32", "uvit", "rgb", "pipeline", "empty")})
    proc = snakemake_in(tmp_path, config, "-n")
    out = proc.stdout
    assert proc.returncode != 0 and "Traceback" not in out, out[-3000:]
    key = "experiments.{}.dense.pretrained: " + re.escape(str(teacher_folders)) + "/{}"
    expected = [
        key.format("px32", r"px32/architecture\.json: sample_size 32, but datasets\.digits\.image_size is 16; "
                           r"the teacher would be finetuned on 16-px images and sample at 32 px"),
        key.format("uvit", r"uvit/architecture\.json describes a U-ViT \(UViT\), but the experiment is a U-Net "
                           r"experiment .* or make it a U-ViT experiment .*\(a model folder's model\.safetensors\)"),
        key.format("rgb", r"rgb/config\.json: in_channels 3, but dataset 'digits' has 1 channel"),
        key.format("rgb", r"rgb/config\.json: out_channels 3, but dataset 'digits' has 1 channel"),
        key.format("pipeline", r"pipeline/unet/config\.json: sample_size 32, but datasets\.digits\.image_size is 16"),
        r"experiments\.empty\.dense\.pretrained: local folder " + re.escape(str(teacher_folders / "empty"))
        + " holds no model",
    ]
    for pattern in expected:
        assert re.search(pattern, out), (pattern, out[-3000:])
    # Only what differs: the U-ViT takes 16-px 1-channel images, the RGB U-Net 16-px ones.
    assert not re.search(r"experiments\.(uvit|rgb)\.dense\.pretrained: \S+: (img_size|sample_size|in_chans)", out)
    assert not (tmp_path / "results").exists()


# ---- case 1: hub models, in the first job that has the model and the data (prune) ----------------------------------------------

def cache_hub_model(cache: Path, model_id: str, net) -> Path:
    """A hub cache entry as huggingface_hub lays it out (refs/main → snapshots/<commit>/)."""
    repo = cache / f"models--{model_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    net.save_pretrained(repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_hub_teacher_of_another_size_fails_its_prune_job_naming_the_key(tmp_path, monkeypatch):
    """Offline, from a hub cache holding a 16-px 1-channel and a 32-px 3-channel U-Net: the one that
    fits is pruned; the other's prune job, the first that has both the model and the data, fails
    naming the key and writes nothing. (The fetching rule's command is unchanged, so a run made
    before this check is not redone.)"""
    cache = tmp_path / "hub"
    torch.manual_seed(0)
    fits = build_unet(TINY_ARCHITECTURE)
    cache_hub_model(cache, "someone/ddpm-digits-16", fits)
    cache_hub_model(cache, "someone/ddpm-cifar10-32", build_unet({**TINY_ARCHITECTURE, "sample_size": 32,
                                                                  "in_channels": 3, "out_channels": 3}))
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = demo_with_teachers({"good": "someone/ddpm-digits-16", "bad": "someone/ddpm-cifar10-32"})
    for settings in config["experiments"].values():
        settings["prune"]["num_images"] = 4
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the jobs inherit Snakemake's environment
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    proc = snakemake_in(workdir, config, "--keep-going", "results/prune/good/diff-pruning-cr0.3/report.json",
                        "results/prune/bad/diff-pruning-cr0.3/report.json")
    assert proc.returncode != 0
    log = (workdir / "results" / "logs" / "prune" / "bad" / "diff-pruning-cr0.3.log").read_text()
    assert re.search(r"experiments\.bad\.dense\.pretrained: the model 'someone/ddpm-cifar10-32': sample_size 32, "
                     r"but datasets\.digits\.image_size is 16", log), log
    assert "experiments.bad.dense.pretrained: the model 'someone/ddpm-cifar10-32': in_channels 3" in log, log
    assert "Traceback" not in log
    assert not (workdir / "results" / "prune" / "bad" / "diff-pruning-cr0.3" / "model").exists()
    assert (workdir / "results" / "prune" / "good" / "diff-pruning-cr0.3" / "report.json").exists()
    good = load_model(workdir / "results" / "dense" / "good" / "pretrained" / "model")
    assert all(torch.equal(good.state_dict()[k], v) for k, v in fits.state_dict().items())


# ---- case 8: pickles that ask for code -------------------------------------------------------------

class RunsCode:
    """Pickles as a call of os.system: what a malicious checkpoint does when unpickled unrestricted."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def assert_refused_with_safe_advice(proc, path: Path, marker: Path, out: Path) -> str:
    """The refusal as case 8 wants it; returns the conversion command it suggests."""
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    message = proc.stderr[proc.stderr.index("Error: "):]  # after diffusers' own log lines
    assert f"{path} contains pickled code or objects, not plain tensors (it asks for posix.system)" in message
    assert "refused for safety, nothing in it ran" in message, message
    for wrong in ("weights_only", "Google Drive", "download it again", "incomplete"):
        assert wrong not in message, (wrong, message)
    assert len(message.strip().splitlines()) <= 3, message
    assert not marker.exists(), "the pickle ran"
    assert not out.exists()
    return re.search(r"`(python -m igsm convert-checkpoint [^`]+)`", message).group(1)


def convert_as_advised(command: str, marker: Path) -> str:
    """Run the command the error suggests; it keeps the tensors and runs nothing."""
    proc = subprocess.run(shlex.split(command.replace("python", shlex.quote(sys.executable), 1)), text=True,
                          capture_output=True, env=command_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists(), "the conversion ran the pickle"
    assert "left out: 'payload', global posix.system" in proc.stdout, proc.stdout
    return proc.stdout


def test_uvit_pth_with_code_is_refused_and_its_tensors_can_be_kept_safely(tmp_path):
    torch.manual_seed(0)
    net = UViT(**TINY_UVIT)
    evil, marker = tmp_path / "uvit.pth", tmp_path / "marker"
    torch.save({**net.state_dict(), "payload": RunsCode(marker)}, evil)
    settings = json.dumps({"family": "uvit", **TINY_UVIT})  # as rule dense_pretrained_uvit passes it
    proc = igsm("pretrained", "--model-id", evil, "--settings", settings, "--out", tmp_path / "model")
    command = assert_refused_with_safe_advice(proc, evil, marker, tmp_path / "model")
    convert_as_advised(command, marker)
    converted = tmp_path / "uvit.safetensors"
    assert f"set dense.pretrained to {converted}" in proc.stderr
    proc = igsm("pretrained", "--model-id", converted, "--settings", settings, "--out", tmp_path / "model")
    assert proc.returncode == 0, proc.stderr
    loaded = load_model(tmp_path / "model")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())
    # A U-ViT model folder's weights are such a checkpoint (case 1's advice for a U-ViT folder).
    proc = igsm("pretrained", "--model-id", tmp_path / "model" / "model.safetensors", "--settings", settings,
                "--out", tmp_path / "again")
    assert proc.returncode == 0, proc.stderr
    assert all(torch.equal(load_model(tmp_path / "again").state_dict()[k], v) for k, v in net.state_dict().items())


def test_diffusers_bin_with_code_is_refused_and_its_tensors_can_be_kept_safely(tmp_path):
    torch.manual_seed(0)
    net = build_unet(TINY_ARCHITECTURE)
    folder, marker = tmp_path / "ddpm", tmp_path / "marker"
    net.save_pretrained(folder, safe_serialization=False)
    weights = folder / "diffusion_pytorch_model.bin"
    torch.save({**net.state_dict(), "payload": RunsCode(marker)}, weights)
    proc = igsm("pretrained", "--model-id", folder, "--out", tmp_path / "model")
    command = assert_refused_with_safe_advice(proc, weights, marker, tmp_path / "model")
    convert_as_advised(command, marker)
    proc = igsm("pretrained", "--model-id", folder, "--out", tmp_path / "model")  # the same folder
    assert proc.returncode == 0, proc.stderr
    loaded = load_model(tmp_path / "model")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())


def test_hub_bin_with_code_is_refused_with_the_local_copy_way(tmp_path):
    """The hub's .bin (here from the cache, offline): the same refusal; the conversion goes through
    a local copy (hf download --local-dir), not the cache."""
    net = build_unet(TINY_ARCHITECTURE)
    snapshot = cache_hub_model(tmp_path / "hub", "someone/ddpm-evil", net)
    marker = tmp_path / "marker"
    (snapshot / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({**net.state_dict(), "payload": RunsCode(marker)}, snapshot / "diffusion_pytorch_model.bin")
    proc = igsm("pretrained", "--model-id", "someone/ddpm-evil", "--out", tmp_path / "model",
                env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    command = assert_refused_with_safe_advice(proc, snapshot / "diffusion_pytorch_model.bin", marker,
                                              tmp_path / "model")
    assert "`hf download someone/ddpm-evil --local-dir DIR`, then" in proc.stderr
    assert command == ("python -m igsm convert-checkpoint DIR/diffusion_pytorch_model.bin "
                       "DIR/diffusion_pytorch_model.safetensors")
    assert "set dense.pretrained to DIR" in proc.stderr


def test_convert_checkpoint_refuses_what_holds_no_tensors(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"payload": RunsCode(marker)}, tmp_path / "only-code.pth")
    (tmp_path / "page.pth").write_text("<html>Google Drive can't scan this file for viruses</html>")
    for source, why in (("only-code.pth", "holds no tensors"), ("page.pth", "not a readable torch checkpoint")):
        proc = igsm("convert-checkpoint", tmp_path / source, tmp_path / "out.safetensors")
        assert proc.returncode == 1 and why in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_convert_checkpoint_keeps_every_tensor_kind_of_either_torch_format(tmp_path, zip_format):
    """Parameters and bf16 tensors too, from torch's zip format and the legacy one (old .bin/.pth
    files): the allow-list must cover what a plain state dict asks for, and nothing else runs."""
    from safetensors.torch import load_file

    from igsm.pickles import convert_checkpoint

    marker = tmp_path / "marker"
    state = {"w": torch.randn(3, 4), "p": torch.nn.Parameter(torch.ones(2)), "h": torch.ones(2, dtype=torch.bfloat16)}
    torch.save({**state, "payload": RunsCode(marker)}, tmp_path / "in.pth", _use_new_zipfile_serialization=zip_format)
    assert convert_checkpoint(tmp_path / "in.pth", tmp_path / "out.safetensors") == ["'payload'", "global posix.system"]
    out = load_file(tmp_path / "out.safetensors")
    assert set(out) == set(state) and all(out[k].dtype == v.dtype and torch.equal(out[k], v.detach())
                                          for k, v in state.items())
    assert not marker.exists()
