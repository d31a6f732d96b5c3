"""Networks and their checkpoints.

Networks of every model family (igsm.families: the paper's U-Nets are diffusers' ``UNet2DModel``,
Sec. 5.1, App. B Table 6, its Transformers U-ViT, igsm.uvit). A pruned network has per-layer widths
that no config of its family can express, so a checkpoint is a folder holding

* ``architecture.json``: the family, its dense config and the static width attributes of every
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

from igsm.families import family_named, family_of, family_of_architecture, family_of_class, names
from igsm.pickles import first_line

ARCHITECTURE_FILE = "architecture.json"
WEIGHTS_FILE = "model.safetensors"


def image_shape(net: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the images a network of any family takes."""
    return family_of(net).image_shape(net)


def declared_images(class_name: str, config: dict, source: str) -> dict:
    """A network's class, config and where they were read (a file, a model id), for
    :func:`pretrained_mismatches`."""
    return {"class": class_name, "config": config, "source": source}


def local_pretrained_declaration(folder: str | os.PathLike) -> dict | None:
    """:func:`declared_images` of the network a local ``dense.pretrained`` folder holds, from the file
    :func:`load_pretrained` builds it from (architecture.json, else diffusers' config.json, else
    unet/config.json); None if there is none. ``ValueError`` naming the file if it is no JSON object."""
    folder = Path(folder)
    for name in (ARCHITECTURE_FILE, "config.json", "unet/config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not readable JSON ({first_line(err)})") from None
        spec = spec if isinstance(spec, dict) else {}
        if name == ARCHITECTURE_FILE:  # save_model's: the class and its config
            class_name, config = spec.get("class"), spec.get("config")
        else:  # diffusers': the config, naming its class
            class_name, config = spec.get("_class_name", "UNet2DModel"), spec
        if not isinstance(class_name, str) or not isinstance(config, dict) or not config:
            raise ValueError(f"{path} does not describe a network (a JSON object with its class and config)")
        return declared_images(class_name, config, str(path))
    return None


def pretrained_mismatches(declared: dict, family: str, dataset: str, image_size: int,
                          channels: int) -> list[str]:
    """Why a pretrained network cannot be the teacher of an experiment of ``family`` (the name its
    architecture.family gives) on ``dataset`` (``image_size`` px, ``channels``): another family,
    image size or channel count than the experiment's. Nothing else would notice: a 32-px teacher
    of 16-px images is finetuned on them and samples at 32 px."""
    where, class_name, config = declared["source"], declared["class"], declared["config"]
    theirs, ours = family_of_class(class_name), family_named(family)
    if theirs is None:
        return [f"{where} describes a {class_name}, not a network the workflow runs (a model family's: "
                f"{', '.join(names())})"]
    problems = []
    if theirs is not ours:
        problems.append(
            f"{where} describes a {theirs.title} ({class_name}), but the experiment is a {ours.title} "
            f"experiment (its architecture.family is {ours.name!r}); point dense.pretrained at a {ours.title}, "
            f"or make it a {theirs.title} experiment (architecture.family: {theirs.name} and its keys), whose "
            f"dense.pretrained is {theirs.pretrained_help}")
    size = config.get(theirs.size_key, theirs.key_defaults[theirs.size_key])
    sides = [size, size] if isinstance(size, int) else list(size) if isinstance(size, (list, tuple)) else None
    if sides is None:
        problems.append(f"{where} gives no {theirs.size_key} (the size of the images the network makes); "
                        f"datasets.{dataset}.image_size is {image_size}")
    elif any(side != image_size for side in sides):
        problems.append(f"{where}: {theirs.size_key} {size}, but datasets.{dataset}.image_size is {image_size}; "
                        f"the teacher would be finetuned on {image_size}-px images and sample at {size} px")
    for key in theirs.channel_keys:
        value = config.get(key, theirs.key_defaults[key])
        if value != channels:
            problems.append(f"{where}: {key} {value}, but dataset {dataset!r} has {channels} channel(s)")
    return problems


def _static_width_attributes():
    """{module type: width attributes} a checkpoint records: every network's layers, then each
    family's own (igsm.families: Family.width_attributes)."""
    kinds = {
        nn.Conv2d: ("in_channels", "out_channels"),
        nn.Linear: ("in_features", "out_features"),
        nn.GroupNorm: ("num_groups", "num_channels"),
        nn.LayerNorm: ("normalized_shape",),  # U-ViT's last out-block and final norm, pruned
    }
    for name in names():
        kinds.update(family_named(name).width_attributes())
    return kinds


def build_unet(architecture: dict) -> nn.Module:
    """A fresh diffusers UNet2DModel from keyword arguments (the config's ``architecture``)."""
    return family_named("unet").build(architecture)


def build_model(architecture: dict) -> nn.Module:
    """A freshly initialised network of the config's ``architecture`` (its family names it)."""
    return family_of_architecture(architecture).build(architecture)


