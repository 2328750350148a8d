"""The five domain schedules compared: from the same base model and shards, prune then
continue with each of constant, sheared, dro, dro_dyloss, drpruning at equal tokens, and
evaluate every result with megadrp eval (transformers).

    python benchmarks/schedules.py [--seeds 1] [--prune-steps 100] [--continue-steps 100] [--eval-interval 10]
        [--corpus DIR --root runs/schedules_debian] [--modes constant,sheared,drpruning]

`--corpus DIR`: a directory of NAME.jsonl domains (e.g. `megadrp debian-corpus`'s real
text) instead of the embedded corpus: its own tokenizer and base model are built under
ROOT/base, and p0 ∝ tokens^0.3 (SPEC §1) since its domains have no recipe proportions.

SPEC §3.1 fits a domain's scaling law only once its history holds more than 10 evaluations,
so `--eval-interval` decides whether `dro_dyloss` and `drpruning` ever use a fitted
reference: the table counts, per schedule, the controller updates that did.

Reuses runs/demo's data and base model when `make demo` has run (else builds them).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import ROOT, commit, first_weights, paired, save, stage_seconds, worst_ratio
from _common import interval as _interval

from megadrp.runtime.run_dir import RunDir

MODES = ("constant", "sheared", "dro", "dro_dyloss", "drpruning")


def _fitted_updates(metrics: Path) -> int:
    """Controller updates in a run's metrics.jsonl that used at least one fitted law."""
    from megadrp.engine.metrics import read_metrics

    return sum(1 for r in read_metrics(metrics) if r.get("controller") and any(r["controller"].get("fits", {}).values()))


def _prediction_errors(root: Path) -> dict[str, float]:
    """Mean absolute % error of the end-of-stage loss predicted at 25/50/75% of each stage
    (megadrp.metrics.prediction_accuracy), keyed 'prune 25%' … 'continue 75%'."""
    from megadrp.engine.metrics import prediction_accuracy, read_metrics

    return {f"{stage} {frac}": a["mape"] for stage in ("prune", "continue")
            for frac, a in prediction_accuracy(read_metrics(RunDir(root / stage).metrics)).items()}


