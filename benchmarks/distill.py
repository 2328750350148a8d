"""Teacher-guided recovery measured: the continue stage after a prune, four ways, from the same
pruned model, with the source (the base model the prune started from) as the teacher.

    (a) LM loss, constant mix            (b) LM loss, drpruning (references: the source's losses)
    (c) KD (α = 1), constant mix         (d) KD, drpruning with the teacher's losses as references

    python benchmarks/distill.py [--root runs/schedules_s5] [--seeds 3] [--name distill]
    python benchmarks/distill.py --root runs/schedules_debian_s5 --data runs/schedules_debian_s5/base/data \
        --continue-steps 60 --eval-interval 4 --name distill_debian

Starts from the schedules benchmark's pruned `drpruning` model of each seed (ROOT/seed*/drpruning/prune/hf)
and its base model (the teacher). At equal tokens every arm runs the same steps. At equal wall-clock
the KD arms run the steps the LM arm's training time buys them: the ratio of their median step times
(measured on seed 0, from the runs' metrics), with the learning-rate schedule over their own steps.
Every model is scored by `megadrp eval` on the held-out windows (perplexity, lower is better); each
domain's ratio to the source's perplexity is reported (goal: none above 1.3), with the worst χ² mix
(`--shift`) and paired 95% intervals over seeds.

Along the way: every run evaluates itself on the same held-out windows every `--eval-interval`
steps (metrics.jsonl), so the arms are also compared at every token count, not only the last, and
the tokens each arm needs to reach (b)'s final worst-domain perplexity are counted: distillation's
claim is token efficiency, and at the end of a stage long enough for (b) to come near the
teacher there is little left to win.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np
from _common import ROOT, commit, interval, paired, save, stage_seconds, worst_ratio

from megadrp.runtime.run_dir import RunDir

ARMS = {"a": ("LM, constant", "constant", False), "b": ("LM, drpruning", "drpruning", False),
        "c": ("KD, constant", "constant", True), "d": ("KD, drpruning, teacher references", "drpruning", True)}


def step_seconds(run: Path) -> float:
    """The median training time of one step over the run's timed intervals."""
    from megadrp.engine.metrics import read_metrics

    rows = [r for r in read_metrics(RunDir(run).metrics) if r.get("train_seconds")]
    per_step = []
    for prev, r in zip(rows, rows[1:]):
        steps = r["step"] - prev["step"]
        if steps > 0:
            per_step.append(r["train_seconds"] / steps)
    return statistics.median(per_step) if per_step else float("nan")


def worst_curve(run: Path) -> dict[int, float]:
    """step → the worst domain's perplexity at each of the run's own evaluations (the held-out
    windows `megadrp eval` scores: at the last step the two agree)."""
    from megadrp.engine.metrics import read_metrics

    return {r["step"]: math.exp(max(r["eval_loss"].values())) for r in read_metrics(RunDir(run).metrics)
            if r.get("eval_loss")}


def trajectory(curves: dict[str, list[dict[int, float]]], final: int, rows: int = 10) -> tuple[dict, dict]:
    """({step: {"b": mean worst ppl, arm: paired % vs (b)}} at about `rows` evaluation steps, and
    {arm: per seed, the first evaluated step whose worst-domain ppl is at or below (b)'s at
    `final`, None where it never is})."""
    steps = sorted(set.intersection(*(set(c) for runs in curves.values() for c in runs)) - {0})
    keep = steps[max(1, math.ceil(len(steps) / rows)) - 1::max(1, math.ceil(len(steps) / rows))]
    if steps and steps[-1] not in keep:
        keep.append(steps[-1])
    table = {}
    for step in keep:
        table[step] = {"b": float(np.mean([c[step] for c in curves["b"]]))}
        for arm, runs in curves.items():
            if arm != "b":
                table[step][arm] = paired([100 * (x[step] / y[step] - 1) for x, y in zip(runs, curves["b"])])
    short = [max(b) for b in curves["b"] if max(b) != final]
    if short:
        raise SystemExit(f"distill: an arm (b) run ends at step {short[0]}, not {final}: it was trained with another "
                         "--continue-steps; remove its distill_* runs or pass another --root")
    reach = {arm: [next((st for st in sorted(c) if st > 0 and c[st] <= b[final]), None) for c, b in zip(runs, curves["b"])]
             for arm, runs in curves.items()}
    return table, reach