def predict_noise(net: nn.Module, x: torch.Tensor, t: torch.Tensor, **condition) -> torch.Tensor:
    """ε̂ = net(x_t, t) for diffusers models (which wrap outputs) and plain modules alike;
    ``condition``: the network's condition by its keyword (:func:`condition_inputs`)."""
    out = net(x, t, **condition)
    return out.sample if hasattr(out, "sample") else out


def _unwrapped(net: nn.Module) -> nn.Module:
    """The network inside a torch.compile'd or DDP-wrapped one (itself otherwise)."""
    net = getattr(net, "_orig_mod", net)
    return getattr(net, "module", net) if type(net).__name__ == "DistributedDataParallel" else net


def condition_keyword(net: nn.Module) -> str | None:
    """The keyword by which ``net`` (of any family; a torch.compile'd or DDP-wrapped one too) takes
    its condition, None for an unconditional network (a plain module ``net(x, t)`` of no family
    included, as the samplers take)."""
    net = _unwrapped(net)
    try:
        family = family_of(net)
    except ValueError:
        return None
    return family.condition_keyword(net)


def check_condition(net: nn.Module, keyword: str | None, condition) -> None:
    """``ValueError`` if a condition is given to an unconditional network (``keyword`` None), or
    none to a conditional one: either would run, on the wrong input or not at all, deep inside it."""
    if (condition is None) != (keyword is None):
        what = "a condition for an unconditional" if keyword is None else "no condition for a conditional"
        raise ValueError(f"{what} {type(_unwrapped(net)).__name__}: the experiment's conditioning and "
                         "its networks disagree")


def condition_inputs(net: nn.Module, condition: torch.Tensor | None) -> dict:
    """``{keyword: condition}`` for :func:`predict_noise` (empty for None), checked (:func:`check_condition`)."""
    keyword = condition_keyword(net)
    check_condition(net, keyword, condition)
    return {} if condition is None else {keyword: condition}


def example_condition(net: nn.Module, batch_size: int, device=None) -> torch.Tensor | None:
    """A condition for ``batch_size`` images of ``net`` (its family's example, repeated; None for an
    unconditional network): for timing and tracing, where the values do not matter."""
    net = _unwrapped(net)
    one = family_of(net).example_condition(net, device)
    return None if one is None else one.expand(batch_size, *one.shape[1:])


class Conditioned(nn.Module):
    """``net`` with a batch's condition bound: ``Conditioned(net, c)(x, t)`` is ``net(x, t, c)``, so
    that code written for ``net(x, t)`` (the Jacobian products, the directions) runs a conditional
    network unchanged; its parameters are ``net``'s."""

    def __init__(self, net: nn.Module, condition: torch.Tensor):
        super().__init__()
        self.net = net
        self.condition = condition_inputs(net, condition)

    def forward(self, x: torch.Tensor, t: torch.Tensor):
        return self.net(x, t, **self.condition)


def conditioned(net: nn.Module | None, condition: torch.Tensor | None):
    """``net`` with ``condition`` bound (:class:`Conditioned`), or ``net`` itself where either is None."""
    return net if net is None or condition is None else Conditioned(net, condition)


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
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from igsm.data.common import reporting_write_errors

    directory = Path(directory)
    with reporting_write_errors(directory):
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
    with reporting_write_errors(directory / WEIGHTS_FILE, also=(SafetensorError,)):
        save_file(state, directory / WEIGHTS_FILE)
    # Written last: a folder without architecture.json is an unfinished save.
    with reporting_write_errors(directory / ARCHITECTURE_FILE):
        (directory / ARCHITECTURE_FILE).write_text(json.dumps(spec, indent=2, default=list))


def _remake(directory) -> str:
    return (f"it was not written completely or was changed since; delete {directory} and rerun the "
            f"workflow, which remakes it")


def read_architecture(directory: str | os.PathLike) -> dict:
    """The ``architecture.json`` of a checkpoint folder, checked to have what loading needs;
    ``ValueError`` naming the file, what is wrong and what to do otherwise."""
    directory = Path(directory)
    path = directory / ARCHITECTURE_FILE
    if not directory.is_dir():
        raise ValueError(f"model folder {directory} does not exist (or is not a folder); check the "
                         f"path, or rerun the workflow, which makes it")
    if not path.is_file():
        unfinished = (directory / WEIGHTS_FILE).exists()
        raise ValueError(
            f"{path} is missing: {directory} is not a model checkpoint"
            + (f" or its save did not finish ({ARCHITECTURE_FILE} is written last); delete {directory} "
               f"and rerun the workflow, which remakes it" if unfinished else
               f" (a folder written by `igsm` holds {ARCHITECTURE_FILE} and {WEIGHTS_FILE})"))
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({first_line(err)}); {_remake(directory)}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path} holds a JSON {type(spec).__name__}, not a model description; "
                         f"{_remake(directory)}")
    missing = [k for k in ("class", "config", "widths") if k not in spec]
    if missing:
        raise ValueError(f"{path} lacks the key(s) {missing}; {_remake(directory)}")
    if not isinstance(spec["config"], dict) or not isinstance(spec["widths"], dict) or not all(
            isinstance(attrs, dict) for attrs in spec["widths"].values()):
        raise ValueError(f"{path}: 'config' and 'widths' must be JSON objects (of objects); "
                         f"{_remake(directory)}")
    return spec