def main() -> None:
    from megadrp.tools import pipeline

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--prune-steps", type=int, default=100)
    ap.add_argument("--continue-steps", type=int, default=100)
    ap.add_argument("--eval-interval", type=int, default=10, help="steps between evaluations (and DRO updates)")
    ap.add_argument("--root", type=Path, default=None, help="run directories (default runs/schedules, or "
                    "runs/schedules_<corpus folder> with --corpus: never the embedded corpus's runs)")
    ap.add_argument("--corpus", type=Path, default=None, help="directory of NAME.jsonl domains (default: embedded)")
    ap.add_argument("--name", default="schedules", help="results file name under benchmarks/results")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="comma-separated schedules to run (default all five; sheared is always run: it is the baseline)")
    args = ap.parse_args()
    modes = [m for m in MODES if m in args.modes.split(",") or m == "sheared"]
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        ap.error(f"--modes: unknown schedule(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")
    if args.root is None:
        args.root = ROOT / "runs" / (f"schedules_{args.corpus.resolve().name}" if args.corpus else "schedules")
    args.root = args.root.resolve()
    args.root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    commit_id = commit()
    work = args.root / "base" if args.corpus else ROOT / "runs" / "demo"
    # runs/demo is `make demo`'s: reused only where made as this script would make it, never rebuilt here
    data = pipeline.prepare_data(work, args.corpus.resolve() if args.corpus else None,
                                 reuse="adopt" if args.corpus else "refuse")
    base = work / "pretrain"
    mix = ["domains=null", "dro.initial_proportion=tokens^0.3"] if args.corpus else []
    pipeline.train_stage("configs/tiny/pretrain.yaml", base, [f"data_dir={data}", *mix],
                         reuse="adopt" if args.corpus else "refuse")
    # The base model scored the same way: `auto` references are its own losses, so the χ² schedules
    # move weight toward the domains furthest above the base, not toward the worst in absolute terms.
    base_ppl = pipeline.evaluate(RunDir(base).hf, data, 4096, 128, args.root / "base_eval.json")["domain_ppl"]
    evals: dict[str, list[dict]] = {m: [] for m in modes}
    fitted: dict[str, list[int]] = {m: [] for m in modes}
    predicted: dict[str, list[dict]] = {m: [] for m in modes}
    for seed in range(args.seeds):
        for mode in modes:
            root = args.root / f"seed{seed}" / mode
            common = [f"data_dir={data}", f"seed={1234 + seed}", f"dro.mode={mode}", "train.log_interval=1000",
                      f"eval.interval={args.eval_interval}", *mix]
            pipeline.train_stage("configs/tiny/prune.yaml", root / "prune",
                                 common + [f"model.init={base / 'hf'}", f"train.steps={args.prune_steps}"], quiet=True,
                                 reuse="adopt")
            # Sheared-LLaMA's scripts continue from the pruning stage's final proportions; the χ²
            # schedules start from p0. Every continue stage's `auto` references are the source's.
            carried = ["dro.initial_proportion=carried"] if mode == "sheared" else []
            pipeline.train_stage("configs/tiny/continue.yaml", root / "continue",
                                 common + [f"model.init={root / 'prune' / 'hf'}", f"train.steps={args.continue_steps}",
                                           *carried], quiet=True, reuse="adopt")
            # One χ² ball for every schedule: around the prune stage's p0 (its first weights), which
            # all schedules share; `sheared`'s continue stage would otherwise be scored around its own
            # carried mix.
            p0 = first_weights(RunDir(root / "prune").metrics)
            evals[mode].append(pipeline.evaluate(RunDir(root / "continue").hf, data, 4096, 128, RunDir(root).eval_json,
                                                 p0=p0))
            fitted[mode].append(sum(_fitted_updates(RunDir(root / stage).metrics) for stage in ("prune", "continue")))
            predicted[mode].append(_prediction_errors(root))
            pipeline.log(f"{mode} seed {seed}: mean ppl {evals[mode][-1]['mean_ppl']:.3f} "
                         f"worst {evals[mode][-1]['worst_ppl']:.3f}")
    table = summarise(evals, fitted, predicted, base_ppl)
    names = list(evals[modes[0]][0]["domain_ppl"])
    pm = "±"
    md = ["| schedule | " + " | ".join(names) + " | mean ppl | worst ppl | mean vs sheared (paired) "
          "| worst vs sheared (paired) | updates with a fitted law |", "|---" * (len(names) + 6) + "|"]
    for mode, r in table.items():
        md.append(f"| {mode} | " + " | ".join(f"{r['domain_ppl'][n]:.3f}" for n in names)
                  + f" | {r['mean_ppl']:.3f} {pm} {r['mean_ppl_sd']:.3f} | {r['worst_ppl']:.3f} {pm} {r['worst_ppl_sd']:.3f}"
                  f" | {_interval(r['mean_vs_sheared_pct'])} | {_interval(r['worst_vs_sheared_pct'])}"
                  f" | {r['fitted_updates']:g} |")
    if "constant" in table:
        md += ["", "Against `constant` (p0 throughout), paired as above:", "",
               "| schedule | mean vs constant | worst vs constant |", "|---|---|---|"]
        for mode, r in table.items():
            md.append(f"| {mode} | {_interval(r['mean_vs_constant_pct'])} | {_interval(r['worst_vs_constant_pct'])} |")
    md += ["", "Under shifted domain mixes (megadrp eval --shift; perplexity of the mix's mean token loss, "
           f"mean {pm} sd over seeds; the χ² ball has the run's ρ around the prune stage's p0, the same for every schedule):", "",
           "| schedule | uniform mix | p0 mix | worst χ² mix | worst χ² mix vs sheared (paired) | worst domain |",
           "|---|---|---|---|---|---|"]
    for mode, r in table.items():
        s = r["shift"]
        md.append(f"| {mode} | " + " | ".join(f"{s[k]['mean']:.3f} {pm} {s[k]['sd']:.3f}" for k in SHIFT_KEYS[:3])
                  + f" | {_interval(r['worst_chi2_vs_sheared_pct'])} | {s['worst_domain']['mean']:.3f} "
                  f"{pm} {s['worst_domain']['sd']:.3f} |")
    md += ["", "Degradation from the base model (each domain's perplexity over the base model's, "
           f"{', '.join(f'{n} {base_ppl[n]:.2f}' for n in names)}): the largest ratio, which the χ² schedules with "
           "`auto` references (the base's own losses) push down, mean ± sd over seeds, with the domain where it is "
           "largest and the paired difference to sheared:", "",
           "| schedule | worst ratio to base | largest on any seed | where | worst ratio vs sheared (paired) "
           "| worst ratio vs constant (paired) |", "|---|---|---|---|---|---|"]
    for mode, r in table.items():
        md.append(f"| {mode} | {r['worst_ratio_to_base']:.4f} {pm} {r['worst_ratio_to_base_sd']:.4f} | "
                  f"{r['max_ratio_to_base']:.4f} | {', '.join(r['worst_ratio_domains'])} | "
                  f"{_interval(r['worst_ratio_vs_sheared_pct'])} | "
                  f"{_interval(r['worst_ratio_vs_constant_pct']) if 'worst_ratio_vs_constant_pct' in r else ''} |")
    cols = sorted({k for r in table.values() for k in r["prediction_mape"]},
                  key=lambda k: (k.split()[0] != "prune", int(k.split()[1][:-1])))
    if cols:
        md += ["", "Scaling-law prediction accuracy: mean absolute % error of the end-of-stage eval loss predicted "
               "at 25/50/75% of a stage (mean over seeds and domains; blank: no law fitted yet):", "",
               "| schedule | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for mode, r in table.items():
            if r["prediction_mape"]:
                md.append(f"| {mode} | " + " | ".join(f"{r['prediction_mape'][c]:.2f}%" if c in r["prediction_mape"]
                                                       else "" for c in cols) + " |")
    spent = sum(stage_seconds(RunDir(args.root / f"seed{seed}" / mode / stage).metrics)
                for seed in range(args.seeds) for mode in modes for stage in ("prune", "continue"))
    md += ["", f"{args.seeds} seed(s); perplexities are means over seeds ± their standard deviation. The paired "
           "columns: per seed, 100·(schedule / sheared − 1) on the same seed's base, data and batches; the mean of "
           "those differences with its 95% interval (Student's t over seeds), then the per-seed values. "
           f"Prune {args.prune_steps} steps + continue {args.continue_steps} steps per schedule, 16 × 128 tokens a "
           f"step, evaluation every {args.eval_interval} steps, 2 ranks ZeRO-3 on CPU; {spent:.0f} s of "
           "training and evaluation in all (summed from the runs' metrics). Perplexities from megadrp.tools.evaluate on 32 eval windows of 128 tokens per domain. "
           f"Configuration (commit {commit_id}): each stage's `auto` references are the source model's (the base; "
           "the continue stage carries them from its prune run), and `sheared` continues from its prune's final "
           "mix (`initial_proportion: carried`), as the reference scripts do."]
    save(args.name, {"seeds": args.seeds, "commit": commit_id, "base_ppl": base_ppl, "prune_steps": args.prune_steps, "continue_steps": args.continue_steps,
                     "eval_interval": args.eval_interval, "results": table, "per_seed": evals,
                     "prediction_errors_per_seed": predicted,
                     "stage_seconds": round(spent), "seconds": round(time.time() - t0)}, "\n".join(md))


SHIFT_KEYS = ("uniform", "p0_mix", "worst_chi2", "worst_domain")


def summarise(evals: dict[str, list[dict]], fitted: dict[str, list[int]],
              predicted: dict[str, list[dict]] | None = None, base_ppl: dict[str, float] | None = None
              ) -> dict[str, dict]:
    names = list(next(iter(evals.values()))[0]["domain_ppl"])
    ref = evals["sheared"]
    table = {}
    for mode in evals:
        runs = evals[mode]
        mean = np.array([e["mean_ppl"] for e in runs])
        worst = np.array([e["worst_ppl"] for e in runs])
        sd = (lambda x: float(x.std(ddof=1)) if len(x) > 1 else 0.0)  # noqa: E731
        table[mode] = {
            "domain_ppl": {n: float(np.mean([e["domain_ppl"][n] for e in runs])) for n in names},
            "mean_ppl": float(mean.mean()), "mean_ppl_sd": sd(mean),
            "worst_ppl": float(worst.mean()), "worst_ppl_sd": sd(worst),
            "mean_vs_sheared_pct": paired([100 * (a["mean_ppl"] / b["mean_ppl"] - 1) for a, b in zip(runs, ref)]),
            "worst_vs_sheared_pct": paired([100 * (a["worst_ppl"] / b["worst_ppl"] - 1) for a, b in zip(runs, ref)]),
            **({"mean_vs_constant_pct": paired([100 * (a["mean_ppl"] / b["mean_ppl"] - 1)
                                                for a, b in zip(runs, evals["constant"])]),
                "worst_vs_constant_pct": paired([100 * (a["worst_ppl"] / b["worst_ppl"] - 1)
                                                 for a, b in zip(runs, evals["constant"])])}
               if "constant" in evals else {}),
            "fitted_updates": float(np.mean(fitted[mode])),
            "shift": {k: {"mean": float(np.mean(v)), "sd": sd(np.array(v))}
                      for k in SHIFT_KEYS for v in [[e["shift"][k]["ppl"] for e in runs]]},
            "worst_chi2_vs_sheared_pct": paired([100 * (a["shift"]["worst_chi2"]["ppl"] / b["shift"]["worst_chi2"]["ppl"]
                                                        - 1) for a, b in zip(runs, ref)]),
            "prediction_mape": {k: float(np.mean([p[k] for p in (predicted or {}).get(mode, []) if k in p]))
                                for k in sorted({k for p in (predicted or {}).get(mode, []) for k in p})},
        }
        if base_ppl:
            ratio = np.array([worst_ratio(e, base_ppl)[0] for e in runs])
            table[mode].update(
                worst_ratio_to_base=float(ratio.mean()), worst_ratio_to_base_sd=sd(ratio),
                worst_ratio_domains=sorted({worst_ratio(e, base_ppl)[1] for e in runs}),
                worst_ratio_vs_sheared_pct=paired([100 * (worst_ratio(a, base_ppl)[0] / worst_ratio(b, base_ppl)[0] - 1)
                                                   for a, b in zip(runs, ref)]),
                max_ratio_to_base=float(ratio.max()))
            if "constant" in evals:
                table[mode]["worst_ratio_vs_constant_pct"] = paired(
                    [100 * (worst_ratio(a, base_ppl)[0] / worst_ratio(b, base_ppl)[0] - 1)
                     for a, b in zip(runs, evals["constant"])])
    return table


if __name__ == "__main__":
    main()
