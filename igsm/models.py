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
import re
from pathlib import Path

import torch
from torch import nn

from igsm.families import family_named, family_of, family_of_architecture, family_of_class, names

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
            raise ValueError(f"{path} is not readable JSON ({_first_line(err)})") from None
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


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text if len(text) <= limit else text[:limit] + "…"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _error_chain(err: BaseException) -> str:
    """The first line of an error and of the errors behind it (diffusers wraps torch's refusal of
    a pickle in an OSError that does not say why)."""
    lines, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        lines.append(_first_line(err))
        err = err.__cause__ or err.__context__
    return " ← ".join(lines)


# ---- pickled weights that are more than tensors (hub .bin files, U-ViT .pth files) -------------

# What a pickle of plain tensors asks for (torch.save of a state dict: the mapping, tensors and
# parameters; storages are torch's own persistent ids). Everything else is refused.
TENSOR_PICKLE_GLOBALS = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
                         "torch._utils._rebuild_parameter"}


def _errors_behind(err: BaseException | None):
    """``err`` and every error behind it, through both ``__cause__`` and ``__context__`` (diffusers
    and the hub client wrap the error that matters, or raise a new one while handling it)."""
    pending, seen = [err], set()
    while pending:
        err = pending.pop()
        if err is not None and id(err) not in seen:
            seen.add(id(err))
            yield err
            pending += [err.__context__, err.__cause__]


# torch's weights-only unpickler, refusing what a pickle asks for beyond tensors (a global, an object
# to create or build, a function to call); its other errors mean a damaged file, or none of torch's.
_REFUSAL = re.compile(r"GLOBAL [\w.]+|Can only (create new object|build)|call reduce for")


def refused_pickle(err: BaseException) -> str | None:
    """The globals (``posix.system``) that torch's weights-only unpickler refused, if one of the
    errors behind ``err`` is such a refusal ("" where it names none), else None."""
    import pickle

    refusals = [str(e) for e in _errors_behind(err) if isinstance(e, pickle.UnpicklingError)
                and "Weights only load failed" in str(e) and _REFUSAL.search(str(e))]
    if not refusals:
        return None
    return ", ".join(dict.fromkeys(name for text in refusals for name in re.findall(r"GLOBAL ([\w.]+)", text)))


def convert_command(source, target) -> str:
    """The command that keeps a pickled checkpoint's tensors only (:func:`convert_checkpoint`)."""
    import shlex

    return f"python -m igsm convert-checkpoint {shlex.quote(str(source))} {shlex.quote(str(target))}"


def unsafe_pickle_error(path, refused: str, how: str, key: str = "dense.pretrained") -> ValueError:
    """The error for a weights file whose pickle asks for more than tensors: what it is, that it was
    refused and nothing ran, and ``how`` to go on without running it either (convert_command)."""
    return ValueError(
        f"{key}: {path} contains pickled code or objects, not plain tensors"
        f"{f' (it asks for {refused})' if refused else ''}: refused for safety, nothing in it ran. The "
        f"published checkpoints (google/ddpm-*, U-ViT's .pth files) hold tensors only.\n"
        f"If you trust its source, keep only its tensors, running nothing in it: {how}")


