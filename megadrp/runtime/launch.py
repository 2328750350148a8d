"""Rank discovery in one place: deepspeed launcher / torchrun, mpirun, srun, or one process.

Every launcher ends up setting the same environment (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), after which `torch.distributed` initialises the same way.
The rules, first match wins (docs/launch.md has them with the reasons):

1. **RANK and WORLD_SIZE set** (torchrun, the deepspeed launcher): used as given, with the
   launcher's MASTER_ADDR/MASTER_PORT (its store; megadrp must not move it). A missing
   LOCAL_RANK is derived from LOCAL_WORLD_SIZE/LOCAL_SIZE, an srun or MPI local id of the
   same world, or a loopback MASTER_ADDR (every rank on this host); otherwise an error.
2. **MPI launcher variables** (OMPI_COMM_WORLD_RANK, MPI_LOCALRANKID, or PMIX_RANK/PMI_RANK
   that are not srun's own): mpirun, also inside a Slurm allocation, where the ranks inherit
   the allocation's (or the orted step's) SLURM_* variables, which describe other processes.
3. **An srun step** (SLURM_PROCID and SLURM_STEP_ID): RANK = SLURM_PROCID, WORLD_SIZE =
   SLURM_STEP_NUM_TASKS (the step, not the job: SLURM_NTASKS only where srun did not set it),
   LOCAL_RANK = SLURM_LOCALID.
4. Otherwise one process.

Under srun, mpirun and one process MASTER_ADDR/MASTER_PORT are outputs: values inherited
from the submitting shell are ignored (they name some other job's rendezvous);
MEGADRP_MASTER_ADDR / MEGADRP_MASTER_PORT override them on purpose.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import zlib
from collections.abc import MutableMapping
from dataclasses import dataclass

from megadrp.errors import LaunchError

log = logging.getLogger(__name__)

Env = MutableMapping[str, str]

# Rendezvous ports megadrp picks under srun: below Linux's default ephemeral range
# (net.ipv4.ip_local_port_range = 32768 60999), so an outgoing connection of any process on
# the node cannot already hold the port, and above the registered services that crowd 1-9999.
PORT_MIN, PORT_MAX = 10000, 32767


@dataclass(frozen=True)
class DistInfo:
    """One process's place in the job.

    `local_rank` is the rank's index among the ranks of its node, which is not always its
    CUDA device (one visible GPU per task makes every device 0): see `device_index`.
    `launcher` names the discovery rule that applied; `device_index` trusts Slurm's per-step
    GPU variables only under "srun". `local_world_size` is None where no launcher says it."""

    rank: int
    local_rank: int
    world_size: int
    launcher: str
    local_world_size: int | None = None


def _visible_devices() -> int:
    import torch

    return torch.cuda.device_count()


def free_port() -> int:
    """A TCP port free on this host right now (for rendezvous and test clusters)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- small parsers -------------------------------------------------------------------------
