"""Weight files that are pickles (hub ``.bin`` files, U-ViT's ``.pth`` files): recognising torch's
refusal of a pickle that asks for more than tensors, the error saying what to do instead, and
keeping such a file's tensors only without running anything in it (``igsm convert-checkpoint``).

Below the model families and the checkpoint format (igsm.models), which all load such files;
imports torch only inside a function (the workflow imports the families to build its DAG).
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def first_line(err: BaseException, limit: int = 300) -> str:
    """An error's type and the first line of its message (at most ``limit`` characters)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text if len(text) <= limit else text[:limit] + "…"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def error_chain(err: BaseException) -> str:
    """The first line of an error and of the errors behind it (diffusers wraps torch's refusal of
    a pickle in an OSError that does not say why)."""
    lines, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        lines.append(first_line(err))
        err = err.__cause__ or err.__context__
    return " ← ".join(lines)


# What a pickle of plain tensors asks for (torch.save of a state dict: the mapping, tensors and
# parameters; storages are torch's own persistent ids). Everything else is refused.
TENSOR_PICKLE_GLOBALS = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
                         "torch._utils._rebuild_parameter"}


def errors_behind(err: BaseException | None):
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

    refusals = [str(e) for e in errors_behind(err) if isinstance(e, pickle.UnpicklingError)
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

    import torch
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
        raise ValueError(f"{source} is not a readable torch checkpoint ({first_line(err)})") from None
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
