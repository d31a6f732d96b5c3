"""The registry of block-reuse methods (DiP-GO and its baselines; README "Block reuse at sampling
time"): what each method is at the config's level and how it makes its gate table. The config
schema's ``reuse.methods`` enum (filled from :data:`METHODS` when igsm.config loads the schema),
the CLI's ``reuse-plan --method`` and the workflow all read this registry; a new method is one
:class:`ReuseMethod` registered here (or in a module of its own that calls :func:`register`).

Importing this module does not import torch: the workflow builds its jobs from it. A member
imports the plan code (igsm.reuse) only when it makes a plan.
"""

from __future__ import annotations

import math

from igsm.registry import origin, registered_twice


class ReuseMethod:
    """One block-reuse method. ``mac_fraction`` is the share of the dense sampler's MACs still
    executed (1 = dense), averaged over the sampling steps, as everywhere in igsm.reuse."""

    name: str = ""
    # Learns its gate table (DiP-GO's pruner, with the 'reuse.learn' settings) instead of following a rule.
    learns: bool = False
    # No gate table: the variant samples with fewer sampler steps instead (sampler_steps).
    alters_sampler_steps: bool = False

    def sampler_steps(self, num_steps: int, mac_fraction: float) -> int:
        """The sampler steps a variant of this method samples with, out of the config's ``num_steps``."""
        return num_steps

    def plan(self, net, mac_fraction: float, options: dict, schedule, learn: dict, device="cpu"):
        """The gate table (igsm.reuse.ReusePlan) for the sampler of the 'sample' settings
        ``options``; ``learn``: the 'reuse.learn' settings (read by methods that learn)."""
        raise ValueError(f"reuse method {self.name!r} makes no gate table"
                         + (": it samples with fewer sampler steps" if self.alters_sampler_steps else ""))


class DipGo(ReuseMethod):
    """DiP-GO (Zhu et al., NeurIPS 2024): a pruner trained on the sampler's own chains, its scores
    thresholded to the target (igsm.reuse.learn_plan, plan_from_scores)."""

    name = "dipgo"
    learns = True

    def plan(self, net, mac_fraction, options, schedule, learn, device="cpu"):
        from igsm.models import image_shape
        from igsm.reuse import learn_plan
        from igsm.sampling import guidance_from_settings, sampler_kwargs

        # A conditional model's chains as the sample stage runs them: each seed's condition, guided.
        conditioning, guidance_scale = guidance_from_settings(options)
        guidance = {} if conditioning is None else {"conditioning": conditioning, "guidance_scale": guidance_scale}
        return learn_plan(net, sampler=options["sampler"], schedule=schedule, image_shape=image_shape(net),
                          mac_fraction=mac_fraction, device=device, latents=bool(options.get("latents")),
                          **guidance, **sampler_kwargs(options), **learn)


class DeepCache(ReuseMethod):
    """DeepCache (Ma et al., CVPR 2024): a full step every k steps, only the outermost blocks in
    between; the smallest k meeting the fraction (igsm.reuse.deepcache_plan)."""

    name = "deepcache"

    def plan(self, net, mac_fraction, options, schedule, learn, device="cpu"):
        from igsm.reuse import deepcache_plan, rule_plan_inputs

        return deepcache_plan(*rule_plan_inputs(net, options, schedule), mac_fraction=mac_fraction)


class ReuseEps(ReuseMethod):
    """The whole noise prediction of the previous step reused at evenly spread steps
    (igsm.reuse.reuse_eps_plan)."""

    name = "reuse-eps"

    def plan(self, net, mac_fraction, options, schedule, learn, device="cpu"):
        from igsm.reuse import reuse_eps_plan, rule_plan_inputs

        return reuse_eps_plan(*rule_plan_inputs(net, options, schedule), mac_fraction=mac_fraction)


class FewerSteps(ReuseMethod):
    """The "fewer DDIM steps" baseline: the most steps whose MACs are ≤ ``mac_fraction`` of
    ``num_steps`` dense steps (every step costs the same)."""

    name = "fewer-steps"
    alters_sampler_steps = True

    def sampler_steps(self, num_steps, mac_fraction):
        if not 0 < mac_fraction <= 1:
            raise ValueError(f"mac_fraction {mac_fraction} must lie in (0, 1]")
        steps = math.floor(num_steps * mac_fraction + 1e-9)
        if steps < 1:
            raise ValueError(f"{mac_fraction} of {num_steps} sampler steps is less than one step")
        return steps


METHODS: dict[str, ReuseMethod] = {}


def register(method: ReuseMethod) -> ReuseMethod:
    """Add ``method`` under its name; a ValueError naming both members where the name is taken."""
    if not method.name:
        raise ValueError(f"reuse method {origin(method)}: needs a name")
    if method.name in METHODS:
        raise registered_twice("reuse method", method.name, f"the name {method.name!r}", METHODS[method.name], method)
    METHODS[method.name] = method
    return method


for _method in (DipGo(), DeepCache(), ReuseEps(), FewerSteps()):
    register(_method)


def get(name: str, key: str = "reuse.methods") -> ReuseMethod:
    """The registered method ``name``; a ValueError naming ``key`` otherwise."""
    if name not in METHODS:
        raise ValueError(f"{key}: unknown reuse method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def make_plan(net, name: str, mac_fraction: float, options: dict, schedule, learn: dict, device="cpu"):
    """The gate table of method ``name`` at ``mac_fraction`` for the sampler of the 'sample'
    settings ``options``, its target and sampler recorded in its metadata."""
    plan = get(name, "--method").plan(net, mac_fraction, options, schedule, learn, device)
    plan.metadata.update(target_mac_fraction=mac_fraction, sampler=options["sampler"],
                         num_steps=options["num_steps"])
    return plan


def plan_methods() -> list[str]:
    """The methods that make a gate table (``igsm reuse-plan --method``)."""
    return [name for name, method in METHODS.items() if not method.alters_sampler_steps]
