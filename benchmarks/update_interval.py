"""How often should the controller update the domain weights? drpruning's continue stage with an
evaluation and update every {2, 5, 10, 20} steps, at equal tokens, from each seed's pruned drpruning
model (the schedules benchmark's): per-domain and worst-domain perplexity, the worst χ² mix, the
share of wall-clock the evaluations take, and the stability of the weights — the total variation
½·Σ|q_t − q_{t−1}| between consecutive decisions (mean and largest) and how many updates reverse
the previous move (the two moves' inner product is negative).

    python benchmarks/update_interval.py [--root runs/schedules_s5] [--seeds 3] [--name update_interval]
    python benchmarks/update_interval.py --root runs/schedules_debian_s5 \
        --data runs/schedules_debian_s5/base/data --continue-steps 60 --name update_interval_debian
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import ROOT, commit, interval, paired, rows_seconds, save

from megadrp.runtime.run_dir import RunDir

INTERVALS = (2, 5, 10, 20)


def stability(rows: list[dict]) -> dict:
    """Total variation between consecutive weight vectors, and reversals of direction."""
    names = list(rows[0]["weights"])
    q = np.array([[r["weights"][n] for n in names] for r in rows])
    moves = np.diff(q, axis=0)
    tv = 0.5 * np.abs(moves).sum(1)
    reversals = int(sum(float(a @ b) < 0 for a, b in zip(moves, moves[1:]) if np.abs(a).sum() and np.abs(b).sum()))
    return {"tv_mean": float(tv.mean()) if len(tv) else 0.0, "tv_max": float(tv.max()) if len(tv) else 0.0,
            "reversals": reversals, "updates": int(len(moves))}


def eval_share(rows: list[dict]) -> float:
    ev = sum(r.get("eval_seconds", 0.0) for r in rows)
    tr = sum(r.get("train_seconds", 0.0) for r in rows)
    return ev / (ev + tr) if ev + tr else float("nan")


def main() -> None:
    from megadrp.engine.metrics import read_metrics
    from megadrp.tools import pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=ROOT / "runs" / "schedules_s5")
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "demo" / "data")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--continue-steps", type=int, default=100)
    ap.add_argument("--name", default="update_interval")
    args = ap.parse_args()
    t0 = time.time()
    data = args.data.resolve()
    corpus = data != (ROOT / "runs" / "demo" / "data").resolve()
    evals: dict[int, list[dict]] = {i: [] for i in INTERVALS}
    stab: dict[int, list[dict]] = {i: [] for i in INTERVALS}
    shares: dict[int, list[float]] = {i: [] for i in INTERVALS}
    seconds = 0.0
    for seed in range(args.seeds):
        base = args.root / f"seed{seed}"
        for i in INTERVALS:
            run = base / f"interval{i}"
            over = [f"data_dir={data}", f"seed={1234 + seed}", "train.log_interval=1000", f"eval.interval={i}",
                    f"model.init={base / 'drpruning' / 'prune' / 'hf'}", f"train.steps={args.continue_steps}",
                    "dro.mode=drpruning", *(["domains=null", "dro.initial_proportion=tokens^0.3"] if corpus else [])]
            pipeline.train_stage("configs/tiny/continue.yaml", run / "continue", over, quiet=True, reuse="adopt")
            evals[i].append(pipeline.evaluate(RunDir(run / "continue").hf, data, 4096, 128, RunDir(run).eval_json))
            rows = read_metrics(RunDir(run / "continue").metrics)
            stab[i].append(stability([r for r in rows if r["step"] > 0]))
            shares[i].append(eval_share(rows))
            seconds += rows_seconds(rows)
            pipeline.log(f"seed {seed} interval {i}: worst ppl {evals[i][-1]['worst_ppl']:.2f}, "
                         f"TV {stab[i][-1]['tv_mean']:.4f}, eval share {shares[i][-1]:.1%}")
    names = list(evals[INTERVALS[0]][0]["domain_ppl"])
    ref = evals[5]  # the schedules benchmark's interval
    table = {}
    md = ["| interval | " + " | ".join(names) + " | mean ppl | worst ppl | worst χ² mix | worst vs interval 5, paired | "
          "evaluation share of wall-clock | TV per update (mean / max) | reversals / updates |",
          "|---" * (len(names) + 8) + "|"]
    for i in INTERVALS:
        runs = evals[i]
        r = {"domain_ppl": {n: float(np.mean([e["domain_ppl"][n] for e in runs])) for n in names},
             "mean_ppl": float(np.mean([e["mean_ppl"] for e in runs])),
             "worst_ppl": float(np.mean([e["worst_ppl"] for e in runs])),
             "worst_chi2_ppl": float(np.mean([e["shift"]["worst_chi2"]["ppl"] for e in runs])),
             "worst_vs_interval5_pct": paired([100 * (a["worst_ppl"] / b["worst_ppl"] - 1) for a, b in zip(runs, ref)]),
             "eval_share": float(np.mean(shares[i])), "tv_mean": float(np.mean([s["tv_mean"] for s in stab[i]])),
             "tv_max": float(np.max([s["tv_max"] for s in stab[i]])),
             "reversals": float(np.mean([s["reversals"] for s in stab[i]])),
             "updates": float(np.mean([s["updates"] for s in stab[i]]))}
        table[i] = r
        md.append(f"| {i} | " + " | ".join(f"{r['domain_ppl'][n]:.2f}" for n in names)
                  + f" | {r['mean_ppl']:.2f} | {r['worst_ppl']:.2f} | {r['worst_chi2_ppl']:.2f} | "
                  f"{interval(r['worst_vs_interval5_pct'])} | {r['eval_share']:.1%} | {r['tv_mean']:.4f} / "
                  f"{r['tv_max']:.4f} | {r['reversals']:.1f} / {r['updates']:.0f} |")
    md += ["", f"{args.seeds} seeds; drpruning's continue stage, {args.continue_steps} steps of 16 × 128 tokens from each "
           "seed's pruned drpruning model, at each interval (equal tokens); perplexities from megadrp eval. Commit "
           f"{commit()}; {seconds:.0f} s of training and evaluation (summed from the runs' metrics)."]
    save(args.name, {"seeds": args.seeds, "commit": commit(), "continue_steps": args.continue_steps,
                     "results": {str(k): v for k, v in table.items()}, "per_seed": {str(k): v for k, v in evals.items()},
                     "stability_per_seed": {str(k): v for k, v in stab.items()}, "stage_seconds": round(seconds),
                     "seconds": round(time.time() - t0)}, "\n".join(md))


if __name__ == "__main__":
    main()
