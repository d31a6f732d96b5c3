"""Pieces of the training loop checked against their definitions (fast, in process)."""

import copy

import torch

from igsm.training import _update_ema


def test_ema_update_is_decay_times_old_plus_rest_times_new():
    """e ← decay·e + (1 − decay)·p for every parameter (an inverted weight would make the 'EMA'
    nearly the last iterate and silently worsen every FID)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Conv2d(3, 4, 3))
    ema = copy.deepcopy(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    before = [e.detach().clone() for e in ema.parameters()]
    _update_ema(ema, net, 0.9)
    for old, new, p in zip(before, ema.parameters(), net.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * p.detach())
    assert all(not e.requires_grad or e.grad is None for e in ema.parameters())
