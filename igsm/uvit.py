"""U-ViT (Bao et al., CVPR 2023), the Transformer the IGSM paper prunes and finetunes on CIFAR-10
and CelebA 64 (Sec. 5.1, Table 2; NOTES §3), built from timm's attention and MLP blocks.

Every token is a patch of the noisy image plus one time token (sinusoidal embedding, no MLP:
``mlp_time_embed`` off, as both reference configs); ``depth // 2`` in-blocks, a mid-block and
``depth // 2`` out-blocks, each out-block joining a long skip from the matching in-block through
``skip_linear`` (2D → D); then LayerNorm, a linear map back to patch pixels and a 3×3 convolution.

Parameter names are the reference implementation's (baofff/U-ViT ``libs/uvit.py``: ``patch_embed.proj``,
``pos_embed``, ``in_blocks.i.attn.qkv``, ``out_blocks.i.skip_linear``, ``decoder_pred``,
``final_layer``…), so its released checkpoints, plain state dicts, load with
``load_state_dict(torch.load(path, weights_only=True))``. timm's ``Attention`` splits qkv as
(3, heads, head_dim), the reference's layout, and calls PyTorch's scaled-dot-product attention,
whose math kernel the Jacobian terms select (igsm.objectives.math_attention).
"""

from __future__ import annotations

import math

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import nn

# The two configurations of the paper (NOTES §3): 44,255,328 and 44,292,228 parameters.
CIFAR10_UVIT = dict(img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=12, num_heads=8, mlp_ratio=4.0)
CELEBA64_UVIT = dict(img_size=64, patch_size=4, in_chans=3, embed_dim=512, depth=12, num_heads=8, mlp_ratio=4.0)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of (possibly fractional) timesteps, as U-ViT's."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1) if dim % 2 else embedding


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """B×C×H×W → B×(H/p·W/p)×(p·p·C), patches in row-major order, each pixel-major then channel."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, channels: int) -> torch.Tensor:
    """The inverse of :func:`patchify` for square images."""
    b, n, d = tokens.shape
    p, side = math.isqrt(d // channels), math.isqrt(n)
    x = tokens.reshape(b, side, side, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, side * p, side * p)


class PrunableAttention(Attention):
    """timm's attention (its parameters and initialisation), reshaping by its own head count and
    width rather than the input's, so that pruned heads or head dimensions keep working, and with
    its recorded softmax scale, so that pruned heads keep the dense temperature."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    """Pre-norm Transformer block; an out-block first merges the long skip (``skip_linear``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, skip: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PrunableAttention(dim, num_heads=num_heads, qkv_bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class UViT(nn.Module):
    """``forward(sample, timestep, y=None) -> noise prediction`` of the sample's shape; the timesteps
    as the sampler feeds them (DDPM indices, or t·999 for the continuous VP-SDE). The argument names
    are diffusers' UNet2DModel's, so both families take the same calls.

    ``num_classes`` > 0: class-conditional as the reference's ImageNet models (``num_classes`` 1001:
    the classes and the null label of guidance), the label a token of its own (``label_emb``) in
    front of the time token; ``y`` then gives each image's label."""

    def __init__(self, img_size: int = 32, patch_size: int = 2, in_chans: int = 3, embed_dim: int = 512,
                 depth: int = 12, num_heads: int = 8, mlp_ratio: float = 4.0, num_classes: int = 0):
        super().__init__()
        if img_size % patch_size or depth % 2:
            raise ValueError(f"U-ViT: img_size {img_size} must divide by patch_size {patch_size}, "
                             f"and depth {depth} must be even")
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
        if num_classes:  # recorded only when set: unconditional checkpoints keep their config
            self.config["num_classes"] = num_classes
        self.label_emb = nn.Embedding(num_classes, embed_dim) if num_classes else None
        self.extras = 1 + bool(num_classes)  # the tokens in front of the patches: time (and label)
        self.embed_dim, self.in_chans = embed_dim, in_chans
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.time_embed = nn.Identity()  # mlp_time_embed=False in both reference configs
        num_tokens = self.extras + (img_size // patch_size) ** 2  # (label,) time, then the patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.in_blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth // 2)])
        self.mid_block = Block(embed_dim, num_heads, mlp_ratio)
        self.out_blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, skip=True)
                                         for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size ** 2 * in_chans)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1)
        self._init_weights()

    def _init_weights(self):
        # The reference's initialisation: truncated normal (std 0.02) for pos_embed and linear
        # weights, zero biases, unit LayerNorms (convolutions keep PyTorch's default).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if (y is None) != (self.label_emb is None):
            raise ValueError("U-ViT: give labels y exactly when the network is class-conditional (num_classes)")
        x, timesteps = sample, torch.as_tensor(timestep, device=sample.device)
        tokens = self.patch_embed(x)
        timesteps = timesteps.expand(x.shape[0]) if timesteps.ndim == 0 else timesteps
        time_token = self.time_embed(timestep_embedding(timesteps, self.embed_dim).to(tokens.dtype))
        extras = [time_token[:, None]] if y is None else [self.label_emb(y)[:, None], time_token[:, None]]
        h = torch.cat([*extras, tokens], dim=1) + self.pos_embed
        skips = []
        for block in self.in_blocks:
            h = block(h)
            skips.append(h)
        h = self.mid_block(h)
        for block in self.out_blocks:
            h = block(h, skips.pop())
        h = self.decoder_pred(self.norm(h))[:, self.extras:]
        return self.final_layer(unpatchify(h, self.in_chans))


