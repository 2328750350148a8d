"""Downstream accuracy of an exported model with lm-evaluation-harness (`lm_eval`).

`megadrp eval --model RUN_DIR/hf --data DATA_DIR --tasks arc_easy,hellaswag`
adds a "downstream" object to the evaluation JSON: per task, lm-eval's metrics (acc,
acc_norm and their standard errors). The paper's set (README, "Downstream tasks") needs the
datasets from the Hugging Face hub; on a machine without network, `--task-dir DIR` adds
task YAMLs of your own (lm-eval reads local `json` datasets), as the tests do.

We call lm-eval's Python API rather than reimplementing multiple-choice scoring: its
tokenisation of (context, continuation) pairs, few-shot formatting and metric definitions
are what published numbers are computed with, so ours are comparable to them.
"""
from __future__ import annotations

import os
from pathlib import Path


def task_manager(tasks: list[str], task_dir: str | os.PathLike | None = None, online: bool = False):
    """lm-eval's task index (with `task_dir`'s YAMLs); unknown names raise ValueError naming
    them, so a typo fails before any model is loaded or any domain evaluated.

    Offline unless `online` (`--online`) or the environment already says otherwise: a hub
    lookup on a machine without network retries for minutes before it fails. Set before
    lm-eval (and `datasets`, which reads them at import) is imported."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if online:
            os.environ[var] = "0"
        else:
            os.environ.setdefault(var, "1")
    from lm_eval.tasks import TaskManager

    if task_dir is not None and not Path(task_dir).is_dir():
        raise ValueError(f"--task-dir {task_dir}: not a directory of lm-eval task YAMLs")
    manager = TaskManager(include_path=str(task_dir) if task_dir else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: lm-eval knows no task {', '.join(map(repr, unknown))}"
                         + ("" if task_dir else "; for a task of your own give --task-dir with its YAML"))
    return manager


def downstream(model_dir: str | os.PathLike, tasks: list[str], task_dir: str | os.PathLike | None = None,
               limit: int | None = None, batch_size: int = 8, num_fewshot: int | None = None,
               log_samples: bool = False, manager=None) -> dict:
    """Runs lm-eval's `simple_evaluate` on a Hugging Face model directory. Returns
    {"tasks": {task: {metric: value}}, "lm_eval_version": ..., "samples": ... (if asked)}.
    Unknown task names raise ValueError naming them before any model is loaded."""
    manager = manager or task_manager(tasks, task_dir)  # indexing lm-eval's tasks takes seconds: reuse
    import lm_eval
    import torch

    res = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"}, tasks=tasks,
        task_manager=manager, batch_size=batch_size, limit=limit, num_fewshot=num_fewshot,
        device="cuda" if torch.cuda.is_available() else "cpu", log_samples=log_samples)
    out: dict = {"tasks": {}, "lm_eval_version": getattr(lm_eval, "__version__", "unknown")}
    # Every result lm-eval returns: a group or tag (`truthfulqa`, `mmlu`) reports its
    # subtasks under their own names. A metric keeps its filter unless that is "none"
    # (gsm8k reports exact_match under strict-match and flexible-extract).
    for task, metrics in res["results"].items():
        out["tasks"][task] = {(key.split(",")[0] if key.endswith(",none") else key): float(v)
                              for key, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if log_samples:
        out["samples"] = res.get("samples", {})
    return out


def main(argv: list[str] | None = None) -> int:
    """`megadrp downstream --model DIR --tasks a,b`: lm-eval accuracy alone (no DATA_DIR); the
    same as `megadrp eval ... --tasks` without the perplexities."""
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model directory (e.g. RUN_DIR/hf)")
    ap.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks")
    ap.add_argument("--task-dir", default=None, help="a directory of your own lm-eval task YAMLs")
    ap.add_argument("--limit", type=int, default=None, help="at most N examples a task")
    ap.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (task default)")
    ap.add_argument("--online", action="store_true", help="let lm-eval download datasets from the hub")
    ap.add_argument("--out", default=None, help="also write the JSON result here")
    args = ap.parse_args(argv)
    if not Path(args.model, "config.json").is_file():
        ap.error(f"--model {args.model}: not a Hugging Face model directory (no config.json)")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        ap.error("needs lm-evaluation-harness: pip install -e '.[eval]'")
    tasks = args.tasks.split(",")
    try:
        manager = task_manager(tasks, args.task_dir, online=args.online)
        res = {"downstream": downstream(args.model, tasks, args.task_dir, args.limit, num_fewshot=args.num_fewshot,
                                        manager=manager)}
    except ValueError as e:
        print(f"downstream: error: {e}", file=sys.stderr)
        return 2
    line = json.dumps(res)
    if args.out:
        from megadrp.runtime.files import atomic_write_text

        atomic_write_text(args.out, line + "\n")
    print(line)
    return 0
