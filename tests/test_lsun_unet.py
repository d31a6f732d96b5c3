"""LSUN church / bedroom 256 (paper Table 1): the DDPM teachers' architecture and its Diff-Pruning
counts, the config's experiments, and loading the teachers' pickled .bin weights safely."""

import os
import shlex
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, TINY_RGB_UNET as TINY_UNET
from igsm import pruning
from igsm.pruning import structural
from igsm.diffusion import NoiseSchedule
from igsm.models import build_unet, load_pretrained

# google/ddpm-church-256's config.json (google/ddpm-bedroom-256's is the same), as UNet2DModel
# keyword arguments: attention at 16×16 only (Table 6 "Attn Res [16,]"), no dropout for LSUN.
LSUN_UNET = dict(
    sample_size=256, in_channels=3, out_channels=3, block_out_channels=(128, 128, 256, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    attention_head_dim=None, dropout=0.0,
)
# Table 1 (LSUN-Church and LSUN-Bedroom rows alike): dense and Diff-Pruning / IGSM, (params, MACs).
PAPER_DENSE = (113.7e6, 248.7e9)
PAPER_PRUNED = (63.2e6, 138.8e9)
LSUN_CHANNEL_RATIO = 0.3          # the paper's "pruning ratio 0.3" for LSUN (App. C, Figs. 3-4)
REL = 5e-3                        # as tests/test_pruning.py's count test


# ---- Table 1's counts ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lsun_unet():
    torch.manual_seed(0)
    return build_unet(LSUN_UNET).eval()


def test_dense_counts_match_table_1(lsun_unet):
    params, macs = structural.count_params_macs(lsun_unet, image_size=256, in_channels=3)
    assert params == sum(p.numel() for p in lsun_unet.parameters()) == 113_673_219
    assert params == pytest.approx(PAPER_DENSE[0], rel=REL)
    assert macs == pytest.approx(248.688e9, rel=1e-4)
    assert macs == pytest.approx(PAPER_DENSE[1], rel=REL)


def test_diff_pruning_at_ratio_0_3_matches_table_1(lsun_unet):
    """Local pruning gives every criterion the same widths, so magnitude (no gradients) counts for
    Diff-Pruning; one zero image of the full 256 px fixes the shapes (about 30 s on a CPU)."""
    start = time.perf_counter()
    net, report = pruning.prune(lsun_unet, criterion="magnitude", channel_ratio=LSUN_CHANNEL_RATIO,
                                images=torch.zeros(1, 3, 256, 256), schedule=NoiseSchedule.linear())
    assert report["pruned_params"] == sum(p.numel() for p in net.parameters()) == 63_205_897
    assert report["pruned_macs"] == pytest.approx(138.871e9, rel=1e-4)
    assert report["pruned_params"] == pytest.approx(PAPER_PRUNED[0], rel=REL)
    assert report["pruned_macs"] == pytest.approx(PAPER_PRUNED[1], rel=REL)
    assert sum(p.numel() for p in lsun_unet.parameters()) == 113_673_219, "dense model was modified"
    print(f"prune + counts at 256 px: {time.perf_counter() - start:.1f} s")


# ---- the config's experiments -------------------------------------------------------------------

@pytest.mark.parametrize("name, teacher, category", [
    ("church_unet", "google/ddpm-church-256", "church_outdoor"),
    ("bedroom_unet", "google/ddpm-bedroom-256", "bedroom"),
])
def test_config_lsun_experiments_are_the_papers(name, teacher, category):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    exp = config["experiments"][name]
    assert exp["dense"]["pretrained"] == teacher
    architecture = {k: tuple(v) if isinstance(v, list) else v for k, v in exp["architecture"].items()}
    assert architecture.pop("family") == "unet" and architecture == LSUN_UNET
    data = config["datasets"][exp["dataset"]]
    assert data["source"] == "lsun" and data["category"] == category
    assert data["split"] == "train" and data["image_size"] == 256
    assert [run["channel_ratio"] for run in exp["finetune"]["runs"]] == [LSUN_CHANNEL_RATIO]
    assert "np" in exp["finetune"]["runs"][0]["objectives"]               # Diff-Pruning's finetune
    training = exp["finetune"]["training"]                                 # App. B Table 6, LSUN
    assert (training["num_steps"], training["batch_size"], training["lr"]) == (500_000, 64, 2e-5)
    assert training["ema_decay"] == 0.999 and training["grad_clip"] == 1.0
    sample = exp["sample"]
    assert (sample["sampler"], sample["num_images"], sample["num_steps"], sample["eta"]) == ("ddim", 50_000, 100, 0.0)
    gpus = exp["resources"]["finetune"]["gpu"]
    assert training["batch_size"] % gpus == 0


# ---- pickled .bin weights -----------------------------------------------------------------------

class _RunsCode:
    """Pickles as a call of os.system: what a malicious .bin does when unpickled unrestricted."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _bin_only_folder(folder: Path, net) -> Path:
    net.save_pretrained(folder, safe_serialization=False)
    assert (folder / "diffusion_pytorch_model.bin").is_file()
    assert not list(folder.glob("*.safetensors")), "only the .bin must be there"
    return folder


def _assert_same_weights(loaded, net):
    expected = net.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_bin_only_folder_loads_with_equal_weights(tmp_path):
    torch.manual_seed(0)
    net = build_unet(TINY_UNET).eval()
    folder = _bin_only_folder(tmp_path / "unet", net)
    loaded = load_pretrained(str(folder))
    _assert_same_weights(loaded, net)
    assert not loaded.training
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, net(x, t).sample)


def test_bin_with_old_attention_names_loads(tmp_path):
    """Old diffusers checkpoints (the DDPM ports among them) call the attention projections
    query / key / value / proj_attn; they are renamed to to_q / to_k / to_v / to_out.0."""
    torch.manual_seed(1)
    net = build_unet(TINY_UNET).eval()
    folder = _bin_only_folder(tmp_path / "unet", net)
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in net.state_dict().items():
        for new, old in new_to_old.items():
            if ".attentions." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
        state[key] = value
    assert any(".proj_attn." in k for k in state)
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    _assert_same_weights(load_pretrained(str(folder)), net)


def test_bin_whose_pickle_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = build_unet(TINY_UNET).eval()
    folder = _bin_only_folder(tmp_path / "unet", net)
    weights = folder / "diffusion_pytorch_model.bin"
    marker = tmp_path / "marker"
    torch.save({**net.state_dict(), "payload": _RunsCode(marker)}, weights)
    with pytest.raises(ValueError) as err:
        load_pretrained(str(folder))
    message = str(err.value)
    # diffusers unpickles with torch.load(weights_only=True): torch refuses the global it asks for,
    # and the message says so without torch's advice to turn that off (tests/test_pretrained_checks.py).
    assert f"{weights} contains pickled code or objects, not plain tensors" in message
    assert "system" in message and "weights_only" not in message  # what it asked for
    assert not marker.exists(), "the pickle was executed"
    # The payload is real: unpickled without restriction, it runs.
    live = tmp_path / "live-marker"
    torch.save({"payload": _RunsCode(live)}, tmp_path / "live.bin")
    torch.load(tmp_path / "live.bin", weights_only=False)
    assert live.exists()


def test_truncated_bin_is_named(tmp_path):
    folder = _bin_only_folder(tmp_path / "unet", build_unet(TINY_UNET))
    weights = folder / "diffusion_pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"could not load a diffusers U-Net .*{weights}"):
        load_pretrained(str(folder))


def test_bin_of_another_model_is_named(tmp_path):
    folder = _bin_only_folder(tmp_path / "unet", build_unet(TINY_UNET))
    torch.save(build_unet({**TINY_UNET, "layers_per_block": 2}).state_dict(), folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="could not load a diffusers U-Net"):
        load_pretrained(str(folder))


# ---- hub ids, offline ---------------------------------------------------------------------------

@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache and HF_HUB_OFFLINE: nothing may wait on the network."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("model_id", ["google/ddpm-church-256", "google/ddpm-bedroom-256", "google/ddpm-cifar10-32"])
def test_offline_hub_id_names_the_id_and_the_local_folder_way(offline_hub, model_id):
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        load_pretrained(model_id)
    assert time.perf_counter() - start < 10, "waited on the network"
    message = str(err.value)
    assert repr(model_id) in message and "HF_HUB_OFFLINE" in message
    assert f"hf download {model_id} --local-dir DIR" in message and "'dense.pretrained'" in message


def _cache_snapshot(cache: Path, model_id: str, net) -> Path:
    """A hub cache entry as huggingface_hub lays it out, holding config.json and the .bin only."""
    repo = cache / f"models--{model_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return _bin_only_folder(repo / "snapshots" / commit, net)


def test_cached_hub_model_with_bin_weights_loads_offline(offline_hub):
    torch.manual_seed(2)
    net = build_unet(TINY_UNET).eval()
    _cache_snapshot(offline_hub, "google/ddpm-church-256", net)
    _assert_same_weights(load_pretrained("google/ddpm-church-256"), net)


def test_cached_hub_bin_that_runs_code_is_refused(offline_hub, tmp_path):
    net = build_unet(TINY_UNET).eval()
    snapshot = _cache_snapshot(offline_hub, "google/ddpm-bedroom-256", net)
    marker = tmp_path / "marker"
    torch.save({**net.state_dict(), "payload": _RunsCode(marker)}, snapshot / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError) as err:
        load_pretrained("google/ddpm-bedroom-256")
    message = str(err.value)
    assert f"{snapshot / 'diffusion_pytorch_model.bin'} contains pickled code" in message and "system" in message
    assert "hf download google/ddpm-bedroom-256 --local-dir DIR" in message
    assert not marker.exists()
