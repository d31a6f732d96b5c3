"""The reuse stage (paper Sec. 5.4, DiP-GO and its baselines): a block-reuse gate table for a
model's sampler at a share of the dense sampler's MACs (igsm.reuse_methods)."""

from __future__ import annotations

from igsm import reuse_methods
from igsm.stages.common import StageError, diffusion_of, forward_process, readable_inputs
from igsm.stages.process import device as torch_device, set_threads


def reuse_plan(model_dir, method: str, mac_fraction: float, sample_settings: dict, learn_settings: dict, out,
               picture, device: str, threads: int | None) -> str:
    """The gate table of ``method`` for the sampler of ``sample_settings`` (+ 'diffusion') at
    ``mac_fraction``, into ``out`` (and a PNG of it into ``picture``): DiP-GO learns it on the
    sampler's own chains (``learn_settings``: 'reuse.learn'); deepcache and reuse-eps follow a rule."""
    from igsm.models import load_model

    set_threads(threads)
    device = torch_device(device)
    with readable_inputs():
        net = load_model(model_dir, device)
    try:
        plan = reuse_methods.make_plan(net, method, mac_fraction, sample_settings,
                                       forward_process(diffusion_of(sample_settings)), learn_settings, device=device)
    except ValueError as err:
        raise StageError(str(err)) from None
    if picture:
        from igsm.plots import plot_reuse_plan

        plot_reuse_plan(plan, picture)
    plan.save(out)
    return f"{out}: {method}, {plan.mac_fraction():.4f} of the dense MACs executed (target {mac_fraction})"
