"""Pruning methods side by side (#39): what do learned masks buy over a one-shot prune, and at what
cost? From each seed's base model (benchmarks/ablation.py's replicates), every method prunes to
the same target, then the same continue stage (drpruning) at equal tokens:

| arm | prune |
|---|---|
| l0_cold | learned L0 masks, log α uniform (the paper's; the ablation's `drpruning` run itself) |
| l0_warm | learned L0 masks started from a one-shot minitron prune's choice (`prune.init: importance`) |
| minitron_mean | one shot: Minitron's activation importance, averaged over domains |
| minitron_worst | one shot: each domain's importance normalised, a unit kept by its largest (megadrp's) |

and, at a target that removes layers only (ShortGPT cannot change width), `shortgpt` (Block
Influence) beside `minitron_depth` (the loss increase when a layer is skipped). Scored on the
test split before and after continuing: per domain, the worst domain, the largest ratio to the
source; each method's prune cost (the cost ledger's FLOPs, the clock's seconds); and the prune
steps the warm start needs to reach the cold start's final worst ratio (its own evaluations,
eval split, against the source's losses there: the within-stage trajectory the trainer records).

    python benchmarks/methods.py [--seeds 3] [--corpus embedded|debian]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import yaml
from _common import (
    ROOT,
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

from megadrp.engine.metrics import read_metrics
from megadrp.runtime.files import read_json
from megadrp.runtime.run_dir import RunDir

MAIN = ("l0_cold", "l0_warm", "minitron_mean", "minitron_worst")
DEPTH = ("shortgpt", "minitron_depth")


def depth_target() -> list[str]:
    """The tiny prune recipe's target in depth only: its layer count, the source's width."""
    prune = yaml.safe_load((ROOT / "configs/tiny/prune.yaml").read_text())["prune"]["target"]
    base = yaml.safe_load((ROOT / "configs/tiny/pretrain.yaml").read_text())["model"]["shape"]
    width = {k: base[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")}
    return [f"prune.target.{k}={v}" for k, v in {"num_hidden_layers": prune["num_hidden_layers"], **width}.items()]


def prune_overrides(arm: str, args) -> list[str]:
    common = ["dro.mode=drpruning", f"eval.interval={args.eval_interval}"]
    one_shot = [f"prune.calibration_tokens={args.calibration_tokens}"]
    return common + {
        "l0_cold": [],
        "l0_warm": ["prune.init=importance", *one_shot],
        "minitron_mean": ["prune.method=minitron", "prune.importance_over_domains=mean", *one_shot],
        "minitron_worst": ["prune.method=minitron", "prune.importance_over_domains=worst", *one_shot],
        "shortgpt": ["prune.method=shortgpt", *depth_target(), *one_shot],
        "minitron_depth": ["prune.method=minitron", *depth_target(), *one_shot],
    }[arm]


def run_of(rep: Replicate, arm: str) -> Path:
    return rep.work / ("drpruning" if arm == "l0_cold" else f"method_{arm}")


def prune_cost(run: Path) -> dict:
    """The prune stage's FLOPs (cost ledger) and seconds (its clock, or its rows' training and
    evaluation seconds for a run from before the clock)."""
    from megadrp.cost_ledger import measured

    rd = RunDir(run / "prune")
    rows = read_metrics(rd.metrics, events=True)
    m = measured(rows)
    seconds = sum(m.values()) if any(r.get("event") for r in rows) else sum(
        r.get("train_seconds", 0.0) + r.get("eval_seconds", 0.0) for r in rows)
    flops = read_json(rd.cost)["total_flops"] if rd.cost.is_file() else _ledger(rd)["total_flops"]
    return {"flops": flops, "seconds": seconds}


def _ledger(rd: RunDir) -> dict:
    from megadrp.config import load_config
    from megadrp.cost_ledger import ledger
    from megadrp.plan import make_plan

    return ledger(make_plan(load_config(rd.config), 2, 0), 2)


def trajectory(run: Path) -> list[tuple[int, float]]:
    """(step, largest ratio of a domain's eval-split perplexity to the source's) along a prune,
    from its own evaluations and its reference losses (the source's, `auto`), at the evaluations
    where the target has reached the final shape (the sparsity ramp is over): before that the
    evaluated model is larger than the target, and its ratio says nothing about the target's."""
    rows = [r for r in read_metrics(RunDir(run / "prune").metrics) if r.get("eval_loss") and r.get("reference_loss")]
    src, final = rows[0]["reference_loss"], rows[-1].get("target_sparsity", 0.0)
    return [(r["step"], max(float(np.exp(r["eval_loss"][n] - src[n])) for n in src)) for r in rows
            if r["step"] > 0 and r.get("target_sparsity", 0.0) >= final - 1e-9]


def steps_to_reach(traj: list[tuple[int, float]], goal: float) -> int | None:
    return next((s for s, v in traj if v <= goal), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    replicate_args(ap, "methods")
    ap.add_argument("--calibration-tokens", type=int, default=16384, help="tokens a domain the one-shot methods score")
    args = ap.parse_args()
    root, name = replicate_root(args, "methods")
    t0, commit_id = time.time(), commit()
    arms = MAIN + DEPTH
    pruned: dict[str, list[dict]] = {a: [] for a in arms}
    cont: dict[str, list[dict]] = {a: [] for a in arms}
    cost: dict[str, list[dict]] = {a: [] for a in arms}
    sources, bases, reach = [], [], []
    for seed in range(args.seeds):
        rep = Replicate(root, args.corpus, seed)
        p0 = None
        for arm in arms:
            run = run_of(rep, arm)
            over = prune_overrides(arm, args)
            model = rep.prune_continue(run, over, ["dro.mode=drpruning", f"eval.interval={args.eval_interval}"],
                                       args.prune_steps, args.continue_steps)
            p0 = p0 or first_weights(RunDir(run_of(rep, "l0_cold") / "prune").metrics)
            pruned[arm].append(rep.test_eval(RunDir(run / "prune").hf, run / "prune_test_eval.json", p0))
            cont[arm].append(rep.test_eval(model, run / "test_eval.json", p0))
            cost[arm].append(prune_cost(run))
        sources.append(rep.source(p0)["domain_ppl"])
        bases.append(rep.base_record())
        cold, warm = trajectory(run_of(rep, "l0_cold")), trajectory(run_of(rep, "l0_warm"))
        reach.append({"cold_final": cold[-1][1], "warm_steps": steps_to_reach(warm, cold[-1][1]),
                      "cold_steps": steps_to_reach(cold, cold[-1][1]), "warm_final": warm[-1][1]})
    pct = lambda a, b: 100.0 * (a / b - 1.0)  # noqa: E731
    ratio = lambda e, s: worst_ratio(e, s)[0]  # noqa: E731
    table = {}
    for arm in arms:
        ref = "l0_cold" if arm in MAIN else "minitron_depth"
        r = {"vs": ref}
        for when, ev in (("pruned", pruned), ("continued", cont)):
            r[when] = {
                "domain_ppl": {n: float(np.mean([e["domain_ppl"][n] for e in ev[arm]])) for n in sources[0]},
                "worst_ppl": [e["worst_ppl"] for e in ev[arm]], "mean_ppl": [e["mean_ppl"] for e in ev[arm]],
                "worst_ratio": [ratio(e, s) for e, s in zip(ev[arm], sources)],
                "worst_domain": [e["shift"]["worst_domain"]["domain"] for e in ev[arm]],
                "worst_vs_ref_pct": paired([pct(a["worst_ppl"], b["worst_ppl"]) for a, b in zip(ev[arm], ev[ref])]),
                "ratio_vs_ref_pct": paired([pct(ratio(a, s), ratio(b, s)) for a, b, s in zip(ev[arm], ev[ref], sources)]),
            }
        r["prune_flops"] = float(np.mean([c["flops"] for c in cost[arm]]))
        r["prune_seconds"] = float(np.mean([c["seconds"] for c in cost[arm]]))
        table[arm] = r
    worst_vs_mean = paired([pct(ratio(a, s), ratio(b, s))
                            for a, b, s in zip(cont["minitron_worst"], cont["minitron_mean"], sources)])
    worst_vs_mean_pruned = paired([pct(ratio(a, s), ratio(b, s))
                                   for a, b, s in zip(pruned["minitron_worst"], pruned["minitron_mean"], sources)])
    names = list(sources[0])
    md = ["Test split, mean over seeds; 'vs' columns paired per seed against the reference arm (l0_cold, or "
          "minitron_depth for the depth-only pair): 100·(arm / reference − 1), mean [95% interval] (per-seed values):",
          "", "| arm | prune cost (PFLOP, s) | after the prune: worst ppl | largest ratio to source | after continuing: "
          "worst ppl | largest ratio to source | worst vs reference | ratio vs reference |", "|---" * 9 + "|"]
    for arm, r in table.items():
        a, c = r["pruned"], r["continued"]
        md.append(f"| {arm} | {r['prune_flops'] / 1e15:.4f}, {r['prune_seconds']:.0f} | {np.mean(a['worst_ppl']):.2f} | "
                  f"{np.mean(a['worst_ratio']):.3f} | {np.mean(c['worst_ppl']):.2f} | {np.mean(c['worst_ratio']):.3f} | "
                  + (f"{interval(c['worst_vs_ref_pct'])} | {interval(c['ratio_vs_ref_pct'])} |" if arm != r["vs"]
                     else "reference | reference |"))
    md += ["", "Per domain after continuing (test perplexity, mean over seeds):", "",
           "| arm | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
           "| source | " + " | ".join(f"{np.mean([s[n] for s in sources]):.2f}" for n in names) + " |"]
    for arm, r in table.items():
        md.append(f"| {arm} | " + " | ".join(f"{r['continued']['domain_ppl'][n]:.2f}" for n in names) + " |")
    md += ["", "Answers:", "",
           f"- l0 against a one-shot prune after the same recovery: the largest ratio to the source, minitron_mean vs "
           f"l0_cold {interval(table['minitron_mean']['continued']['ratio_vs_ref_pct'])}, minitron_worst vs l0_cold "
           f"{interval(table['minitron_worst']['continued']['ratio_vs_ref_pct'])}.",
           f"- `worst` against `mean` (the largest ratio to the source): after the prune {interval(worst_vs_mean_pruned)}, "
           f"after continuing {interval(worst_vs_mean)}.",
           "- prune steps the warm start needs to reach the cold start's final worst ratio (eval split, its own "
           "evaluations once the sparsity ramp has reached the target shape): "
           + ", ".join(f"seed {i}: {r['warm_steps'] if r['warm_steps'] is not None else 'never'} "
                       f"(cold {r['cold_steps']}, goal ≤ {args.prune_steps // 2})" for i, r in enumerate(reach)) + ".",
           "", f"{args.seeds} seeds, each its own base model ({', '.join(b['path'] for b in bases)}); prune "
           f"{args.prune_steps} steps (l0) or one shot on {args.calibration_tokens} calibration tokens a domain, then "
           f"continue {args.continue_steps} steps with drpruning, evaluation every {args.eval_interval}; 2 CPU ranks; "
           f"commit {commit_id}. Scored on the test split (no run opened it)."]
    save(name, {"seeds": args.seeds, "split": "test", "corpus": args.corpus, "commit": commit_id, "arms": list(arms),
                "base_models": bases, "results": table, "warm_start": reach, "worst_vs_mean_pct": worst_vs_mean,
                "worst_vs_mean_pruned_pct": worst_vs_mean_pruned,
                "per_seed": {"pruned": pruned, "continued": cont, "cost": cost, "source_ppl": sources},
                "seconds": round(time.time() - t0)}, "\n".join(md))


if __name__ == "__main__":
    main()
