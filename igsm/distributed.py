"""Several processes for one job: the thin layer over torch.distributed (edm torch_utils/distributed.py).

``init()`` works without torchrun (one process, no process group); under torchrun (or anything that
sets its environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) it joins the default process
group, NCCL on GPUs and gloo on CPUs. ``launch_command`` is how a job with several GPUs becomes
several processes: torchrun on one node, ``srun`` + torchrun across the nodes of a SLURM allocation.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import torch

RENDEZVOUS_PORT = 29500


def _under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: torch.device | None = None) -> None:
    """Join the process group when started by torchrun with more than one process; else nothing."""
    if get_world_size() == 1 or torch.distributed.is_initialized():
        return
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(get_local_rank())
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def get_rank() -> int:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0)) if _under_launcher() else 0


def get_world_size() -> int:
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1)) if _under_launcher() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def get_local_world_size() -> int:
    """Processes on this node (torchrun's nproc_per_node)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if _under_launcher() else 1


def print0(*args, **kwargs) -> None:
    if get_rank() == 0:
        print(*args, **kwargs)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the processes, in place (nothing with one process)."""
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def launch_command(argv: list[str], nproc_per_node: int, nnodes: int = 1) -> list[str] | None:
    """The command that reruns ``python -m igsm <argv>`` as nnodes × nproc_per_node processes.

    None when one process does it, or when this process was itself started by a launcher. One node:
    ``torchrun --standalone`` (a free local port, so several jobs can share a node). Several nodes
    (inside a SLURM allocation of ``nnodes`` nodes): ``srun`` starts one torchrun per node, which
    meet at the first node of the allocation (c10d rendezvous, id = the SLURM job id). The shell
    around torchrun ignores SIGUSR1 for it: SLURM's ``--signal=USR1@…`` reaches every process of
    the step and only the training processes act on it (they checkpoint and stop).
    """
    if nproc_per_node < 1 or nnodes < 1:
        raise ValueError(f"nproc_per_node ({nproc_per_node}) and nnodes ({nnodes}) must be ≥ 1")
    if nproc_per_node * nnodes == 1 or _under_launcher():
        return None
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}"]
    tail = ["-m", "igsm", *argv]
    if nnodes == 1:
        return [*torchrun, "--standalone", "--nnodes=1", *tail]
    job_id, nodelist = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_JOB_NODELIST")
    if not job_id or not nodelist or not shutil.which("srun"):
        raise RuntimeError(f"{nnodes} nodes: multi-node training runs inside a SLURM allocation "
                           f"(SLURM_JOB_ID, SLURM_JOB_NODELIST and srun are missing)")
    head = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, text=True,
                          capture_output=True).stdout.split()[0]
    return ["srun", f"--nodes={nnodes}", f"--ntasks={nnodes}", "--ntasks-per-node=1",
            "--kill-on-bad-exit=1", "sh", "-c", 'trap "" USR1; exec "$0" "$@"',
            *torchrun, f"--nnodes={nnodes}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={head}:{RENDEZVOUS_PORT}", f"--rdzv_id={job_id}", *tail]
