"""U-ViT (igsm.uvit) against the reference implementation's facts: parameter counts of the paper's
two configs, its parameter names, its token layout and forward computation (written out here
independently, in float64, from baofff/U-ViT's libs/uvit.py)."""

import math

import pytest
import torch

from igsm.uvit import CELEBA64_UVIT, CIFAR10_UVIT, UViT, patchify, timestep_embedding, unpatchify

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def count(net):
    return sum(p.numel() for p in net.parameters())


def test_parameter_counts_of_the_reference_configs():
    assert count(UViT(**CIFAR10_UVIT)) == 44_255_328
    assert count(UViT(**CELEBA64_UVIT)) == 44_292_228


def test_reference_parameter_names_load_from_a_plain_state_dict(tmp_path):
    net = UViT(**CIFAR10_UVIT)
    keys = set(net.state_dict())
    # Names as in the released checkpoints (cifar10_uvit_small.pth), a sample of each kind.
    for key in ["pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "in_blocks.0.norm1.weight",
                "in_blocks.0.attn.qkv.weight", "in_blocks.5.attn.proj.bias", "in_blocks.2.mlp.fc1.weight",
                "mid_block.mlp.fc2.bias", "out_blocks.0.skip_linear.weight", "out_blocks.5.norm2.bias",
                "norm.weight", "decoder_pred.weight", "decoder_pred.bias", "final_layer.weight"]:
        assert key in keys, key
    assert not any("qkv.bias" in k or "time_embed" in k or k.startswith("in_blocks.0.skip") for k in keys)
    assert net.pos_embed.shape == (1, 1 + 16 * 16, 512) and net.decoder_pred.out_features == 12
    path = tmp_path / "cifar10_uvit_small.pth"
    torch.save({k: v.clone().normal_() for k, v in net.state_dict().items()}, path)
    other = UViT(**CIFAR10_UVIT)
    other.load_state_dict(torch.load(path, weights_only=True))  # strict: every name matches
    assert torch.equal(other.pos_embed, torch.load(path, weights_only=True)["pos_embed"])


def test_patchify_layout_and_round_trip():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float64).reshape(2, 3, 4, 4)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 4, 12)
    # Token 1 is the patch at row 0, column 1; its entries run over (p1, p2, C), channel fastest.
    expected = [x[0, c, i, 2 + j] for i in range(2) for j in range(2) for c in range(3)]
    assert tokens[0, 1].tolist() == [float(v) for v in expected]
    assert torch.equal(unpatchify(tokens, 3), x)


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 3.5, 999.0])
    emb = timestep_embedding(t, 6)
    freqs = [math.exp(-math.log(10000) * i / 3) for i in range(3)]
    expected = [[math.cos(v * f) for f in freqs] + [math.sin(v * f) for f in freqs] for v in t.tolist()]
    torch.testing.assert_close(emb, torch.tensor(expected, dtype=torch.float32))


