"""What each part of DRPruning adds, scored on a test split no run opened.

Every seed is a whole replicate of the pipeline: its own corpus draw (the embedded corpus;
Debian text is the machine's own, the same for every seed), its own held-out draw
(`megadrp preprocess --seed`; 50 eval and 100 test documents a domain, Debian 30 and 40), its own base model
(pretrained with the seed) and its own from-scratch model of the target shape. From the base,
each arm prunes to half size and continues at equal tokens:

| arm | dro.mode | references | continue starts from |
|---|---|---|---|
| constant | constant | none: p0 throughout | p0 |
| sheared | sheared | the target-shape model's losses (Sheared-LLaMA's: what a model of the target size reaches) | the prune stage's final mix |
| sheared_source | sheared | the source's losses (`auto`; megadrp's earlier setup of this baseline) | the prune stage's final mix |
| dro | dro | the source's, fixed; χ² ball around a fixed ratio | p0 |
| dro_dyloss | dro_dyloss | + references predicted by per-domain scaling laws | p0 |
| drpruning | drpruning | + the ratio moving toward the hard domains (the method) | p0 |

Stage lengths: a law is fitted only once a domain's history holds more than 10 evaluations
(SPEC §3.1), so the default 150 steps with an evaluation every 4 have fitted laws deciding from
step 45, 70% of each stage; the table states the share per arm. Scored with `megadrp eval` on
the test split (the controller's windows are the eval split's): mean, worst domain, the largest
ratio to the source (the base), the worst mix inside the χ² ball around p0 and the uniform mix,
each paired over seeds against constant and against sheared with a 95% Student-t interval. Also
the fitted laws' end-of-stage prediction error at 25/50/75% of each stage beside the naive
predictor (the last loss observed then), as the seed paper's first experiment.

    python benchmarks/ablation.py [--seeds 5] [--prune-steps 150] [--continue-steps 150] [--eval-interval 4]
    python benchmarks/ablation.py --corpus debian --name ablation_debian

Finished stages and evaluations are reused, so a rerun resumes where the last one stopped; a
seed's data and models are built on its first visit. `--report-only` writes the results from the
finished seeds without training anything.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import yaml
from _common import (
    ROOT,
    TEST_TOKENS,
    Replicate,
    commit,
    first_weights,
    interval,
    paired,
    save,
    stage_seconds,
    worst_ratio,
)

from megadrp.runtime.run_dir import RunDir

# arm: (dro.mode, references: None = the mode's default (`auto`: the source), "target" = the
# from-scratch target-shape model's; continue from the prune stage's final mix)
ARMS: dict[str, tuple[str, str | None, bool]] = {
    "constant": ("constant", None, False),
    "sheared": ("sheared", "target", True),
    "sheared_source": ("sheared", None, True),
    "dro": ("dro", None, False),
    "dro_dyloss": ("dro_dyloss", None, False),
    "drpruning": ("drpruning", None, False),
}
BASELINES = ("constant", "sheared")
METRICS = {  # key: (label, value of one eval JSON given the source's perplexities)
    "mean_ppl": ("mean ppl", lambda e, src: e["mean_ppl"]),
    "worst_ppl": ("worst domain ppl", lambda e, src: e["worst_ppl"]),
    "worst_ratio": ("largest ratio to the source", lambda e, src: worst_ratio(e, src)[0]),
    "worst_chi2_ppl": ("worst χ² mix ppl", lambda e, src: e["shift"]["worst_chi2"]["ppl"]),
    "uniform_ppl": ("uniform mix ppl", lambda e, src: e["shift"]["uniform"]["ppl"]),
}
STAGES = ("prune", "continue")


def target_shape() -> list[str]:
    """`model.shape` overrides for a from-scratch model of the prune target's shape: the tiny
    prune recipe's target, with the source's head width (pruning keeps head_dim)."""
    prune = yaml.safe_load((ROOT / "configs/tiny/prune.yaml").read_text())["prune"]["target"]
    base = yaml.safe_load((ROOT / "configs/tiny/pretrain.yaml").read_text())["model"]["shape"]
    head_dim = base["hidden_size"] // base["num_attention_heads"]
    return [f"model.shape.{k}={v}" for k, v in {**prune, "head_dim": head_dim}.items()]


def fitted_from(metrics: Path) -> int | None:
    """The first step whose domain weights came from a decision that used a fitted law (the
    decision at evaluation t rules from step t + 1), or None if none did."""
    from megadrp.engine.metrics import read_metrics

    for r in read_metrics(metrics):
        if r.get("controller") and any(r["controller"].get("fits", {}).values()):
            return r["step"] + 1
    return None


def prediction_errors(metrics: Path) -> dict[str, dict]:
    """{'25%': {'law': MAPE, 'naive': MAPE}, ...}: the law's end-of-stage prediction against
    the last observed loss, at the same evaluation."""
    from megadrp.engine.metrics import prediction_accuracy, read_metrics

    return {f: {"law": a["mape"], "naive": a["naive_mape"]}
            for f, a in prediction_accuracy(read_metrics(metrics)).items()}


def run_seed(root: Path, corpus: str, seed: int, args, arms: list[str]) -> dict:
    """Builds (or reuses) one seed's replicate, its target-shape model and every arm; returns
    its evaluations and run facts."""
    from megadrp.tools import pipeline

    rep = Replicate(root, corpus, seed)
    target = rep.work / "target_scratch"
    rep.stage("configs/tiny/pretrain.yaml", target, target_shape())
    out: dict = {"evals": {}, "fitted_from": {}, "prediction": {}, "seconds": 0.0}
    p0 = None
    for arm in arms:
        mode, refs, carried = ARMS[arm]
        run = rep.work / arm
        ref = [f"dro.reference_loss=model:{RunDir(target).hf}"] if refs == "target" else []
        over = [f"dro.mode={mode}", f"eval.interval={args.eval_interval}", *ref]
        model = rep.prune_continue(run, over, over + (["dro.initial_proportion=carried"] if carried else []),
                                   args.prune_steps, args.continue_steps)
        # one χ² ball for every arm: around the prune stage's p0, which every arm starts from
        p0 = p0 or first_weights(RunDir(run / "prune").metrics)
        out["evals"][arm] = rep.test_eval(model, run / "test_eval.json", p0)
        out["fitted_from"][arm] = {s: fitted_from(RunDir(run / s).metrics) for s in STAGES}
        out["prediction"][arm] = {s: prediction_errors(RunDir(run / s).metrics) for s in STAGES}
        out["seconds"] += sum(stage_seconds(RunDir(run / s).metrics) for s in STAGES)
        e = out["evals"][arm]
        pipeline.log(f"seed {seed} {arm}: test mean ppl {e['mean_ppl']:.3f}, worst {e['worst_ppl']:.3f}")
    out["source"] = rep.source(p0)
    out["target_scratch"] = rep.test_eval(RunDir(target).hf, rep.work / "target_test.json", p0)
    ref_file = RunDir(rep.work / "sheared" / "prune").reference_losses
    out["sheared_references"] = json.loads(ref_file.read_text()) if ref_file.is_file() else None
    out["base_model"] = rep.base_record()
    return out


def summarise(per_seed: list[dict], arms: list[str]) -> dict:
    """Per arm: each metric's per-seed values, mean ± sd, and paired % against each baseline."""
    pct = lambda a, b: 100.0 * (a / b - 1.0)  # noqa: E731
    table: dict[str, dict] = {}
    names = list(per_seed[0]["evals"][arms[0]]["domain_ppl"])
    for arm in arms:
        r: dict = {"domain_ppl": {n: float(np.mean([s["evals"][arm]["domain_ppl"][n] for s in per_seed])) for n in names},
                   "worst_domains": [s["evals"][arm]["shift"]["worst_domain"]["domain"] for s in per_seed],
                   "worst_ratio_domains": [worst_ratio(s["evals"][arm], s["source"]["domain_ppl"])[1] for s in per_seed]}
        for key, (_, value) in METRICS.items():
            v = [value(s["evals"][arm], s["source"]["domain_ppl"]) for s in per_seed]
            r[key] = {"per_seed": v, "mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
            for b in BASELINES:
                if b in arms:
                    r[key][f"vs_{b}_pct"] = paired([pct(value(s["evals"][arm], s["source"]["domain_ppl"]),
                                                        value(s["evals"][b], s["source"]["domain_ppl"]))
                                                    for s in per_seed])
        fitted = {st: [s["fitted_from"][arm][st] for s in per_seed] for st in STAGES}
        r["fitted_law_from_step"] = fitted
        pred: dict = {}
        for st in STAGES:
            for f in ("25%", "50%", "75%"):
                got = [s["prediction"][arm][st][f] for s in per_seed if f in s["prediction"][arm][st]]
                if got:
                    pred[f"{st} {f}"] = {"law": float(np.mean([g["law"] for g in got])),
                                         "naive": float(np.mean([g["naive"] for g in got])),
                                         "law_minus_naive": paired([g["law"] - g["naive"] for g in got]),
                                         "seeds": len(got)}
        r["prediction_mape"] = pred
        table[arm] = r
    return table


def markdown(table: dict, per_seed: list[dict], arms: list[str], args, spent: float, commit_id: str) -> str:
    names = list(table[arms[0]]["domain_ppl"])
    md = ["Test split, mean ± sd over seeds (lower is better):", "",
          "| arm | " + " | ".join(label for label, _ in METRICS.values()) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for arm in arms:
        md.append(f"| {arm} | " + " | ".join(f"{table[arm][k]['mean']:.3f} ± {table[arm][k]['sd']:.3f}"
                                              for k in METRICS) + " |")
    for b in BASELINES:
        if b not in arms:
            continue
        md += ["", f"Paired against `{b}` on the same seed: 100·(arm / {b} − 1), mean [95% interval] (per-seed "
               "values); an interval that includes zero is no measurable difference:", "",
               "| arm | " + " | ".join(label for label, _ in METRICS.values()) + " |", "|---" * (len(METRICS) + 1) + "|"]
        for arm in arms:
            if arm != b:
                md.append(f"| {arm} | " + " | ".join(interval(table[arm][k][f"vs_{b}_pct"]) for k in METRICS) + " |")
    md += ["", "Per domain (test perplexity, mean over seeds), the worst domain and the domain furthest from the "
           "source on each seed:", "", "| arm | " + " | ".join(names) + " | worst domain | furthest from source |",
           "|---" * (len(names) + 3) + "|"]
    src = {n: float(np.mean([s["source"]["domain_ppl"][n] for s in per_seed])) for n in names}
    scratch = {n: float(np.mean([s["target_scratch"]["domain_ppl"][n] for s in per_seed])) for n in names}
    md.append("| source (base) | " + " | ".join(f"{src[n]:.2f}" for n in names) + " | | |")
    md.append("| target shape from scratch | " + " | ".join(f"{scratch[n]:.2f}" for n in names) + " | | |")
    for arm in arms:
        r = table[arm]
        md.append(f"| {arm} | " + " | ".join(f"{r['domain_ppl'][n]:.2f}" for n in names)
                  + f" | {', '.join(r['worst_domains'])} | {', '.join(r['worst_ratio_domains'])} |")
    md += ["", "The step from which fitted scaling laws set the weights, per seed (of "
           f"{args.prune_steps} prune / {args.continue_steps} continue steps; '-': never):", "",
           "| arm | prune | continue | share of the steps driven by fitted laws (least over seeds) |", "|---|---|---|---|"]
    for arm in arms:
        f = table[arm]["fitted_law_from_step"]
        if any(x is not None for st in STAGES for x in f[st]):
            share = min((n - (x - 1)) / n if x is not None else 0.0
                        for st, n in zip(STAGES, (args.prune_steps, args.continue_steps)) for x in f[st])
            md.append(f"| {arm} | {', '.join(str(x) if x else '-' for x in f['prune'])} | "
                      f"{', '.join(str(x) if x else '-' for x in f['continue'])} | {share:.0%} |")
    cols = [c for c in (f"{st} {f}" for st in STAGES for f in ("25%", "50%", "75%"))
            if any(c in table[a]["prediction_mape"] for a in arms)]
    if cols:
        md += ["", "End-of-stage eval loss predicted at 25/50/75% of a stage: mean absolute % error of the fitted law "
               "and of the naive predictor (the last loss observed then), mean over seeds and domains, and the "
               "paired difference law − naive (percentage points):", "",
               "| arm | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for arm in arms:
            p = table[arm]["prediction_mape"]
            if p:
                md.append(f"| {arm} | " + " | ".join(
                    f"law {p[c]['law']:.2f}%, naive {p[c]['naive']:.2f}%; {interval(p[c]['law_minus_naive'])}"
                    .replace("%;", "%:") if c in p else "" for c in cols) + " |")
        missing = [c for c in (f"{st} {f}" for st in STAGES for f in ("25%", "50%", "75%")) if c not in cols]
        if missing:
            md += ["", f"No column for {', '.join(missing)}: no law was fitted yet there (a fit needs more than 10 "
                   "evaluations, SPEC §3.1; the table above gives the step from which the first one set the "
                   "weights), so there is no prediction to score."]
    refs = [s["sheared_references"] for s in per_seed if s.get("sheared_references")]
    if refs:
        md += ["", "`sheared`'s references (the target-shape model trained from scratch on the base's data and "
               "tokens, its eval-split losses) beside the source's (seed 0): "
               + ", ".join(f"{n} {v:.3f}" for n, v in zip(refs[0].get("domains", names), refs[0]["losses"]))
               + "; source: " + ", ".join(f"{n} {per_seed[0]['source']['domain_loss'][n]:.3f}" for n in names)
               + " (test split)."]
    drawn = ("its own corpus draw (embedded), " if args.corpus == "embedded"
             else "one corpus (Debian's text, shared by the seeds), each seed its own ")
    md += ["", f"{len(per_seed)} seed{'s' * (len(per_seed) != 1)}, {drawn}held-out draw and base model "
           f"({', '.join(s['base_model']['path'] for s in per_seed)}); prune {args.prune_steps} + continue "
           f"{args.continue_steps} steps of 16 × 128 tokens, evaluation (on the eval split) every "
           f"{args.eval_interval}, 2 ranks ZeRO-3 on CPU; {spent:.0f} s of training and evaluation in all (the "
           f"runs' metrics). Scored on the test split ({TEST_TOKENS} tokens a domain, capped by the split: "
           f"{min(min(s['evals'][arms[0]]['windows'].values()) for s in per_seed)} windows of 128 at least), "
           f"which no run opened; commit {commit_id}."]
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--prune-steps", type=int, default=150)
    ap.add_argument("--continue-steps", type=int, default=150)
    ap.add_argument("--eval-interval", type=int, default=4, help="steps between evaluations (and DRO updates)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--corpus", choices=("embedded", "debian"), default="embedded")
    ap.add_argument("--root", type=Path, default=None, help="default runs/ablation or runs/ablation_debian")
    ap.add_argument("--name", default=None, help="results file name (default ablation or ablation_debian)")
    ap.add_argument("--report-only", action="store_true", help="summarise the seeds already finished; train nothing")
    args = ap.parse_args()
    arms = [a for a in ARMS if a in args.arms.split(",")]
    if set(args.arms.split(",")) - set(ARMS):
        ap.error(f"--arms: unknown {', '.join(sorted(set(args.arms.split(',')) - set(ARMS)))}")
    suffix = "" if args.corpus == "embedded" else f"_{args.corpus}"
    root = (args.root or ROOT / "runs" / f"ablation{suffix}").resolve()
    name = args.name or f"ablation{suffix}"
    t0, commit_id = time.time(), commit()
    per_seed = []
    for seed in range(args.seeds):
        if args.report_only and not all(RunDir(root / f"seed{seed}" / a / "continue").done() for a in arms):
            break
        per_seed.append(run_seed(root, args.corpus, seed, args, arms))
    if not per_seed:
        raise SystemExit(f"ablation: no finished seed under {root}")
    table = summarise(per_seed, arms)
    spent = sum(s["seconds"] for s in per_seed)
    save(name, {"seeds": len(per_seed), "split": "test", "corpus": args.corpus, "commit": commit_id,
                "arms": {a: {"dro.mode": ARMS[a][0], "references": ARMS[a][1] or "source (auto)",
                             "continue_from": "carried" if ARMS[a][2] else "p0"} for a in arms},
                "base_models": [s["base_model"] for s in per_seed],
                "prune_steps": args.prune_steps, "continue_steps": args.continue_steps,
                "eval_interval": args.eval_interval, "test_tokens_per_domain": TEST_TOKENS,
                "results": table,
                "per_seed": [{k: s[k] for k in ("evals", "source", "target_scratch", "sheared_references",
                                                "fitted_from", "prediction")} for s in per_seed],
                "stage_seconds": round(spent), "seconds": round(time.time() - t0)},
         markdown(table, per_seed, arms, args, spent, commit_id))


if __name__ == "__main__":
    main()
