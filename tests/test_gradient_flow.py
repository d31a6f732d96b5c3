"""Soft channel masks for gradient-flow pruning (igsm/pruning/soft_masks.py, issue 16): at 0/1 they
compute exactly the hard-pruned network; GroupNorm statistics follow the masks; the final hard
prune keeps the channels with the largest masks, at Diff-Pruning's widths."""

import copy

import pytest
import torch

from conftest import TINY_ARCHITECTURE
from igsm import pruning
from igsm.pruning import soft_masks, structural
from igsm.models import build_unet, count_parameters


@pytest.fixture
def tiny_unet():
    torch.manual_seed(0)
    return with_norms_off_init(build_unet(TINY_ARCHITECTURE).eval())


def with_norms_off_init(net):
    """Norm layers' affine parameters off their 1/0 init: biases must not revive channels."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.5)
    return net


def inputs(seed=1):
    generator = torch.Generator().manual_seed(seed)
    size, channels = TINY_ARCHITECTURE["sample_size"], TINY_ARCHITECTURE["in_channels"]
    return torch.randn(3, channels, size, size, generator=generator), torch.tensor([5, 300, 999])


def test_group_norm_with_0_1_weights_is_the_group_norm_of_the_kept_channels():
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    keep = torch.tensor([1, 0, 1, 1] * 4, dtype=torch.bool)  # one channel of each group dropped
    pruned = torch.nn.GroupNorm(4, 12).double()
    with torch.no_grad():
        pruned.weight.copy_(norm.weight[keep]), pruned.bias.copy_(norm.bias[keep])
    got = soft_masks.masked_group_norm(x, norm.double(), keep.double())
    torch.testing.assert_close(got[:, keep], pruned(x[:, keep]), rtol=0, atol=1e-12)
    # All ones: PyTorch's GroupNorm; a whole group at 0: finite (its channels are read by nobody).
    torch.testing.assert_close(soft_masks.masked_group_norm(x, norm, torch.ones(16, dtype=torch.float64)),
                               norm(x), rtol=0, atol=1e-12)
    assert torch.isfinite(soft_masks.masked_group_norm(x, norm, torch.tensor([0.0] * 4 + [1.0] * 12))).all()


def randomly_hard_pruned(net):
    """A copy of ``net`` hard-pruned at ratio 0.5 with a random ranking, and the channels each
    group (by the hard prune's root name) lost."""
    hard = copy.deepcopy(net)
    with structural.metapruner(hard, pruning.criterion_importance("random"), 0.5) as pruner:
        removed = {}
        torch.manual_seed(3)
        for group in pruner.step(interactive=True):
            removed[soft_masks.root_name(group)] = list(group[0].idxs)
            group.prune()
    return hard, removed


def test_masks_at_0_1_compute_the_hard_pruned_network(tiny_unet):
    """Hard-prune a copy (random ranking, ratio 0.5), then zero exactly the removed channels' masks
    on the dense network: the two networks agree on every output."""
    hard, removed = randomly_hard_pruned(tiny_unet)
    assert removed and count_parameters(hard) < count_parameters(tiny_unet)

    dense = copy.deepcopy(tiny_unet)
    with structural.metapruner(dense, pruning.criterion_importance("magnitude"), 0.5) as pruner:
        masks = soft_masks.soft_masks(pruner.DG.get_all_groups(
            ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types))
    assert set(removed) <= set(masks.roots)
    for root, mask in zip(masks.roots, masks.masks):
        mask[removed.get(root, [])] = 0.0
    x, t = inputs()
    with torch.no_grad():
        expected = hard(x, t).sample
        with masks.applied(dense):
            got = dense(x, t).sample
        unmasked = dense(x, t).sample  # hooks gone: the dense network again
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(unmasked, expected, atol=1e-3)


def test_mask_gradients_flow_and_ones_change_nothing(tiny_unet):
    with structural.metapruner(tiny_unet, pruning.criterion_importance("magnitude"), 0.5) as pruner:
        masks = soft_masks.soft_masks(pruner.DG.get_all_groups(
            ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types))
    x, t = inputs()
    with torch.no_grad():
        reference = tiny_unet(x, t).sample
    for mask in masks.masks:
        mask.requires_grad_(True)
    with masks.applied(tiny_unet):
        out = tiny_unet(x, t).sample
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    assert all(m.grad is not None and torch.isfinite(m.grad).all() for m in masks.masks)
    assert sum(int((m.grad != 0).sum()) for m in masks.masks) > 0.9 * sum(m.numel() for m in masks.masks)


def test_hard_prune_keeps_the_largest_masks_at_diff_prunings_widths(tiny_unet):
    with structural.metapruner(copy.deepcopy(tiny_unet), pruning.criterion_importance("magnitude"), 0.5) as pruner:
        masks = soft_masks.soft_masks(pruner.DG.get_all_groups(
            ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types))
    generator = torch.Generator().manual_seed(4)
    for mask in masks.masks:
        mask.copy_(torch.rand(mask.shape, generator=generator))
    images = torch.zeros(2, TINY_ARCHITECTURE["in_channels"], 16, 16)
    from igsm.diffusion import NoiseSchedule

    flow_net, flow_report = structural.prune_with_importance(tiny_unet, soft_masks.MaskImportance(masks),
                                                          channel_ratio=0.5, images=images)
    _, dp_report = pruning.prune(tiny_unet, criterion="diff-pruning", channel_ratio=0.5, images=images,
                                 schedule=NoiseSchedule.linear())
    assert (flow_report["pruned_params"], flow_report["pruned_macs"]) == (dp_report["pruned_params"], dp_report["pruned_macs"])
    # The kept channels of a group without GroupNorm coupling are its top half by mask.
    conv = dict(flow_net.named_modules())["time_embedding.linear_1"]
    root = masks.roots.index("time_embedding.linear_1")
    kept = torch.sort(torch.topk(masks.masks[root], conv.out_features).indices).values
    dense_weight = dict(tiny_unet.named_modules())["time_embedding.linear_1"].weight
    torch.testing.assert_close(conv.weight, dense_weight[kept])


# ---- the flow --------------------------------------------------------------------------------

def tiny_masks(net):
    with structural.metapruner(net, pruning.criterion_importance("magnitude"), 0.5) as pruner:
        return soft_masks.soft_masks(pruner.DG.get_all_groups(
            ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types))


def test_energy_gradient_equals_finite_differences(tiny_unet):
    """d(½‖∇_θ L‖²)/dm by double backpropagation against central differences (float64)."""
    masks = tiny_masks(tiny_unet)  # traced in float32, then the same layers in float64
    net = tiny_unet.double()
    generator = torch.Generator().manual_seed(5)
    masks.masks[:] = [0.5 + 0.5 * torch.rand(m.shape, generator=generator, dtype=torch.float64)
                      for m in masks.masks]
    x, t = inputs()
    x, noise = x.double(), torch.randn(x.shape, generator=generator, dtype=torch.float64)

    def loss_fn(model):
        return (model(x + noise, t).sample - noise).square().mean()

    def energy():
        params = [p for p in net.parameters()]
        with masks.applied(net):
            grads = torch.autograd.grad(loss_fn(net), params, allow_unused=True)
        return 0.5 * sum(float(g.square().sum()) for g in grads if g is not None)

    value, mask_grads = soft_masks.gradient_norm_energy(net, masks, loss_fn)
    assert value.item() == pytest.approx(energy(), rel=1e-12)
    h = 1e-5
    for g, i in ((0, 0), (3, 1), (len(masks.masks) - 1, 2)):
        mask = masks.masks[g]
        mask[i] += h
        up = energy()
        mask[i] -= 2 * h
        down = energy()
        mask[i] += h
        assert mask_grads[g][i].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)