def reference_forward(net, x, t):
    """U-ViT's forward written out: explicit patches, attention by its formula (B L (K H D) split)."""
    cfg = net.config
    p, d, heads = cfg["patch_size"], cfg["embed_dim"], cfg["num_heads"]
    b, c, h, w = x.shape
    patches = torch.stack([torch.stack([x[n, :, i:i + p, j:j + p].permute(1, 2, 0).reshape(-1)
                                        for i in range(0, h, p) for j in range(0, w, p)]) for n in range(b)])
    weight = net.patch_embed.proj.weight.permute(0, 2, 3, 1).reshape(d, -1)  # (D, p·p·C) in patch order
    tokens = patches @ weight.T + net.patch_embed.proj.bias
    half = d // 2
    # In float32, as U-ViT computes its time embedding whatever the network's dtype.
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs
    time = torch.cat([torch.cos(args), torch.sin(args)], dim=1).double()
    z = torch.cat([time[:, None], tokens], dim=1) + net.pos_embed

    def block(m, z, skip=None):
        if skip is not None:
            z = torch.cat([z, skip], -1) @ m.skip_linear.weight.T + m.skip_linear.bias
        y = torch.nn.functional.layer_norm(z, (d,), m.norm1.weight, m.norm1.bias)
        q, k, v = (y @ m.attn.qkv.weight.T).reshape(b, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v
        z = z + a.transpose(1, 2).reshape(b, -1, d) @ m.attn.proj.weight.T + m.attn.proj.bias
        y = torch.nn.functional.layer_norm(z, (d,), m.norm2.weight, m.norm2.bias)
        y = torch.nn.functional.gelu(y @ m.mlp.fc1.weight.T + m.mlp.fc1.bias)
        return z + y @ m.mlp.fc2.weight.T + m.mlp.fc2.bias

    skips = []
    for m in net.in_blocks:
        z = block(m, z)
        skips.append(z)
    z = block(net.mid_block, z)
    for m in net.out_blocks:
        z = block(m, z, skips.pop())
    z = torch.nn.functional.layer_norm(z, (d,), net.norm.weight, net.norm.bias)
    out = (z @ net.decoder_pred.weight.T + net.decoder_pred.bias)[:, 1:]
    side = h // p
    image = out.reshape(b, side, side, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
    return net.final_layer(image)


def test_forward_equals_the_reference_computation():
    torch.manual_seed(0)
    net = UViT(img_size=8, patch_size=2, in_chans=3, embed_dim=16, depth=4, num_heads=2).double()
    with torch.no_grad():
        for param in net.parameters():  # nonzero biases everywhere, so every term shows
            param.add_(0.05 * torch.randn_like(param))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([3.0, 871.5], dtype=torch.float64)
    torch.testing.assert_close(net(x, t), reference_forward(net, x, t), rtol=1e-10, atol=1e-12)


def test_checkpoint_round_trip_and_counts(tmp_path):
    """A U-ViT saves and reloads through the family registry (architecture.json + safetensors),
    and the efficiency stage counts it."""
    import json
    import subprocess
    import sys

    from conftest import REPO
    from igsm.models import image_shape, load_model, save_model

    torch.manual_seed(0)
    net = UViT(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2)
    save_model(net, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert type(back) is UViT and image_shape(back) == (1, 8, 8)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 10, 999])
    with torch.no_grad():
        assert torch.equal(back(x, t), net(x, t))
    out = tmp_path / "e.json"
    proc = subprocess.run([sys.executable, "-m", "igsm", "efficiency", "--model", str(tmp_path / "m"),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["params"] == count(net)


def expected_pruned_params(cfg, ratio):
    """Parameters of the pruned U-ViT by hand from its layers (igsm.pruning's U-ViT scope): every
    head keeps ⌊head_dim·(1 − ratio)⌋ dims, the MLP ⌊4D·(1 − ratio)⌋ hidden units, the last
    out-block's residual stream ⌊D·(1 − ratio)⌋ features (with the final norm and the decoder's
    input); the other streams keep D."""
    d, depth, heads = cfg["embed_dim"], cfg["depth"], cfg["num_heads"]
    hidden_dense = int(d * cfg["mlp_ratio"])
    out = cfg["patch_size"] ** 2 * cfg["in_chans"]

    def block(stream, inner, hidden, skip):  # norm1, qkv (no bias), proj, norm2, fc1, fc2, skip_linear
        return (2 * stream + stream * 3 * inner + inner * stream + stream + 2 * stream
                + stream * hidden + hidden + hidden * stream + stream + ((2 * d) * stream + stream if skip else 0))

    net = UViT(**cfg)
    assert count(net.out_blocks[0]) == block(d, d, hidden_dense, True)  # the formula, on a dense block
    inner, hidden, stream = heads * int(d // heads * (1 - ratio)), int(hidden_dense * (1 - ratio)), int(d * (1 - ratio))
    removed = (depth // 2 + 1) * (block(d, d, hidden_dense, False) - block(d, inner, hidden, False))
    removed += (depth // 2 - 1) * (block(d, d, hidden_dense, True) - block(d, inner, hidden, True))
    removed += block(d, d, hidden_dense, True) - block(stream, inner, hidden, True)  # the last out-block
    removed += 2 * (d - stream) + out * (d - stream)  # final norm, decoder_pred's input
    return count(net) - removed


def test_pruning_keeps_the_residual_stream_and_reloads(tmp_path):
    """Diff-Pruning on a small U-ViT: only head widths and MLP hidden units go (the count equals
    the by-hand count), every block keeps its heads, the pruned checkpoint reloads and runs."""
    from igsm.diffusion import NoiseSchedule
    from igsm.models import load_model, save_model
    from igsm.pruning import prune

    cfg = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=4, num_heads=4, mlp_ratio=4.0)
    torch.manual_seed(0)
    net = UViT(**cfg)
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    pruned, report = prune(net, criterion="diff-pruning", channel_ratio=0.5, images=images,
                           schedule=NoiseSchedule.linear(num_steps=20), thr=0.05)
    assert report["pruned_params"] == count(pruned) == expected_pruned_params(cfg, 0.5)
    for block in [*pruned.in_blocks, pruned.mid_block, *pruned.out_blocks]:
        assert block.attn.num_heads == 4 and block.attn.head_dim == 4
        stream = 16 if block is pruned.out_blocks[-1] else 32  # only the last out-block's is pruned
        assert block.attn.qkv.in_features == block.attn.proj.out_features == stream
        assert block.mlp.fc1.out_features == 64 and block.attn.scale == 8 ** -0.5  # dense temperature
    assert pruned.pos_embed.shape == net.pos_embed.shape
    save_model(pruned, tmp_path / "p")
    back = load_model(tmp_path / "p")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 500])
    with torch.no_grad():
        assert torch.equal(back(x, t), pruned(x, t))


def test_paper_config_pruned_counts():
    """CIFAR-10 U-ViT at Table 5's four ratios (counting only, magnitude: the widths do not depend
    on the criterion): within 2% of the paper's params and MACs, and the params equal to the
    by-hand count of the layers."""
    from igsm.diffusion import NoiseSchedule
    from igsm.pruning import prune

    net = UViT(**CIFAR10_UVIT)
    images = torch.zeros(1, 3, 32, 32)
    table5 = {0.5: (22.7e6, 5.8e9), 0.6: (18.5e6, 4.7e9), 0.7: (14.5e6, 3.7e9), 0.8: (10.4e6, 2.6e9)}
    for ratio, (params, macs) in table5.items():
        _, report = prune(net, criterion="magnitude", channel_ratio=ratio, images=images,
                          schedule=NoiseSchedule.linear())
        assert report["pruned_params"] == expected_pruned_params(CIFAR10_UVIT, ratio)
        assert abs(report["pruned_params"] / params - 1) < 0.02, (ratio, report["pruned_params"])
        assert abs(report["pruned_macs"] / macs - 1) < 0.02, (ratio, report["pruned_macs"])
    assert abs(report["dense_macs"] / 1e9 - 11.3) < 0.05  # the paper's 11.3G for the dense U-ViT


def test_reference_checkpoint_loads_from_a_file_or_url_and_bad_files_are_named(tmp_path):
    """dense.pretrained for U-ViT: U-ViT's released .pth (a plain state dict) from a path or a
    file:// URL into the cache; Google Drive's HTML page instead of the file is an error naming the
    key, and the bad download is deleted so that a rerun fetches it again."""
    from igsm.uvit import load_reference_checkpoint

    cfg = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=4, num_heads=4, mlp_ratio=4.0)
    torch.manual_seed(0)
    net = UViT(**cfg)
    torch.save(net.state_dict(), tmp_path / "small.pth")
    for source in (str(tmp_path / "small.pth"), (tmp_path / "small.pth").as_uri()):
        loaded = load_reference_checkpoint(source, cfg, tmp_path / "cache")
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())
    assert (tmp_path / "cache" / "small.pth").is_file()
    (tmp_path / "drive.pth").write_text("<html>Google Drive can't scan this file for viruses</html>")
    with pytest.raises(ValueError, match="^dense.pretrained: .* not a torch state dict .* and was deleted"):
        load_reference_checkpoint((tmp_path / "drive.pth").as_uri(), cfg, tmp_path / "cache2")
    assert not (tmp_path / "cache2" / "drive.pth").exists()
    with pytest.raises(ValueError, match="does not fit the experiment's U-ViT architecture"):
        load_reference_checkpoint(str(tmp_path / "small.pth"), {**cfg, "embed_dim": 64}, tmp_path / "c3")
    with pytest.raises(ValueError, match="is not a file"):
        load_reference_checkpoint(str(tmp_path / "absent.pth"), cfg, tmp_path / "c4")
