"""The DiT family (igsm/families/dit.py; issue 31): diffusers' DiTTransformer2DModel behind the family
registry — its size against the DiT paper, its own label dropout off, ε only from a learned-variance
head, pruning of heads and MLP widths with the stream kept, checkpoints and pretrained folders."""

from __future__ import annotations

import json

import pytest
import torch

from igsm.families import family_named, family_of
from igsm.models import load_model, load_pretrained, predict_noise, save_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

TINY = dict(family="dit", sample_size=8, in_channels=2, patch_size=2, num_attention_heads=2, attention_head_dim=8,
            num_layers=2, num_embeds_ada_norm=3, norm_num_groups=1)
DIT = family_named("dit")


def tiny(**changes):
    torch.manual_seed(0)
    net = DIT.build({**TINY, **changes})
    with torch.no_grad():  # adaLN-Zero starts at the identity: give every block a say
        for name, param in net.named_parameters():
            if "norm1.linear" in name or "proj_out" in name:
                param.normal_(0, 0.3)
    return net.eval()


def batch():
    return torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 500, 999]), \
        torch.tensor([0, 2, 3])


def test_dit_xl_2_has_the_papers_675m_parameters():
    """DiT-XL/2 (diffusers' defaults with the released model's learned variance) is the DiT paper's
    675M parameters (Table 4) once its timestep/label embedder is counted once: diffusers keeps an
    identical copy in each of the 28 blocks, so the network holds 750M (what the tables count)."""
    with torch.device("meta"):
        net = DIT.network_class()(out_channels=8)
    held = sum(p.numel() for p in net.parameters())
    embedder = sum(p.numel() for p in net.transformer_blocks[0].norm1.emb.parameters())
    assert round(held / 1e6) == 750 and round((held - 27 * embedder) / 1e6) == 675
    assert family_of(net) is DIT and DIT.class_name == type(net).__name__ == "DiTTransformer2DModel"


def test_labels_are_never_dropped_inside_the_network():
    """diffusers' DiT drops labels itself in training mode (each block, global RNG); igsm.conditioning
    does it, for student and teacher alike: a training-mode forward equals the eval one."""
    net = tiny()
    x, t, labels = batch()
    with torch.no_grad():
        expected = predict_noise(net, x, t, class_labels=labels)
        net.train()
        assert all(torch.equal(predict_noise(net, x, t, class_labels=labels), expected) for _ in range(5))


def test_learned_variance_channels_are_not_returned():
    net = tiny(out_channels=4)
    x, t, labels = batch()
    assert predict_noise(net, x, t, class_labels=labels).shape == x.shape


def test_pruning_frees_heads_and_mlp_widths_and_keeps_the_stream(tmp_path):
    from igsm.diffusion import NoiseSchedule
    from igsm.pruning.diff_pruning import prune

    net = tiny()
    x, t, labels = batch()
    pruned, report = prune(net, criterion="diff-pruning", channel_ratio=0.5, images=x,
                           schedule=NoiseSchedule.linear(20), condition=labels)
    for block in pruned.transformer_blocks:
        assert block.attn1.to_q.out_features == block.attn1.to_v.out_features == 8  # 2 heads of 4 (of 8)
        assert block.ff.net[0].proj.out_features == 32 and block.ff.net[2].out_features == 16  # stream kept
        assert block.norm1.linear.out_features == 6 * 16
    assert report["pruned_params"] < report["dense_params"] and report["pruned_macs"] < report["dense_macs"]
    save_model(pruned, tmp_path / "m")
    back = load_model(tmp_path / "m")  # meta skeleton: the position table is recomputed by the family
    with torch.no_grad():
        torch.testing.assert_close(predict_noise(back, x, t, class_labels=labels),
                                   predict_noise(pruned, x, t, class_labels=labels))


def test_a_buffer_no_one_restores_is_an_error_naming_it(tmp_path, monkeypatch):
    """A family that forgets a non-persistent buffer would leave it on the meta device, failing at
    the first call far from the cause; load_model names it instead."""
    save_model(tiny(), tmp_path / "m")
    monkeypatch.setattr(type(DIT), "restore_computed_buffers", lambda self, net, device: None)
    with pytest.raises(ValueError, match=r"computes \['pos_embed\.pos_embed'\] at construction"):
        load_model(tmp_path / "m")


def test_pretrained_from_a_pipeline_folder_and_errors(tmp_path):
    """dense.pretrained: a diffusers folder or a pipeline's with the network in transformer/ (as
    facebook/DiT-XL-2-256 is laid out); a folder without one is an error naming it."""
    net = tiny()
    net.save_pretrained(tmp_path / "pipeline" / "transformer")
    loaded = load_pretrained(str(tmp_path / "pipeline"), {"family": "dit"})
    x, t, labels = batch()
    with torch.no_grad():
        torch.testing.assert_close(predict_noise(loaded, x, t, class_labels=labels),
                                   predict_noise(net, x, t, class_labels=labels))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty holds no diffusers DiT"):
        load_pretrained(str(tmp_path / "empty"), {"family": "dit"})
    assert json.loads((tmp_path / "pipeline/transformer/config.json").read_text())["_class_name"] == \
        "DiTTransformer2DModel"


def test_conditioning_must_match_the_label_table():
    from igsm.conditioning import ClassLabels

    assert DIT.conditioning_errors("experiments.x", TINY, ClassLabels(3)) == []
    assert "num_embeds_ada_norm: 3 classes, but conditioning.num_classes is 10" in \
        DIT.conditioning_errors("experiments.x", TINY, ClassLabels(10))[0]
    assert "DiT is class-conditional" in DIT.conditioning_errors("experiments.x", TINY, None)[0]


def test_a_hub_id_offline_fails_at_once_naming_it_and_what_to_do(tmp_path, monkeypatch):
    """Not in the hub cache and no network: an error naming the id and `hf download`, without the
    hub client's minute of retries."""
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"could not load the diffusers DiT from facebook/DiT-XL-2-256 .*HF_HUB_OFFLINE is set.*"
                                         r"hf download facebook/DiT-XL-2-256 --local-dir DIR"):
        load_pretrained("facebook/DiT-XL-2-256", {"family": "dit"}, cache_dir=tmp_path)
    assert time.perf_counter() - started < 20