def main() -> None:
    from megadrp.tools import pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=ROOT / "runs" / "schedules_s5")
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "demo" / "data")
    ap.add_argument("--teacher", type=Path, default=None, help="default: the schedules' base model (ROOT/../base or "
                    "runs/demo/pretrain)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--continue-steps", type=int, default=100)
    ap.add_argument("--eval-interval", type=int, default=5)
    ap.add_argument("--name", default="distill")
    args = ap.parse_args()
    t0 = time.time()
    data = args.data.resolve()
    corpus = data != (ROOT / "runs" / "demo" / "data").resolve()
    teacher = (args.teacher or (args.root / "base" / "pretrain" if corpus else ROOT / "runs" / "demo" / "pretrain"))
    teacher = RunDir(teacher.resolve()).hf
    source_ppl = pipeline.evaluate(teacher, data, 4096, 128, args.root / "base_eval.json")["domain_ppl"]
    names = list(source_ppl)
    evals: dict[str, list[dict]] = {}
    timing: dict[str, float] = {}
    kd_steps = None
    for seed in range(args.seeds):
        base = args.root / f"seed{seed}"
        common = [f"data_dir={data}", f"seed={1234 + seed}", "train.log_interval=1000",
                  f"eval.interval={args.eval_interval}", f"model.init={base / 'drpruning' / 'prune' / 'hf'}",
                  *(["domains=null", "dro.initial_proportion=tokens^0.3"] if corpus else [])]
        plan = {k: args.continue_steps for k in ARMS}
        if kd_steps is not None:
            plan.update({"c_clock": kd_steps, "d_clock": kd_steps})
        for arm, steps in plan.items():
            label, mode, kd = ARMS[arm[0]]
            over = [f"dro.mode={mode}", f"train.steps={steps}"]
            if kd:
                over += [f"distill.teacher={teacher}", "distill.alpha=1.0", "distill.chunk_tokens=512"]
                if mode == "drpruning":
                    over.append("dro.reference_loss=teacher")
            run = base / f"distill_{arm}"
            pipeline.train_stage("configs/tiny/continue.yaml", run / "continue", common + over, quiet=True,
                                 reuse="adopt")
            ev = pipeline.evaluate(RunDir(run / "continue").hf, data, 4096, 128, RunDir(run).eval_json)
            evals.setdefault(arm, []).append(ev)
            if seed == 0:
                timing[arm] = step_seconds(run / "continue")
            pipeline.log(f"seed {seed} ({arm}) {label}: mean ppl {ev['mean_ppl']:.3f} worst {ev['worst_ppl']:.3f}")
        if seed == 0:  # the KD arms at the LM arm's wall-clock: the steps its training time buys them
            ratio = timing["c"] / timing["a"]
            kd_steps = max(args.eval_interval, int(round(args.continue_steps / ratio)))
            plan = {"c_clock": kd_steps, "d_clock": kd_steps}
            for arm, steps in plan.items():
                label, mode, kd = ARMS[arm[0]]
                over = [f"dro.mode={mode}", f"train.steps={steps}", f"distill.teacher={teacher}", "distill.alpha=1.0",
                        "distill.chunk_tokens=512", *(["dro.reference_loss=teacher"] if mode == "drpruning" else [])]
                run = base / f"distill_{arm}"
                pipeline.train_stage("configs/tiny/continue.yaml", run / "continue", common + over, quiet=True,
                                 reuse="adopt")
                evals.setdefault(arm, []).append(pipeline.evaluate(RunDir(run / "continue").hf, data, 4096, 128,
                                                                   RunDir(run).eval_json))
    table = {}
    for arm, runs in evals.items():
        ref = evals["b"]
        ratios = [worst_ratio(e, source_ppl)[0] for e in runs]
        table[arm] = {
            "label": ARMS[arm[0]][0] + (" (equal wall-clock)" if arm.endswith("clock") else ""),
            "domain_ppl": {n: float(np.mean([e["domain_ppl"][n] for e in runs])) for n in names},
            "mean_ppl": float(np.mean([e["mean_ppl"] for e in runs])),
            "worst_ppl": float(np.mean([e["worst_ppl"] for e in runs])),
            "worst_chi2_ppl": float(np.mean([e["shift"]["worst_chi2"]["ppl"] for e in runs])),
            "worst_ratio_to_source": float(np.mean(ratios)), "worst_ratio_max": float(np.max(ratios)),
            "worst_vs_b_pct": paired([100 * (x["worst_ppl"] / y["worst_ppl"] - 1) for x, y in zip(runs, ref)]),
            "mean_vs_b_pct": paired([100 * (x["mean_ppl"] / y["mean_ppl"] - 1) for x, y in zip(runs, ref)]),
            "worst_chi2_vs_b_pct": paired([100 * (x["shift"]["worst_chi2"]["ppl"] / y["shift"]["worst_chi2"]["ppl"] - 1)
                                           for x, y in zip(runs, ref)]),
        }
    step_ratio = timing["c"] / timing["a"]
    curves = {arm: [worst_curve(args.root / f"seed{seed}" / f"distill_{arm}" / "continue") for seed in range(args.seeds)]
              for arm in ARMS}
    traj, reach = trajectory(curves, args.continue_steps)
    seconds = sum(stage_seconds(RunDir(args.root / f"seed{seed}" / f"distill_{arm}" / "continue").metrics)
                  for seed in range(args.seeds) for arm in evals)
    md = ["| arm | " + " | ".join(names) + " | mean ppl | worst ppl | worst χ² mix | largest ratio to the source "
          "| worst vs (b), paired | mean vs (b), paired | worst χ² mix vs (b) |", "|---" * (len(names) + 8) + "|"]
    for arm, r in table.items():
        md.append(f"| ({arm}) {r['label']} | " + " | ".join(f"{r['domain_ppl'][n]:.2f}" for n in names)
                  + f" | {r['mean_ppl']:.2f} | {r['worst_ppl']:.2f} | {r['worst_chi2_ppl']:.2f} | "
                  f"{r['worst_ratio_to_source']:.3f} (max {r['worst_ratio_max']:.3f}) | {interval(r['worst_vs_b_pct'])} "
                  f"| {interval(r['mean_vs_b_pct'])} | {interval(r['worst_chi2_vs_b_pct'])} |")
    teacher_worst = max(source_ppl.values())
    md += ["", "Along the stage, at equal tokens: the worst domain's perplexity in each run's own evaluations, "
           f"(b)'s mean and each arm paired against (b) (the teacher's worst: {teacher_worst:.2f}):", "",
           "| step | (b) worst ppl | (b) over the teacher | " + " | ".join(f"({a}) vs (b)" for a in ARMS if a != "b") + " |",
           "|---" * (len(ARMS) + 2) + "|"]
    for step, row in traj.items():
        md.append(f"| {step} | {row['b']:.2f} | {100 * (row['b'] / teacher_worst - 1):+.1f}% | "
                  + " | ".join(interval(row[a]) for a in ARMS if a != "b") + " |")
    md += ["", f"Steps to reach (b)'s worst-domain perplexity at step {args.continue_steps} (per seed, to the "
           f"evaluation interval, {args.eval_interval}; — never): "
           + "; ".join(f"({a}) {', '.join('—' if x is None else str(x) for x in r)}" for a, r in reach.items()) + ".",
           "", f"Source (teacher) perplexity: {', '.join(f'{n} {source_ppl[n]:.2f}' for n in names)}.",
           f"Step time, KD over LM (median over seed 0's intervals; the teacher's forward and the chunked KL): "
           f"**{step_ratio:.2f}×** (goal ≤ 1.6). Equal wall-clock: the KD arms run {kd_steps} steps for the LM arms' "
           f"{args.continue_steps}.",
           f"{args.seeds} seeds; continue {args.continue_steps} steps of 16 × 128 tokens from each seed's pruned drpruning "
           f"model, evaluation every {args.eval_interval}; perplexities from megadrp eval (32 windows of 128 tokens a "
           f"domain); paired columns: per seed 100·(arm / (b) − 1), mean [95% interval] (per seed). Commit {commit()}; "
           f"{seconds:.0f} s of training and evaluation (summed from the runs' metrics)."]
    save(args.name, {"seeds": args.seeds, "commit": commit(), "source_ppl": source_ppl, "step_time_ratio": step_ratio,
                     "step_seconds": timing, "kd_steps_at_equal_wall_clock": kd_steps,
                     "continue_steps": args.continue_steps, "results": table, "per_seed": evals,
                     "trajectory": {str(k): v for k, v in traj.items()}, "steps_to_b_final": reach,
                     "teacher_worst_ppl": teacher_worst, "stage_seconds": round(seconds),
                     "seconds": round(time.time() - t0)}, "\n".join(md))


if __name__ == "__main__":
    main()
