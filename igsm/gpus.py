"""Which GPU a job takes when nothing assigns one: several GPUs, one machine, no scheduler.

SLURM gives each job its own GPUs (``CUDA_VISIBLE_DEVICES``), but Snakemake's local executor
only counts them (``--resources gpu=N``): without this, every job of a 2-GPU workstation would run
on ``cuda:0``. A job that asks for ``auto`` therefore claims the visible GPUs with the fewest live
claims (ties: lowest index) and keeps them while its process lives. A claim is a file
``<gpu>-<pid>`` in a shared folder, written under a lock; claims of dead processes are ignored and
removed, so a killed job never holds a GPU. ``os.execvp`` keeps the pid, so a job that becomes
torchrun keeps its claims.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path


def claims_folder() -> Path:
    return Path(os.environ.get("IGSM_GPU_CLAIMS", Path(tempfile.gettempdir()) / "igsm-gpu-claims"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def claim(count: int, num_gpus: int, pid: int | None = None, folder: Path | None = None) -> list[int]:
    """Claim ``count`` of the ``num_gpus`` visible GPUs for process ``pid``; return their indices."""
    if not 1 <= count <= num_gpus:
        raise ValueError(f"cannot claim {count} of {num_gpus} visible GPU(s)")
    pid = os.getpid() if pid is None else pid
    folder = claims_folder() if folder is None else folder
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        load = [0] * num_gpus
        for path in folder.glob("*-*"):
            gpu, _, owner = path.name.partition("-")
            if not (gpu.isdigit() and owner.isdigit()):
                continue
            if not _alive(int(owner)):
                path.unlink(missing_ok=True)
            elif int(owner) != pid and int(gpu) < num_gpus:
                load[int(gpu)] += 1
        chosen = sorted(range(num_gpus), key=lambda gpu: (load[gpu], gpu))[:count]
        for gpu in chosen:
            (folder / f"{gpu}-{pid}").touch()
    return sorted(chosen)


def device_name(device) -> str:
    """The GPU's model name (recorded with timings and samples), or "cpu"."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def visible_ids(num_gpus: int) -> list[str]:
    """The names of the visible GPUs as CUDA_VISIBLE_DEVICES gives them (indices when unset)."""
    names = os.environ.get("CUDA_VISIBLE_DEVICES")
    if names is None:
        return [str(i) for i in range(num_gpus)]
    return [name.strip() for name in names.split(",")][:num_gpus]
