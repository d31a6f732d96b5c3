"""The loss terms (paper Eq. 7–9): small swappable objects reading a shared :class:`Probe`, each
declaring what it needs (the teacher's output, the Jacobian products) and returning a per-sample
loss summed over pixels.

Beside the paper's ``jm2`` two scale-free variants, *not the paper's formula* (issue 20): the
teacher's directional expansion a = ‖P_D v̂‖² is ~2000 at t = 0 and ~1 beyond t = 500 (NOTES §1), so
(a − b)² puts almost all of jm2's weight on the smallest timesteps. ``jm2_log`` compares
log a and log b (the finite-time Lyapunov exponent is itself a log of the stretching ratio) and
``jm2_rel`` the relative difference (a − b)/a; both are 0 exactly where jm2 is, and their size no
longer grows with a.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from igsm.objectives.products import sq_norm

NAMES = ("np", "kd", "jm1", "jm2", "jm2_log", "jm2_rel")


# ---------------------------------------------------------------------------------------------
# Terms: small swappable losses reading a shared Probe, each returning a per-sample loss.


@dataclass
class Probe:
    """What the terms read, computed once per call and shared between them.

    ``student`` keeps its graph to the student's parameters; ``teacher`` and ``teacher_products``
    hold no graph. Products are lists over directions, for the batch rows ``rows`` (None: all).
    """

    noise: Tensor
    student: Tensor
    teacher: Tensor | None = None
    student_products: list[Tensor] = field(default_factory=list)
    teacher_products: list[Tensor] = field(default_factory=list)
    directions: Tensor | None = None
    rows: Tensor | None = None
    # Mixed partials only: the Jacobian terms' detached values and the per-sample surrogate whose
    # parameter gradient is theirs (weights included), for the rows ``rows``.
    jacobian_values: dict = field(default_factory=dict)
    surrogate: Tensor | None = None


class NoisePrediction:
    """L_NP = ‖s(x_t, t) − ε‖² (Eq. 7): the DDPM loss."""

    needs_teacher, needs_teacher_output, needs_jacobian = False, False, False

    def __call__(self, probe: Probe) -> Tensor:
        return sq_norm(probe.student - probe.noise)


class Distillation:
    """L_KD = ‖s(x_t, t) − s_D(x_t, t)‖² (Eq. 7): output-level knowledge distillation."""

    needs_teacher, needs_teacher_output, needs_jacobian = True, True, False

    def __call__(self, probe: Probe) -> Tensor:
        return sq_norm(probe.student - probe.teacher)


class FirstOrderJacobianMatching:
    """Projected ‖J − J_D‖² (Eq. 8, Table 3): mean over directions of ‖P v̂ − P_D v̂‖²."""

    needs_teacher, needs_teacher_output, needs_jacobian = True, False, True

    def __call__(self, probe: Probe) -> Tensor:
        per_direction = [sq_norm(p - p_dense)
                         for p, p_dense in zip(probe.student_products, probe.teacher_products)]
        return torch.stack(per_direction).mean(0)


class _ExpansionMatching:
    """Mean over directions of ``compare(a, b)`` with a = ‖P_D v̂‖² (teacher), b = ‖P v̂‖² (student);
    each subclass defines ``compare``."""

    needs_teacher, needs_teacher_output, needs_jacobian = True, False, True

    def __call__(self, probe: Probe) -> Tensor:
        per_direction = [self.compare(sq_norm(p_dense), sq_norm(p))
                         for p, p_dense in zip(probe.student_products, probe.teacher_products)]
        return torch.stack(per_direction).mean(0)


class SecondOrderJacobianMatching(_ExpansionMatching):
    """IGSM (Eq. 9, squared as in Eq. 28): mean over directions of (‖P_D v̂‖² − ‖P v̂‖²)²."""

    def compare(self, dense, student):
        return (dense - student).square()


class LogExpansionMatching(_ExpansionMatching):
    """``jm2_log`` (not the paper's formula): (log ‖P_D v̂‖² − log ‖P v̂‖²)². Norms are floored at
    the dtype's smallest normal number, so a zero product gives a large finite loss, not inf/NaN."""

    def compare(self, dense, student):
        tiny = torch.finfo(student.dtype).tiny
        return (dense.clamp_min(tiny).log() - student.clamp_min(tiny).log()).square()


class RelativeExpansionMatching(_ExpansionMatching):
    """``jm2_rel`` (not the paper's formula): ((‖P_D v̂‖² − ‖P v̂‖²) / ‖P_D v̂‖²)²."""

    def compare(self, dense, student):
        return ((dense - student) / dense.clamp_min(torch.finfo(dense.dtype).tiny)).square()


TERMS = {"np": NoisePrediction, "kd": Distillation, "jm1": FirstOrderJacobianMatching,
         "jm2": SecondOrderJacobianMatching, "jm2_log": LogExpansionMatching,
         "jm2_rel": RelativeExpansionMatching}


