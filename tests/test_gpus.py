"""GPU claims on a machine without a scheduler (igsm.gpus): jobs spread over the GPUs, and a dead
job's claim frees its GPU. The claims are plain files, so this runs without GPUs."""

import subprocess
import sys

import pytest

from igsm import gpus


def test_jobs_spread_over_the_gpus_and_return_when_full(tmp_path):
    sleepers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(3)]
    try:
        picks = [gpus.claim(1, 2, pid=p.pid, folder=tmp_path)[0] for p in sleepers]
        # Least claimed first, ties to the lowest index: 0, 1, then 0 again (a third job shares).
        assert picks == [0, 1, 0]
        # A two-GPU job on a 4-GPU machine next to them takes the two free ones.
        assert gpus.claim(2, 4, pid=sleepers[0].pid, folder=tmp_path) == [2, 3]
    finally:
        for p in sleepers:
            p.kill()
            p.wait()


def test_claims_of_dead_processes_free_their_gpu(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert gpus.claim(1, 2, pid=dead.pid, folder=tmp_path) == [0]
    # The dead job's claim on GPU 0 no longer counts (and is removed).
    assert gpus.claim(1, 2, folder=tmp_path) == [0]
    assert not (tmp_path / f"0-{dead.pid}").exists()


def test_impossible_claims_are_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot claim 3 of 2"):
        gpus.claim(3, 2, folder=tmp_path)


def test_visible_ids_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert gpus.visible_ids(2) == ["2", "3"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpus.visible_ids(2) == ["0", "1"]