def test_sparsity_indexed_step_lowers_the_density_by_dt_at_norm_r(tiny_unet):
    masks = tiny_masks(tiny_unet)
    for mask in masks.masks:
        mask.fill_(0.5)  # away from the [0, 1] bounds: no clipping
    generator = torch.Generator().manual_seed(6)
    ascent = [torch.randn(m.shape, generator=generator) for m in masks.masks]
    before = torch.cat([m.flatten() for m in masks.masks]).double()
    soft_masks.sparsity_indexed_step(masks, ascent, dt=1e-3, r=1.1)
    delta = (torch.cat([m.flatten() for m in masks.masks]).double() - before) / 1e-3
    n = delta.numel()
    assert delta.mean().item() == pytest.approx(-1.0, rel=1e-4)  # G = mean(m) falls by dt per step
    assert (delta.norm() * (1.0 / n ** 0.5)).item() == pytest.approx(1.1, rel=1e-4)  # ‖δ‖·‖b‖ = r
    a = torch.cat([g.flatten() for g in ascent]).double()
    assert (delta @ a).item() > 0  # it also climbs the energy


def test_schedule_brings_the_density_down_monotonically_to_its_target(tiny_unet):
    masks = tiny_masks(tiny_unet)
    generator = torch.Generator().manual_seed(7)
    steps, target = 40, 0.5
    dt = (soft_masks.density(masks) - target) / steps
    densities = [soft_masks.density(masks)]
    for _ in range(steps):
        ascent = [torch.randn(m.shape, generator=generator) for m in masks.masks]
        soft_masks.sparsity_indexed_step(masks, ascent, dt=dt)
        densities.append(soft_masks.density(masks))
    assert all(later < earlier for earlier, later in zip(densities, densities[1:]))
    assert densities[-1] == pytest.approx(target, abs=0.05)
    assert all(float(m.min()) >= 0 and float(m.max()) <= 1 for m in masks.masks)


