"""Networks and their checkpoints.

The paper's U-Nets are diffusers' ``UNet2DModel`` (Sec. 5.1, App. B Table 6). A pruned U-Net has
per-layer widths that no diffusers config can express, so a checkpoint is a folder holding

* ``architecture.json``: the dense diffusers config plus the static width attributes of every
  layer (conv/linear features, GroupNorm groups, Up/Downsample channels, attention heads);
* ``model.safetensors``: the weights.

Loading builds the dense skeleton on the meta device, applies the recorded widths and assigns the
tensors: nothing is unpickled, and the same format serves dense teachers and pruned students.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

ARCHITECTURE_FILE = "architecture.json"
WEIGHTS_FILE = "model.safetensors"


def _static_width_attributes():
    # Imported lazily: diffusers is slow to import and only needed when a model is built.
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    return {
        nn.Conv2d: ("in_channels", "out_channels"),
        nn.Linear: ("in_features", "out_features"),
        nn.GroupNorm: ("num_groups", "num_channels"),
        Upsample2D: ("channels", "out_channels"),
        Downsample2D: ("channels", "out_channels"),
        # scale: pruned attention keeps the dense softmax temperature (igsm.pruning folds it
        # into to_q and sets scale for diffusers' non-SDPA path); the dims are descriptive.
        Attention: ("heads", "inner_dim", "inner_kv_dim", "query_dim", "cross_attention_dim",
                    "out_dim", "scale"),
    }


def build_unet(architecture: dict) -> nn.Module:
    """A fresh diffusers UNet2DModel from keyword arguments (the config's ``architecture``)."""
    from diffusers import UNet2DModel

    return UNet2DModel(**architecture)


def predict_noise(net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ε̂ = net(x_t, t) for diffusers models (which wrap outputs) and plain modules alike."""
    out = net(x, t)
    return out.sample if hasattr(out, "sample") else out


def layer_widths(net: nn.Module) -> dict:
    """The static width attributes of every layer, keyed by module name."""
    kinds = _static_width_attributes()
    widths = {}
    for name, module in net.named_modules():
        for kind, attrs in kinds.items():
            if type(module) is kind:
                widths[name] = {a: getattr(module, a) for a in attrs if hasattr(module, a)}
    return widths


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def save_model(net: nn.Module, directory: str | os.PathLike, extra: dict | None = None) -> None:
    """Write ``architecture.json`` + ``model.safetensors`` into ``directory`` (created)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in dict(net.config).items() if not k.startswith("_")}
    spec = {
        "class": type(net).__name__,
        "config": config,
        "widths": layer_widths(net),
        "num_parameters": count_parameters(net),
        **(extra or {}),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE)
    # Written last: a folder without architecture.json is an unfinished save.
    (directory / ARCHITECTURE_FILE).write_text(json.dumps(spec, indent=2, default=list))


def read_architecture(directory: str | os.PathLike) -> dict:
    path = Path(directory) / ARCHITECTURE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a model checkpoint (no {ARCHITECTURE_FILE})")
    return json.loads(path.read_text())


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a (possibly pruned) model saved by :func:`save_model`, in any process."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    spec = read_architecture(directory)
    if spec["class"] != "UNet2DModel":
        raise ValueError(f"{directory}: unsupported model class {spec['class']!r}")
    with torch.device("meta"):
        net = UNet2DModel(**spec["config"])
    modules = dict(net.named_modules())
    for name, attrs in spec["widths"].items():
        for attr, value in attrs.items():
            setattr(modules[name], attr, value)
    state = load_file(Path(directory) / WEIGHTS_FILE, device=str(device))
    # load_state_dict rejects shapes that differ from the dense skeleton even with assign=True,
    # so pruned tensors are put in place one by one; every skeleton tensor must be replaced.
    expected = set(net.state_dict())
    if set(state) != expected:
        raise ValueError(f"{directory}: weights do not match the architecture (missing "
                         f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]})")
    for key, tensor in state.items():
        owner_name, _, attr = key.rpartition(".")
        owner = modules[owner_name]
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=owner._parameters[attr].requires_grad)
        else:
            owner._buffers[attr] = tensor
    return net.eval()


def _hub_reachable(timeout_s: float = 5.0) -> bool:
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def load_pretrained(model_id: str) -> nn.Module:
    """A dense diffusers UNet2DModel from a local diffusers folder, the hub cache or the hub.

    Offline, the hub client retries for about a minute before giving up; we check the endpoint
    first so that a missing model fails at once with instructions.
    """
    from diffusers import UNet2DModel

    def attempt(**kwargs):
        try:
            return UNet2DModel.from_pretrained(model_id, **kwargs)
        except (OSError, EnvironmentError):
            # Pipeline repositories keep the U-Net in a subfolder.
            return UNet2DModel.from_pretrained(model_id, subfolder="unet", **kwargs)

    if Path(model_id).is_dir():
        return attempt()
    try:
        return attempt(local_files_only=True)
    except Exception:
        pass
    error = None
    if _hub_reachable():
        try:
            return attempt()
        except Exception as err:  # the hub client raises many kinds; all mean "not available"
            error = f"{type(err).__name__}: {err}"
    raise RuntimeError(
        f"could not load the pretrained model {model_id!r} "
        f"({error or 'the Hugging Face hub is unreachable'}). Without internet, download it "
        f"elsewhere (huggingface-cli download {model_id} --local-dir DIR), copy DIR here and set "
        "the experiment's 'dense.pretrained' to that local path."
    )
