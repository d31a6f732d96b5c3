"""Gradient-flow pruning (issue 16; "Pruning for Sparse Diffusion Models based on Gradient Flow",
arXiv 2501.09464; a reconstruction, README "Gradient-flow pruning"): the pruning method. Its
machinery, soft channel masks moved along the gradient flow and the hard prune by them, is
igsm/pruning/soft_masks.py, imported when it runs: the workflow reads this method's names and
settings key without torch.
"""

from __future__ import annotations

from igsm.pruning.methods import PruningMethod, register


class GradientFlow(PruningMethod):
    """Gradient-flow pruning (settings 'prune.gradient_flow'): a short training run of the one loop
    under soft masks, resumable from ``<folder>/checkpoints``, then the hard prune by the masks."""

    name = "gradient-flow"
    criteria = ("gradient-flow",)
    settings_key = "gradient_flow"
    report_picture = "masks.png"

    def prune(self, net, images, *, criterion, channel_ratio, settings, schedule, conditioning, folder, device):
        from pathlib import Path

        from igsm.pruning.soft_masks import prune_with_gradient_flow
        from igsm.training import TrainingOptions

        flow = settings.sections[self.settings_key]
        options = TrainingOptions.from_dict({
            "num_steps": flow["num_steps"], "batch_size": flow["batch_size"], "lr": flow["lr"],
            "checkpoint_every": flow["checkpoint_every"], "seed": settings.seed,
            "objective": {"weights": {"np": 1.0}}})
        folder = Path(folder)
        pruned, report = prune_with_gradient_flow(
            net, images, schedule, channel_ratio=channel_ratio, options=options,
            checkpoint_dir=folder / "checkpoints", metrics_path=folder / "flow_metrics.jsonl", r=flow["r"],
            device=device, conditioning=conditioning)
        return pruned, {"criterion": criterion, **report}

    def draw_report(self, report, path):
        """Each group's mask over the flow beside the overall density, and its width before and
        after the hard prune (igsm.plots.plot_flow_masks)."""
        from igsm.plots import plot_flow_masks

        if "gradient_flow" not in report:
            raise ValueError("not a gradient-flow prune report (no 'gradient_flow')")
        plot_flow_masks(report["gradient_flow"], path)


register(GradientFlow())
