"""Model families: everything the workflow must know about one kind of network (the paper's
U-Nets and U-ViTs, Sec. 5.1), asked of one registry instead of re-decided in every module.

A family is one module here (``unet.py``, ``uvit.py``) holding a :class:`Family` that it
registers under its name; the config names it (``experiments.<exp>.architecture.family``).
:func:`family_of` is the only place that asks which family a network belongs to; every other
module asks the family it gets for what it needs (how to build or load the network, its image
shape, what pruning keeps, its block graph …).

Importing this package, or a member's module, imports neither torch nor diffusers (members
import them inside their methods): the workflow reads a family's config-level facts (its keys,
its forward process) while it builds the DAG.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from igsm.registry import origin, registered_twice

FAMILY_KEY = "family"  # experiments.<exp>.architecture.family
REST = "rest"  # in a block graph: everything outside the blocks (it always runs, reads the last block)
# Before the config named its family, an architecture without a family's identifying keys was a
# U-Net (diffusers' UNet2DModel takes every key as optional): the migration path keeps that reading.
MIGRATION_DEFAULT = "unet"
# The shipped members by name, imported on first use (each registers itself).
MEMBER_MODULES = {"unet": "igsm.families.unet", "uvit": "igsm.families.uvit", "dit": "igsm.families.dit",
                  "sd-unet": "igsm.families.sd_unet"}
# The families that configs written before architecture.family existed can mean (the migration path).
MIGRATION_FAMILIES = ("unet", "uvit")

_registry: dict[str, "Family"] = {}


@dataclass(frozen=True)
class BlockGraph:
    """Block names in execution order, and for each block the blocks reading its output
    (``REST`` for the last block, whose output the network's head reads): the units that block
    reuse (igsm.reuse, DiP-GO) runs or takes from its cache."""

    names: tuple[str, ...]
    consumers: dict[str, tuple[str, ...]]


def chain_consumers(names: list[str]) -> dict[str, list[str]]:
    """Consumers of blocks that run one after another (each feeds the next, the last ``REST``)."""
    consumers = {name: [] for name in names}
    for producer, consumer in zip(names, names[1:]):
        consumers[producer].append(consumer)
    consumers[names[-1]].append(REST)
    return consumers


class Family:
    """One kind of network. Class attributes describe the config, methods the networks.

    The interface: a member implements network_class, owns, load_pretrained, pruning_plan and
    block_graph (the base raises NotImplementedError naming the family and the method, so a
    partial member, e.g. a test's toy family, fails where it is first used), and a conditional
    one condition_keyword and example_condition; the other methods have defaults.

    name: the value of ``architecture.family`` that selects it.
    title: its name in messages ("U-Net").
    class_name: its network's class, as a checkpoint's architecture.json records it ("class").
    description: which networks it covers, for errors that list the families.
    size_key, channel_keys: the architecture keys giving the image side and the image channels
        (input, then output where the network has both).
    key_defaults: the network's own defaults for size_key and channel_keys a config leaves out
        (None: no default, nothing to check).
    identifying_keys: architecture keys that only this family takes: a config naming another
        family with one of them is an error, and the migration path (no ``family``) reads them.
    process: the forward process (igsm.diffusion: "ddpm" or "vpsde") its released checkpoints
        were trained with, and process_reason the sentence saying so in errors.
    pretrained_help: what ``dense.pretrained`` takes for this family (schema and errors).
    pretrained_needs_architecture: its pretrained weights carry no config (a plain state dict),
        so loading them needs the experiment's architecture.
    pretrained_folders: ``dense.pretrained`` may be a local model folder (a diffusers one, or one
        written by this workflow), whose declared network is checked against the experiment before
        any job.
    """

    name: str = ""
    title: str = ""
    class_name: str = ""
    description: str = ""
    size_key: str = ""
    channel_keys: tuple[str, ...] = ()
    key_defaults: dict = {}
    identifying_keys: tuple[str, ...] = ()
    process: str = ""
    process_reason: str = ""
    pretrained_help: str = ""
    pretrained_needs_architecture: bool = False
    pretrained_folders: bool = False
    # Settings of the forward process (the experiment's 'diffusion' keys) its released checkpoints
    # learned beyond ``process``: a pretrained teacher is finetuned and sampled on them (SD's β).
    pretrained_diffusion: dict = {}
    condition_kinds: tuple[str, ...] = ()  # the conditioning kinds (igsm.conditioning) its networks take
    # The architecture key giving the rows of a class embedding that holds the classes and the null
    # label (num_classes + 1; unset or 0: unconditional), checked by the default conditioning_errors.
    class_slots_key: str | None = None

    def network_arguments(self, architecture: dict) -> dict:
        """The network class's keyword arguments: the config's architecture without ``family``."""
        return {k: v for k, v in architecture.items() if k != FAMILY_KEY}

    def network_class(self):
        """The class whose keyword arguments are the architecture (imports torch)."""
        raise NotImplementedError(f"model family {self.name!r} does not implement network_class()")

    def owns(self, net) -> bool:
        """Whether ``net`` (a network instance) is of this family."""
        raise NotImplementedError(f"model family {self.name!r} does not implement owns()")

    def build(self, architecture: dict):
        """A freshly initialised network from the config's architecture."""
        return self.network_class()(**self.network_arguments(architecture))

    def pretrained_errors(self, key: str, pretrained: str) -> list[str]:
        """What the config alone shows wrong with ``dense.pretrained`` (``key``: the experiment's
        dotted key) for this family: a missing file or folder, a checkpoint of another family."""
        return []

    def load_pretrained(self, source: str, architecture: dict, cache_dir):
        """The dense teacher from ``dense.pretrained`` (``source``); ``cache_dir`` keeps downloads.
        ``ValueError``/``RuntimeError`` naming the key and what to do. (A folder written by this
        workflow, where ``pretrained_folders``, igsm.models.load_pretrained loads itself.)"""
        raise NotImplementedError(f"model family {self.name!r} does not implement load_pretrained()")

    def image_shape(self, net) -> tuple[int, int, int]:
        """(channels, height, width) of the images ``net`` takes, from its config."""
        config = net.config
        size = config[self.size_key]
        return config[self.channel_keys[0]], size, size

    def pruning_plan(self, model) -> dict:
        """What torch-pruning must keep and how widths stay consistent: ``ignored_layers``,
        ``num_heads``, ``unwrapped_parameters``, ``sync_widths`` (called after pruning) and
        optionally ``pruning_ratio_dict`` (channel ratio → per-layer ratios)."""
        raise NotImplementedError(f"model family {self.name!r} does not implement pruning_plan()")

    def block_graph(self, net) -> BlockGraph:
        """The network's blocks for block reuse, with the blocks reading each one's output."""
        raise NotImplementedError(f"model family {self.name!r} does not implement block_graph()")

    def condition_keyword(self, net) -> str | None:
        """The keyword by which ``net``'s forward takes its condition; None: ``net`` is unconditional."""
        return None

    def example_condition(self, net, device):
        """A condition for a batch of one, to trace ``net`` (pruning, MAC counts); None if unconditional."""
        return None

    def conditioning_errors(self, key: str, architecture: dict, conditioning) -> list[str]:
        """What the config alone shows wrong between the architecture (None: not in the config, a
        pretrained network's) and ``conditioning`` (an igsm.conditioning kind's object, None if
        unconditional); ``key``: the experiment's key."""
        if conditioning is not None and conditioning.kind not in self.condition_kinds:
            takes = ", ".join(self.condition_kinds) or "none"
            return [f"{key}.conditioning.kind: {conditioning.kind!r}, but the {self.title} family's networks "
                    f"take no such condition (conditioning kinds they take: {takes})"]
        if self.class_slots_key is None or architecture is None:
            return []
        slots = architecture.get(self.class_slots_key)
        if conditioning is None and not slots:
            return []
        if conditioning is None:
            return [f"{key}.architecture.{self.class_slots_key}: {slots} makes a class-conditional {self.title}, "
                    f"but {key}.conditioning.kind is none (set kind: class and num_classes: {slots - 1})"]
        if conditioning.kind == "class" and slots != conditioning.num_classes + 1:
            given = "unset" if slots is None else slots
            return [f"{key}.architecture.{self.class_slots_key}: {given}, but conditioning.num_classes "
                    f"{conditioning.num_classes} needs {conditioning.num_classes + 1} (the classes and the null "
                    f"label of classifier-free guidance)"]
        return []

    def restore_computed_buffers(self, net, device) -> None:
        """Recompute, on ``device``, the buffers a network computes at construction and its
        checkpoint does not hold (non-persistent ones): igsm.models.load_model builds the skeleton
        on the meta device, where they hold no values. None by default."""

    def width_attributes(self) -> dict:
        """{module type: attribute names}: the static widths a checkpoint records for each layer
        of this family beyond the ones every network has (igsm.models.layer_widths)."""
        return {}


def register(family: Family) -> Family:
    """Add ``family`` to the registry under ``family.name`` (a member module calls it on import)."""
    if not family.name:
        raise ValueError(f"{type(family).__name__}: a family needs a name")
    shipped = MEMBER_MODULES.get(family.name) == type(family).__module__
    # A plugin's family is checked against every shipped member too (imported here, torch-free).
    for other in list(_registry.values()) if shipped else families():
        same_class = bool(family.class_name) and other.class_name == family.class_name
        if other.name == family.name or same_class:
            what = (f"the name {family.name!r}" if other.name == family.name else
                    f"the network class {family.class_name!r} (a checkpoint names its family by it)")
            raise registered_twice("model family", family.name, what, other, family)
    _registry[family.name] = family
    return family


def names() -> list[str]:
    """Every family's name: the shipped members and any registered since."""
    return sorted({*MEMBER_MODULES, *_registry})


def family_named(name: str) -> Family:
    """The family called ``name``; ``ValueError`` listing the valid names otherwise."""
    if name not in _registry and name in MEMBER_MODULES:
        importlib.import_module(MEMBER_MODULES[name])
    if name not in _registry:
        raise ValueError(f"unknown model family {name!r}; valid families: {', '.join(names())}")
    return _registry[name]


def families() -> list[Family]:
    """Every family, each member module imported."""
    return [family_named(name) for name in names()]


def family_of(net) -> Family:
    """The family of a network instance: the one place that asks. ``ValueError`` if none owns it."""
    owners = [family for family in families() if family.owns(net)]
    if len(owners) != 1:
        known = "; ".join(f"{f.name}: {f.description}" for f in families())
        what = "is of no model family" if not owners else \
            f"is claimed by several families ({', '.join(f.name for f in owners)})"
        raise ValueError(f"{type(net).__name__} {what}; known families: {known}")
    return owners[0]


def family_of_class(class_name: str) -> Family | None:
    """The family whose network class is ``class_name`` (a checkpoint's "class"), or None."""
    return next((f for f in families() if f.class_name == class_name), None)


def family_of_architecture(architecture: dict) -> Family:
    """The family a config's architecture names (``family``); without that key, the one its keys
    imply (:func:`assumed_family`, the migration path: igsm.config warns where it is taken)."""
    if FAMILY_KEY in architecture:
        return family_named(architecture[FAMILY_KEY])
    return assumed_family(architecture)


def assumed_family(architecture: dict) -> Family:
    """The family that configs written before ``architecture.family`` existed meant: the one
    whose image-size key the architecture has (U-ViT: ``img_size``), else a U-Net."""
    found = [family_named(name) for name in MIGRATION_FAMILIES
             if name != MIGRATION_DEFAULT and family_named(name).size_key in architecture]
    return found[0] if found else family_named(MIGRATION_DEFAULT)


def contradicting_keys(family: Family, architecture: dict) -> dict[str, list[str]]:
    """{other family's name: its identifying keys present} for an architecture naming ``family``."""
    present = {}
    for other in families():
        keys = [k for k in other.identifying_keys if k in architecture and k not in family.identifying_keys]
        if other is not family and keys:
            present[other.name] = keys
    return present
