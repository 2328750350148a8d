"""A real single-node Slurm cluster for tests and local trials (slurmctld + slurmd + munge).

    python tests/slurm_cluster.py start DIR   # prints `export SLURM_CONF=...`
    python tests/slurm_cluster.py stop DIR

Generates slurm.conf in DIR (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, one
node with this machine's CPUs), starts munged if it is not running, then both daemons,
and waits until the node is idle. Needs root and Debian's slurmctld/slurmd/munge.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from megadrp.runtime.launch import free_port

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "sinfo")


def available() -> str | None:
    """None when a cluster can be started here; otherwise the reason it cannot."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd needs root"
    return None



def write_conf(d: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    mem = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=megadrp
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits for its old credential to expire before it may start (~2 min by
# default); the requeue test needs it to start in seconds.
AuthInfo=cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
KillWait=30
InactiveLimit=0
MinJobAge=300
NodeName={host} CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
    return conf


def _munge_running() -> bool:
    return subprocess.run(["munge", "-n"], capture_output=True).returncode == 0 if shutil.which("munge") else False


def start(d: Path, timeout: float = 60.0) -> dict[str, str]:
    """Start the cluster; returns the environment (SLURM_CONF) its clients need."""
    why = available()
    if why:
        raise RuntimeError(why)
    d.mkdir(parents=True, exist_ok=True)
    conf = write_conf(d)
    env = dict(os.environ, SLURM_CONF=str(conf))
    if not _munge_running():
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
    for daemon in ("slurmctld", "slurmd"):
        subprocess.Popen([daemon, "-D", "-f", str(conf)], env=env, stdout=open(d / "log" / f"{daemon}.out", "w"),
                         stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    while time.time() - t0 < timeout:
        p = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
        if p.returncode == 0 and p.stdout.strip() in ("idle", "idle*", "mixed"):
            return {"SLURM_CONF": str(conf)}
        time.sleep(0.5)
    logs = "\n".join((d / "log" / f).read_text()[-2000:] for f in ("slurmctld.out", "slurmd.out")
                     if (d / "log" / f).exists())
    stop(d)
    raise RuntimeError(f"Slurm did not become ready in {timeout:.0f}s:\n{logs}")


def stop(d: Path) -> None:
    for pid_file in ("slurmd.pid", "slurmctld.pid"):
        p = d / pid_file
        if p.exists():
            try:
                os.kill(int(p.read_text().strip()), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass
    time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2 or args[0] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    d = Path(args[1]).resolve()
    if args[0] == "start":
        env = start(d)
        print(f"export SLURM_CONF={env['SLURM_CONF']}")
    else:
        stop(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