def _check_widths(net: nn.Module, weights_path: Path, architecture_path: Path, directory) -> None:
    """Every layer's tensors have the shapes its recorded widths imply (both files of one save)."""
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            expected = (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
        elif isinstance(module, nn.Linear):
            expected = (module.out_features, module.in_features)
        elif isinstance(module, nn.GroupNorm):
            expected = (module.num_channels,) if module.affine else None
        elif isinstance(module, nn.LayerNorm):
            expected = tuple(module.normalized_shape) if module.elementwise_affine else None
        else:
            continue
        weight = getattr(module, "weight", None)
        if expected is not None and weight is not None and tuple(weight.shape) != expected:
            raise ValueError(
                f"{weights_path}: {name}.weight has shape {tuple(weight.shape)}, but {architecture_path} "
                f"gives that layer the shape {expected}; the two files are not of one save; "
                f"{_remake(directory)}")


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a (possibly pruned) model saved by :func:`save_model`, in any process.

    A missing folder or file, a malformed ``architecture.json``, a truncated or corrupt
    ``model.safetensors`` or weights that do not fit the architecture raise ``ValueError`` naming
    the file, what is wrong and what to do.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    architecture_path, weights_path = directory / ARCHITECTURE_FILE, directory / WEIGHTS_FILE
    spec = read_architecture(directory)
    family = family_of_class(spec["class"])
    if family is None:
        known = sorted(family_named(name).class_name for name in names())
        raise ValueError(f"{architecture_path}: unsupported model class {spec['class']!r} (known: "
                         f"{known}); {_remake(directory)}")
    try:
        with torch.device("meta"):
            net = family.network_class()(**spec["config"])
    except Exception as err:  # a bad config raises TypeError, ValueError, …
        raise ValueError(f"{architecture_path}: its 'config' does not build a {spec['class']} "
                         f"({first_line(err)}); {_remake(directory)}") from None
    modules = dict(net.named_modules())
    for name, attrs in spec["widths"].items():
        if name not in modules:
            raise ValueError(f"{architecture_path}: 'widths' names a layer {name!r} that its 'config' "
                             f"does not have; {_remake(directory)}")
        for attr, value in attrs.items():
            setattr(modules[name], attr, tuple(value) if attr == "normalized_shape" else value)  # JSON lists
    if not weights_path.is_file():
        raise ValueError(f"{weights_path} is missing; {_remake(directory)}")
    try:
        state = load_file(weights_path, device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights_path} is unreadable ({first_line(err)}); {_remake(directory)}") from None
    # load_state_dict rejects shapes that differ from the dense skeleton even with assign=True,
    # so pruned tensors are put in place one by one; every skeleton tensor must be replaced.
    expected = set(net.state_dict())
    if set(state) != expected:
        raise ValueError(f"{weights_path}: the weights do not match {architecture_path} (missing "
                         f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}); "
                         f"{_remake(directory)}")
    for key, tensor in state.items():
        owner_name, _, attr = key.rpartition(".")
        owner = modules[owner_name]
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=owner._parameters[attr].requires_grad)
        else:
            owner._buffers[attr] = tensor
    family.restore_computed_buffers(net, device)
    unset = [name for name, tensor in [*net.named_parameters(), *net.named_buffers()] if tensor.is_meta]
    if unset:  # a non-persistent buffer its family does not recompute: it would fail at the first call
        raise ValueError(f"{architecture_path}: the {family.title} network computes {unset[:3]} at construction "
                         f"and neither its checkpoint nor its family restores them")
    _check_widths(net, weights_path, architecture_path, directory)
    return net.eval()




def load_pretrained(model_id: str, architecture: dict | None = None, cache_dir=None) -> nn.Module:
    """The dense teacher ``dense.pretrained`` names: a local folder written by this workflow
    (``architecture.json``, :func:`save_model`) where the family takes folders, else what the
    architecture's family loads (igsm.families: ``Family.load_pretrained``); without an
    architecture, a self-describing diffusers U-Net (a hub id or a local folder).
    ``ValueError``/``RuntimeError`` naming the key and what to do."""
    family = family_of_architecture(architecture) if architecture else family_named("unet")
    folder = Path(str(model_id)).expanduser()
    if family.pretrained_folders and (folder / ARCHITECTURE_FILE).is_file():
        try:
            return load_model(folder)
        except ValueError as err:
            raise ValueError(f"dense.pretrained: {err}") from None
    return family.load_pretrained(model_id, architecture or {}, cache_dir)
