"""Coarse or fine domains: does DRO do better weighing 12 fine domains or 4 groups of them?

The corpus: the embedded generators, each drawn twice with different seeds
(`megadrp synth-corpus --variants 2`: `prose_v1`, `prose_v2`, … — the same grammar with another
lexicon, identifiers and parameters), 12 fine domains in one DATA_DIR. From one base model
trained on all 12, prune then continue with drpruning:

- `fine`: the controller weighs the 12 domains;
- `coarse`: `domain_groups` makes 4 groups of them — text (prose, lang2), structured (code,
  records), math, dna — and the controller weighs the groups; each group's batch is split among
  its members as p0 splits it, so both start from the same per-domain mix (p0 ∝ tokens^0.3 of the
  fine domains) and differ only in what the controller sees;
- `constant` (with `--modes`): p0 throughout, the floor.

Both are scored on the 12 fine domains: the worst fine domain's perplexity and the mean.

`--corpus debian`: real text instead, `megadrp debian-corpus --fine` (15 domains split from the
seven kinds by package, man section, licence format or install place; those with fewer than
100 documents on the machine are left out, 12 must remain) in four groups, FINE_GROUPS: notes
(changelogs, package descriptions), legal (copyright), docs (man pages), code (Perl, Python,
shell).

    python benchmarks/granularity.py [--seeds 3] [--prune-steps 100] [--continue-steps 100] [--eval-interval 5]
    python benchmarks/granularity.py --corpus debian --prune-steps 60 --continue-steps 60 --eval-interval 4 \\
        --name granularity_debian
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _common import ROOT, commit, interval, paired, save, stage_seconds, worst_ratio

from megadrp.runtime.run_dir import RunDir

GROUPS = {"text": ("prose", "lang2"), "structured": ("code", "records"), "math": ("math",), "dna": ("dna",)}
MODES = ("constant", "fine", "coarse")
MIN_FINE = 12


def fine_groups(corpus: str, names: list[str]) -> dict[str, list[str]]:
    """{group: its fine domains present in the data}: the embedded generators' variants, or the
    Debian FINE_GROUPS less the domains this machine had too few documents for."""
    if corpus == "embedded":
        from megadrp.tools.synth_corpus import variant_names

        fams = variant_names(2)
        return {g: [d for fam in members for d in fams[fam]] for g, members in GROUPS.items()}
    from megadrp.tools.debian_corpus import FINE_GROUPS

    groups = {g: [d for d in members if d in names] for g, members in FINE_GROUPS.items()}
    return {g: m for g, m in groups.items() if m}


def _p0(data: Path) -> tuple[list[str], list[float]]:
    """The fine domains of `data` and their p0, tokens^0.3 (the study's fine and coarse start)."""
    from megadrp.data.manifest import load_manifest
    from megadrp.plan import initial_proportion

    manifest = load_manifest(data)
    names = list(manifest.domains)
    return names, list(initial_proportion("tokens^0.3", manifest.select(names), names))


def coarse_overrides(data: Path, members: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """(fine p0 override, coarse groups + p0 overrides) that give both the same per-domain mix
    at step 0: each group's share is the sum of its members' fine p0, split among them as p0 is."""
    p0 = dict(zip(*_p0(data)))
    groups = {g: {d: p0[d] for d in ds} for g, ds in members.items()}
    fine = ["domains=null", "dro.initial_proportion=tokens^0.3"]
    coarse = ["domains=null", f"domain_groups={json.dumps(groups)}",
              f"dro.initial_proportion={json.dumps({g: sum(m.values()) for g, m in groups.items()})}"]
    return fine, coarse


def allocation(run: Path, members: dict[str, list[str]]) -> dict:
    """Where one run's controller put the tokens, from its metrics: each group's share of the
    tokens trained (prune + continue), and the mean excess (eval loss − reference loss) over the
    evaluations of each stage, per coordinate the controller weighed (fine domain or group) — the
    signal the χ² ball moves weight by, which is not perplexity."""
    from megadrp.engine.metrics import read_metrics

    tokens = {g: 0.0 for g in members}
    excess: dict[str, dict[str, float]] = {}
    for stage in ("prune", "continue"):
        rows = read_metrics(RunDir(run / stage).metrics)
        last = rows[-1]["tokens"]
        for g, ms in members.items():
            tokens[g] += sum(last[m] for m in ms)
        scored = [r for r in rows if r["step"] > 0 and r.get("reference_loss")]
        loss = "group_eval_loss" if "group_eval_loss" in rows[0] else "eval_loss"
        excess[stage] = {k: float(np.mean([r[loss][k] - r["reference_loss"][k] for r in scored]))
                         for k in (scored[0]["reference_loss"] if scored else {})}
    total = sum(tokens.values())
    return {"token_share": {g: t / total for g, t in tokens.items()}, "excess": excess}


def main() -> None:
    from megadrp.tools import pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--prune-steps", type=int, default=100)
    ap.add_argument("--continue-steps", type=int, default=100)
    ap.add_argument("--eval-interval", type=int, default=5)
    ap.add_argument("--docs-per-domain", type=int, default=1000)
    ap.add_argument("--modes", default="fine,coarse", help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--corpus", choices=("embedded", "debian"), default="embedded")
    ap.add_argument("--root", type=Path, default=None, help="default runs/granularity, or runs/granularity_debian")
    ap.add_argument("--name", default="granularity")
    args = ap.parse_args()
    args.root = args.root or ROOT / "runs" / ("granularity" if args.corpus == "embedded" else "granularity_debian")
    modes = [m for m in MODES if m in args.modes.split(",")]
    if "fine" not in modes or "coarse" not in modes:
        ap.error("--modes must hold fine and coarse (the comparison)")
    t0, commit_id = time.time(), commit()
    root = args.root.resolve()
    corpus = root / "corpus"
    if not (corpus / "sources.json" if args.corpus == "debian" else corpus / "dna_v2.jsonl").is_file():
        make = (("synth-corpus", "--variants", "2", "--docs-per-domain", str(args.docs_per_domain))
                if args.corpus == "embedded" else ("debian-corpus", "--fine", "--max-docs-per-domain", "300"))
        pipeline.sh(pipeline.megadrp(make[0], "--out", str(corpus), *make[1:]))
    if args.corpus == "debian" and not json.loads((corpus / "sources.json").read_text()).get("fine"):
        raise SystemExit(f"granularity: {corpus / 'sources.json'} is not a --fine build (the seven coarse kinds): "
                         f"remove {corpus} and run again, or pass another --root")
    members = fine_groups(args.corpus, sorted(f.name.split(".")[0] for f in corpus.glob("*.jsonl")))
    n_fine = sum(map(len, members.values()))
    if n_fine < MIN_FINE or len(members) < 2:
        raise SystemExit(f"granularity: {corpus} has {n_fine} fine domains in {len(members)} groups; the study needs "
                         f"at least {MIN_FINE} in 2 or more (see {corpus / 'sources.json'} for what was left out)")
    data = pipeline.prepare_data(root / "base", corpus, reuse="adopt")
    base = root / "base" / "pretrain"
    fine, coarse = coarse_overrides(data, members)
    pipeline.train_stage("configs/tiny/pretrain.yaml", base, [f"data_dir={data}", *fine], reuse="adopt")
    over = {"constant": ["dro.mode=constant", *fine], "fine": ["dro.mode=drpruning", *fine],
            "coarse": ["dro.mode=drpruning", *coarse]}
    evals: dict[str, list[dict]] = {m: [] for m in modes}
    for seed in range(args.seeds):
        for mode in modes:
            run = root / f"seed{seed}" / mode
            common = [f"data_dir={data}", f"seed={1234 + seed}", "train.log_interval=1000",
                      f"eval.interval={args.eval_interval}", *over[mode]]
            pipeline.train_stage("configs/tiny/prune.yaml", run / "prune",
                                 common + [f"model.init={base / 'hf'}", f"train.steps={args.prune_steps}"], quiet=True,
                                 reuse="adopt")
            pipeline.train_stage("configs/tiny/continue.yaml", run / "continue",
                                 common + [f"model.init={run / 'prune' / 'hf'}", f"train.steps={args.continue_steps}"],
                                 quiet=True, reuse="adopt")
            evals[mode].append(pipeline.evaluate(RunDir(run / "continue").hf, data, 4096, 128, RunDir(run).eval_json))
            pipeline.log(f"{mode} seed {seed}: mean ppl {evals[mode][-1]['mean_ppl']:.3f} "
                         f"worst {evals[mode][-1]['worst_ppl']:.3f} ({evals[mode][-1]['shift']['worst_domain']['domain']})")
    names = list(evals["fine"][0]["domain_ppl"])
    source_ppl = pipeline.evaluate(base / "hf", data, 4096, 128, root / "base_eval.json")["domain_ppl"]
    ratio = lambda x: worst_ratio(x, source_ppl)[0]  # noqa: E731
    alloc = {m: [allocation(root / f"seed{seed}" / m, members) for seed in range(args.seeds)] for m in modes}
    p0_fine = dict(zip(*_p0(data)))
    p0_share = {g: sum(p0_fine[d] for d in ms) for g, ms in members.items()}
    pct = lambda a, b: 100.0 * (a / b - 1.0)  # noqa: E731
    table = {}
    for mode in modes:
        e = evals[mode]
        table[mode] = {
            "domain_ppl": {n: float(np.mean([x["domain_ppl"][n] for x in e])) for n in names},
            "mean_ppl": float(np.mean([x["mean_ppl"] for x in e])), "mean_ppl_sd": float(np.std([x["mean_ppl"] for x in e])),
            "worst_ppl": float(np.mean([x["worst_ppl"] for x in e])),
            "worst_ppl_sd": float(np.std([x["worst_ppl"] for x in e])),
            "worst_domains": [x["shift"]["worst_domain"]["domain"] for x in e],
            "worst_chi2_ppl": float(np.mean([x["shift"]["worst_chi2"]["ppl"] for x in e])),
            "mean_vs_fine_pct": paired([pct(a["mean_ppl"], b["mean_ppl"]) for a, b in zip(e, evals["fine"])]),
            "worst_vs_fine_pct": paired([pct(a["worst_ppl"], b["worst_ppl"]) for a, b in zip(e, evals["fine"])]),
            "worst_ratio_to_source": float(np.mean([ratio(x) for x in e])),
            "worst_ratio_domains": [worst_ratio(x, source_ppl)[1] for x in e],
            "worst_ratio_vs_fine_pct": paired([pct(ratio(a), ratio(b)) for a, b in zip(e, evals["fine"])]),
            "token_share": {g: float(np.mean([a["token_share"][g] for a in alloc[mode]])) for g in members},
            "excess": {st: {k: float(np.mean([a["excess"][st][k] for a in alloc[mode]])) for k in alloc[mode][0]["excess"][st]}
                       for st in ("prune", "continue")},
        }
    md = ["| schedule | " + " | ".join(names) + " | mean ppl | worst fine-domain ppl | worst χ² mix | mean vs fine | "
          "worst vs fine | largest ratio to the source | ratio vs fine |", "|---" * (len(names) + 8) + "|"]
    for mode, r in table.items():
        md.append(f"| {mode} | " + " | ".join(f"{r['domain_ppl'][n]:.2f}" for n in names)
                  + f" | {r['mean_ppl']:.3f} ± {r['mean_ppl_sd']:.3f} | {r['worst_ppl']:.3f} ± {r['worst_ppl_sd']:.3f}"
                  f" | {r['worst_chi2_ppl']:.3f} | {interval(r['mean_vs_fine_pct'])} | {interval(r['worst_vs_fine_pct'])}"
                  f" | {r['worst_ratio_to_source']:.3f} ({', '.join(sorted(set(r['worst_ratio_domains'])))})"
                  f" | {interval(r['worst_ratio_vs_fine_pct'])} |")
    where = ["", "Where the tokens went (share of the tokens trained, prune + continue, mean over seeds), and the "
             "excess loss over the reference that moved them (mean over the prune stage's evaluations, per "
             "coordinate the controller weighs):", "",
             "| schedule | " + " | ".join(members) + " | prune-stage excess, loss − reference |",
             "|---" * (len(members) + 2) + "|",
             "| p0 | " + " | ".join(f"{p0_share[g]:.1%}" for g in members) + " | |"]
    for mode, r in table.items():
        where.append(f"| {mode} | " + " | ".join(f"{r['token_share'][g]:.1%}" for g in members) + " | "
                     + ", ".join(f"{k} {v:.2f}" for k, v in r["excess"]["prune"].items()) + " |")
    seconds = sum(stage_seconds(RunDir(root / f"seed{seed}" / mode / stage).metrics)
                  for seed in range(args.seeds) for mode in modes for stage in ("prune", "continue"))
    source = "`synth-corpus --variants 2`" if args.corpus == "embedded" else "`debian-corpus --fine`"
    md += ["", f"{args.seeds} seed(s); the paired columns: per seed, 100·(mode / fine − 1) with a 95% Student-t interval "
           f"over seeds and the per-seed values. The largest ratio to the source: the fine domain whose perplexity "
           f"is furthest above the base model's (the source both prune from; its `auto` references are what "
           f"drpruning aims to stay near). {n_fine} fine domains ({source}); coarse groups: "
           + "; ".join(f"{g} = {' + '.join(ms)}" for g, ms in members.items())
           + f". Prune {args.prune_steps} + continue {args.continue_steps} steps, 16 × 128 tokens a step, evaluation "
           f"every {args.eval_interval}, 2 ranks ZeRO-3 on CPU; {seconds:.0f} s of training and evaluation "
           f"(summed from the runs' metrics, base model aside); commit {commit_id}."]
    save(args.name, {"seeds": args.seeds, "commit": commit_id, "corpus": args.corpus, "groups": members,
                     "p0_group_share": p0_share, "source_ppl": source_ppl,
                     "prune_steps": args.prune_steps, "continue_steps": args.continue_steps,
                     "eval_interval": args.eval_interval, "results": table, "per_seed": evals,
                     "stage_seconds": round(seconds), "seconds": round(time.time() - t0)}, "\n".join(md + where))


if __name__ == "__main__":
    main()
