"""Entry point: `deepspeed megadrp/train.py --config CONFIG.yaml [dotted.key=value ...]`
(or `megadrp train ...`).

Also runs as `python megadrp/train.py` (one process), under torchrun, srun and mpirun; wiring
only — the loop lives in megadrp/engine/trainer.py.

    --dry-run [--world-size N] [--gpu-memory GIB] [--json] [--no-disk-check] [--mfu 0.4] [--gpu h100]
        resolve and check everything that needs no weights (config, data manifest, the
        source's config.json against the target, the batch layout for N ranks, free space,
        the per-GPU memory plan, the cost: FLOPs by part and GPU-hours at --mfu on --gpu), print
        the plan, exit. With --gpu-memory a job whose plan does not fit is refused (exit 2, one
        line naming the largest term); --json prints the whole plan as one JSON object
        (`memory_per_gpu_bytes` and its `memory.terms`, `cost`). These flags need --dry-run.

Exit codes: 0 done (or a dry run that found no problem); 2 a user error (one line naming the
key, file or variable); 3 stopped at a checkpoint by SIGTERM/SIGUSR1 (resume with
resume=auto); 130 the same after Ctrl-C; 75 the rendezvous port was taken (retry).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import warnings

try:  # signal and logging only: nothing slow is imported before the stop handlers are in place
    from megadrp.runtime.stop import StopRequest
except ModuleNotFoundError as _e:  # run as a script from a checkout that was never installed
    if _e.name != "megadrp":
        raise
    print(f"train: megadrp is not installed in this Python ({sys.executable}); in the checkout run "
          "`pip install -e .` (or `make setup`), then launch again", file=sys.stderr)
    sys.exit(2)

# Before anything slow (torch and DeepSpeed imports, the rendezvous, a 7B model load): a stop
# during startup is a clean stop (exit 3, no new checkpoint), never death by SIGUSR1.
_STOP = StopRequest().install() if __name__ == "__main__" and "--dry-run" not in sys.argv else None

from megadrp.runtime.build_locks import pin_extensions_dir  # noqa: E402

pin_extensions_dir()  # before DeepSpeed is imported: its ops are built once per environment, not per start

from megadrp.errors import UserError  # noqa: E402


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="megadrp train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML run config (see configs/; a shipped one by its name "
                    "works from any directory)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dry-run", action="store_true", help="check and print the run plan, build nothing")
    ap.add_argument("--world-size", type=int, default=None, help="ranks to plan for with --dry-run (default: "
                    "the launcher's WORLD_SIZE / SLURM_NTASKS, else 1)")
    ap.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                    help="with --dry-run: GiB of memory per GPU of the job; refuse a plan that does not fit "
                    "(also what `auto` micro-batch and checkpointing plan for)")
    ap.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    ap.add_argument("--mfu", type=float, default=None,
                    help="with --dry-run: the model-FLOPs utilisation the cost's GPU-hours assume (default 0.4)")
    ap.add_argument("--gpu", choices=("a100", "h100", "h200"), default=None,
                    help="with --dry-run: the GPU whose bf16 peak the cost's GPU-hours assume (default h100)")
    ap.add_argument("--no-disk-check", action="store_true",
                    help="with --dry-run: report, but do not refuse, a run_dir without room")
    ap.add_argument("--plan-only", action="store_true",
                    help="with --dry-run: plan for another machine: only config.json of the models and the data's "
                    "manifest.json are read; the checks of the run's start (shards, weights, run_dir, resume) and "
                    "of free space are skipped")
    ap.add_argument("--time-limit", default=None, metavar="TIME",
                    help="stop at a checkpoint (exit 3) before this much time from the start has passed: seconds or "
                    "[D-]H:M:S (default: the Slurm job's end time, where it is known)")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.steps=10")
    return ap


def _check_flags(ap: argparse.ArgumentParser, args) -> None:
    """Refuse (exit 2, before any work) a plan-only flag without --dry-run, and values no plan
    can use."""
    only = [f for f, v in (("--world-size", args.world_size), ("--gpu-memory", args.gpu_memory), ("--mfu", args.mfu),
                           ("--gpu", args.gpu), ("--json", args.json or None),
                           ("--no-disk-check", args.no_disk_check or None), ("--plan-only", args.plan_only or None))
            if v is not None]
    if only and not args.dry_run:
        ap.error(f"{only[0]} plans a run: it needs --dry-run (a run takes its world size from the launcher and "
                 "plans for the device it has)")
    if args.world_size is not None and args.world_size < 1:
        ap.error(f"--world-size={args.world_size}: at least 1")
    if args.gpu_memory is not None and not (math.isfinite(args.gpu_memory) and args.gpu_memory > 0):
        ap.error(f"--gpu-memory={args.gpu_memory}: a positive number of GiB, e.g. 80")
    if args.mfu is not None and not (math.isfinite(args.mfu) and 0 < args.mfu <= 1):
        ap.error(f"--mfu={args.mfu}: a share in (0, 1], e.g. 0.4")


def _quiet_libraries() -> None:
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # DeepSpeed still calls torch.distributed APIs that warn on every step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.*")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _dry_run(cfg, args) -> int:
    from megadrp.plan import GIB, dry_run
    from megadrp.runtime.deadline import Deadline

    world = args.world_size or int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    budget = int(args.gpu_memory * GIB) if args.gpu_memory else None
    try:
        Deadline.find(args.time_limit)  # the run parses it first: the same refusal
        report = dry_run(cfg, world, budget, check_disk=not (args.no_disk_check or args.plan_only), mfu=args.mfu,
                         gpu=args.gpu or "h100")
        if not args.plan_only:  # what the run refuses at its start, refused here by the same function
            from megadrp.engine.startup import check_start

            assert report.plan is not None
            check_start(report.plan, world)
    except (UserError, OSError) as e:
        print(f"train: dry run: {e}", file=sys.stderr)
        return 2
    from megadrp.config import to_dict
    from megadrp.engine.checkpoint import RunRecord, describe_resume
    from megadrp.runtime.run_dir import RunDir

    record = RunRecord(to_dict(cfg), report.data.get("tokenizer_fingerprint")).state_dict()
    resume = describe_resume(RunDir(cfg.run_dir).checkpoints, cfg.resume, world, record)
    report.lines.insert(len(report.lines) - 1, resume)
    report.data["resume"] = resume
    print(json.dumps(report.data, indent=2) if args.json else "\n".join(report.lines))
    if report.problem:
        print(f"train: dry run: {report.problem}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None, stop: StopRequest | None = None) -> int:
    ap = parser()
    args = ap.parse_intermixed_args(argv)  # flags may follow the overrides
    _check_flags(ap, args)
    if not args.dry_run:  # a dry run builds nothing to stop at a checkpoint: it keeps the caller's handlers
        stop = stop or _STOP or StopRequest().install()
    _quiet_libraries()
    from megadrp.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except UserError as e:
        print(f"train: config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        return _dry_run(cfg, args)

    assert stop is not None
    from megadrp.engine.trainer import Trainer, TrainingStopped
    from megadrp.runtime import process_group
    from megadrp.runtime.deadline import Deadline
    from megadrp.runtime.run_dir import RunDir

    rank = os.environ.get("RANK", "?")
    try:
        deadline = Deadline.find(args.time_limit)
    except UserError as e:
        print(f"train: {e}", file=sys.stderr)
        return 2
    try:
        with process_group.starting() as info:  # DeepSpeed JIT-loads ops in init and in the engine build
            rank = info.rank
            if cfg.stage == "prune" and cfg.prune.method != "l0":  # one shot: no training step
                from megadrp.engine.clock import Clock
                from megadrp.engine.one_shot import OneShotPrune

                trainer = OneShotPrune(cfg, info, Clock(), stop)
            else:
                trainer = Trainer(cfg, info, stop, deadline)
        rc = trainer.run()
        if rc != 0 and rank == 0:  # the closing line of a run a signal stopped
            from megadrp.engine.checkpoint import latest

            last = latest(RunDir(cfg.run_dir).checkpoints)
            print(f"train: stopped ({stop.describe()}); "
                  + (f"the last checkpoint is {last}; resume with resume=auto" if last else
                     "no checkpoint was written (stopped before the first step); start again the same way"),
                  file=sys.stderr)
        return rc
    except process_group.RendezvousBusy as e:
        # Transient: mark the run for a retry (the Slurm scripts requeue it) and say so.
        print(f"train: {e}", file=sys.stderr)
        RunDir(cfg.run_dir).write_state("retry")
        return e.exit_code
    except (UserError, OSError, TrainingStopped) as e:
        from megadrp.errors import LaunchError

        print(f"train: {'launch error' if isinstance(e, LaunchError) else f'error (rank {rank})'}: {e}",
              file=sys.stderr)
        process_group.release()
        return 2


if __name__ == "__main__":
    sys.exit(main())
