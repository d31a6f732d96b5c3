"""The dense stage's models that are not trained here: a pretrained one fetched and stored in the
project's format, a freshly initialised one for the dense training, a pickled checkpoint's tensors
kept safely. (The dense training itself runs the one training loop: igsm.stages.train.)"""

from __future__ import annotations

from pathlib import Path

from igsm.stages.common import StageError


def pretrained(model_id: str, out, cache_dir, settings: dict) -> None:
    """Fetch a pretrained dense model and store it in the project's format (settings: the
    experiment's 'architecture', whose family loads it; needed where the weights are plain state
    dicts, as U-ViT's; without it, a self-describing diffusers model: hub id or folder)."""
    from igsm.models import load_pretrained, save_model

    try:
        net = load_pretrained(model_id, settings, cache_dir or Path(out).parent / "download")
    except (RuntimeError, ValueError) as err:
        raise StageError(str(err)) from None
    save_model(net, out, extra={"source": model_id})


def init(out, seed: int, settings: dict) -> None:
    """A freshly initialised network from the experiment's 'architecture' (any family)."""
    import torch

    from igsm.models import build_model, save_model

    torch.manual_seed(seed)
    save_model(build_model(settings), out, extra={"source": f"random init (seed {seed})"})


def convert_checkpoint(source, target) -> str:
    """Keep the tensors of a pickled checkpoint (a U-ViT .pth, a diffusers .bin) in a safetensors
    file, running nothing in its pickle: anything but tensors is left out and listed. For a file
    whose pickle asks for more than tensors, which dense.pretrained refuses; its weights are only
    as trustworthy as its source."""
    from igsm.pickles import convert_checkpoint as convert

    try:
        left_out = convert(source, target)
    except ValueError as err:
        raise StageError(str(err)) from None
    return f"{target}: the tensors of {source}" + (f"; left out: {', '.join(left_out)}" if left_out else "")
