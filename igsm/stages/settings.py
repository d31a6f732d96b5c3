"""The stages' settings, typed: a dataclass per config section a stage reads (its ``--settings``),
filled once from the schema's defaults (igsm.schema), so that no stage or algorithm below keeps a
second copy of a default. Torch-free: the CLI builds them while it parses the command line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from igsm.schema import schema_defaults, schema_file, section_defaults
from igsm.stages.common import diffusion_of


class SectionSettings:
    """A config section's keys as fields (+ ``diffusion``: the experiment's forward process, which
    the workflow passes along with the section)."""

    SECTION: ClassVar[str]

    @classmethod
    def _defaults(cls, values: dict) -> dict:
        return {**section_defaults(cls.SECTION, values), "diffusion": diffusion_of({})}

    @classmethod
    def from_dict(cls, values: dict):
        """The settings of ``values``, each key it leaves out the schema's default; a key that is not
        one of the section's is an error naming it."""
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"{unknown[0]}: not a key of the {cls.SECTION!r} settings ({', '.join(names)})")
        defaults = cls._defaults(values)
        return cls(**{name: values[name] if name in values else defaults[name]
                      for name in names if name in values or name in defaults})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FidSettings(SectionSettings):
    """'fid': the Inception features' mode, the reference statistics' size or file."""

    SECTION: ClassVar[str] = "fid"
    mode: str
    num_reference: int
    reference_statistics: str
    diffusion: dict
    reference_dataset: str = ""  # another dataset's images as the reference (no schema default: absent stays absent)
    # How the distance takes its matrix square root (igsm.feature_statistics.SQUARE_ROOTS); no schema
    # default either, so that the FID jobs of configs without the key keep their settings.
    square_root: str = "sqrtm"
    # Where PRDC is enabled, the 'prdc' section's num_features and (the reference's) seed, passed along
    # to the statistics jobs, which keep that many features (igsm.fid.kept_indices); empty: none.
    prdc: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ClipScoreSettings(SectionSettings):
    """'clip_score' as its job runs it: the CLIP model and its batch (not ``enabled``, which only
    decides whether the job exists), and the experiment's conditioning, whose sampling_prompts give
    each image its prompt."""

    SECTION: ClassVar[str] = "clip_score"
    model: str
    batch_size: int
    conditioning: dict = field(default_factory=dict)  # the experiment's (igsm.conditioning), passed along


@dataclass(frozen=True)
class NetworkSettings(SectionSettings):
    """How a network runs, as in 'sample' (the efficiency stage's timing)."""

    SECTION: ClassVar[str] = "sample"
    precision: str
    channels_last: bool
    compile: bool
    compile_mode: str


@dataclass(frozen=True)
class PruneSettings(SectionSettings):
    """'prune': the method (None: the one that takes the criterion), Diff-Pruning's batch and
    threshold, and ``sections``: the pruning methods' own sections (a key of 'prune' the schema
    defines by reference, as 'gradient_flow'), each completed with its schema defaults."""

    SECTION: ClassVar[str] = "prune"
    criterion: str
    thr: float
    num_images: int
    seed: int
    diffusion: dict
    method: str | None = None
    sections: dict = field(default_factory=dict)
    conditioning: dict = field(default_factory=dict)  # the experiment's (igsm.conditioning), passed along
    latents: dict = field(default_factory=dict)  # a latent experiment's autoencoder (igsm.latents), passed along

    @classmethod
    def from_dict(cls, values: dict) -> "PruneSettings":
        references = {key: spec["$ref"].rsplit("/", 1)[-1] for key, spec in
                      schema_file()["$defs"]["experiment"]["properties"][cls.SECTION]["properties"].items()
                      if "$ref" in spec}
        sections = {key: {**schema_defaults(definition), **values.get(key, {})}
                    for key, definition in references.items()}
        plain = super().from_dict({key: value for key, value in values.items() if key not in references})
        return dataclasses.replace(plain, sections=sections)