class _Refused:
    """What a refused global of a pickle becomes while its tensors are taken out: calling it,
    building it or giving it state does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def convert_checkpoint(source: str | os.PathLike, target: str | os.PathLike) -> list[str]:
    """Write the tensors of a pickled checkpoint (a torch.save'd state dict: U-ViT's .pth, a
    diffusers .bin) to a safetensors file, running nothing in the pickle: every global other than
    TENSOR_PICKLE_GLOBALS unpickles as an inert stand-in and is left out. Returns what was left out
    (top-level keys and refused globals); ``ValueError`` if the file holds no tensors."""
    import pickle
    from types import SimpleNamespace

    from safetensors.torch import save_file

    refused = []

    class TensorsOnlyUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if f"{module}.{name}" in TENSOR_PICKLE_GLOBALS:
                return super().find_class(module, name)
            refused.append(f"{module}.{name}")
            return _Refused

    # torch.load reads storages itself and takes the pickle's objects from this module's unpickler.
    module = SimpleNamespace(__name__="igsm_tensors_only", Unpickler=TensorsOnlyUnpickler,
                             load=lambda f, **kwargs: TensorsOnlyUnpickler(f, **kwargs).load())
    source, target = Path(source), Path(target)
    try:
        state = torch.load(source, map_location="cpu", pickle_module=module)
    except Exception as err:  # not a torch file, truncated, …
        raise ValueError(f"{source} is not a readable torch checkpoint ({_first_line(err)})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{source} holds a {type(state).__name__}, not a state dict of tensors")
    tensors = {k: v.detach().clone().contiguous() for k, v in state.items()
               if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{source} holds no tensors at its top level (keys: {list(state)[:5]})")
    left_out = [repr(k) for k in state if k not in tensors]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    save_file(tensors, partial)
    os.replace(partial, target)  # complete or absent
    return left_out + [f"global {name}" for name in dict.fromkeys(refused)]


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
        raise ValueError(f"{path} is not valid JSON ({_first_line(err)}); {_remake(directory)}") from None
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
                         f"({_first_line(err)}); {_remake(directory)}") from None
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
        raise ValueError(f"{weights_path} is unreadable ({_first_line(err)}); {_remake(directory)}") from None
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
    _check_widths(net, weights_path, architecture_path, directory)
    return net.eval()


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE set (huggingface_hub's own switch): never try the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout_s: float = 5.0) -> bool:
    import socket
    from urllib.parse import urlparse

    if _hub_offline():
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def looks_like_local_path(model_id: str) -> bool:
    """A path rather than a hub id: absolute, ./ ../ ~ in front, or a first component that is a
    folder here (hub ids are ``owner/name``, and ``owner`` is rarely a local folder)."""
    separators = [s for s in (os.sep, os.altsep) if s]
    if os.path.isabs(model_id) or model_id.startswith("~") or model_id in (".", ".."):
        return True
    if any(model_id.startswith(prefix + s) for prefix in (".", "..") for s in separators):
        return True
    return any(sep in model_id and Path(model_id.split(sep)[0]).is_dir() for sep in separators)


def _unsafe_bin_error(err: BaseException, fallback: Path, refused: str, model_id: str | None = None):
    """unsafe_pickle_error for a diffusers .bin: the file diffusers names (its OSError says "…
    checkpoint file for '<path>'"); a hub model is converted in a local copy (``hf download``)."""
    named = [found.group(1) for e in _errors_behind(err)
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


def _load_local_pretrained(folder: Path) -> nn.Module:
    from diffusers import UNet2DModel

    if (folder / "architecture.json").is_file():  # a model written by this workflow (save_model)
        try:
            return load_model(folder)
        except ValueError as err:
            raise ValueError(f"dense.pretrained: {err}") from None
    # A UNet2DModel.save_pretrained folder, or a pipeline folder with the U-Net in unet/.
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
            errors.append(f"{folder / sub}: {_error_chain(err)}" if sub else _error_chain(err))
    raise ValueError(
        f"dense.pretrained: could not load a diffusers U-Net from local folder {folder} "
        f"({'; '.join(errors)}); its files are incomplete or not a UNet2DModel: download it again "
        f"(`hf download <model id> --local-dir DIR`)")


def load_pretrained(model_id: str) -> nn.Module:
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
        return _load_local_pretrained(local)
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
                             f"loaded ({_error_chain(err)}); delete it from the cache and download "
                             "it again") from None
    error = None
    if _hub_reachable():
        try:
            return attempt()
        except Exception as err:  # the hub client raises many kinds; all mean "not available"
            refused = refused_pickle(err)
            if refused is not None:
                raise _unsafe_bin_error(err, Path(model_id), refused, model_id) from None
            error = f"{type(err).__name__}: {err}"
    reason = error or ("HF_HUB_OFFLINE is set and it is not in the hub cache" if _hub_offline()
                       else "the Hugging Face hub is unreachable")
    raise RuntimeError(
        f"could not load the pretrained model {model_id!r} ({reason}). Without internet, download "
        f"it elsewhere (hf download {model_id} --local-dir DIR; older huggingface_hub: "
        f"huggingface-cli download), copy DIR here and set the experiment's 'dense.pretrained' "
        "to that local path."
    )
