"""A job's process: its device, its CPU threads, and (several GPUs asked for) torchrun."""

from __future__ import annotations

import os
import sys

from igsm.stages.common import StageError


def device(name: str):
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` as a torch device; ``auto`` with several visible
    GPUs and one process (Snakemake's local executor) takes the least used."""
    import torch

    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        from igsm import distributed, gpus

        if distributed.get_world_size() == 1 and torch.cuda.device_count() > 1:
            return torch.device(f"cuda:{gpus.claim(1, torch.cuda.device_count())[0]}")
        return torch.device("cuda")
    return torch.device(name)


def set_threads(threads: int | None) -> None:
    """torch's CPU threads (None: torch's choice)."""
    import torch

    if threads:
        torch.set_num_threads(threads)


def set_blas_threads(threads: int | None) -> None:
    """numpy's and SciPy's BLAS threads (OpenBLAS, MKL: threadpoolctl, which scikit-learn brings), for a
    job whose work is numpy's, not torch's (the FID's matrix square root, PRDC's distances): without it
    OpenBLAS takes every core whatever the job's ``threads``, and two such jobs on two cores thrash."""
    if threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads, user_api="blas")


def relaunch_under_torchrun(nproc_per_node: int, nnodes: int = 1, device_name: str = "auto") -> None:
    """With several processes asked for, replace this one by torchrun running the same command.

    On one node with more GPUs visible than processes (``--device auto``), the job first claims
    the least used ones (igsm.gpus) and shows torchrun only those."""
    from igsm import distributed, gpus

    try:
        command = distributed.launch_command(sys.argv[1:], nproc_per_node, nnodes)
    except RuntimeError as err:
        raise StageError(f"--nnodes: {err}") from None
    if command and device_name == "auto" and nnodes == 1:
        import torch

        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible > nproc_per_node:
            names = gpus.visible_ids(visible)
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(
                names[i] for i in gpus.claim(nproc_per_node, visible))
    if command:
        print(" ".join(command), file=sys.stderr)
        os.execvp(command[0], command)  # same process (pid), so SLURM's signals still reach it


def start_process(device_name: str, threads: int | None):
    """This process's device and CPU threads (--threads = the job's CPUs on this node, shared by
    its processes), then the process group; returns the device."""
    from igsm import distributed

    chosen = device(device_name)
    if chosen.type == "cuda" and chosen.index is None and distributed.get_world_size() > 1:
        chosen = device(f"cuda:{distributed.get_local_rank()}")
    set_threads(max(1, threads // distributed.get_local_world_size()) if threads else None)
    distributed.init(chosen)
    return chosen