def _int(env: Env, name: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise LaunchError(f"{name} is not set; the launcher should set it (see docs/launch.md)") from None
    except ValueError:
        raise LaunchError(f"{name}={env[name]!r} is not an integer; unset it or fix the launcher") from None


def _opt_int(env: Env, *names: str) -> int | None:
    for name in names:
        if env.get(name, "") != "":
            return _int(env, name)
    return None


def _override_port(env: Env) -> int | None:
    port = _opt_int(env, "MEGADRP_MASTER_PORT")
    if port is not None and not 1 <= port <= 65535:
        raise LaunchError(f"MEGADRP_MASTER_PORT={port} is not a TCP port; use one in {PORT_MIN}-{PORT_MAX}")
    return port


def mixed_port(job_id: str, step_id: str, restart: str = "0") -> int:
    """The rendezvous port of one srun step, the same on every task without communication.

    A hash of job id, step id and restart count spreads them over PORT_MIN..PORT_MAX: two
    steps of one allocation differ; jobs whose ids are equal modulo some number do not
    collide systematically (`20000 + jobid % 20000` did, and reached into the ephemeral
    range); and a requeued job (same job id, step 0 again) tries another port than the run
    that may have failed on a busy one."""
    return PORT_MIN + zlib.crc32(f"{job_id}.{step_id}.{restart}".encode()) % (PORT_MAX - PORT_MIN + 1)


def _tasks_per_node(spec: str, node: int) -> int | None:
    """Entry `node` of a Slurm count list such as "8(x2),4" (SLURM_STEP_TASKS_PER_NODE)."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node] if 0 <= node < len(counts) else None


def _in_srun_step(env: Env) -> bool:
    return "SLURM_PROCID" in env and "SLURM_STEP_ID" in env


# ---- the launchers -------------------------------------------------------------------------
def _loopback(addr: str) -> bool:
    return addr in ("localhost", "::1") or addr.startswith("127.")


def _derive_local_rank(env: Env, rank: int, world: int, local_world: int | None) -> int:
    """LOCAL_RANK for a launcher that set RANK/WORLD_SIZE but not LOCAL_RANK; never a guess.

    Taking RANK itself (what this code did) is wrong on every node but the first."""
    if local_world:
        return rank % local_world  # launchers that export it place ranks node by node
    if _in_srun_step(env) and "SLURM_LOCALID" in env and _opt_int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") == world:
        return _int(env, "SLURM_LOCALID")  # one srun task per rank
    for local, size in (("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"), ("MPI_LOCALRANKID", "PMI_SIZE")):
        if local in env and _opt_int(env, size) == world:
            return _int(env, local)  # one MPI process per rank
    if world == 1:
        return 0
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    if _loopback(addr):
        # Every rank reaches rank 0's store over loopback, so all ranks are on this host.
        return rank
    raise LaunchError(f"LOCAL_RANK is not set (RANK={rank}, WORLD_SIZE={world}, MASTER_ADDR={addr}) and no launcher "
                      "variable says which rank of its node this is; set LOCAL_RANK (or LOCAL_WORLD_SIZE) per rank, "
                      "as torchrun and the deepspeed launcher do")


def _from_env_launcher(env: Env) -> DistInfo:
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local_world = _opt_int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE")  # torchrun's, the deepspeed launcher's
    local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else _derive_local_rank(env, rank, world, local_world)
    if "MASTER_ADDR" not in env and world > 1 and local_world is not None and local_world < world:
        raise LaunchError(f"MASTER_ADDR is not set but WORLD_SIZE={world} spans several nodes "
                          f"(LOCAL_WORLD_SIZE={local_world}); set it to rank 0's host")
    env["LOCAL_RANK"] = str(local)
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")  # torchrun's default
    return DistInfo(rank, local, world, "deepspeed/torchrun", local_world)


def _mpi_launched(env: Env) -> bool:
    """True under an MPI launcher. srun's own PMI plugins (--mpi=pmi2, --mpi=pmix) also set
    PMI_RANK / PMIX_RANK, equal to SLURM_PROCID; those tasks are srun's and need no mpi4py.
    OMPI_COMM_WORLD_RANK (Open MPI) and MPI_LOCALRANKID (MPICH/Intel MPI's Hydra) come only
    from mpirun, so they win even inside an srun step (mpirun's remote daemons are srun tasks)."""
    if "OMPI_COMM_WORLD_RANK" in env or "MPI_LOCALRANKID" in env:
        return True
    srun = _in_srun_step(env)
    return any(var in env and not (srun and env[var] == env.get("SLURM_PROCID")) for var in ("PMIX_RANK", "PMI_RANK"))


def _from_mpi(env: Env) -> DistInfo:
    try:
        from mpi4py import MPI
    except ImportError as e:
        var = next(v for v in ("OMPI_COMM_WORLD_RANK", "MPI_LOCALRANKID", "PMIX_RANK", "PMI_RANK") if v in env)
        raise LaunchError(f"{var} is set (an MPI launcher) but mpi4py cannot be imported ({e}); "
                          "pip install mpi4py, or launch with srun or torchrun") from None
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    for local_var, size_var in (("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
                                ("MPI_LOCALRANKID", "MPI_LOCALNRANKS")):
        if local_var in env:
            local, local_world = _int(env, local_var), _opt_int(env, size_var)
            break
    else:  # a launcher without a local-rank variable: the ranks sharing this node's memory
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        local, local_world = node.Get_rank(), node.Get_size()
    # Rank 0 hosts the store, so its host and a port free there are the rendezvous.
    mine = (env.get("MEGADRP_MASTER_ADDR") or socket.gethostname(), _override_port(env) or free_port()) \
        if rank == 0 else None
    addr, port = comm.bcast(mine, root=0)
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local), MASTER_ADDR=addr, MASTER_PORT=str(port))
    if local_world is not None:
        env["LOCAL_WORLD_SIZE"] = str(local_world)
    return DistInfo(rank, local, world, "mpirun", local_world)


def _first_host(nodelist: str, env: Env) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True,
                         env=dict(env), timeout=60)
    return out.stdout.split()[0]


def _srun_master_addr(env: Env) -> str:
    """The step's first node: srun's block distribution places task 0 there.

    A one-node step needs no name (127.0.0.1 reaches rank 0). On several nodes the name
    comes from `scontrol show hostnames`; if that fails, falling back to 127.0.0.1 would
    make every node wait on its own loopback, so it is an error instead."""
    if env.get("MEGADRP_MASTER_ADDR"):
        return env["MEGADRP_MASTER_ADDR"]
    for var, count_vars in (("SLURM_STEP_NODELIST", ("SLURM_STEP_NUM_NODES",)),
                            ("SLURM_JOB_NODELIST", ("SLURM_JOB_NUM_NODES", "SLURM_NNODES")),
                            ("SLURM_NODELIST", ("SLURM_NNODES",))):
        if env.get(var):
            nodes, count = env[var], _opt_int(env, *count_vars)
            break
    else:
        nodes, var, count = "", "SLURM_STEP_NODELIST", _opt_int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES")
    several = (count or 1) > 1 or "," in nodes or bool(re.search(r"\[[^\]]*[-,]", nodes))
    if not several:
        return "127.0.0.1"
    if not nodes:
        raise LaunchError(f"{var} is not set on a {count}-node step, so rank 0's node is unknown; "
                          "set MEGADRP_MASTER_ADDR to the first node's address")
    try:
        return _first_host(nodes, env)
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        why = "it printed no host" if isinstance(e, IndexError) else \
            ((getattr(e, "stderr", None) or str(e)).strip().splitlines() or [type(e).__name__])[-1]
        raise LaunchError(f"{var}={nodes!r}: `scontrol show hostnames` failed ({why}), so rank 0's node of this "
                          "multi-node step is unknown; put scontrol on PATH or set MEGADRP_MASTER_ADDR to the "
                          "first node's address") from None


def _srun_master_port(env: Env) -> int:
    port = _override_port(env)
    if port is not None:
        return port
    resv = env.get("SLURM_STEP_RESV_PORTS", "")  # "12000-12015" or "12000,12003": ports the site reserved
    m = re.match(r"\s*(\d+)", resv)
    if m:
        return int(m.group(1))
    return mixed_port(env.get("SLURM_JOB_ID", "0"), env.get("SLURM_STEP_ID", "0"), env.get("SLURM_RESTART_COUNT", "0"))


def _from_srun(env: Env) -> DistInfo:
    rank = _int(env, "SLURM_PROCID")
    world = _int(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS")
    local = _int(env, "SLURM_LOCALID")
    gtids = env.get("SLURM_GTIDS", "")  # the global ids of this step's tasks on this node
    local_world = len(gtids.split(",")) if gtids else None
    if local_world is None and "SLURM_STEP_TASKS_PER_NODE" in env and "SLURM_NODEID" in env:
        local_world = _tasks_per_node(env["SLURM_STEP_TASKS_PER_NODE"], _int(env, "SLURM_NODEID"))
    addr, port = _srun_master_addr(env), _srun_master_port(env)
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local), MASTER_ADDR=addr, MASTER_PORT=str(port))
    if local_world is not None:
        env["LOCAL_WORLD_SIZE"] = str(local_world)
    return DistInfo(rank, local, world, "srun", local_world)


