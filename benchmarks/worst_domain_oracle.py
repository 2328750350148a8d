"""How far can any domain schedule move the worst domain at this scale? An oracle test of the
schedules benchmark's reading (README "The five schedules").

The goal the schedules are measured against is a worst-domain perplexity ≥ 5% below
`sheared`'s. Whether that is reachable at all in a 100-step continue stage is a question
about the worst domain, not about the schedules: this script continues each seed's pruned
`drpruning` model for the same steps and tokens with nearly the whole batch on the worst
domain (`dro.mode=constant`, p0 = 0.9 on it, the rest shared), which no schedule with a
floor would ever do, and scores the result with megadrp eval. If even that does not
bring the worst domain 5% below `sheared`'s, no schedule can at this budget, and the gap
measures the budget, not DRO.

The second arm tests the other candidate, the size of the χ² ball: the same continue stage
with `drpruning` and a larger ρ (`--rho`, default 0.5 against the recipe's 0.1), which lets the
weights move further from the reference ratio. The third tests the objective: χ² DRO minimises
the worst *excess* loss over each domain's reference (the stage's own first losses, or their
predicted values), not the worst loss; a domain that is hard in absolute terms but improves like
the others gets no extra weight. `dro` with every reference 0 makes the excess the loss itself,
with the recipe's ρ. All arms start from the same pruned model as the drpruning row of the
schedules table, so each differs from it in the continue stage only.

    python benchmarks/worst_domain_oracle.py [--root runs/schedules_s3] [--seeds 3] [--share 0.9] [--rho 0.5]
    python benchmarks/worst_domain_oracle.py --root runs/schedules_debian --data runs/schedules_debian/base/data \
        --continue-steps 60 --eval-interval 4 --name worst_domain_oracle_debian

Needs the schedules benchmark's stages under ROOT (seed*/drpruning/prune, seed*/*/eval.json). With
--data other than the embedded corpus's shards, the runs take their domains from the shards'
manifest and `drpruning`'s p0 ∝ tokens^0.3, as `schedules.py --corpus` does.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _common import ROOT, save

from megadrp.runtime.run_dir import RunDir

ARMS = ("drpruning", "oracle", "rho", "absolute")  # drpruning: the schedules table's own run


def main() -> None:
    from megadrp.tools import pipeline

    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=ROOT / "runs" / "schedules_s3")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--share", type=float, default=0.9, help="batch share of the worst domain")
    ap.add_argument("--rho", type=float, default=0.5, help="χ² radius of the second arm (the recipe's is 0.1)")
    ap.add_argument("--continue-steps", type=int, default=100)
    ap.add_argument("--eval-interval", type=int, default=5)
    ap.add_argument("--name", default="worst_domain_oracle")
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "demo" / "data",
                    help="the shards the schedules ran on (default: the embedded corpus's)")
    args = ap.parse_args()
    t0 = time.time()
    data = args.data.resolve()
    corpus = data != (ROOT / "runs" / "demo" / "data").resolve()
    rows = []
    for seed in range(args.seeds):
        base = args.root / f"seed{seed}"
        evals = {m: json.loads((RunDir(base / m).eval_json).read_text()) for m in ("sheared", "drpruning", "constant")}
        worst = max(evals["sheared"]["domain_ppl"], key=evals["sheared"]["domain_ppl"].get)
        names = list(evals["sheared"]["domain_ppl"])
        rest = (1.0 - args.share) / (len(names) - 1)
        p0 = "{" + ", ".join(f"{n}: {args.share if n == worst else rest}" for n in names) + "}"
        common = [f"data_dir={data}", f"seed={1234 + seed}", "train.log_interval=1000",
                  f"eval.interval={args.eval_interval}", f"model.init={base / 'drpruning' / 'prune' / 'hf'}",
                  f"train.steps={args.continue_steps}", *(["domains=null"] if corpus else [])]
        schedule_p0 = ["dro.initial_proportion=tokens^0.3"] if corpus else []  # the schedules' p0 (schedules.py)
        arms = {"oracle": ["dro.mode=constant", f"dro.initial_proportion={p0}"],
                "rho": ["dro.mode=drpruning", f"dro.rho={args.rho}", *schedule_p0],
                "absolute": ["dro.mode=dro", "dro.reference_loss={" + ", ".join(f"{n}: 0.0" for n in names) + "}",
                             *schedule_p0]}
        row: dict = {"seed": seed, "worst_domain": worst}
        for m in evals:
            row.update({f"{m}_ppl": evals[m]["domain_ppl"][worst], f"{m}_mean_ppl": evals[m]["mean_ppl"]})
        for arm, over in arms.items():
            name = {"oracle": "oracle", "rho": f"drpruning_rho{args.rho:g}", "absolute": "dro_absolute"}[arm]
            pipeline.train_stage("configs/tiny/continue.yaml", base / name / "continue", common + over, quiet=True,
                                 reuse="adopt")
            ev = pipeline.evaluate(RunDir(base / name / "continue").hf, data, 4096, 128, RunDir(base / name).eval_json)
            row.update({f"{arm}_ppl": ev["domain_ppl"][worst], f"{arm}_mean_ppl": ev["mean_ppl"],
                        f"{arm}_worst_ppl": ev["worst_ppl"]})
        for m in ARMS:
            row[f"{m}_vs_sheared_pct"] = 100 * (row[f"{m}_ppl"] / row["sheared_ppl"] - 1)
            row[f"{m}_mean_vs_sheared_pct"] = 100 * (row[f"{m}_mean_ppl"] / row["sheared_mean_ppl"] - 1)
        rows.append(row)
        pipeline.log(f"seed {seed}: {worst} ppl sheared {row['sheared_ppl']:.2f}, drpruning {row['drpruning_ppl']:.2f}, "
                     f"oracle {row['oracle_ppl']:.2f}, rho {args.rho:g} {row['rho_ppl']:.2f}, "
                     f"absolute {row['absolute_ppl']:.2f}")
    pct = "{:+.2f}%".format
    md = [f"| seed | worst domain | sheared | constant | drpruning (ρ 0.1) | oracle ({args.share:.0%} of the batch on "
          f"it) | drpruning, ρ {args.rho:g} in continue | dro, references 0 |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['seed']} | {r['worst_domain']} | {r['sheared_ppl']:.2f} | {r['constant_ppl']:.2f} | "
           f"{r['drpruning_ppl']:.2f} ({pct(r['drpruning_vs_sheared_pct'])}) | {r['oracle_ppl']:.2f} "
           f"({pct(r['oracle_vs_sheared_pct'])}) | {r['rho_ppl']:.2f} ({pct(r['rho_vs_sheared_pct'])}) | "
           f"{r['absolute_ppl']:.2f} ({pct(r['absolute_vs_sheared_pct'])}) |" for r in rows]
    md += ["", "Mean perplexity over domains (and against sheared's):", "",
           "| seed | sheared | drpruning (ρ 0.1) | oracle | drpruning, ρ " + f"{args.rho:g} | dro, references 0 |",
           "|---|---|---|---|---|---|"]
    md += [f"| {r['seed']} | {r['sheared_mean_ppl']:.2f} | {r['drpruning_mean_ppl']:.2f} "
           f"({pct(r['drpruning_mean_vs_sheared_pct'])}) | {r['oracle_mean_ppl']:.2f} "
           f"({pct(r['oracle_mean_vs_sheared_pct'])}) | {r['rho_mean_ppl']:.2f} ({pct(r['rho_mean_vs_sheared_pct'])}) | "
           f"{r['absolute_mean_ppl']:.2f} ({pct(r['absolute_mean_vs_sheared_pct'])}) |" for r in rows]
    summary = {f"{m}_{k}_mean": float(np.mean([r[f"{m}_{k}"] for r in rows]))
               for m in ARMS for k in ("vs_sheared_pct", "mean_vs_sheared_pct")}
    md += ["", "Means over seeds, against sheared: worst domain " + ", ".join(
           f"{m} {pct(summary[f'{m}_vs_sheared_pct_mean'])}" for m in ARMS)
           + "; mean perplexity " + ", ".join(f"{m} {pct(summary[f'{m}_mean_vs_sheared_pct_mean'])}"
                                              for m in ARMS) + ".",
           "", f"Both arms continue each seed's pruned drpruning model for {args.continue_steps} steps (16 × 128 tokens "
           f"each), evaluation every {args.eval_interval}; the oracle puts {args.share:.0%} of every batch on the worst "
           "domain (the one worst under sheared), the second runs drpruning with a larger χ² ball, the third dro with every "
           "reference loss 0 (the excess is the loss). Perplexities from "
           f"megadrp eval (32 windows of 128 tokens a domain); {time.time() - t0:.0f} s."]
    save(args.name, {"rows": rows, **summary, "share": args.share, "rho": args.rho,
                     "continue_steps": args.continue_steps}, "\n".join(md))


if __name__ == "__main__":
    main()