def load_reference_checkpoint(source: str, architecture: dict, cache_dir) -> UViT:
    """A dense U-ViT of ``architecture`` with the weights of a reference checkpoint (baofff/U-ViT's
    released ``*.pth``: a plain state dict, read with ``weights_only=True``, nothing unpickled; or
    its tensors in a ``.safetensors`` file, as ``igsm convert-checkpoint`` writes them).

    ``source``: a local file, or an http(s):// / file:// URL downloaded into ``cache_dir`` (kept:
    a rerun reads it again). Errors are ``ValueError`` naming the file and what to do.
    """
    import hashlib
    from pathlib import Path
    from urllib.parse import unquote, urlsplit

    from igsm.data import DownloadError, download
    from igsm.pickles import convert_command, refused_pickle, unsafe_pickle_error

    parts = urlsplit(source)
    downloaded = parts.scheme in ("http", "https", "file")
    if downloaded:
        name = Path(unquote(parts.path)).name
        # Google Drive's download URL has no file name: the query's id names it.
        if not name.endswith((".pth", ".pt", ".safetensors")):
            name = f"checkpoint-{hashlib.sha256(source.encode()).hexdigest()[:16]}.pth"
        path = Path(cache_dir) / name
        if not path.is_file():
            try:
                download(source, path)
            except DownloadError as err:
                raise ValueError(f"dense.pretrained: {err} Or download the checkpoint elsewhere and set "
                                 f"dense.pretrained to the local .pth file.") from None
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(f"dense.pretrained: {source} is not a file; set it to U-ViT's released "
                             f"checkpoint (e.g. cifar10_uvit_small.pth) or its URL")
    try:
        if path.suffix == ".safetensors":  # e.g. made by `igsm convert-checkpoint`
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated file, an HTML page (Google Drive's warning), a pickle
        refused = refused_pickle(err)
        if refused is not None:  # not a bad download: kept, for the user to judge (nothing ran)
            target = path.with_suffix(".safetensors")
            raise unsafe_pickle_error(path, refused, f"`{convert_command(path, target)}` and set "
                                                     f"dense.pretrained to {target}") from None
        if downloaded:  # so that a rerun downloads it again instead of reading the same bytes
            path.unlink(missing_ok=True)
        raise ValueError(f"dense.pretrained: {path} is not a torch state dict ({type(err).__name__})"
                         f"{' and was deleted' if downloaded else ''}; if it came from Google Drive it may "
                         f"be the page asking to confirm the download: fetch the file in a browser and "
                         f"point dense.pretrained at it") from None
    net = UViT(**architecture)
    try:
        net.load_state_dict(state if isinstance(state, dict) else {}, strict=True)
    except RuntimeError as err:
        raise ValueError(f"dense.pretrained: {path} does not fit the experiment's U-ViT architecture "
                         f"{architecture}: {' '.join(str(err).split())[:400]}") from None
    return net.eval()
