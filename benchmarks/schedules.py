"""The five domain schedules compared: from the same base model and shards, prune then
continue with each of constant, sheared, dro, dro_dyloss, drpruning at equal tokens, and
evaluate every result with megadrp.evaluate (transformers).

    python benchmarks/schedules.py [--seeds 1] [--prune-steps 100] [--continue-steps 100]

Reuses runs/demo's data and base model when `make demo` has run (else builds them).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import ROOT, save

MODES = ("constant", "sheared", "dro", "dro_dyloss", "drpruning")


def main() -> None:
    from megadrp import pipeline

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--prune-steps", type=int, default=100)
    ap.add_argument("--continue-steps", type=int, default=100)
    ap.add_argument("--root", type=Path, default=ROOT / "runs" / "schedules")
    args = ap.parse_args()
    t0 = time.time()
    demo = ROOT / "runs" / "demo"
    data = pipeline.prepare_data(demo)
    base = demo / "pretrain"
    pipeline.train_stage("configs/tiny/pretrain.yaml", base, [f"data_dir={data}"])
    evals: dict[str, list[dict]] = {m: [] for m in MODES}
    for seed in range(args.seeds):
        for mode in MODES:
            root = args.root / f"seed{seed}" / mode
            common = [f"data_dir={data}", f"seed={1234 + seed}", f"dro.mode={mode}", "train.log_interval=1000"]
            pipeline.train_stage("configs/tiny/prune.yaml", root / "prune",
                                 common + [f"model.init={base / 'hf'}", f"train.steps={args.prune_steps}"], quiet=True)
            pipeline.train_stage("configs/tiny/continue.yaml", root / "continue",
                                 common + [f"model.init={root / 'prune' / 'hf'}", f"train.steps={args.continue_steps}"],
                                 quiet=True)
            evals[mode].append(pipeline.evaluate(root / "continue" / "hf", data, 4096, 128, root / "eval.json"))
            pipeline.log(f"{mode} seed {seed}: mean ppl {evals[mode][-1]['mean_ppl']:.3f} "
                         f"worst {evals[mode][-1]['worst_ppl']:.3f}")
    names = list(evals[MODES[0]][0]["domain_ppl"])
    table = {}
    for mode in MODES:
        ppl = {n: float(np.mean([e["domain_ppl"][n] for e in evals[mode]])) for n in names}
        table[mode] = {"domain_ppl": ppl, "mean_ppl": float(np.mean([e["mean_ppl"] for e in evals[mode]])),
                       "worst_ppl": float(np.mean([e["worst_ppl"] for e in evals[mode]]))}
    ref = table["sheared"]
    for mode in MODES:
        table[mode]["mean_vs_sheared_pct"] = 100 * (table[mode]["mean_ppl"] / ref["mean_ppl"] - 1)
        table[mode]["worst_vs_sheared_pct"] = 100 * (table[mode]["worst_ppl"] / ref["worst_ppl"] - 1)
    md = ["| schedule | " + " | ".join(names) + " | mean ppl | worst ppl | mean vs sheared | worst vs sheared |",
          "|---" * (len(names) + 5) + "|"]
    for mode, r in table.items():
        md.append(f"| {mode} | " + " | ".join(f"{r['domain_ppl'][n]:.3f}" for n in names)
                  + f" | {r['mean_ppl']:.3f} | {r['worst_ppl']:.3f} | {r['mean_vs_sheared_pct']:+.2f}% "
                  f"| {r['worst_vs_sheared_pct']:+.2f}% |")
    md += ["", f"{args.seeds} seed(s); prune {args.prune_steps} steps + continue {args.continue_steps} steps per "
           f"schedule, 16 × 128 tokens a step, 2 ranks ZeRO-3 on CPU; {time.time() - t0:.0f} s in all. "
           "Perplexities from megadrp.evaluate on 32 eval windows of 128 tokens per domain."]
    save("schedules", {"seeds": args.seeds, "prune_steps": args.prune_steps, "continue_steps": args.continue_steps,
                       "results": table, "seconds": round(time.time() - t0)}, "\n".join(md))


if __name__ == "__main__":
    main()
