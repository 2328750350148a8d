"""The paper's open questions, answered in small (#41). Each study builds on the ablation's
replicates (benchmarks/ablation.py: every seed its own corpus draw, held-out draw and base model),
reuses what is finished, scores on the test split and writes
benchmarks/results/open_questions_<study>.{json,md} with per-seed values and paired 95% intervals.

    python benchmarks/open_questions.py ratio [--seeds 3]         # Q1: extreme pruning
    python benchmarks/open_questions.py convergence [--seeds 3]   # Q2: continuing 4× and 16× longer
    python benchmarks/open_questions.py scratch [--seeds 3]       # Q3a: DRO in pretraining from scratch
    python benchmarks/open_questions.py posttrain [--seeds 3]     # Q3b: continuing onto new domains
    python benchmarks/open_questions.py architecture [--seeds 3]  # next check 2: the law on Mistral and Qwen2

- **ratio**: the same base pruned to about 50%, 25% and 10% of its non-embedding parameters
  (`TARGETS`; 25% is the ablation's own target, whose runs are reused), with constant, sheared
  (its references: a model of that target shape trained from scratch on the base's data and tokens)
  and drpruning, prune + continue at equal tokens: the largest ratio to the source and the worst
  domain against the pruning ratio, and drpruning's paired gap to each baseline at each ratio.
- **convergence**: from each seed's drpruning-pruned model, the continue stage 4× and 16× longer
  than the ablation's (an update every 4× and 16× as many steps, so every length gets the same
  number of updates), constant against drpruning; the paired gap at the end of each length, and
  along the longest run from its own evaluations (eval split), where each curve stops improving.
- **scratch**: pretraining from scratch with drpruning against constant (the ablation's base, the
  same p0 and tokens). A model with no source has no `auto` reference; its references are the
  losses a model of its size reaches on p0 (DoReMi's reference model): the constant arm's, measured
  by `dro.reference_loss: model:`; the scaling law then predicts the end-of-stage loss from there
  (docs/method.md §12).
- **posttrain**: a base pretrained without two domains (`NEW`), pruned on the domains it knows,
  then continued on all of them, constant against drpruning: the new domains' and the worst domain's
  perplexity.
- **architecture**: the fitted laws' end-of-stage prediction error at 25/50/75% of each stage,
  against the naive predictor (the last loss observed), on a Mistral-shaped base (a sliding window
  no shorter than the sequence) and a Qwen2-shaped base (q/k/v biases, tied embeddings), each
  pretrained like the Llama base, beside the ablation's Llama runs.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
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

from megadrp.runtime.run_dir import RunDir

# Q1: (hidden, layers, kv heads, intermediate) at about 50, 25 and 10% of the tiny base's non-embedding
# parameters (4 layers × 256 d, 8 heads in 4 groups of 32, 688 channels); heads = 2 × kv
TARGETS = {"50%": (224, 3, 3, 512), "25%": (192, 3, 2, 344), "10%": (128, 2, 1, 256)}
NEW = ("dna", "lang2")  # Q3b: the domains the base never saw (embedded corpus)
ARMS = ("constant", "sheared", "drpruning")


def _non_embedding(hidden: int, layers: int, kv: int, inter: int, hd: int = 32, group: int = 2) -> int:
    return layers * (hidden * hd * kv * (2 * group + 2) + 3 * hidden * inter)


def _target(name: str) -> list[str]:
    hidden, layers, kv, inter = TARGETS[name]
    return [f"prune.target.hidden_size={hidden}", f"prune.target.num_hidden_layers={layers}",
            f"prune.target.num_key_value_heads={kv}", f"prune.target.num_attention_heads={2 * kv}",
            f"prune.target.intermediate_size={inter}"]


def _scratch_shape(name: str) -> list[str]:
    hidden, layers, kv, inter = TARGETS[name]
    return [f"model.shape.hidden_size={hidden}", f"model.shape.num_hidden_layers={layers}",
            f"model.shape.num_key_value_heads={kv}", f"model.shape.num_attention_heads={2 * kv}",
            f"model.shape.intermediate_size={inter}", "model.shape.head_dim=32"]


def _pct(a: float, b: float) -> float:
    return 100.0 * (a / b - 1.0)


def study_ratio(rep: Replicate, args) -> dict:
    base_shape = yaml.safe_load((ROOT / "configs/tiny/pretrain.yaml").read_text())["model"]["shape"]
    full = _non_embedding(base_shape["hidden_size"], base_shape["num_hidden_layers"],
                          base_shape["num_key_value_heads"], base_shape["intermediate_size"])
    out = {}
    for name in TARGETS:
        hidden, layers, kv, inter = TARGETS[name]
        scratch = rep.stage("configs/tiny/pretrain.yaml", rep.work / f"target_scratch_{name.rstrip('%')}",
                            _scratch_shape(name)) if name != "25%" else rep.work / "target_scratch" / "hf"
        evals = {}
        for arm in ARMS:
            run = rep.work / (arm if name == "25%" else f"ratio{name.rstrip('%')}_{arm}")  # 25%: the ablation's
            ref = [f"dro.reference_loss=model:{scratch}"] if arm == "sheared" else []
            over = [f"dro.mode={arm}", f"eval.interval={args.eval_interval}", *ref,
                    *([] if name == "25%" else _target(name))]
            model = rep.prune_continue(run, over, over + (["dro.initial_proportion=carried"] if arm == "sheared" else []),
                                       args.prune_steps, args.continue_steps)
            evals[arm] = rep.test_eval(model, run / "test_eval.json", first_weights(RunDir(run / "prune").metrics))
        out[name] = {"kept_non_embedding": _non_embedding(hidden, layers, kv, inter) / full, "evals": evals}
    return out


def summarise_ratio(per_seed: list[dict], sources: list[dict]) -> tuple[dict, str]:
    table, md = {}, ["| target (kept non-embedding share) | arm | worst ppl | largest ratio to the source | "
                     "drpruning − arm, worst [95%] | drpruning − arm, ratio [95%] |", "|---|---|---|---|---|---|"]
    for name in TARGETS:
        t = {}
        for arm in ARMS:
            ev = [s[name]["evals"][arm] for s in per_seed]
            dr = [s[name]["evals"]["drpruning"] for s in per_seed]
            t[arm] = {"worst_ppl": [e["worst_ppl"] for e in ev],
                      "worst_ratio": [worst_ratio(e, src)[0] for e, src in zip(ev, sources)],
                      "drpruning_vs_pct": {
                          "worst": paired([_pct(a["worst_ppl"], b["worst_ppl"]) for a, b in zip(dr, ev)]),
                          "ratio": paired([_pct(worst_ratio(a, s)[0], worst_ratio(b, s)[0])
                                           for a, b, s in zip(dr, ev, sources)])}}
            share = per_seed[0][name]["kept_non_embedding"]
            md.append(f"| {name} ({share:.0%}) | {arm} | {np.mean(t[arm]['worst_ppl']):.2f} | "
                      f"{np.mean(t[arm]['worst_ratio']):.3f} | "
                      + (f"{interval(t[arm]['drpruning_vs_pct']['worst'])} | {interval(t[arm]['drpruning_vs_pct']['ratio'])} |"
                         if arm != "drpruning" else " | |"))
        table[name] = t
    return table, "\n".join(md)


def study_convergence(rep: Replicate, args) -> dict:
    pruned = RunDir(rep.work / "drpruning" / "prune").hf
    out = {}
    for factor in (4, 16):
        for arm in ("constant", "drpruning"):
            run = rep.work / f"converge{factor}_{arm}"
            rep.stage("configs/tiny/continue.yaml", run, [
                f"dro.mode={arm}", f"model.init={pruned}", f"train.steps={args.continue_steps * factor}",
                f"eval.interval={args.eval_interval * factor}", f"train.warmup_steps={20 * factor}",
                f"save.interval={args.continue_steps * factor}"])
            from megadrp.engine.metrics import read_metrics

            rows = read_metrics(RunDir(run).metrics)
            out[f"{factor}x_{arm}"] = {
                "test": rep.test_eval(RunDir(run).hf, run / "test_eval.json",
                                      first_weights(RunDir(rep.work / "drpruning" / "prune").metrics)),
                "trajectory": [(r["step"], max(r["eval_loss"].values())) for r in rows if r.get("eval_loss")]}
    return out


def study_scratch(rep: Replicate, args) -> dict:
    """drpruning from scratch, references from the constant arm (the ablation's base)."""
    base = rep.base / "hf"
    run = rep.work / "scratch_drpruning"
    rep.stage("configs/tiny/pretrain.yaml", run, ["dro.mode=drpruning", f"dro.reference_loss=model:{base}",
                                                 f"eval.interval={args.eval_interval}"])
    return {"constant": rep.source(), "drpruning": rep.test_eval(RunDir(run).hf, run / "test_eval.json")}


def study_posttrain(rep: Replicate, args) -> dict:
    known = [d for d in json.loads((rep.data / "manifest.json").read_text())["domains"] if d not in NEW]
    only = [f"domains={json.dumps(known)}", "dro.initial_proportion=uniform"]
    base = rep.stage("configs/tiny/pretrain.yaml", rep.work / "post_base", only)
    pruned = rep.stage("configs/tiny/prune.yaml", rep.work / "post_prune",
                       only + ["dro.mode=drpruning", f"model.init={base}", f"train.steps={args.prune_steps}",
                               f"eval.interval={args.eval_interval}"])
    out = {}
    for arm in ("constant", "drpruning"):
        run = rep.work / f"post_{arm}"
        rep.stage("configs/tiny/continue.yaml", run, ["domains=null", "dro.initial_proportion=uniform",
                                                     f"dro.mode={arm}", f"model.init={pruned}",
                                                     f"train.steps={args.continue_steps}",
                                                     f"eval.interval={args.eval_interval}"])
        out[arm] = rep.test_eval(RunDir(run).hf, run / "test_eval.json")
    return out


def _random_base(rep: Replicate, family: str) -> Path:
    """A random-init model of the tiny base's shape in `family`'s own transformers class, saved
    with save_pretrained (then pretrained by a continue stage on p0, as the Llama base is)."""
    import transformers

    out = rep.work / f"arch_{family}_init"
    if (out / "config.json").is_file():
        return out
    shape = yaml.safe_load((ROOT / "configs/tiny/pretrain.yaml").read_text())["model"]["shape"]
    vocab = json.loads((rep.data / "manifest.json").read_text())["vocab_size"]
    kw = dict(vocab_size=vocab, hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
              num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
              num_key_value_heads=shape["num_key_value_heads"], max_position_embeddings=512, bos_token_id=1,
              eos_token_id=2)
    if family == "mistral":
        config = transformers.MistralConfig(**kw, sliding_window=512)
    else:
        config = transformers.Qwen2Config(**kw, tie_word_embeddings=True)
    torch.manual_seed(1234 + rep.seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    for f in (rep.data / "tokenizer").iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def study_architecture(rep: Replicate, args) -> dict:
    from ablation import prediction_errors

    out = {"llama": {s: prediction_errors(RunDir(rep.work / "drpruning" / s).metrics) for s in ("prune", "continue")}}
    for family in ("mistral", "qwen2"):
        base = rep.stage("configs/tiny/continue.yaml", rep.work / f"arch_{family}_base",
                         ["dro.mode=constant", f"model.init={_random_base(rep, family)}", "train.steps=250",
                          "train.warmup_steps=30", "train.lr=3e-3"])
        run = rep.work / f"arch_{family}"
        over = ["dro.mode=drpruning", f"eval.interval={args.eval_interval}"]
        pruned = rep.stage("configs/tiny/prune.yaml", run / "prune",
                           over + [f"model.init={base}", f"train.steps={args.prune_steps}"])
        rep.stage("configs/tiny/continue.yaml", run / "continue",
                  over + [f"model.init={pruned}", f"train.steps={args.continue_steps}"])
        out[family] = {s: prediction_errors(RunDir(run / s).metrics) for s in ("prune", "continue")}
    return out


STUDIES = {"ratio": study_ratio, "convergence": study_convergence, "scratch": study_scratch,
           "posttrain": study_posttrain, "architecture": study_architecture}


def markdown(study: str, per_seed: list[dict], sources: list[dict]) -> tuple[dict, str]:
    """The study's table and its paired intervals."""
    if study == "ratio":
        return summarise_ratio(per_seed, sources)
    if study == "convergence":
        table, md = {}, ["| continue length | constant worst ppl | drpruning worst ppl | drpruning − constant, "
                         "worst [95%] | ratio to the source [95%] |", "|---|---|---|---|---|"]
        for f in (4, 16):
            c, d = [s[f"{f}x_constant"]["test"] for s in per_seed], [s[f"{f}x_drpruning"]["test"] for s in per_seed]
            w = paired([_pct(a["worst_ppl"], b["worst_ppl"]) for a, b in zip(d, c)])
            r = paired([_pct(worst_ratio(a, s)[0], worst_ratio(b, s)[0]) for a, b, s in zip(d, c, sources)])
            table[f"{f}x"] = {"worst_vs_constant_pct": w, "ratio_vs_constant_pct": r}
            md.append(f"| {f}× | {np.mean([x['worst_ppl'] for x in c]):.2f} | {np.mean([x['worst_ppl'] for x in d]):.2f} "
                      f"| {interval(w)} | {interval(r)} |")
        return table, "\n".join(md)
    if study in ("scratch", "posttrain"):
        keys = ("worst_ppl", "mean_ppl")
        c, d = [s["constant"] for s in per_seed], [s["drpruning"] for s in per_seed]
        table = {k: paired([_pct(a[k], b[k]) for a, b in zip(d, c)]) for k in keys}
        if study == "posttrain":
            for n in NEW:
                table[f"{n}_ppl"] = paired([_pct(a["domain_ppl"][n], b["domain_ppl"][n]) for a, b in zip(d, c)])
        md = ["| measure | constant | drpruning | drpruning − constant [95%] |", "|---|---|---|---|"]
        for k, p in table.items():
            get = (lambda e, k=k: e[k]) if k in keys else (lambda e, k=k: e["domain_ppl"][k[:-4]])
            md.append(f"| {k} | {np.mean([get(x) for x in c]):.2f} | {np.mean([get(x) for x in d]):.2f} | {interval(p)} |")
        return table, "\n".join(md)
    cols = [f"{st} {f}" for st in ("prune", "continue") for f in ("25%", "50%", "75%")]
    table, md = {}, ["| architecture | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for arch in ("llama", "mistral", "qwen2"):
        row = {}
        for c in cols:
            st, f = c.split()
            got = [s[arch][st][f] for s in per_seed if f in s[arch][st]]
            if got:
                row[c] = {"law": float(np.mean([g["law"] for g in got])), "naive": float(np.mean([g["naive"] for g in got])),
                          "law_minus_naive": paired([g["law"] - g["naive"] for g in got])}
        table[arch] = row
        md.append(f"| {arch} | " + " | ".join(f"law {row[c]['law']:.2f}%, naive {row[c]['naive']:.2f}%" if c in row
                                               else "" for c in cols) + " |")
    return table, "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", choices=list(STUDIES))
    replicate_args(ap, "open_questions_<study>")
    args = ap.parse_args()
    if args.study == "posttrain" and args.corpus != "embedded":
        ap.error("posttrain names the embedded corpus's domains (NEW); run it on the embedded corpus")
    root, name = replicate_root(args, f"open_questions_{args.study}")
    t0, commit_id = time.time(), commit()
    per_seed, sources, bases = [], [], []
    for seed in range(args.seeds):
        rep = Replicate(root, args.corpus, seed)
        per_seed.append(STUDIES[args.study](rep, args))
        sources.append(rep.source()["domain_ppl"])
        bases.append(rep.base_record())
    table, md = markdown(args.study, per_seed, sources)
    md += (f"\n\n{args.seeds} seeds, each its own base model ({', '.join(b['path'] for b in bases)}); scored on the "
           "test split; paired: 100·(drpruning / baseline − 1) per seed, mean [95% Student-t interval] (per-seed "
           f"values); an interval that includes zero is no measurable difference. Commit {commit_id}.")
    save(name,
         {"study": args.study, "seeds": args.seeds, "split": "test", "corpus": args.corpus, "commit": commit_id,
          "base_models": bases, "results": table, "per_seed": per_seed, "source_ppl": sources,
          "seconds": round(time.time() - t0)}, md)


if __name__ == "__main__":
    main()
