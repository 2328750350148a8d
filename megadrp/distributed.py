"""Rank discovery in one place: deepspeed launcher / torchrun, srun, mpirun, or one process.

Every launcher ends up setting the same environment (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), after which `torch.distributed` initialises the same way.
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    launcher: str


def free_port() -> int:
    """A TCP port free on this host right now (for rendezvous and test clusters)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    if nodes:
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
            return out.stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            pass
    return "127.0.0.1"


def discover() -> DistInfo:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed/torchrun"
        env.setdefault("LOCAL_RANK", env["RANK"])
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", "29500")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and env.get("SLURM_STEP_ID") is not None:
        launcher = "srun"
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _slurm_master())
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    elif "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env or "PMIX_RANK" in env:
        launcher = "mpirun"
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
        local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", rank)))
        addr, port = (socket.gethostname(), free_port()) if rank == 0 else (None, None)
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        addr, port = comm.bcast((addr, port), root=0)
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(size), str(local)
        env["MASTER_ADDR"] = addr
        env.setdefault("MASTER_PORT", str(port))
    else:
        launcher = "single"
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    return DistInfo(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]), launcher)


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init(info: DistInfo) -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=False)
