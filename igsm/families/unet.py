"""The U-Net family: diffusers' ``UNet2DModel``, the paper's U-Nets (Sec. 5.1, App. B Table 6),
pruned as Diff-Pruning does (NOTES §2), its blocks for reuse as DeepCache cuts them.

Loading a pretrained U-Net (a diffusers folder, the hub cache or the hub) is this module's too.
Imports torch and diffusers only inside its functions (igsm.families)."""

from __future__ import annotations

import math
import re
from pathlib import Path

from igsm.families import REST, BlockGraph, Family, chain_consumers, register
from igsm.hub import hub_offline, hub_reachable, looks_like_local_path
from igsm.pickles import convert_command, error_chain, errors_behind, refused_pickle, unsafe_pickle_error

# Plain state dicts (U-ViT's released checkpoints), which a U-Net experiment cannot load.
STATE_DICT_SUFFIXES = (".pth", ".pt")


class UNetFamily(Family):
    name = "unet"
    title = "U-Net"
    class_name = "UNet2DModel"
    description = ("diffusers' UNet2DModel, or a network built like one (its output layer conv_out, "
                   "which pruning keeps)")
    size_key = "sample_size"
    channel_keys = ("in_channels", "out_channels")
    # diffusers' UNet2DModel: 3 channels, no sample_size.
    key_defaults = {"sample_size": None, "in_channels": 3, "out_channels": 3}
    identifying_keys = ("sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
                        "down_block_types", "up_block_types", "norm_num_groups", "attention_head_dim")
    process = "ddpm"
    process_reason = "pretrained diffusers U-Nets are DDPM models"
    pretrained_help = "a hub id or a local diffusers folder"
    pretrained_folders = True
    # Class labels through UNet2DModel's class embedding (num_class_embeds rows, added to the time
    # embedding): the classes and the null label of guidance (igsm.conditioning).
    condition_kinds = ("class",)
    class_slots_key = "num_class_embeds"

    def network_class(self):
        from diffusers import UNet2DModel

        return UNet2DModel

    def owns(self, net) -> bool:
        from diffusers import ModelMixin
        from torch import nn

        # Any ε-network whose last layer is conv_out prunes as a U-Net (tests plant such networks),
        # but a diffusers network of another class is its own family's (UNet2DConditionModel has a
        # conv_out too: igsm.families.sd_unet).
        return isinstance(net, self.network_class()) or (
            isinstance(getattr(net, "conv_out", None), nn.Module) and not isinstance(net, ModelMixin))

    def pretrained_errors(self, key: str, pretrained: str) -> list[str]:
        if pretrained.endswith(STATE_DICT_SUFFIXES):
            return [f"{key}.architecture.family: {self.name!r}, but dense.pretrained {pretrained} is a plain state "
                    f"dict (a U-ViT checkpoint); set architecture.family: uvit and give U-ViT's architecture "
                    f"(img_size, patch_size, …) to build it"]
        if looks_like_local_path(pretrained) and not Path(pretrained).expanduser().is_dir():
            return [f"{key}.dense.pretrained: local folder {pretrained} does not exist"]
        return []

    def load_pretrained(self, source: str, architecture: dict, cache_dir):
        return load_diffusers_unet(source)

    def condition_keyword(self, net) -> str | None:
        config = getattr(net, "config", {})
        return "class_labels" if config.get(self.class_slots_key) or config.get("class_embed_type") else None

    def example_condition(self, net, device):
        import torch

        return torch.zeros(1, dtype=torch.long, device=device) if self.condition_keyword(net) else None

    def pruning_plan(self, model) -> dict:
        """Diff-Pruning's U-Net: every layer but ``conv_out``; each attention's heads keep equal widths."""
        attention = attention_modules(model)
        dense_head_dims = {name: attn.inner_dim // attn.heads for name, attn in attention.items()}
        return {"ignored_layers": [model.conv_out],
                "num_heads": {lin: attn.heads for attn in attention.values() if attn.heads > 1
                              for lin in (attn.to_q, attn.to_k, attn.to_v)},
                "unwrapped_parameters": None,
                "sync_widths": lambda: sync_static_widths(model, dense_head_dims)}

    def block_graph(self, net) -> BlockGraph:
        """``down_blocks.i``, ``mid_block``, ``up_blocks.i``, each down block also read by the up
        blocks that pop its residuals."""
        if not (hasattr(net, "down_blocks") and hasattr(net, "up_blocks")):
            raise ValueError(f"block reuse: {type(net).__name__} has no down_blocks and up_blocks to cut "
                             f"into blocks (a diffusers UNet2DModel has)")
        names = ([f"down_blocks.{i}" for i in range(len(net.down_blocks))]
                 + (["mid_block"] if net.mid_block is not None else [])
                 + [f"up_blocks.{i}" for i in range(len(net.up_blocks))])
        consumers = chain_consumers(names)
        # UNet2DModel.forward: the residual stack starts with conv_in's output and grows by every
        # down block's res_samples (one per resnet, plus one for its downsampler); each up block pops
        # len(resnets) of them from the end.
        stack = [REST]
        for i, block in enumerate(net.down_blocks):
            if getattr(block, "skip_conv", None) is not None:
                raise ValueError(f"block reuse: down_blocks.{i} ({type(block).__name__}) is a skip block, "
                                 f"whose extra output is not supported")
            stack += [f"down_blocks.{i}"] * (len(block.resnets) + (block.downsamplers is not None))
        for j, block in enumerate(net.up_blocks):
            taken = stack[-len(block.resnets):]
            del stack[-len(block.resnets):]
            for producer in taken:
                if producer != REST and f"up_blocks.{j}" not in consumers[producer]:
                    consumers[producer].append(f"up_blocks.{j}")
        return BlockGraph(tuple(names), {k: tuple(v) for k, v in consumers.items()})

    def width_attributes(self) -> dict:
        from diffusers.models.attention_processor import Attention
        from diffusers.models.downsampling import Downsample2D
        from diffusers.models.upsampling import Upsample2D

        return {
            Upsample2D: ("channels", "out_channels"),
            Downsample2D: ("channels", "out_channels"),
            # scale: pruned attention keeps the dense softmax temperature (sync_static_widths folds
            # it into to_q and sets scale for diffusers' non-SDPA path); the dims are descriptive.
            Attention: ("heads", "inner_dim", "inner_kv_dim", "query_dim", "cross_attention_dim",
                        "out_dim", "scale"),
        }


def attention_modules(model) -> dict:
    """diffusers' Attention modules of ``model`` by name (the U-Net's, DiT's: igsm.families.dit)."""
    from diffusers.models.attention_processor import Attention

    return {name: m for name, m in model.named_modules() if isinstance(m, Attention)}


def sync_static_widths(model, dense_head_dims: dict) -> None:
    """Make diffusers' static width attributes agree with the pruned layers.

    Up/Downsample2D assert on ``channels``; Attention keeps ``inner_dim`` and friends. Attention
    also needs its softmax temperature kept: diffusers' fused path (SDPA) divides q·k by
    √(pruned head dim) and ignores ``attn.scale``, its math path multiplies by ``attn.scale``
    (√ of the dense head dim). We keep the dense model's temperature on both paths by folding
    √(pruned/dense) into ``to_q`` and setting ``attn.scale`` to what SDPA uses; ``save_model``
    records ``scale``.
    """
    import torch
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D
    from torch import nn

    for name, m in model.named_modules():
        if isinstance(m, (Upsample2D, Downsample2D)):
            conv = getattr(m, "conv", None) or getattr(m, "Conv2d_0", None)
            if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
                m.channels, m.out_channels = conv.in_channels, conv.out_channels
    for name, attn in attention_modules(model).items():
        attn.inner_dim = attn.to_q.out_features
        attn.inner_kv_dim = attn.to_k.out_features
        attn.query_dim = attn.to_q.in_features
        attn.cross_attention_dim = attn.to_k.in_features
        attn.out_dim = attn.to_out[0].out_features
        if attn.inner_dim % attn.heads:
            raise ValueError(f"net: pruning left {name} with {attn.inner_dim} dims for "
                             f"{attn.heads} heads")
        head_dim, dense_head_dim = attn.inner_dim // attn.heads, dense_head_dims[name]
        if attn.scale_qk and head_dim != dense_head_dim:
            with torch.no_grad():
                factor = math.sqrt(head_dim / dense_head_dim)
                attn.to_q.weight.mul_(factor)
                if attn.to_q.bias is not None:
                    attn.to_q.bias.mul_(factor)
            attn.scale = head_dim ** -0.5


# ---- pretrained U-Nets: diffusers folders, the hub cache, the hub ------------------------------

def _unsafe_bin_error(err: BaseException, fallback: Path, refused: str, model_id: str | None = None):
    """unsafe_pickle_error for a diffusers .bin: the file diffusers names (its OSError says "…
    checkpoint file for '<path>'"); a hub model is converted in a local copy (``hf download``)."""
    named = [found.group(1) for e in errors_behind(err)
             if (found := re.search(r"checkpoint file for '([^']+)'", str(e)))]
    weights = Path(named[0]) if named else fallback
    if model_id is None:
        how = (f"`{convert_command(weights, weights.with_name('diffusion_pytorch_model.safetensors'))}` "
               f"(diffusers then reads it instead of the .bin)")
    else:  # in the hub cache: <cache>/models--owner--name/snapshots/<commit>/<path in the repository>
        inside = re.split(r"/snapshots/[0-9a-f]{40}/", str(weights))[-1] if named else "diffusion_pytorch_model.bin"
        local = Path("DIR") / inside
        how = (f"`hf download {model_id} --local-dir DIR`, then "
               f"`{convert_command(local, local.with_name('diffusion_pytorch_model.safetensors'))}` and set "
               f"dense.pretrained to DIR")
    return unsafe_pickle_error(weights, refused, how)


def _load_local_diffusers(folder: Path):
    """A UNet2DModel.save_pretrained folder, or a pipeline folder with the U-Net in unet/ (a folder
    written by this workflow, holding architecture.json, igsm.models.load_pretrained loads itself)."""
    from diffusers import UNet2DModel

    candidates = [sub for sub in ("", "unet") if (folder / sub / "config.json").is_file()]
    if not candidates:
        raise ValueError(
            f"dense.pretrained: local folder {folder} holds no diffusers U-Net (neither config.json "
            f"nor unet/config.json) and no model of this workflow (architecture.json); point it at "
            f"a folder written by UNet2DModel.save_pretrained, by `hf download "
            f"<model id> --local-dir DIR`, or by a workflow stage (e.g. results/dense/<exp>/trained/model)")
    errors = []
    for sub in candidates:
        try:
            return UNet2DModel.from_pretrained(str(folder), **({"subfolder": sub} if sub else {}))
        except Exception as err:  # diffusers raises OSError, ValueError, SafetensorError, …
            refused = refused_pickle(err)
            if refused is not None:  # not damage: a pickle that asks for code (torch's advice withheld)
                raise _unsafe_bin_error(err, folder / sub / "diffusion_pytorch_model.bin", refused) from None
            errors.append(f"{folder / sub}: {error_chain(err)}" if sub else error_chain(err))
    raise ValueError(
        f"dense.pretrained: could not load a diffusers U-Net from local folder {folder} "
        f"({'; '.join(errors)}); its files are incomplete or not a UNet2DModel: download it again "
        f"(`hf download <model id> --local-dir DIR`)")


def load_diffusers_unet(model_id: str):
    """A dense diffusers UNet2DModel from a local diffusers folder, the hub cache or the hub.

    Pickled weights (``diffusion_pytorch_model.bin``: google/ddpm-church-256 and -bedroom-256 ship
    nothing else) are unpickled by diffusers through ``torch.load(weights_only=True)`` (diffusers
    passes it; torch ≥ 2.6, which pyproject requires, defaults to it): tensors only, and a file
    whose pickle would run code is refused (tests/test_lsun_unet.py).

    Offline, the hub client retries for about a minute before giving up; we check the endpoint
    first so that a missing model fails at once with instructions (``RuntimeError``). A local path
    that is not a folder, or a folder without a diffusers U-Net, raises ``ValueError``.
    """
    from diffusers import UNet2DModel

    def attempt(**kwargs):
        try:
            return UNet2DModel.from_pretrained(model_id, **kwargs)
        except (OSError, EnvironmentError):
            # Pipeline repositories keep the U-Net in a subfolder.
            return UNet2DModel.from_pretrained(model_id, subfolder="unet", **kwargs)

    model_id = str(model_id)
    local = Path(model_id).expanduser()
    if local.is_dir():
        return _load_local_diffusers(local)
    if looks_like_local_path(model_id):
        raise ValueError(f"dense.pretrained: local folder {model_id} does not exist (looked for "
                         f"{local.absolute()}); set it to an existing diffusers folder, or to a hub "
                         f"id such as google/ddpm-cifar10-32")
    try:
        return attempt(local_files_only=True)
    except Exception as err:
        from huggingface_hub import try_to_load_from_cache

        if any(isinstance(try_to_load_from_cache(model_id, name), str)
               for name in ("config.json", "unet/config.json")):  # in the cache, yet unloadable
            refused = refused_pickle(err)
            if refused is not None:
                raise _unsafe_bin_error(err, Path(model_id), refused, model_id) from None
            raise ValueError(f"dense.pretrained: the hub cache's copy of {model_id} could not be "
                             f"loaded ({error_chain(err)}); delete it from the cache and download "
                             "it again") from None
    error = None
    if hub_reachable():
        try:
            return attempt()
        except Exception as err:  # the hub client raises many kinds; all mean "not available"
            refused = refused_pickle(err)
            if refused is not None:
                raise _unsafe_bin_error(err, Path(model_id), refused, model_id) from None
            error = f"{type(err).__name__}: {err}"
    reason = error or ("HF_HUB_OFFLINE is set and it is not in the hub cache" if hub_offline()
                       else "the Hugging Face hub is unreachable")
    raise RuntimeError(
        f"could not load the pretrained model {model_id!r} ({reason}). Without internet, download "
        f"it elsewhere (hf download {model_id} --local-dir DIR; older huggingface_hub: "
        f"huggingface-cli download), copy DIR here and set the experiment's 'dense.pretrained' "
        "to that local path."
    )


UNET = register(UNetFamily())
