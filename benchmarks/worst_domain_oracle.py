"""How far can any domain schedule move the worst domain at this scale? An oracle test of the
schedules benchmark's reading (README "The five schedules").

The goal the schedules are measured against is a worst-domain perplexity ≥ 5% below
`sheared`'s. Whether that is reachable at all in a 100-step continue stage is a question
about the worst domain, not about the schedules: this script continues each seed's pruned
`drpruning` model for the same steps and tokens with nearly the whole batch on the worst
domain (`dro.mode=constant`, p0 = 0.9 on it, the rest shared), which no schedule with a
floor would ever do, and scores the result with megadrp.evaluate. If even that does not
bring the worst domain 5% below `sheared`'s, no schedule can at this budget, and the gap
measures the budget, not DRO.

    python benchmarks/worst_domain_oracle.py [--root runs/schedules_s3] [--seeds 3] [--share 0.9]

Needs the schedules benchmark's stages under ROOT (seed*/drpruning/prune, seed*/*/eval.json).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _common import ROOT, save


def main() -> None:
    from megadrp import pipeline

    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=ROOT / "runs" / "schedules_s3")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--share", type=float, default=0.9, help="batch share of the worst domain")
    ap.add_argument("--continue-steps", type=int, default=100)
    ap.add_argument("--eval-interval", type=int, default=5)
    ap.add_argument("--name", default="worst_domain_oracle")
    args = ap.parse_args()
    t0 = time.time()
    data = ROOT / "runs" / "demo" / "data"
    rows = []
    for seed in range(args.seeds):
        base = args.root / f"seed{seed}"
        evals = {m: json.loads((base / m / "eval.json").read_text()) for m in ("sheared", "drpruning", "constant")}
        worst = max(evals["sheared"]["domain_ppl"], key=evals["sheared"]["domain_ppl"].get)
        names = list(evals["sheared"]["domain_ppl"])
        rest = (1.0 - args.share) / (len(names) - 1)
        p0 = "{" + ", ".join(f"{n}: {args.share if n == worst else rest}" for n in names) + "}"
        run = base / "oracle" / "continue"
        pipeline.train_stage("configs/tiny/continue.yaml", run,
                             [f"data_dir={data}", f"seed={1234 + seed}", "dro.mode=constant", "train.log_interval=1000",
                              f"eval.interval={args.eval_interval}", f"dro.initial_proportion={p0}",
                              f"model.init={base / 'drpruning' / 'prune' / 'hf'}", f"train.steps={args.continue_steps}"],
                             quiet=True)
        oracle = pipeline.evaluate(run / "hf", data, 4096, 128, base / "oracle" / "eval.json")
        row = {"seed": seed, "worst_domain": worst,
               **{f"{m}_ppl": evals[m]["domain_ppl"][worst] for m in evals}, "oracle_ppl": oracle["domain_ppl"][worst],
               "oracle_mean_ppl": oracle["mean_ppl"]}
        row["oracle_vs_sheared_pct"] = 100 * (row["oracle_ppl"] / row["sheared_ppl"] - 1)
        row["drpruning_vs_sheared_pct"] = 100 * (row["drpruning_ppl"] / row["sheared_ppl"] - 1)
        rows.append(row)
        pipeline.log(f"seed {seed}: {worst} ppl sheared {row['sheared_ppl']:.2f}, drpruning {row['drpruning_ppl']:.2f}, "
                     f"oracle {row['oracle_ppl']:.2f} ({row['oracle_vs_sheared_pct']:+.2f}% vs sheared)")
    md = [f"| seed | worst domain | sheared | constant | drpruning | oracle ({args.share:.0%} of the batch on it) | "
          "drpruning vs sheared | oracle vs sheared | oracle's mean ppl |", "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['seed']} | {r['worst_domain']} | {r['sheared_ppl']:.2f} | {r['constant_ppl']:.2f} | "
           f"{r['drpruning_ppl']:.2f} | {r['oracle_ppl']:.2f} | {r['drpruning_vs_sheared_pct']:+.2f}% | "
           f"{r['oracle_vs_sheared_pct']:+.2f}% | {r['oracle_mean_ppl']:.2f} |" for r in rows]
    mean = float(np.mean([r["oracle_vs_sheared_pct"] for r in rows]))
    md += ["", f"Oracle against sheared on the worst domain, mean over seeds: {mean:+.2f}%. The oracle continues each "
           f"seed's pruned drpruning model for {args.continue_steps} steps (16 × 128 tokens each) with "
           f"{args.share:.0%} of every batch on the worst domain; perplexities from megadrp.evaluate (32 windows of "
           f"128 tokens a domain); {time.time() - t0:.0f} s."]
    save(args.name, {"rows": rows, "oracle_vs_sheared_pct_mean": mean, "share": args.share,
                     "continue_steps": args.continue_steps}, "\n".join(md))


if __name__ == "__main__":
    main()
