"""Conditioning: what a conditional network is given besides x_t and t, in every stage (issue 31).

An experiment's ``conditioning`` section names a kind, a member of this module's registry:

* ``class`` (:class:`ClassLabels`): class labels 0..K−1 from the image store's labels (DiT's
  ImageNet classes, Fashion-MNIST's ten). The label K is the *null* label, the "no condition" of
  classifier-free guidance (Ho & Salimans 2022): DiT's LabelEmbedding keeps the same extra row
  (``num_classes`` + 1 embeddings when it drops labels), a U-Net gets it as
  ``num_class_embeds`` = K + 1 and a U-ViT as ``num_classes`` = K + 1.

One interface, read by the training loop (:meth:`training_condition`: the batch's labels, each
replaced by the null one with probability ``drop_prob``, so that the network also learns the
unconditional prediction that guidance needs), the sampler (:meth:`sampling_condition`: an image's
condition, a function of its seed alone, as its noise is, so that batch invariance is kept;
:meth:`null_like`: the unconditional half) and pruning (:meth:`data_condition`: the data's own
labels, no dropout). The network receives a condition by its family's keyword
(igsm.families.Family.condition_keyword; igsm.models.condition_inputs).

Classifier-free guidance (:func:`guided`): ε̂ = ε̂(x, t, ∅) + w·(ε̂(x, t, c) − ε̂(x, t, ∅)), w the
sampler setting ``guidance_scale`` (1: the conditional prediction alone, no unconditional pass).
"""

from __future__ import annotations

# torch is imported inside the methods: the config checks read the registry while the workflow
# builds its DAG, which must not pay torch's import.

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from igsm.registry import registered_twice

if TYPE_CHECKING:
    import torch

NONE = "none"  # conditioning.kind of an unconditional experiment


@dataclass(frozen=True)
class ClassLabels:
    """Class labels 0..num_classes−1, the null label ``num_classes``."""

    num_classes: int
    drop_prob: float = 0.1
    kind = "class"

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"conditioning.num_classes: {self.num_classes}, must be ≥ 1")
        if not 0 <= self.drop_prob < 1:
            raise ValueError(f"conditioning.drop_prob: {self.drop_prob}, must be in [0, 1)")

    @property
    def null_label(self) -> int:
        return self.num_classes

    def check_labels(self, labels, where: str) -> None:
        """``ValueError`` naming ``where`` (the dataset) if a label is outside 0..num_classes−1."""
        labels = np.asarray(labels)
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"{where}: labels {int(labels.min())}..{int(labels.max())} do not fit "
                             f"conditioning.num_classes {self.num_classes} (labels 0..{self.num_classes - 1})")

    def data_condition(self, labels, device=None) -> torch.Tensor:
        """The images' own labels as the network takes them (pruning; no dropout)."""
        import torch

        return torch.as_tensor(labels, dtype=torch.long).to(device)

    def training_condition(self, labels, generator: torch.Generator, device=None) -> torch.Tensor:
        """The batch's labels, each the null label with probability ``drop_prob`` (one uniform draw
        per image from ``generator``, the step's)."""
        import torch

        labels = self.data_condition(labels, device)
        if self.drop_prob == 0:
            return labels
        drop = torch.rand(len(labels), generator=generator, device=generator.device).to(labels.device)
        return torch.where(drop < self.drop_prob, torch.full_like(labels, self.null_label), labels)

    def sampling_condition(self, seeds, device=None) -> torch.Tensor:
        """The class of the image of seed s: s mod num_classes (every class equally often over
        consecutive seeds, and the label a function of the image's seed alone, like its noise: the
        same at any batch size, shard split or GPU count)."""
        import torch

        return torch.as_tensor(np.asarray(seeds), dtype=torch.long).remainder(self.num_classes).to(device)

    def null_like(self, condition: torch.Tensor) -> torch.Tensor:
        """The unconditional input for each row of ``condition``."""
        import torch

        return torch.full_like(condition, self.null_label)

    def describe(self) -> dict:
        """What the samples' metadata and the FID JSON record."""
        return {"kind": self.kind, "num_classes": self.num_classes, "drop_prob": self.drop_prob,
                "null_label": self.null_label, "sampling_labels": "the image of seed s: class s mod num_classes"}

    def identity(self) -> bytes:
        """Bytes naming the conditioning in training fingerprints."""
        return json.dumps({"kind": self.kind, "num_classes": self.num_classes, "drop_prob": self.drop_prob},
                          sort_keys=True).encode()


_KINDS: dict[str, type] = {}


def register(cls: type) -> type:
    """Add a conditioning kind (a class with the interface above) under ``cls.kind``."""
    if cls.kind == NONE:
        raise ValueError(f"conditioning kind {NONE!r} means unconditional: {cls.__qualname__} needs another name")
    if cls.kind in _KINDS:
        raise registered_twice("conditioning kind", cls.kind, f"the name {cls.kind!r}", _KINDS[cls.kind], cls)
    _KINDS[cls.kind] = cls
    return cls


register(ClassLabels)


def kinds() -> list[str]:
    """The values of ``conditioning.kind``: ``none`` and every registered kind."""
    return [NONE, *_KINDS]


def conditioning_from_settings(settings: dict | None):
    """The conditioning of an experiment's ``conditioning`` section (None: unconditional)."""
    settings = dict(settings or {})
    kind = settings.pop("kind", NONE)
    if kind == NONE:
        return None
    if kind not in _KINDS:
        raise ValueError(f"conditioning.kind: unknown {kind!r}; choose one of {kinds()}")
    import dataclasses

    fields = dataclasses.fields(_KINDS[kind])
    names = [f.name for f in fields]
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in settings]
    unknown = sorted(set(settings) - set(names))
    if missing or unknown:
        key, what = (missing[0], "required") if missing else (unknown[0], "not a key")
        raise ValueError(f"conditioning.{key}: {what} for kind {kind!r} (its keys: {', '.join(names)})")
    return _KINDS[kind](**settings)


def guided(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ε̂_∅ + w·(ε̂_c − ε̂_∅)."""
    return unconditional + scale * (conditional - unconditional)
