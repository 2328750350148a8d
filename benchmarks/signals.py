"""A cheaper signal for the controller (#40; results as benchmarks/results/signal.json — the script is not
`signal.py`, which would shadow the standard library's `signal` for every script in this folder): does DRPruning need a held-out evaluation at every
update? Each seed's base model (benchmarks/ablation.py's replicates), pruned and continued with
drpruning at equal training tokens, the controller weighing:

| arm (config name) | the signal | held-out evaluation |
|---|---|---|
| eval | the held-out evaluation (the paper's; the ablation's `drpruning` arm itself) | every update |
| train_ema | the moving average of each domain's training loss (0.9) | every `--held-out-every`-th update |
| train | each domain's mean training loss since the last update | every `--held-out-every`-th update |
| eval_auto | the held-out evaluation, each domain scored until its standard error ≤ `--target-se` | every update |

A training-loss signal's references are the source's losses on training windows (the same
basis, docs/method.md §9). Scored on the test split: the worst domain, the largest ratio to the
source, the mean; each paired over seeds against `eval`, with the evaluation's share of the
stages' wall-clock (the runs' clocks) and of their FLOPs (the cost ledger, RUN_DIR/cost.json).

    python benchmarks/signals.py [--seeds 3] [--held-out-every 4] [--corpus embedded|debian]

Needs (and reuses) the ablation's replicates and `drpruning` runs under --root (default
runs/ablation, or runs/ablation_debian); builds what is missing with the ablation's settings.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import (
    Replicate,
    commit,
    first_weights,
    interval,
    paired,
    replicate_args,
    replicate_root,
    save,
    worst_ratio,
)

from megadrp.runtime.files import read_json
from megadrp.runtime.run_dir import RunDir

ARMS = ("eval", "train_ema", "train", "eval_auto")


def overrides(arm: str, args) -> list[str]:
    base = ["dro.mode=drpruning", f"eval.interval={args.eval_interval}"]
    return base + {
        "eval": [],
        "train_ema": ["dro.signal=train_ema", f"eval.held_out_every={args.held_out_every}"],
        "train": ["dro.signal=train", f"eval.held_out_every={args.held_out_every}"],
        "eval_auto": ["eval.tokens_per_domain=auto", f"eval.target_se={args.target_se}",
                      f"eval.min_tokens_per_domain={args.min_tokens}", f"eval.max_tokens_per_domain={args.max_tokens}"],
    }[arm]


def run_dir(rep: Replicate, arm: str) -> Path:
    # `eval` is the ablation's drpruning arm: the same configuration, run once
    return rep.work / ("drpruning" if arm == "eval" else f"signal_{arm}")


def eval_share(run: Path) -> dict:
    """The evaluation's share of the two stages' clock and of their planned FLOPs."""
    from megadrp.cost_ledger import measured
    from megadrp.engine.metrics import read_metrics

    secs = {"eval": 0.0, "all": 0.0}
    flops = {"eval": 0.0, "all": 0.0}
    for stage in ("prune", "continue"):
        rd = RunDir(run / stage)
        m = measured(read_metrics(rd.metrics, events=True))
        secs["eval"] += m["eval"]
        secs["all"] += m["train"] + m["eval"] + m["controller_wait"]
        c = planned_cost(rd)
        flops["eval"] += c["flops"]["eval"]
        flops["all"] += c["total_flops"]
    return {"wall": secs["eval"] / secs["all"], "flops": flops["eval"] / flops["all"],
            "eval_seconds": secs["eval"], "stage_seconds": secs["all"]}


def planned_cost(rd: RunDir) -> dict:
    """The run's cost ledger: RUN_DIR/cost.json, or (a run from before it was written) the ledger
    of the plan its config.yaml resolves to."""
    if rd.cost.is_file():
        return read_json(rd.cost)
    from megadrp.config import load_config
    from megadrp.cost_ledger import ledger
    from megadrp.plan import make_plan

    return ledger(make_plan(load_config(rd.config), 2, 0), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    replicate_args(ap, "signal")
    ap.add_argument("--held-out-every", type=int, default=4, help="training-loss arms: held-out evaluation every Nth update")
    ap.add_argument("--target-se", type=float, default=0.05, help="eval_auto: the standard error to reach (nats)")
    ap.add_argument("--min-tokens", type=int, default=1024, help="eval_auto: the floor, tokens a domain")
    ap.add_argument("--max-tokens", type=int, default=8192, help="eval_auto: the ceiling, tokens a domain")
    args = ap.parse_args()
    root, name = replicate_root(args, "signal")
    t0, commit_id = time.time(), commit()
    evals: dict[str, list[dict]] = {a: [] for a in ARMS}
    shares: dict[str, list[dict]] = {a: [] for a in ARMS}
    sources, bases = [], []
    for seed in range(args.seeds):
        rep = Replicate(root, args.corpus, seed)
        p0 = None
        for arm in ARMS:
            run = run_dir(rep, arm)
            model = rep.prune_continue(run, overrides(arm, args), overrides(arm, args), args.prune_steps,
                                       args.continue_steps)
            p0 = p0 or first_weights(RunDir(run / "prune").metrics)
            evals[arm].append(rep.test_eval(model, run / "test_eval.json", p0))
            shares[arm].append(eval_share(run))
        sources.append(rep.source(p0)["domain_ppl"])
        bases.append(rep.base_record())
    pct = lambda a, b: 100.0 * (a / b - 1.0)  # noqa: E731
    metric = {"mean_ppl": lambda e, s: e["mean_ppl"], "worst_ppl": lambda e, s: e["worst_ppl"],
              "worst_ratio": lambda e, s: worst_ratio(e, s)[0]}
    table = {}
    for arm in ARMS:
        r = {}
        for key, f in metric.items():
            v = [f(e, s) for e, s in zip(evals[arm], sources)]
            r[key] = {"per_seed": v, "mean": float(np.mean(v)),
                      "vs_eval_pct": paired([pct(f(a, s), f(b, s)) for a, b, s in zip(evals[arm], evals["eval"], sources)])}
        r["eval_share_wall"] = float(np.mean([s["wall"] for s in shares[arm]]))
        r["eval_share_flops"] = float(np.mean([s["flops"] for s in shares[arm]]))
        r["per_seed_shares"] = shares[arm]
        table[arm] = r
    md = ["| signal | mean ppl | worst domain ppl | largest ratio to the source | worst vs eval [95%] | ratio vs eval "
          "[95%] | mean vs eval [95%] | evaluation share of wall-clock | of FLOPs |", "|---" * 10 + "|"]
    for arm, r in table.items():
        md.append(f"| {arm} | {r['mean_ppl']['mean']:.3f} | {r['worst_ppl']['mean']:.3f} | {r['worst_ratio']['mean']:.3f}"
                  f" | {interval(r['worst_ppl']['vs_eval_pct'])} | {interval(r['worst_ratio']['vs_eval_pct'])}"
                  f" | {interval(r['mean_ppl']['vs_eval_pct'])} | {r['eval_share_wall']:.1%} | "
                  f"{r['eval_share_flops']:.1%} |")
    md += ["", f"{args.seeds} seeds, each its own base model ({', '.join(b['path'] for b in bases)}); prune "
           f"{args.prune_steps} + continue {args.continue_steps} steps with drpruning, an update every "
           f"{args.eval_interval} steps; the training-loss arms evaluate held-out windows every "
           f"{args.held_out_every}th update (and at each stage's end), eval_auto scores each domain from "
           f"{args.min_tokens} to {args.max_tokens} tokens until its standard error ≤ {args.target_se} nats. Scored "
           "on the test split; paired: 100·(arm / eval − 1) per seed, mean [95% Student-t interval] (per-seed "
           "values); an interval that includes zero is no measurable difference. Evaluation shares: the two "
           "stages' held-out evaluation seconds over their training + evaluation + controller seconds (the runs' "
           "clocks, 2 CPU ranks), and the planned FLOPs (RUN_DIR/cost.json). On a GPU an evaluation's forward runs "
           f"at the training steps' throughput, so the FLOPs share is the one to carry to a cluster; commit {commit_id}."]
    save(name, {"seeds": args.seeds, "split": "test", "corpus": args.corpus, "commit": commit_id, "arms": list(ARMS),
                "base_models": bases, "held_out_every": args.held_out_every, "eval_interval": args.eval_interval,
                "results": table, "per_seed": evals, "source_ppl": sources, "seconds": round(time.time() - t0)},
         "\n".join(md))


if __name__ == "__main__":
    main()
