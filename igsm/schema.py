"""The config's JSON schema (``schemas/config.schema.yaml``), the only place a default lives.

Kept apart from igsm.config (the cross-field checks, which import the algorithms' registries) so
that the algorithms themselves can read their defaults from it without importing the layer above
them (issue 30: layering)."""

from __future__ import annotations

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
