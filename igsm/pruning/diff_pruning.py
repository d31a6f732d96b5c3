"""Diff-Pruning (Fang et al. 2023) as used by IGSM (Sec. 5.1, App. B.1): channels ranked by a
first-order Taylor importance whose gradients are accumulated over the informative timesteps only,
and the baselines of Diff-Pruning's ablation (``taylor``, ``magnitude``, ``random``, ``reinit`` =
train the pruned architecture from scratch), each a criterion of this one pruning method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from igsm.pruning.methods import PruningMethod, register

if TYPE_CHECKING:  # imported where pruning runs: the workflow reads this method's names without torch
    import torch
    from torch import nn

    from igsm.diffusion import NoiseSchedule

CRITERIA = ("diff-pruning", "taylor", "magnitude", "random", "reinit")
GRADIENT_CRITERIA = ("diff-pruning", "taylor")  # criteria whose importance reads accumulated gradients


def criterion_importance(criterion: str):
    """torch-pruning's importance of a one-shot criterion (see :func:`prune`)."""
    import torch_pruning as tp

    return {
        "diff-pruning": lambda: tp.importance.TaylorImportance(multivariable=False),
        "taylor": lambda: tp.importance.TaylorImportance(multivariable=True),
        "magnitude": lambda: tp.importance.MagnitudeImportance(p=2),
        "random": lambda: tp.importance.RandomImportance(),
        "reinit": lambda: tp.importance.MagnitudeImportance(p=2),
    }[criterion]()


def prune(net: nn.Module, *, criterion: str, channel_ratio: float, images: torch.Tensor,
          schedule: NoiseSchedule, thr: float = 0.05, seed: int = 0,
          condition: torch.Tensor | None = None) -> tuple[nn.Module, dict]:
    """Prune a copy of ``net`` with a Diff-Pruning criterion; ``net`` itself (the dense teacher) is
    left untouched (igsm.pruning.structural.prune_with_importance: local pruning at
    ``channel_ratio``, every criterion giving the same widths).

    ``images`` is one batch of training images x0 in [-1, 1] (N, C, H, W): the gradient data
    of ``diff-pruning``/``taylor`` and, for every criterion, the input shape used for tracing
    and counting. Criteria (Diff-Pruning's ``ddpm_prune.py``):

    * ``diff-pruning``: Σ|w·∂L/∂w| per channel (TaylorImportance, multivariable=False) with the
      noise-prediction loss L_t = ‖ε̂(x_t, t) − ε‖² (summed over pixels, averaged over the batch)
      accumulated for t = 0, 1, 2, … on the whole batch with one fixed noise draw, stopping after
      the first t whose loss is below ``thr`` × the largest loss so far (``thr=0``: all T steps).
    * ``taylor``: |Σ w·∂L/∂w| (multivariable=True), the same loop over all T timesteps without
      early stopping, as in Diff-Pruning's ablation.
    * ``magnitude``: L2 norm of the channel's weights (MagnitudeImportance, p=2).
    * ``random``: uniform random scores drawn from a generator seeded by ``seed``.
    * ``reinit``: the magnitude architecture with all weights re-initialised (seeded): the
      train-from-scratch baseline.

    ``condition``: the images' conditions, for a conditional network (the gradient criteria's loss).
    """
    from igsm.pruning.structural import prune_with_importance, seeded

    if criterion not in CRITERIA:
        raise ValueError(f"criterion: unknown {criterion!r}; valid criteria are {', '.join(CRITERIA)}")
    if not 0.0 <= thr <= 1.0:
        raise ValueError(f"thr: {thr} is outside [0, 1]")

    def gradient_phase(model, batch) -> dict:
        losses = []
        if criterion in GRADIENT_CRITERIA:
            losses = _accumulate_noise_prediction_gradients(
                model, batch, schedule, seed=seed, thr=thr if criterion == "diff-pruning" else 0.0,
                condition=condition)
        return {"num_gradient_steps": len(losses), "gradient_losses": losses}

    model, counts = prune_with_importance(net, criterion_importance(criterion), channel_ratio=channel_ratio,
                                          images=images, seed=seed, phase=gradient_phase)
    if criterion == "reinit":
        with seeded(seed, next(model.parameters()).device):
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    return model, {"criterion": criterion, "channel_ratio": channel_ratio, "seed": seed, "thr": thr, **counts}


def _accumulate_noise_prediction_gradients(model, images, schedule, *, seed, thr, condition=None) -> list[float]:
    """Backpropagate L_t for t = 0, 1, … into ``.grad``; stop after L_t < thr·max L (thr>0)."""
    import torch
    from tqdm import tqdm

    from igsm.models import conditioned, predict_noise

    model_of_images = conditioned(model, condition)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype).to(images.device)
    losses, loss_max = [], 0.0
    steps = tqdm(range(schedule.num_steps), desc="pruning gradients", unit="t", leave=False)
    for t in steps:
        timesteps = torch.full((images.shape[0],), t, dtype=torch.long, device=images.device)
        x_t = schedule.add_noise(images, noise, timesteps)
        loss = (predict_noise(model_of_images, x_t, timesteps) - noise).square().sum(dim=(1, 2, 3)).mean()
        loss.backward()
        losses.append(loss.item())
        loss_max = max(loss_max, losses[-1])
        # Diff-Pruning's rationale: timesteps whose loss is a small fraction of the peak add
        # noise rather than information to the Taylor scores, so the expansion stops there.
        if losses[-1] < thr * loss_max:
            break
    steps.close()
    return losses


class DiffPruning(PruningMethod):
    """The pruning method of the IGSM paper; its criteria are Diff-Pruning's and its ablation's."""

    name = "diff-pruning"
    criteria = CRITERIA

    def prune(self, net, images, *, criterion, channel_ratio, settings, schedule, conditioning, folder, device):
        import torch

        from igsm.data import to_model_range

        generator = torch.Generator().manual_seed(settings.seed)
        pick = torch.randperm(len(images), generator=generator)[: settings.num_images]
        x0 = to_model_range(images[pick.numpy()]).to(device)
        condition = (None if conditioning is None else
                     conditioning.for_data(images).data_condition(images.labels[pick.numpy()], device))
        return prune(net.to(x0.device), criterion=criterion, channel_ratio=channel_ratio, images=x0,
                     # Diff-Pruning walks integer steps: a VP-SDE's at t = k/999.
                     schedule=schedule.integer_steps(), thr=settings.thr, seed=settings.seed, condition=condition)


register(DiffPruning())
