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


# ---- the real loop, in process, on the tiny U-Net (conftest.TINY_ARCHITECTURE) ----------------

def _finetune(folder, teacher, **settings):
    """Finetune the tiny student against ``teacher`` with the loop itself (NP + KD + jm1 + jm2, a
    metrics line every step): (metrics without wall-clock fields, sha256 of the student's weights)."""
    import hashlib

    import numpy as np

    from conftest import TINY_ARCHITECTURE, metrics_without_wall_clock
    from igsm.models import build_unet
    from igsm.training import TrainingOptions, _hash_tensors, train

    torch.manual_seed(0)
    student = build_unet(TINY_ARCHITECTURE)
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 1), dtype=np.uint8)
    options = TrainingOptions.from_dict({
        "objective": {"weights": {"np": 1.0, "kd": 1.0, "jm1": 0.1, "jm2": 0.1}}, "num_steps": 3,
        "batch_size": 4, "lr": 1e-3, "log_every": 1, "checkpoint_every": 100, **settings})
    train(student, images, options, folder / "ck", folder / "metrics.jsonl", teacher=teacher)
    digest = hashlib.sha256()
    _hash_tensors(digest, student.state_dict())
    return metrics_without_wall_clock(folder / "metrics.jsonl"), digest.hexdigest()


def test_the_teachers_dropout_never_reaches_the_kd_and_jacobian_targets(tmp_path):
    """The dense teacher is a fixed function while a student is finetuned (Sec. 4, Eq. 7: the KD
    target s_D and J_D·v are the dense model's): the loop puts it in eval mode. The paper's CIFAR-10
    and Fashion-MNIST teachers have dropout 0.1 (App. B, Table 6), so finetuning against such a
    teacher, handed over in train mode, must give bitwise the losses (kd, jm1, jm2 per step) and
    weights of finetuning against the same weights without dropout.
    Catches the teacher left in train mode (`.eval()` dropped where the loop prepares it): every KD
    target and J_D·v would carry dropout noise, a silent bias in every KD/IGSM FID."""
    from conftest import TINY_ARCHITECTURE
    from igsm.models import build_unet

    torch.manual_seed(1)
    with_dropout = build_unet({**TINY_ARCHITECTURE, "dropout": 0.1})
    without_dropout = build_unet(TINY_ARCHITECTURE)
    without_dropout.load_state_dict(with_dropout.state_dict())
    # The test can fail: in train mode this teacher's output does depend on its dropout masks.
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    with torch.no_grad():
        assert not torch.equal(with_dropout.train()(x, t).sample, without_dropout.train()(x, t).sample)

    records, weights = _finetune(tmp_path / "dropout", with_dropout.train())
    expected_records, expected_weights = _finetune(tmp_path / "plain", without_dropout.train())
    assert all(r["kd"] > 0 and r["jm1"] > 0 and r["jm2"] > 0 for r in records)
    terms = ("loss", "kd", "jm1", "jm2")
    assert [{k: r[k] for k in terms} for r in records] == [{k: r[k] for k in terms} for r in expected_records], \
        "the teacher's dropout changed the KD/Jacobian targets: is the teacher in train mode?"
    assert weights == expected_weights, "the teacher's dropout changed the finetuned weights"


def test_learning_rate_of_the_first_steps_follows_the_warm_up(tmp_path):
    """Linear warm-up: step s (counted from 0) trains at lr·min(1, (s+1)/warmup_steps), so step 0
    already learns and step warmup_steps − 1 reaches the full rate; the metrics log the rate of
    each step. Catches a warm-up starting at 0 (s/warmup_steps: a wasted first step and every
    warm-up step one notch low) and one that ends a step late or early."""
    lr, warmup_steps = 1e-3, 3
    records, _ = _finetune(tmp_path, None, objective={"weights": {"np": 1.0}}, num_steps=5,
                           lr=lr, warmup_steps=warmup_steps)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["lr"] for r in records] == pytest.approx([lr / 3, 2 * lr / 3, lr, lr, lr], rel=1e-12)