def flow_options(num_steps):
    from igsm.training import TrainingOptions

    return TrainingOptions.from_dict({"num_steps": num_steps, "batch_size": 8, "lr": 1e-3, "log_every": 1,
                                      "checkpoint_every": 3, "keep_checkpoints": 3,
                                      "objective": {"weights": {"np": 1.0}}})


@pytest.mark.slow
def test_gradient_flow_pruning_trains_the_masks_down_and_resumes_bitwise(tiny_training, tmp_path):
    """Six steps of the one training loop under the flow: the density falls to 1 − ratio, the hard
    prune has Diff-Pruning's widths; a run resumed from its step-3 snapshot ends bitwise equal."""
    from igsm.data import load_images
    from igsm.diffusion import NoiseSchedule
    from igsm.models import load_model

    net, images, schedule = load_model(tiny_training / "student"), load_images(tiny_training / "data"), NoiseSchedule.linear()

    def run(folder):
        return soft_masks.prune_with_gradient_flow(
            net, images, schedule, channel_ratio=0.5, options=flow_options(6),
            checkpoint_dir=folder / "checkpoints", metrics_path=folder / "metrics.jsonl")

    pruned, report = run(tmp_path / "a")
    densities = report["gradient_flow"]["densities"]
    assert len(densities) == 6 and all(b < a for a, b in zip(densities, densities[1:]))
    assert densities[-1] == pytest.approx(0.5, abs=0.05)
    _, dp = pruning.prune(net, criterion="magnitude", channel_ratio=0.5, images=torch.zeros(1, 1, 16, 16),
                          schedule=schedule)
    assert (report["pruned_params"], report["pruned_macs"]) == (dp["pruned_params"], dp["pruned_macs"])
    # The same run cut after its step-3 snapshot, then started again: it resumes mid-schedule.
    (tmp_path / "b").mkdir()
    import shutil
    shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints")
    (tmp_path / "b" / "checkpoints" / "step-0000006.pt").unlink()
    resumed, resumed_report = run(tmp_path / "b")
    assert resumed_report["gradient_flow"]["final_masks"] == report["gradient_flow"]["final_masks"]
    assert resumed_report["gradient_flow"]["densities"] == densities
    spreads = report["gradient_flow"]["mask_spreads"]  # the masks over time survive the resume too
    assert resumed_report["gradient_flow"]["mask_spreads"] == spreads
    assert all(len(steps) == 6 and all(lo <= mean <= hi for lo, mean, hi in steps) for steps in spreads.values())
    assert all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(), resumed.state_dict().values()))
    assert resumed_report["gradient_flow"]["timing"]["attempts"] == 2


