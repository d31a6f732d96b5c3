"""Pieces of the training loop checked against their definitions (fast, in process)."""

import copy

import pytest
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


def test_training_options_take_their_defaults_from_the_schema_only():
    """The settings dataclass has exactly the schema's training keys (+ the objective) and no
    defaults of its own: a default changed in one place only, or a key added to one side only,
    fails here (an Euler–Maruyama config once ran DDIM's step count because two copies disagreed)."""
    import dataclasses

    import yaml

    from conftest import REPO
    from igsm.training import TrainingOptions

    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())["$defs"]["training"]
    fields = TrainingOptions.__dataclass_fields__
    assert set(fields) == set(schema["properties"]) | {"objective"}
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in fields.values())
    options = TrainingOptions.from_dict({"num_steps": 3, "objective": {"weights": {"np": 1.0}}})
    for key, spec in schema["properties"].items():
        if "default" in spec:
            assert getattr(options, key) == spec["default"], key
    with pytest.raises(ValueError, match=r"\['objective'\] missing"):
        TrainingOptions.from_dict({"num_steps": 3})
    with pytest.raises(ValueError, match="unknown training setting"):
        TrainingOptions.from_dict({"num_steps": 3, "objective": {}, "lr_typo": 1})
