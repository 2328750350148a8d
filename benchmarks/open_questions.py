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
- **convergence**: from each seed's drpruning-pruned model, the continue stage as long as the
  ablation's (whose drpruning run is reused), 4× and 16× longer (an update every 4× and 16× as
  many steps, so every length gets the same number of updates), constant against drpruning; the
  paired gap at the end of each length, where each curve stops improving (its own evaluations,
  eval split), and how many passes over a domain's training tokens the longest runs make.
- **scratch**: pretraining from scratch with drpruning against constant (the ablation's base, the
  same p0 and tokens). A model with no source has no `auto` reference; its references are the
  losses a model of its size reaches on p0 (DoReMi's reference model): the constant arm's, measured
  by `dro.reference_loss: model:`; the scaling law then predicts the end-of-stage loss from there
  (docs/method.md §12).
- **posttrain**: a base pretrained without two domains (`NEW`), pruned on the domains it knows,
  then continued on all of them, constant against drpruning: the new domains' and the worst domain's
  perplexity. Both continue from references for all six domains: the ablation's base (the source's
  size, trained on all of them), since `auto` would measure a base that never saw the new ones.
- **architecture**: the fitted laws' end-of-stage prediction error at 25/50/75% of each stage,
  against the naive predictor (the last loss observed), on a Mistral-shaped base (a sliding window
  no shorter than the sequence) and a Qwen2-shaped base (q/k/v biases, tied embeddings), beside a
  Llama base made the same way: each a random init in its own transformers class, pretrained by
  the same continue-recipe stage on p0, then pruned and continued with drpruning.
"""
from __future__ import annotations

import argparse
import json
import shutil
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
# (transformers refuses a hidden size that is not a multiple of the head count, whatever head_dim says)
TARGETS = {"50%": (240, 3, 3, 480), "25%": (192, 3, 2, 344), "10%": (128, 2, 1, 256)}
ARCHS = ("llama", "mistral", "qwen2")  # next check 2: bases made alike in each architecture's own class
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


def _arm(rep: Replicate, run: Path, arm: str, args, extra: list[str] | None = None) -> Path:
    """`arm` pruned and continued under `run` with benchmarks/ablation.py's overrides (`sheared`
    continues from its prune stage's final mix), plus `extra`: its continued export."""
    over = [f"dro.mode={arm}", f"eval.interval={args.eval_interval}", *(extra or [])]
    return rep.prune_continue(run, over, over + (["dro.initial_proportion=carried"] if arm == "sheared" else []),
                              args.prune_steps, args.continue_steps)


def _ablation_arm(rep: Replicate, arm: str, args, ref: list[str] | None = None) -> Path:
    """The ablation's `arm` on this seed (its run folder and overrides, so a finished run is reused
    and a missing one is built exactly as the ablation would): its continued export."""
    return _arm(rep, rep.work / arm, arm, args, ref)


def _target_scratch(rep: Replicate, name: str) -> Path:
    """The target shape `name` trained from scratch on the base's data and tokens (Sheared-LLaMA's
    references); at 25% the ablation's own `target_scratch`."""
    run = rep.work / ("target_scratch" if name == "25%" else f"target_scratch_{name.rstrip('%')}")
    return rep.stage("configs/tiny/pretrain.yaml", run, _scratch_shape(name))


def study_ratio(rep: Replicate, args) -> dict:
    base_shape = yaml.safe_load((ROOT / "configs/tiny/pretrain.yaml").read_text())["model"]["shape"]
    full = _non_embedding(base_shape["hidden_size"], base_shape["num_hidden_layers"],
                          base_shape["num_key_value_heads"], base_shape["intermediate_size"])
    out = {}
    for name in TARGETS:
        hidden, layers, kv, inter = TARGETS[name]
        scratch = _target_scratch(rep, name)
        evals = {}
        for arm in ARMS:
            ref = [f"dro.reference_loss=model:{scratch}"] if arm == "sheared" else []
            if name == "25%":  # the ablation's own target: its runs
                run, model = rep.work / arm, _ablation_arm(rep, arm, args, ref)
            else:
                run = rep.work / f"ratio{name.rstrip('%')}_{arm}"
                model = _arm(rep, run, arm, args, [*ref, *_target(name)])
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


FACTORS = (1, 4, 16)  # Q2: continue-stage lengths, in multiples of the ablation's
PLATEAU = 0.01  # nats: a curve has stopped improving once its worst domain stays this close to its best


