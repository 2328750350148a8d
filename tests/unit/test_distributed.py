"""megadrp.runtime.launch (and process_group's init) with faked launcher environments: torchrun / the deepspeed launcher,
srun (steps, GPU bindings, rendezvous address and port), mpirun (mpi4py faked in
sys.modules), mpirun inside a Slurm allocation, and one process. No processes, no GPUs:
each test hands `discover` a dict for the environment (plus a fake `scontrol` on PATH
where the node list must be expanded)."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest

from megadrp.errors import ConfigError
from megadrp.runtime import launch as D
from megadrp.runtime import process_group as PG

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def srun_env(**kw: str) -> dict[str, str]:
    """Task 5 of a one-node, 8-task step 3 of job 4242 (what srun sets), plus `kw`."""
    env = dict(SLURM_JOB_ID="4242", SLURM_STEP_ID="3", SLURM_PROCID="5", SLURM_LOCALID="5", SLURM_NODEID="0",
               SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="8", SLURM_STEP_NUM_NODES="1", SLURM_NNODES="1",
               SLURM_STEP_NODELIST="gpu-a07", SLURM_JOB_NODELIST="gpu-a07", SLURM_GTIDS="0,1,2,3,4,5,6,7",
               SLURM_STEP_TASKS_PER_NODE="8")
    env.update(kw)
    return env


def fake_scontrol(tmp_path: Path, script: str) -> str:
    """A directory holding an executable `scontrol` running `script` (sh); use it as PATH."""
    exe = tmp_path / "scontrol"
    exe.write_text("#!/bin/sh\n" + script + "\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(tmp_path)


class FakeComm:
    """mpi4py's COMM_WORLD for one rank: bcast hands every rank what rank 0 passed."""

    def __init__(self, rank: int, size: int, root_value=("node-r0", 23456), node=(0, 1)):
        self.rank, self.size, self.root_value, self.node = rank, size, root_value, node

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return self.size

    def bcast(self, obj, root: int = 0):
        assert root == 0
        return obj if self.rank == 0 else self.root_value

    def Split_type(self, kind):
        assert kind == "shared"
        return FakeComm(*self.node)


@pytest.fixture
def fake_mpi(monkeypatch):
    """Install a fake `mpi4py` whose COMM_WORLD the test sets through the returned setter."""
    mpi = types.SimpleNamespace(COMM_WORLD=None, COMM_TYPE_SHARED="shared")
    pkg = types.ModuleType("mpi4py")
    pkg.MPI = mpi
    monkeypatch.setitem(sys.modules, "mpi4py", pkg)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", mpi)

    def set_comm(comm: FakeComm) -> None:
        mpi.COMM_WORLD = comm

    return set_comm


@pytest.fixture
def no_mpi(monkeypatch):
    """Make `from mpi4py import MPI` fail, so a test proves a path never needs it."""
    monkeypatch.setitem(sys.modules, "mpi4py", None)


# ---- torchrun / deepspeed launcher -------------------------------------------------------------
def test_torchrun_values_used_as_given():
    env = dict(RANK="9", WORLD_SIZE="16", LOCAL_RANK="1", LOCAL_WORLD_SIZE="8", MASTER_ADDR="10.1.2.3",
               MASTER_PORT="29400", MEGADRP_MASTER_ADDR="ignored", SLURM_PROCID="1", SLURM_STEP_ID="0",
               SLURM_STEP_NUM_TASKS="2", SLURM_LOCALID="0")  # torchrun started by srun, one per node
    info = D.discover(env)
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (9, 1, 16, 8)
    assert info.launcher == "deepspeed/torchrun"
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.1.2.3", "29400")  # the launcher's store


