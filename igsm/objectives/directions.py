"""Probe directions v̂ for the Jacobian terms (paper App. E): Gaussian, orthonormalised per sample;
OTD, evolved along the teacher's Jacobian (Eq. 26–27); or a user's callable.

Each kind is called as ``directions(x_t, t, generator, teacher)`` and returns a (k, B, ...) tensor,
and has ``for_global_batch(rows, global_batch)``: the same directions for a process that holds only
``rows`` of a global batch (several processes, igsm.training), so that sample i gets the same
directions whatever the number of processes.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor

from igsm.objectives.products import JVP

OTD_DEFAULTS = {"dt": 0.01, "steps": 1, "prob": 0.5}


def orthonormalize(directions: Tensor) -> Tensor:
    """Orthonormal frame per sample for directions of shape (k, B, ...); v/‖v‖ when k = 1.

    Gram–Schmidt through QR with the signs of diag(R) made positive, so that the first direction
    keeps the orientation of the first input and k = 1 reduces to plain normalisation.
    """
    k, batch = directions.shape[:2]
    if k == 1:
        norm = directions.flatten(2).norm(dim=2).view(1, batch, *[1] * (directions.ndim - 2))
        return directions / norm
    work = torch.promote_types(directions.dtype, torch.float32)  # QR has no bf16/fp16 kernels
    q, r = torch.linalg.qr(directions.flatten(2).permute(1, 2, 0).to(work))  # (B, n, k)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q.permute(2, 0, 1).reshape(directions.shape).to(directions.dtype)


def otd_step(directions: Tensor, jacobian_products: Tensor, dt: float) -> Tensor:
    """One Forward-Euler step of dV/dt = JV − V VᵀJV (App. E, Eq. 25/27), re-orthonormalised.

    ``directions`` V and ``jacobian_products`` JV have shape (k, B, ...); VᵀJV is the per-sample
    k×k matrix of v_iᵀ J v_j (the scalar v̂ᵀJv̂ when k = 1).
    """
    v, jv = directions.flatten(2), jacobian_products.flatten(2)
    overlap = torch.einsum("ibn,jbn->bij", v, jv)
    v_overlap = torch.einsum("ibn,bij->jbn", v, overlap)
    return orthonormalize(directions + dt * (jacobian_products - v_overlap.view_as(directions)))


# ---------------------------------------------------------------------------------------------
# Directions: each returns a (k, B, ...) tensor.


class GaussianDirections:
    """v ~ N(0, I) per sample, the k directions orthonormalised (Eq. 9: v̂ = v/‖v‖)."""

    needs_teacher = False

    def __init__(self, num_directions: int = 1):
        self.num_directions = num_directions
        self.rows: slice | None = None  # global-batch mode: this process's rows of the batch drawn
        self.global_batch: int | None = None

    def for_global_batch(self, rows: slice, global_batch: int) -> "GaussianDirections":
        """Draws for the whole global batch and keeps ``rows``: the generator is seeded alike on
        every process, so each process draws the same global batch of directions."""
        mode = GaussianDirections(self.num_directions)
        mode.rows, mode.global_batch = rows, global_batch
        return mode

    def __call__(self, x, t, generator, teacher=None):
        if self.global_batch is None:
            v = torch.randn((self.num_directions, *x.shape), generator=generator, device=x.device,
                            dtype=x.dtype)
            return orthonormalize(v)
        if x.shape[0] != self.rows.stop - self.rows.start:
            raise ValueError("jacobian_fraction < 1 is not supported with several processes")
        v = torch.randn((self.num_directions, self.global_batch, *x.shape[1:]), generator=generator,
                        device=x.device, dtype=x.dtype)
        return orthonormalize(v[:, self.rows])


class OTDDirections:
    """Gaussian directions evolved along the dense teacher's Jacobian (App. E, Eq. 26–27)."""

    needs_teacher = True

    def __init__(self, num_directions: int = 1, dt: float = 0.01, steps: int = 1,
                 prob: float = 0.5, jvp_method: str = "forward"):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"otd.prob: {prob} is outside [0, 1]")
        if steps < 0:
            raise ValueError(f"otd.steps: {steps} is negative")
        self.initial = GaussianDirections(num_directions)
        self.dt, self.steps, self.prob = dt, steps, prob
        self.jacobian = JVP(jvp_method)  # J_D v̂: a forward product whatever the loss projection

    def for_global_batch(self, rows: slice, global_batch: int) -> "OTDDirections":
        """The initial directions drawn for the global batch; each sample's own are then evolved
        along the teacher's Jacobian at that sample, which needs only this process's rows."""
        mode = copy.copy(self)
        mode.initial = self.initial.for_global_batch(rows, global_batch)
        return mode

    def __call__(self, x, t, generator, teacher=None):
        directions = self.initial(x, t, generator)
        # Always drawn, so the generator advances the same way whether OTD applies or not.
        apply = torch.rand((), generator=generator, device=x.device).item() < self.prob
        for _ in range(self.steps if apply else 0):
            _, products = self.jacobian.teacher(teacher, x, t, list(directions))
            directions = otd_step(directions, torch.stack(products), self.dt)
        return directions


class CallableDirections:
    """User-supplied ``fn(x_t, t, generator) -> Tensor`` of shape (k, *x_t.shape) or x_t.shape."""

    needs_teacher = False

    def __init__(self, fn: Callable, num_directions: int = 1):
        self.fn, self.num_directions = fn, num_directions

    def for_global_batch(self, rows: slice, global_batch: int) -> "CallableDirections":
        """Unchanged: the callable gets this process's rows and draws what it likes."""
        return self

    def __call__(self, x, t, generator, teacher=None):
        v = self.fn(x, t, generator)
        if v.shape == x.shape:
            v = v.unsqueeze(0)
        if v.shape != (self.num_directions, *x.shape):
            raise ValueError(f"directions: the callable returned shape {tuple(v.shape)}; expected "
                             f"{(self.num_directions, *x.shape)} (num_directions, *x_t.shape)")
        return v


