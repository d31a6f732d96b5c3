"""The config's JSON schema (``schemas/config.schema.yaml``), the only place a default lives.

Kept apart from igsm.config (the cross-field checks, which import the algorithms' registries) so
that the algorithms themselves can read their defaults from it without importing the layer above
them (issue 30: layering)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import yaml

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


@functools.cache
def schema_file() -> dict:
    """The schema as the file holds it, read once (callers copy before they change it)."""
    return yaml.safe_load(SCHEMA.read_text())


@functools.cache
def schema_defaults(definition: str) -> dict:
    """The defaults the schema gives the keys of ``$defs.<definition>``: the one copy of them that
    code filling a partial section (igsm.training.TrainingOptions.from_dict) reads."""
    properties = schema_file()["$defs"][definition]["properties"]
    return {key: spec["default"] for key, spec in properties.items() if "default" in spec}


def _defaults_of(spec: dict) -> dict:
    return {key: copy.deepcopy(sub["default"]) for key, sub in spec.get("properties", {}).items()
            if "default" in sub}


def _satisfies(condition: dict, values: dict) -> bool:
    """``values`` meet an ``if`` of the schema's one form: keys required, some with a ``const``."""
    return (all(key in values for key in condition.get("required", ()))
            and all(values.get(key) == sub["const"] for key, sub in condition.get("properties", {}).items()
                    if key in values and "const" in sub))


def _defaults_for(spec: dict, values: dict | None) -> dict:
    """``spec``'s defaults, with those of the ``if``/``then``/``else`` branch ``values`` fall in (a
    branch may hold an ``if`` of its own: the dataset's else-if chain of per-source defaults)."""
    defaults = _defaults_of(spec)
    if "if" in spec:
        branch = spec["then"] if _satisfies(spec["if"], {**defaults, **(values or {})}) else spec.get("else", {})
        defaults.update(_defaults_for(branch, {**defaults, **(values or {})}))
    return defaults


def section_defaults(section: str, values: dict | None = None) -> dict:
    """The defaults the schema gives the keys of an experiment's config ``section`` ('sample',
    'fid', 'prune', 'diffusion', …), with those of the ``if``/``then``/``else`` branch the section's
    ``values`` fall in (the diffusion process's own constants). A fresh copy on each call."""
    return _defaults_for(schema_file()["$defs"]["experiment"]["properties"][section], values)


def dataset_defaults(spec: dict) -> dict:
    """The defaults the schema gives a ``datasets.<name>`` entry of ``spec``'s source (image_size
    256 for lsun, 32 for the others; split train; …). A fresh copy on each call."""
    return _defaults_for(schema_file()["$defs"]["dataset"], spec)


def experiment_default(section: str):
    """The schema's default of a whole experiment section (a fresh copy): what a stage reads for a
    section its settings leave out (the 'diffusion' a sample or prune job is not given)."""
    return copy.deepcopy(schema_file()["$defs"]["experiment"]["properties"][section]["default"])