@pytest.mark.slow
def test_prune_stage_runs_gradient_flow(tiny_training, tmp_path):
    """`igsm prune --criterion gradient-flow` (the workflow's prune job): flow settings from the
    experiment's prune.gradient_flow, a loadable pruned model, its report with the flow."""
    import json
    import subprocess
    import sys

    from conftest import REPO
    from igsm.models import load_model

    out = tmp_path / "prune" / "model"
    settings = {"gradient_flow": {"num_steps": 4, "batch_size": 8, "checkpoint_every": 2}, "seed": 0}
    proc = subprocess.run([sys.executable, "-m", "igsm", "prune", "--model", str(tiny_training / "student"),
                           "--data", str(tiny_training / "data"), "--criterion", "gradient-flow",
                           "--channel-ratio", "0.5", "--settings", json.dumps(settings), "--out", str(out),
                           "--report", str(tmp_path / "prune" / "report.json"), "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "prune" / "report.json").read_text())
    assert report["criterion"] == "gradient-flow" and len(report["gradient_flow"]["densities"]) == 4
    assert report["gradient_flow"]["densities"][-1] == pytest.approx(0.5, abs=0.05)
    pruned = load_model(out)
    assert count_parameters(pruned) == report["pruned_params"]
    assert sorted(p.name for p in (tmp_path / "prune" / "checkpoints").glob("step-*.pt"))[-1] == "step-0000004.pt"
    # Its report: each group's width before → after is the pruned network's (widths read off the
    # masks' lengths and the pruned layers, not assumed from the ratio), and the picture is drawn.
    widths = report["gradient_flow"]["final_widths"]
    assert widths and all(after == pruned.get_submodule(root).out_channels and after < before
                          for root, (before, after) in widths.items() if "conv" in root)
    picture = tmp_path / "prune" / "masks.png"
    plot = subprocess.run([sys.executable, "-m", "igsm", "draw-prune-report", "--report", str(tmp_path / "prune" / "report.json"),
                           "--criterion", "gradient-flow", "--out", str(picture)], cwd=REPO, capture_output=True, text=True)
    assert plot.returncode == 0 and picture.read_bytes()[:4] == b"\x89PNG", plot.stderr[-2000:]


def test_config_accepts_gradient_flow(tmp_path):
    import yaml

    from conftest import REPO
    from igsm.config import validate

    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config["experiments"]["digits_unet"]["prune"].update(criterion="gradient-flow", gradient_flow={"num_steps": 10})
    validate(config)
    assert config["experiments"]["digits_unet"]["prune"]["gradient_flow"] == {
        "num_steps": 10, "batch_size": 64, "lr": 2.0e-4, "r": 1.1, "checkpoint_every": 50}
    config["experiments"]["digits_unet"]["prune"]["gradient_flow"]["r"] = 1.0
    with pytest.raises(Exception, match="r"):
        validate(config)


# ---- U-ViT ----------------------------------------------------------------------------------

@pytest.fixture
def tiny_uvit():
    from igsm.uvit import UViT

    torch.manual_seed(0)
    return with_norms_off_init(UViT(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=4, num_heads=2).eval())


def uvit_masks(net):
    with structural.metapruner(net, pruning.criterion_importance("magnitude"), 0.5) as pruner:
        return soft_masks.soft_masks(pruner.DG.get_all_groups(
            ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types))


def test_layer_norm_with_0_1_weights_is_the_layer_norm_of_the_kept_channels():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(12).double()
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    keep = torch.tensor([1, 0, 1] * 4, dtype=torch.bool)
    pruned = torch.nn.LayerNorm(8).double()
    with torch.no_grad():
        pruned.weight.copy_(norm.weight[keep]), pruned.bias.copy_(norm.bias[keep])
    torch.testing.assert_close(soft_masks.masked_layer_norm(x, norm, keep.double())[..., keep], pruned(x[..., keep]),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(soft_masks.masked_layer_norm(x, norm, torch.ones(12)), norm(x), rtol=0, atol=1e-12)


def test_u_vit_masks_at_0_1_compute_the_hard_pruned_network(tiny_uvit):
    """U-ViT (attention heads, the fused qkv layer, LayerNorms on the pruned residual stream): zero
    the masks of the channels a random hard prune removes and the dense network computes the
    pruned one. One mask per head dim ties q_i, k_i, v_i and proj's input i, as the hard prune does."""
    hard, removed = randomly_hard_pruned(tiny_uvit)
    dense = copy.deepcopy(tiny_uvit)
    masks = uvit_masks(dense)  # hooks on dense's own layers
    by_name = {**{root: g for g, root in enumerate(masks.roots)}, **masks.aliases}
    assert any("attn.proj" in name for name in removed) and set(removed) <= set(by_name)
    qkv = [g for g, root in enumerate(masks.roots) if root.endswith("attn.qkv")]
    assert qkv and all(masks.masks[g].numel() == 16 for g in qkv)  # d = embed_dim, not 3·d
    for name, idxs in removed.items():
        masks.masks[by_name[name]][idxs] = 0.0
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([5.0, 300.0, 999.0])
    with torch.no_grad():
        expected = hard(x, t)
        with masks.applied(dense):
            got = dense(x, t)
        unmasked = dense(x, t)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(unmasked, expected, atol=1e-3)


def test_u_vit_hard_prune_keeps_the_largest_masks_at_diff_prunings_widths(tiny_uvit):
    from igsm.diffusion import NoiseSchedule

    masks = uvit_masks(copy.deepcopy(tiny_uvit))
    generator = torch.Generator().manual_seed(4)
    for mask in masks.masks:
        mask.copy_(torch.rand(mask.shape, generator=generator))
    images = torch.zeros(2, 1, 8, 8)
    flow_net, flow_report = structural.prune_with_importance(tiny_uvit, soft_masks.MaskImportance(masks),
                                                          channel_ratio=0.5, images=images)
    _, dp_report = pruning.prune(tiny_uvit, criterion="diff-pruning", channel_ratio=0.5, images=images,
                                 schedule=NoiseSchedule.linear())
    assert (flow_report["pruned_params"], flow_report["pruned_macs"]) == (dp_report["pruned_params"], dp_report["pruned_macs"])
    # The MLP's hidden layer keeps its top half by mask; an attention keeps the same head dims in
    # q, k, v and proj: per head, the dims with the largest masks.
    fc1, dense_fc1 = flow_net.mid_block.mlp.fc1, tiny_uvit.mid_block.mlp.fc1
    mask = masks.masks[masks.roots.index("mid_block.mlp.fc1")]
    kept = torch.sort(torch.topk(mask, fc1.out_features).indices).values
    torch.testing.assert_close(fc1.weight, dense_fc1.weight[kept])
    attn, dense_attn = flow_net.mid_block.attn, tiny_uvit.mid_block.attn
    mask = masks.masks[masks.aliases["mid_block.attn.proj"]].view(2, 8)  # 2 heads of 8 dims
    dims = torch.cat([h * 8 + torch.sort(torch.topk(mask[h], attn.head_dim).indices).values for h in range(2)])
    torch.testing.assert_close(attn.proj.weight, dense_attn.proj.weight[:, dims])
    torch.testing.assert_close(attn.qkv.weight, dense_attn.qkv.weight[torch.cat([dims, dims + 16, dims + 32])])


@pytest.mark.slow
def test_gradient_flow_prunes_a_u_vit(tiny_uvit, tmp_path):
    """The flow on a U-ViT: the masks come down to the target and the pruned network has
    Diff-Pruning's counts (the config accepts it for U-ViT experiments too)."""
    import numpy as np

    from igsm.diffusion import NoiseSchedule

    images = np.random.default_rng(0).integers(0, 256, size=(32, 8, 8, 1), dtype=np.uint8)
    pruned, report = soft_masks.prune_with_gradient_flow(
        tiny_uvit, images, NoiseSchedule.linear(), channel_ratio=0.5, options=flow_options(4),
        checkpoint_dir=tmp_path / "checkpoints", metrics_path=tmp_path / "metrics.jsonl")
    densities = report["gradient_flow"]["densities"]
    assert len(densities) == 4 and densities[-1] == pytest.approx(0.5, abs=0.05)
    # Widths in mask units: an attention's 16 head dims (q, k, v tied) → the 8 proj reads.
    assert report["gradient_flow"]["final_widths"]["mid_block.attn.qkv"] == [16, pruned.mid_block.attn.proj.in_features] == [16, 8]
    _, dp = pruning.prune(tiny_uvit, criterion="magnitude", channel_ratio=0.5, images=torch.zeros(1, 1, 8, 8),
                          schedule=NoiseSchedule.linear())
    assert (report["pruned_params"], report["pruned_macs"]) == (dp["pruned_params"], dp["pruned_macs"])
    assert count_parameters(pruned) == report["pruned_params"]
    import yaml

    from conftest import REPO
    from igsm.config import validate

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["experiments"]["cifar10_uvit"]["finetune"]["runs"][0]["criterion"] = "gradient-flow"
    validate(config)  # once refused for U-ViT: accepted now