def study_convergence(rep: Replicate, args) -> dict:
    """From the seed's drpruning-pruned model (the ablation's), continue 1×, 4× and 16× the
    ablation's continue stage with constant and drpruning; 1× drpruning is the ablation's own run."""
    from megadrp.engine.metrics import read_metrics

    _ablation_arm(rep, "drpruning", args)
    prune = RunDir(rep.work / "drpruning" / "prune")
    train_tokens = {d: v["train_tokens"] for d, v in json.loads((rep.data / "manifest.json").read_text())["domains"].items()}
    out = {}
    for factor in FACTORS:
        for arm in ("constant", "drpruning"):
            if factor == 1 and arm == "drpruning":
                run = rep.work / "drpruning" / "continue"
            else:
                run = rep.work / f"converge{factor}_{arm}"
                longer = [f"train.warmup_steps={20 * factor}", f"save.interval={args.continue_steps * 4}"]
                rep.stage("configs/tiny/continue.yaml", run, [
                    f"dro.mode={arm}", f"eval.interval={args.eval_interval * factor}", f"model.init={prune.hf}",
                    f"train.steps={args.continue_steps * factor}", *(longer if factor > 1 else [])])
            rows = [r for r in read_metrics(RunDir(run).metrics) if r.get("eval_loss")]
            curve = [(r["step"], max(r["eval_loss"].values())) for r in rows]
            best = min(v for _, v in curve)
            plateau = next(st for i, (st, _) in enumerate(curve) if all(v <= best + PLATEAU for _, v in curve[i:]))
            out[f"{factor}x_{arm}"] = {
                "test": rep.test_eval(RunDir(run).hf, run / "test_eval.json", first_weights(prune.metrics)),
                "trajectory": curve, "plateau_step": plateau, "steps": args.continue_steps * factor,
                "passes": {d: rows[-1]["tokens"][d] / train_tokens[d] for d in rows[-1]["tokens"]}}
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
    # references for every domain, the new ones included: what the source's size reaches having seen
    # them (the ablation's base, trained on all six); `auto` would measure post_base, which never saw
    # the new domains, so their references would be high and drpruning would starve them
    refs = rep.base / "hf"
    out = {"post_base": str(base), "references": str(refs)}
    for arm in ("constant", "drpruning"):
        run = rep.work / f"post_{arm}"
        rep.stage("configs/tiny/continue.yaml", run, ["domains=null", "dro.initial_proportion=uniform",
                                                     f"dro.mode={arm}", f"model.init={pruned}",
                                                     f"dro.reference_loss=model:{refs}",
                                                     f"train.steps={args.continue_steps}",
                                                     f"eval.interval={args.eval_interval}"])
        out[arm] = rep.test_eval(RunDir(run).hf, run / "test_eval.json")
    return out


