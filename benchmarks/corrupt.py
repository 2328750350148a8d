"""Robustness to corrupted test text: do the schedules' models keep their order as the eval text
degrades? Each seed's continued model of constant, sheared and drpruning (the schedules benchmark's
runs) scored by `megadrp eval --corrupt RATE --shift` at rates {0, 0.05, 0.1, 0.2}: that share of
the eval tokens replaced by random ones (the same damage for every model: seeded), scoring only the
targets left intact, so the loss measures prediction of real text from a damaged context.

    python benchmarks/corrupt.py [--root runs/schedules_s5] [--seeds 5] [--name corrupt]
    python benchmarks/corrupt.py --root runs/schedules_debian_s5 --data runs/schedules_debian_s5/base/data \
        --name corrupt_debian
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import ROOT, commit, first_weights, interval, paired, save

from megadrp.runtime.run_dir import RunDir

MODES = ("constant", "sheared", "drpruning")
RATES = (0.0, 0.05, 0.1, 0.2)


def main() -> None:
    from megadrp.tools import pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=ROOT / "runs" / "schedules_s5")
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "demo" / "data")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--name", default="corrupt")
    args = ap.parse_args()
    t0 = time.time()
    evals = {(m, r): [] for m in MODES for r in RATES}
    for seed in range(args.seeds):
        for m in MODES:
            run = args.root / f"seed{seed}" / m
            p0 = first_weights(RunDir(run / "prune").metrics)  # one χ² ball for every schedule
            for r in RATES:
                out = RunDir(run).eval_json if r == 0 else run / f"eval_corrupt{r:g}.json"
                evals[(m, r)].append(pipeline.evaluate(RunDir(run / "continue").hf, args.data.resolve(), 4096, 128,
                                                       out, corrupt=r, p0=p0))
        pipeline.log(f"seed {seed} scored at {len(RATES)} rates")
    rows = {}
    md = ["| rate | schedule | mean ppl | worst ppl | worst χ² mix | worst vs sheared, paired | mean vs sheared, paired "
          "| worst χ² mix vs sheared |", "|---|---|---|---|---|---|---|---|"]
    for r in RATES:
        for m in MODES:
            runs, ref = evals[(m, r)], evals[("sheared", r)]
            row = {"mean_ppl": float(np.mean([e["mean_ppl"] for e in runs])),
                   "worst_ppl": float(np.mean([e["worst_ppl"] for e in runs])),
                   "worst_chi2_ppl": float(np.mean([e["shift"]["worst_chi2"]["ppl"] for e in runs])),
                   "worst_vs_sheared_pct": paired([100 * (a["worst_ppl"] / b["worst_ppl"] - 1) for a, b in zip(runs, ref)]),
                   "mean_vs_sheared_pct": paired([100 * (a["mean_ppl"] / b["mean_ppl"] - 1) for a, b in zip(runs, ref)]),
                   "worst_chi2_vs_sheared_pct": paired([100 * (a["shift"]["worst_chi2"]["ppl"] /
                                                               b["shift"]["worst_chi2"]["ppl"] - 1)
                                                        for a, b in zip(runs, ref)])}
            rows[f"{m}@{r:g}"] = row
            md.append(f"| {r:g} | {m} | {row['mean_ppl']:.2f} | {row['worst_ppl']:.2f} | {row['worst_chi2_ppl']:.2f} | "
                      f"{interval(row['worst_vs_sheared_pct'])} | {interval(row['mean_vs_sheared_pct'])} | "
                      f"{interval(row['worst_chi2_vs_sheared_pct'])} |")
    md += ["", f"{args.seeds} seeds; the schedules benchmark's continued models ({args.root}); each rate's damage is "
           "seeded, the same for every model; only intact targets are scored. Paired columns: per seed "
           f"100·(schedule / sheared − 1), mean [95% interval] (per seed). Commit {commit()}; {time.time() - t0:.0f} s."]
    save(args.name, {"seeds": args.seeds, "commit": commit(), "rates": list(RATES), "results": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
