"""Does pruning follow its target? The tiny prune stage from the demo's base model, for each
variant × length × seed: the masks' expected shape against the ramped target at every
evaluation, the largest overshoot during the ramp and the largest deviation after it (both
as a share of the amount to remove, per dimension), and the pruned model's final eval loss.

    python benchmarks/pruning_control.py [--seeds 3] [--lengths 150,300] \\
        [--variant before=] [--variant after=prune.lambda_lr=0.05,prune.mask_lr=0.2]

Goal (issue #20): overshoot ≤ 25% of the amount to remove during the ramp; within 10% of it at
every evaluation after the ramp; the final loss's spread over seeds a third of today's.
Reuses runs/demo's data and base model when `make demo` has run (else builds them).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from _common import ROOT, save

from megadrp.engine.metrics import pruning_control as control
from megadrp.runtime.run_dir import RunDir


def main() -> None:
    from megadrp.engine.metrics import read_metrics
    from megadrp.tools import pipeline

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lengths", default="150,300", help="prune steps of each run (150 is the tiny recipe)")
    ap.add_argument("--variant", action="append", default=None,
                    help="NAME=key=value,key=value (overrides of configs/tiny/prune.yaml); repeatable")
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--name", default="pruning_control")
    args = ap.parse_args()
    variants = {}
    for v in args.variant or ["recipe="]:
        name, _, over = v.partition("=")
        variants[name] = [o for o in over.split(",") if o]
    t0 = time.time()
    demo = ROOT / "runs" / "demo"
    data = pipeline.prepare_data(demo, reuse="refuse")  # `make demo`'s: reused only where made alike, never rebuilt
    base = demo / "pretrain"
    pipeline.train_stage("configs/tiny/pretrain.yaml", base, [f"data_dir={data}"], reuse="refuse")
    results: dict = {}
    for name, over in variants.items():
        for length in (int(x) for x in args.lengths.split(",")):
            for seed in range(args.seeds):
                run = ROOT / "runs" / "pruning_control" / name / f"steps{length}" / f"seed{seed}"
                pipeline.train_stage("configs/tiny/prune.yaml", run, [
                    f"data_dir={data}", f"model.init={base / 'hf'}", f"seed={1234 + seed}", f"train.steps={length}",
                    "train.log_interval=1000", "save.interval=0", *over], ranks=args.ranks, quiet=True, reuse="adopt")
                rows = read_metrics(RunDir(run).metrics)
                results.setdefault(name, {}).setdefault(str(length), []).append({
                    "seed": seed, "control": control(rows), "final_loss": float(np.mean(list(rows[-1]["eval_loss"].values()))),
                    "trajectory": [{"step": r["step"], "expected": r["expected_shape"], "target": r["target_shape"]}
                                   for r in rows]})
                pipeline.log(f"{name} {length} steps seed {seed}: {results[name][str(length)][-1]['control']}")
    md = ["| variant | steps | max ramp overshoot (share of the amount to remove) | max post-ramp deviation "
          "| final eval loss per seed | spread (max − min) |", "|---|---|---|---|---|---|"]
    for name, by_len in results.items():
        for length, runs in by_len.items():
            over = max(v["ramp_overshoot"] for r in runs for v in r["control"].values())
            dev = max(v["post_ramp_deviation"] for r in runs for v in r["control"].values())
            losses = [r["final_loss"] for r in runs]
            md.append(f"| {name} ({','.join(variants[name]) or 'recipe'}) | {length} | {over:.2f} | {dev:.2f} | "
                      + ", ".join(f"{x:.3f}" for x in losses) + f" | {max(losses) - min(losses):.3f} |")
    md += ["", f"{args.seeds} seed(s), {args.ranks} rank(s); {time.time() - t0:.0f} s. Goal: overshoot ≤ 0.25, "
           "post-ramp deviation ≤ 0.10 at every evaluation."]
    save(args.name, {"variants": variants, "results": results, "seconds": round(time.time() - t0)}, "\n".join(md))


if __name__ == "__main__":
    main()
