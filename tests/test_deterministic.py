"""`training.deterministic`: what it switches on. Its effect (the same bits on a rerun) needs a GPU;
docs/experiments/multi_gpu/run.sh measures it there."""

import os

import numpy as np
import torch

from igsm.diffusion import NoiseSchedule
from igsm.training import TrainingOptions, _use_deterministic_kernels, run_fingerprint


def test_deterministic_kernels_take_the_math_attention_path(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cuda.flash_sdp_enabled(),
             torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())
    try:
        _use_deterministic_kernels()
        # The fused attention kernels' backward passes are not deterministic (seen on 2 H100s).
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()  # an op without one must not end a run
        assert not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        torch.backends.cuda.enable_flash_sdp(saved[3])
        torch.backends.cuda.enable_mem_efficient_sdp(saved[4])
        torch.backends.cuda.enable_cudnn_sdp(saved[5])


def test_switching_it_on_keeps_a_run_resumable():
    """It picks kernels, not the computation: a run started without it resumes with it."""
    net, images = torch.nn.Linear(2, 2), np.zeros((4, 8, 8, 1), np.uint8)
    base = {"num_steps": 10, "objective": {"weights": {"np": 1.0}}}
    plain = TrainingOptions.from_dict(base)
    strict = TrainingOptions.from_dict({**base, "deterministic": True})
    schedule = NoiseSchedule.linear()
    assert run_fingerprint(net, images, plain, None, schedule) == run_fingerprint(net, images, strict, None, schedule)
    other = TrainingOptions.from_dict({**base, "lr": 1e-3})
    assert run_fingerprint(net, images, plain, None, schedule) != run_fingerprint(net, images, other, None, schedule)
