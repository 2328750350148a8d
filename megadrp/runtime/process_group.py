"""The process group: what touches the process and the devices once the launch is known
(megadrp/runtime/launch.py finds the rank, with no side effect). Start-up in one sequence for
the trainer and the test harnesses (`start`), the device binding, the backend DeepSpeed's
accelerator implies, and the ways out: together (`shutdown`) or after a failure (`release`).
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator

from megadrp.errors import ConfigError, UserError
from megadrp.runtime import build_locks, shm_segments
from megadrp.runtime.launch import DistInfo, Env, device_index, discover

log = logging.getLogger(__name__)


class RendezvousBusy(RuntimeError):
    """Rank 0 could not listen on MASTER_PORT because another process holds it.

    Transient (another job chose the same port), so the run should be retried, not failed:
    the entry point is meant to exit with `exit_code` (EX_TEMPFAIL) after marking the run
    `retry`, and the Slurm scripts requeue it."""

    exit_code = 75


def _cuda_available() -> bool:
    # torch is imported only where a device is needed: discovery is plain environment work,
    # and its unit tests stay fast without loading torch.
    import torch

    return torch.cuda.is_available()


def bind_device(info: DistInfo, env: Env | None = None, visible: int | None = None,
                set_device: Callable[[int], None] | None = None) -> int:
    """Select this rank's CUDA device and make LOCAL_RANK name it.

    DeepSpeed takes LOCAL_RANK as the CUDA device ordinal (DeepSpeedEngine's set_device and
    zero.Init's local_device read os.environ["LOCAL_RANK"]), so with one visible GPU per
    task LOCAL_RANK must be 0, not the node-local rank; `info.local_rank` keeps the latter.
    DeepSpeed also asserts LOCAL_RANK == OMPI_COMM_WORLD_LOCAL_RANK when the latter is set;
    MPI has read its environment by now (mpi4py initialised it in `discover`), so it follows."""
    env = os.environ if env is None else env
    idx = device_index(info, env, visible)
    if set_device is None:
        import torch

        set_device = torch.cuda.set_device
    set_device(idx)
    if env.get("LOCAL_RANK") != str(idx):
        log.info("rank %d: CUDA device %d of those visible (LOCAL_RANK %s -> %d for DeepSpeed)", info.rank, idx,
                 env.get("LOCAL_RANK"), idx)
        env["LOCAL_RANK"] = str(idx)
        if "OMPI_COMM_WORLD_LOCAL_RANK" in env:
            env["OMPI_COMM_WORLD_LOCAL_RANK"] = str(idx)
    return idx


def accelerator() -> tuple[str, str]:
    """(device type, process-group backend) of DeepSpeed's accelerator: what the engine runs
    on decides the backend and the device binding, never `torch.cuda.is_available()` alone.
    DS_ACCELERATOR=cpu on a host with GPUs gives a CPU engine on a gloo group (NCCL serves
    only CUDA tensors); on CUDA it is NCCL on the rank's own GPU."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return acc.device_name(), acc.communication_backend_name()


def device_memory(local_world_size: int | None) -> tuple[int, str]:
    """(bytes this rank may plan for, the accelerator's current device). A GPU's own memory;
    on the CPU accelerator the host's memory shared by the node's ranks."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    total = int(acc.total_memory())
    if acc.device_name() == "cpu":
        total //= max(1, local_world_size or 1)
    return total, acc.current_device_name()


def _port_in_use(e: BaseException) -> bool:
    text = str(e)
    return "EADDRINUSE" in text or "address already in use" in text.lower()


def init(info: DistInfo) -> None:
    """Initialise torch.distributed through DeepSpeed with its accelerator's backend (gloo on
    the CPU accelerator, NCCL on CUDA, on the device `bind_device` chooses). A rendezvous port another process holds raises
    RendezvousBusy (retry), not a plain failure."""
    if not _cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # spares DeepSpeed's probe and its warning
    import deepspeed

    device, backend = accelerator()
    cpu = device == "cpu"
    if device == "cuda":
        bind_device(info)
    if cpu and info.local_rank == 0:
        shm_segments.clear_stale()  # what killed CPU runs on this node left in /dev/shm
    try:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    except RuntimeError as e:  # torch's DistNetworkError is one
        if _port_in_use(e):
            raise RendezvousBusy(f"MASTER_PORT={os.environ.get('MASTER_PORT')}: another process on "
                                 f"{os.environ.get('MASTER_ADDR')} holds it; retry (the Slurm scripts requeue), "
                                 "or set MEGADRP_MASTER_PORT") from e
        raise
    if cpu:
        # Every rank has mapped every peer's allreduce segment once all have passed init:
        # the names can go, and the memory goes with the last rank, however it exits.
        import torch.distributed as dist

        dist.barrier()
        shm_segments.unlink_own(dist.get_rank())


def shutdown() -> None:
    """Leave the process group together: a barrier, then destroy it.

    Without this a rank that finishes first exits while its peers' gloo threads still
    talk to it, and the C++ runtime aborts them at interpreter exit ("terminate called
    without an active exception", exit -6) after all the work was done. Only for a clean
    end: after a failure on one rank the barrier would wait for a peer that never comes.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def release() -> None:
    """Leave the process group after a failure, without waiting for peers (they may never come):
    destroy it, so that its threads end before the interpreter does. Left to interpreter exit,
    gloo's threads can abort the process ("terminate called without an active exception", -6)
    after the error was already reported, turning exit 2 into a crash."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 — on the way out of a failure, never a second one
            pass


def on_rank0(check: Callable[[], None], rank: int, world: int) -> None:
    """Run `check` on rank 0 and raise its error (as a ConfigError) on every rank, so that no
    rank is left waiting in a collective for one that failed."""
    import torch.distributed as dist

    msg = None
    if rank == 0:
        try:
            check()
        except (OSError, UserError) as e:
            msg = str(e)
        except Exception as e:  # noqa: BLE001 — the other ranks must hear of any failure, not wait forever
            msg = f"{type(e).__name__} on rank 0: {e}"
    box = [msg]
    if dist.is_initialized() and world > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise ConfigError(box[0])


@contextlib.contextmanager
def starting(env: Env | None = None) -> Iterator[DistInfo]:
    """Discover this rank and join the process group: the one start-up sequence of the
    trainer and of every multi-process test harness. DeepSpeed JIT-loads its ops in the
    group's init and again in the engine build, and a torch build lock a killed process left
    would hang either forever: the node's first rank watches for stale ones until the block
    ends (megadrp/runtime/build_locks.py). A LaunchError (exit 2) names the variable; a
    RendezvousBusy asks for a retry."""
    info = discover(env)
    with build_locks.watch(enabled=info.local_rank == 0):
        init(info)
        yield info


def start(env: Env | None = None) -> DistInfo:
    """`starting` for a harness that builds nothing that loads an op afterwards."""
    with starting(env) as info:
        return info