def test_deepspeed_launcher_local_size():
    info = D.discover(dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="3", LOCAL_SIZE="4", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29500"))
    assert info.local_world_size == 4


@pytest.mark.parametrize("extra, local", [
    (dict(LOCAL_WORLD_SIZE="4"), 2),                                        # rank 6 of nodes of 4
    (dict(SLURM_PROCID="6", SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="8", SLURM_LOCALID="2"), 2),
    (dict(OMPI_COMM_WORLD_LOCAL_RANK="2", OMPI_COMM_WORLD_SIZE="8"), 2),
    (dict(MPI_LOCALRANKID="2", PMI_SIZE="8"), 2),
])
def test_missing_local_rank_is_derived(extra, local):
    env = dict(RANK="6", WORLD_SIZE="8", MASTER_ADDR="10.0.0.1", MASTER_PORT="29500", **extra)
    assert D.discover(env).local_rank == local and env["LOCAL_RANK"] == str(local)


def test_missing_local_rank_on_loopback_is_rank():
    env = dict(RANK="3", WORLD_SIZE="4", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    assert D.discover(env).local_rank == 3  # every rank reaches a loopback store: one host


def test_only_rank_and_world_size_is_one_host():
    """RANK and WORLD_SIZE alone: rank 0's store defaults to 127.0.0.1, which only ranks on this
    host can reach, so the local rank is the rank (and the store address is loopback)."""
    env = dict(RANK="6", WORLD_SIZE="8")
    info = D.discover(env)
    assert (info.rank, info.local_rank, info.world_size) == (6, 6, 8) and env["MASTER_ADDR"] == "127.0.0.1"


def test_missing_local_rank_unknowable_is_an_error():
    env = dict(RANK="6", WORLD_SIZE="8", MASTER_ADDR="10.0.0.1", MASTER_PORT="29500",
               SLURM_PROCID="1", SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2", SLURM_LOCALID="1")  # other world
    with pytest.raises(ConfigError, match="LOCAL_RANK is not set"):
        D.discover(env)


def test_bad_rank_names_the_variable():
    with pytest.raises(D.LaunchError, match=r"RANK='x'"):
        D.discover(dict(RANK="x", WORLD_SIZE="2"))
    with pytest.raises(D.LaunchError, match="not a valid rank"):
        D.discover(dict(RANK="2", WORLD_SIZE="2", LOCAL_RANK="0"))


# ---- srun --------------------------------------------------------------------------------------
def test_srun_step_tasks_over_job_tasks(tmp_path):
    # a 4-task step inside a 16-task allocation: the world is the step
    env = srun_env(SLURM_NTASKS="16", SLURM_STEP_NUM_TASKS="4", SLURM_PROCID="2", SLURM_LOCALID="2",
                   SLURM_GTIDS="0,1,2,3", PATH=fake_scontrol(tmp_path, "exit 1"))
    info = D.discover(env)
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (2, 2, 4, 4)
    assert info.launcher == "srun" and (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("2", "4", "2")


def test_srun_ntasks_when_step_count_missing():
    env = srun_env()
    del env["SLURM_STEP_NUM_TASKS"], env["SLURM_GTIDS"]
    info = D.discover(env)
    assert info.world_size == 8 and info.local_world_size == 8  # from SLURM_STEP_TASKS_PER_NODE


def test_srun_one_node_needs_no_scontrol(tmp_path):
    env = srun_env(MASTER_ADDR="login-3", PATH=fake_scontrol(tmp_path, "exit 1"))
    D.discover(env)
    assert env["MASTER_ADDR"] == "127.0.0.1"


def test_srun_multi_node_first_host_beats_inherited_master_addr(tmp_path):
    path = fake_scontrol(tmp_path, 'test "$3" = "gpu-a[07-08]" && printf "gpu-a07\\ngpu-a08\\n"')
    env = srun_env(SLURM_STEP_NODELIST="gpu-a[07-08]", SLURM_JOB_NODELIST="gpu-a[07-08]", SLURM_STEP_NUM_NODES="2",
                   SLURM_NNODES="2", SLURM_NTASKS="16", SLURM_STEP_NUM_TASKS="16", SLURM_PROCID="13",
                   SLURM_NODEID="1", SLURM_GTIDS="8,9,10,11,12,13,14,15", SLURM_STEP_TASKS_PER_NODE="8(x2)",
                   MASTER_ADDR="login-3", MASTER_PORT="29500", PATH=path)
    info = D.discover(env)
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (13, 5, 16, 8)
    assert env["MASTER_ADDR"] == "gpu-a07" and env["MASTER_PORT"] != "29500"


def test_srun_master_addr_override(tmp_path):
    env = srun_env(SLURM_STEP_NODELIST="gpu-a[07-08]", SLURM_STEP_NUM_NODES="2", MEGADRP_MASTER_ADDR="10.9.9.9",
                   PATH=fake_scontrol(tmp_path, "exit 1"))
    D.discover(env)
    assert env["MASTER_ADDR"] == "10.9.9.9"


@pytest.mark.parametrize("script", ['echo "scontrol: error: Invalid hostlist" >&2; exit 1', "exit 0", None])
def test_srun_multi_node_scontrol_failure_is_an_error(tmp_path, script):
    path = fake_scontrol(tmp_path, script) if script else str(tmp_path)  # None: no scontrol on PATH
    env = srun_env(SLURM_STEP_NODELIST="gpu-a[07-08]", SLURM_STEP_NUM_NODES="2", PATH=path)
    with pytest.raises(D.LaunchError, match=r"SLURM_STEP_NODELIST='gpu-a\[07-08\]'.*MEGADRP_MASTER_ADDR") as e:
        D.discover(env)
    assert "\n" not in str(e.value) and "MASTER_ADDR" not in env


def test_srun_comma_nodelist_counts_as_multi_node(tmp_path):
    env = srun_env(SLURM_STEP_NODELIST="a01,b02", PATH=fake_scontrol(tmp_path, "exit 1"))
    del env["SLURM_STEP_NUM_NODES"]
    with pytest.raises(D.LaunchError, match="scontrol"):
        D.discover(env)


# ---- ports -------------------------------------------------------------------------------------
def test_port_below_ephemeral_range_and_mixed_with_step():
    ports = {D.mixed_port(str(job), str(step)) for job in range(1, 2001) for step in range(3)}
    assert all(D.PORT_MIN <= p <= D.PORT_MAX < 32768 for p in ports)
    assert len(ports) > 5000  # 6000 (job, step) pairs spread, not folded onto a few ports
    assert D.mixed_port("4242", "0") != D.mixed_port("4242", "1")        # two steps of one allocation
    assert D.mixed_port("12345", "0") != D.mixed_port("32345", "0")      # equal mod 20000: the old rule's clash
    assert D.mixed_port("4242", "3") == D.mixed_port("4242", "3")        # every task computes the same
    assert D.mixed_port("4242", "0", "1") != D.mixed_port("4242", "0")   # a requeued job: step 0 again


def test_srun_port_moves_after_a_requeue():
    first, again = srun_env(), srun_env(SLURM_RESTART_COUNT="1")
    D.discover(first), D.discover(again)
    assert first["MASTER_PORT"] != again["MASTER_PORT"]


def test_srun_port_ignores_inherited_master_port():
    env = srun_env(MASTER_PORT="29500")
    D.discover(env)
    assert env["MASTER_PORT"] == str(D.mixed_port("4242", "3"))


def test_srun_port_reserved_and_override():
    env = srun_env(SLURM_STEP_RESV_PORTS="12000-12015")
    D.discover(env)
    assert env["MASTER_PORT"] == "12000"
    env = srun_env(SLURM_STEP_RESV_PORTS="12000-12015", MEGADRP_MASTER_PORT="15001")
    D.discover(env)
    assert env["MASTER_PORT"] == "15001"
    with pytest.raises(D.LaunchError, match="MEGADRP_MASTER_PORT=70000"):
        D.discover(srun_env(MEGADRP_MASTER_PORT="70000"))


def test_single_process_ignores_inherited_rendezvous():
    env = dict(MASTER_ADDR="10.0.0.1", MASTER_PORT="29500")
    info = D.discover(env)
    assert (info.rank, info.world_size, info.launcher) == (0, 1, "single")
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] != "29500"
    env = dict(MEGADRP_MASTER_PORT="15002")
    D.discover(env)
    assert env["MASTER_PORT"] == "15002"


def test_batch_shell_without_srun_is_one_process():
    # python run directly in an sbatch script: SLURM_PROCID but no step
    info = D.discover(dict(SLURM_JOB_ID="1", SLURM_PROCID="0", SLURM_NTASKS="8", SLURM_LOCALID="0"))
    assert (info.world_size, info.launcher) == (1, "single")


def test_discover_defaults_to_os_environ(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "OMPI_", "PMI", "MPI_LOCAL", "MEGADRP_MASTER")) or k in (
                "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(k)
    for k, v in srun_env().items():
        monkeypatch.setenv(k, v)
    assert D.discover().rank == 5 and os.environ["RANK"] == "5" and os.environ["MASTER_ADDR"] == "127.0.0.1"


# ---- mpirun ------------------------------------------------------------------------------------
def test_mpirun(fake_mpi):
    fake_mpi(FakeComm(3, 4))
    env = dict(OMPI_COMM_WORLD_RANK="3", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="1",
               OMPI_COMM_WORLD_LOCAL_SIZE="2", MASTER_ADDR="inherited", MASTER_PORT="1")
    info = D.discover(env)
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size, info.launcher) == (3, 1, 4, 2, "mpirun")
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("3", "1", "4")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("node-r0", "23456")  # rank 0's, broadcast


def test_mpirun_rank0_offers_its_host_or_the_override(fake_mpi):
    fake_mpi(FakeComm(0, 2))
    env = dict(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_LOCAL_RANK="0", MASTER_ADDR="inherited",
               MEGADRP_MASTER_PORT="15003")
    D.discover(env)
    assert env["MASTER_ADDR"] not in ("inherited", "") and env["MASTER_PORT"] == "15003"
    env = dict(PMI_RANK="0", MPI_LOCALRANKID="0", MPI_LOCALNRANKS="2", MEGADRP_MASTER_ADDR="ib0-host")
    D.discover(env)
    assert env["MASTER_ADDR"] == "ib0-host"


def test_mpirun_inside_slurm_allocation_mpi_wins(fake_mpi):
    # salloc's interactive step (or a remote orted's srun step): the SLURM_* describe one task
    fake_mpi(FakeComm(1, 2))
    env = srun_env(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1",
                   OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK="1")
    info = D.discover(env)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (1, 2, 1, "mpirun")


def test_mpirun_pmix_without_local_rank_uses_shared_memory_comm(fake_mpi):
    fake_mpi(FakeComm(5, 8, node=(1, 4)))
    info = D.discover(dict(PMIX_RANK="5"))
    assert (info.rank, info.local_rank, info.local_world_size) == (5, 1, 4)


@pytest.mark.parametrize("var", ["PMIX_RANK", "PMI_RANK"])
def test_srun_own_pmi_is_srun_not_mpirun(no_mpi, var):
    # srun --mpi=pmix / --mpi=pmi2 set PMIX_RANK / PMI_RANK = SLURM_PROCID: no mpi4py needed
    info = D.discover(srun_env(**{var: "5"}))
    assert (info.rank, info.launcher) == (5, "srun")


def test_mpirun_without_mpi4py_is_a_clear_error(no_mpi):
    with pytest.raises(D.LaunchError, match="OMPI_COMM_WORLD_RANK is set.*pip install mpi4py"):
        D.discover(dict(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_LOCAL_RANK="0"))


# ---- devices -----------------------------------------------------------------------------------
def info(local: int, tasks: int | None, launcher: str = "srun") -> D.DistInfo:
    return D.DistInfo(rank=8 + local, local_rank=local, world_size=16, launcher=launcher, local_world_size=tasks)


def test_gpus_per_task_1_is_device_0():
    env = dict(CUDA_VISIBLE_DEVICES="5", SLURM_GPUS_ON_NODE="8", SLURM_STEP_GPUS="0,1,2,3,4,5,6,7")
    assert D.device_index(info(5, 8), env, visible=1) == 0


def test_all_node_gpus_visible_is_local_rank():
    env = dict(SLURM_GPUS_ON_NODE="8")
    assert D.device_index(info(5, 8), env, visible=8) == 5
    assert D.device_index(info(5, None, "deepspeed/torchrun"), {}, visible=8) == 5


def test_gpus_per_task_2_is_device_0():
    assert D.device_index(info(3, 4), dict(CUDA_VISIBLE_DEVICES="6,7", SLURM_GPUS_ON_NODE="8"), visible=2) == 0


def test_shared_gpu_sets_are_an_error():
    env = dict(CUDA_VISIBLE_DEVICES="0,1,2,3", SLURM_STEP_GPUS="0,1,2,3,4,5,6,7")  # --gpu-bind=closest, 8 tasks
    with pytest.raises(D.LaunchError, match="--gpu-bind"):
        D.device_index(info(2, 8), env, visible=4)


@pytest.mark.parametrize("local", [3, 12])
def test_more_tasks_per_node_than_gpus_is_an_error_on_every_rank(local):
    with pytest.raises(D.LaunchError, match="--ntasks-per-node=8") as e:
        D.device_index(info(local, 16), dict(SLURM_GPUS_ON_NODE="8"), visible=8)
    assert "\n" not in str(e.value)


def test_local_rank_beyond_visible_names_the_binding():
    with pytest.raises(D.LaunchError, match=r"LOCAL_RANK=5.*--ntasks-per-node.*--gpus-per-task=1"):
        D.device_index(info(5, None, "mpirun"), dict(CUDA_VISIBLE_DEVICES="0,1"), visible=2)


def test_no_visible_gpu_is_an_error():
    with pytest.raises(D.LaunchError, match="CUDA_VISIBLE_DEVICES="):
        D.device_index(info(0, 8), dict(CUDA_VISIBLE_DEVICES=""), visible=0)


def test_bind_device_makes_local_rank_the_device_for_deepspeed():
    env = dict(LOCAL_RANK="5", OMPI_COMM_WORLD_LOCAL_RANK="5", SLURM_GPUS_ON_NODE="8")
    chosen = []
    assert PG.bind_device(info(5, 8), env, visible=1, set_device=chosen.append) == 0
    assert chosen == [0] and env["LOCAL_RANK"] == "0" and env["OMPI_COMM_WORLD_LOCAL_RANK"] == "0"
    env = dict(LOCAL_RANK="5")
    PG.bind_device(info(5, 8), env, visible=8, set_device=chosen.append)
    assert chosen[-1] == 5 and env == dict(LOCAL_RANK="5")


def test_discovery_does_not_load_torch():
    # rank discovery is environment work; torch loads only when a device is chosen
    code = "import sys, megadrp.runtime.launch as d; d.discover({}); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)


# ---- init --------------------------------------------------------------------------------------
def test_init_turns_a_busy_port_into_rendezvous_busy(monkeypatch):
    calls = []

    def init_distributed(**kw):
        calls.append(kw)
        raise RuntimeError("The server socket has failed to listen on any local network address. port: 29500, "
                           "useIpv6: 0, code: -98, name: EADDRINUSE, message: address already in use")

    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(init_distributed=init_distributed))
    monkeypatch.setattr(PG, "accelerator", lambda: ("cpu", "gloo"))
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(PG.RendezvousBusy, match="MASTER_PORT=29500") as e:
        PG.init(info(0, 1))
    assert e.value.exit_code == 75 and calls[0]["dist_backend"] == "gloo"

    def other_failure(**kw):
        raise RuntimeError("connection refused")

    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(init_distributed=other_failure))
    with pytest.raises(RuntimeError, match="connection refused"):
        PG.init(info(0, 1))


def test_backend_follows_deepspeeds_accelerator_not_the_visible_gpus(tmp_path):
    """DS_ACCELERATOR=cpu on a host where torch sees a GPU (simulated: `_cuda_available` says
    yes, and no device exists to bind): a CPU engine needs a gloo group and no CUDA binding.
    Binding CUDA there fails ("sees no GPU"), and an NCCL group would refuse every CPU tensor."""
    code = """
import os, torch.distributed as dist, megadrp.runtime.launch as D, megadrp.runtime.process_group as PG
PG._cuda_available = lambda: True
info = D.discover(os.environ)
PG.init(info)
assert dist.get_backend() == "gloo", dist.get_backend()
assert PG.accelerator() == ("cpu", "gloo")
PG.shutdown()
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", MEGADRP_MASTER_PORT=str(D.free_port()))
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-3000:]