def _random_base(rep: Replicate, family: str) -> Path:
    """A random-init model of the tiny base's shape in `family`'s own transformers class, saved
    with save_pretrained (then pretrained by a continue stage on p0, as the Llama base is)."""
    import transformers

    out = rep.work / f"arch_{family}_init"
    if (out / "tokenizer.json").is_file():  # written last: a folder without it is a half-made one
        return out
    shape = yaml.safe_load((ROOT / "configs/tiny/pretrain.yaml").read_text())["model"]["shape"]
    vocab = json.loads((rep.data / "manifest.json").read_text())["vocab_size"]
    kw = dict(vocab_size=vocab, hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
              num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
              num_key_value_heads=shape["num_key_value_heads"], max_position_embeddings=512, bos_token_id=1,
              eos_token_id=2)
    config = {"llama": lambda: transformers.LlamaConfig(**kw),
              "mistral": lambda: transformers.MistralConfig(**kw, sliding_window=512),
              "qwen2": lambda: transformers.Qwen2Config(**kw, tie_word_embeddings=True)}[family]()
    torch.manual_seed(1234 + rep.seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in sorted((rep.data / "tokenizer").iterdir(), key=lambda f: f.name == "tokenizer.json"):
        shutil.copy(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def study_architecture(rep: Replicate, args) -> dict:
    from ablation import prediction_errors

    out = {}
    for family in ARCHS:  # every base made the same way, Llama's too: random init, then the same pretraining
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
                         "worst [95%] | ratio to the source [95%] | stops improving (step: constant, drpruning) | "
                         "passes over the smallest domain's training tokens |", "|---|---|---|---|---|---|---|"]
        for f in FACTORS:
            runs = {a: [s[f"{f}x_{a}"] for s in per_seed] for a in ("constant", "drpruning")}
            c, d = ([r["test"] for r in runs[a]] for a in ("constant", "drpruning"))
            w = paired([_pct(a["worst_ppl"], b["worst_ppl"]) for a, b in zip(d, c)])
            r = paired([_pct(worst_ratio(a, s)[0], worst_ratio(b, s)[0]) for a, b, s in zip(d, c, sources)])
            plateau = {a: [x["plateau_step"] for x in runs[a]] for a in runs}
            passes = max(max(x["passes"].values()) for a in runs for x in runs[a])
            table[f"{f}x"] = {"steps": runs["constant"][0]["steps"], "worst_vs_constant_pct": w,
                              "ratio_vs_constant_pct": r, "plateau_step": plateau, "most_passes": passes}
            md.append(f"| {f}× ({runs['constant'][0]['steps']} steps) | {np.mean([x['worst_ppl'] for x in c]):.2f} | "
                      f"{np.mean([x['worst_ppl'] for x in d]):.2f} | {interval(w)} | {interval(r)} | "
                      f"{', '.join(map(str, plateau['constant']))}; {', '.join(map(str, plateau['drpruning']))} | "
                      f"{passes:.1f} |")
        md += ["", f"A curve stops improving at the first evaluation (eval split, the run's own) from which its worst "
               f"domain's loss stays within {PLATEAU} nats of its best; the passes column is the most any domain's "
               "training tokens were seen (beyond about one pass, the longer runs also measure memorisation)."]
        return table, "\n".join(md)
    if study in ("scratch", "posttrain"):
        keys = ("worst_ppl", "mean_ppl")
        c, d = [s["constant"] for s in per_seed], [s["drpruning"] for s in per_seed]
        table = {k: paired([_pct(a[k], b[k]) for a, b in zip(d, c)]) for k in keys}
        # every domain: a lower worst domain is bought with the others' tokens, and what that
        # costs each of them is part of the answer
        for n in c[0]["domain_ppl"]:
            table[f"{n}_ppl"] = paired([_pct(a["domain_ppl"][n], b["domain_ppl"][n]) for a, b in zip(d, c)])
        md = ["| measure | constant | drpruning | drpruning − constant [95%] |", "|---|---|---|---|"]
        for k, p in table.items():
            get = (lambda e, k=k: e[k]) if k in keys else (lambda e, k=k: e["domain_ppl"][k[:-4]])
            md.append(f"| {k} | {np.mean([get(x) for x in c]):.2f} | {np.mean([get(x) for x in d]):.2f} | {interval(p)} |")
        return table, "\n".join(md)
    cols = [f"{st} {f}" for st in ("prune", "continue") for f in ("25%", "50%", "75%")]
    table, md = {}, ["| architecture | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for arch in ARCHS:
        row = {}
        for c in cols:
            st, f = c.split()
            got = [s[arch][st][f] for s in per_seed if f in s[arch][st]]
            if got:
                row[c] = {"law": float(np.mean([g["law"] for g in got])), "naive": float(np.mean([g["naive"] for g in got])),
                          "law_minus_naive": paired([g["law"] - g["naive"] for g in got])}
        table[arch] = row
        md.append(f"| {arch} | " + " | ".join(
            f"law {row[c]['law']:.2f}%, naive {row[c]['naive']:.2f}%: {interval(row[c]['law_minus_naive'])}" if c in row
            else "" for c in cols) + " |")
    md += ["", "Mean absolute % error of the end-of-stage eval loss predicted at 25/50/75% of a stage by the fitted "
           "law and by the naive predictor (the last loss observed then), mean over seeds and domains; paired "
           "law − naive in percentage points. An empty cell: no law fitted yet there (more than 10 evaluations, "
           "SPEC §3.1). The Mistral base's window is no shorter than the sequence and it has no biases, so it "
           "computes what a Llama computes: it differs from the Llama base only in its random draw."]
    return table, "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", choices=list(STUDIES))
    replicate_args(ap, "open_questions_<study>")
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error("--seeds must be at least 1 (the issue's studies use 3)")
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
          "prune_steps": args.prune_steps, "continue_steps": args.continue_steps, "eval_interval": args.eval_interval,
          "base_models": bases, "results": table, "per_seed": per_seed, "source_ppl": sources,
          "seconds": round(time.time() - t0)}, md)


if __name__ == "__main__":
    main()