def _single(env: Env) -> DistInfo:
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR=env.get("MEGADRP_MASTER_ADDR") or "127.0.0.1",
               MASTER_PORT=str(_override_port(env) or free_port()))
    return DistInfo(0, 0, 1, "single", 1)


def discover(env: Env | None = None) -> DistInfo:
    """Find this process's rank from the launcher's environment and complete that environment
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) for `torch.distributed`.

    `env` defaults to os.environ (and is written to); tests pass a dict. Raises LaunchError
    with one line naming the variable when the environment cannot describe a valid rank."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        info = _from_env_launcher(env)
    elif _mpi_launched(env):
        info = _from_mpi(env)
    elif _in_srun_step(env):
        info = _from_srun(env)
    else:
        info = _single(env)
    if not (0 <= info.rank < info.world_size and info.local_rank >= 0):
        raise LaunchError(f"RANK={info.rank}, LOCAL_RANK={info.local_rank}, WORLD_SIZE={info.world_size} "
                          f"({info.launcher}) is not a valid rank; check the launcher's variables")
    return info


# ---- devices -------------------------------------------------------------------------------
def _gpus_on_node(env: Env) -> int | None:
    """GPUs Slurm gave this step on this node (all tasks together), where Slurm says."""
    n = _opt_int(env, "SLURM_GPUS_ON_NODE")
    if n:
        return n
    gpus = env.get("SLURM_STEP_GPUS", "")
    return len(gpus.split(",")) if gpus else None


def device_index(info: DistInfo, env: Env | None = None, visible: int | None = None) -> int:
    """The CUDA device (an index among the devices this process can see) for this rank.

    - one visible GPU (--gpus-per-task=1, --gpu-bind=single:1, a wrapper that sets
      CUDA_VISIBLE_DEVICES per rank): device 0;
    - under srun, fewer visible GPUs than the step has on the node: Slurm bound a disjoint
      slice to each task (--gpus-per-task=k): device 0; slices that must overlap (more
      tasks × visible than GPUs, e.g. --gpu-bind=closest) cannot be told apart: an error;
    - every GPU of the node visible: LOCAL_RANK, and more ranks on the node than GPUs is an
      error naming --ntasks-per-node.

    `visible` defaults to torch.cuda.device_count() (which honours CUDA_VISIBLE_DEVICES)."""
    env = os.environ if env is None else env
    n = _visible_devices() if visible is None else visible
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    seen = f"CUDA_VISIBLE_DEVICES={cvd}" if cvd is not None else "CUDA_VISIBLE_DEVICES unset"
    where = f"rank {info.rank} (local {info.local_rank}"
    where += f" of {info.local_world_size} on this node)" if info.local_world_size else ")"
    if n < 1:
        raise LaunchError(f"{seen}: {where} sees no GPU; request GPUs (--gpus-per-node or --gpus-per-task) "
                          "or run on CPU")
    if n == 1:
        return 0
    tasks = info.local_world_size
    node = _gpus_on_node(env) if info.launcher == "srun" else None
    if node is not None and n < node:
        if tasks is not None and tasks * n > node:
            raise LaunchError(f"{seen}: {where} sees {n} of the node's {node} GPUs, shared with other tasks "
                              "(--gpu-bind=closest or a map), so no device of its own can be chosen; "
                              "use --gpus-per-task=1 or --gpu-bind=single:1, or --gpu-bind=none")
        return 0
    if tasks is not None and tasks > n:
        raise LaunchError(f"{seen}: {tasks} ranks on this node but each sees {n} GPUs, {where}; "
                          f"set --ntasks-per-node={n} (one task per GPU) or request more GPUs per node")
    if info.local_rank >= n:
        raise LaunchError(f"LOCAL_RANK={info.local_rank}: {where} sees only {n} GPUs ({seen}); run at most {n} "
                          "ranks per node (--ntasks-per-node) or give each task its own GPU (--gpus-per-task=1)")
    return info.local_rank
