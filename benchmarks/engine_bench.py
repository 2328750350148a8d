"""Tiny prune steps with 1 and 2 ranks (DeepSpeed ZeRO-3 on CPU): tokens/s, the time share
of evaluation, and the cost of the mask machinery (the same run with the masks off, i.e. a
continue stage on the same model) — side by side in one run.

    python benchmarks/engine_bench.py [--rounds 3] [--steps 40]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from _common import paired_median, rotated, save

from megadrp.runtime.run_dir import RunDir

MASKS_OFF = "same model, masks off (continue stage), 1 rank"


def _stats(run_dir: Path) -> dict:
    from megadrp.engine.metrics import read_metrics

    rows = read_metrics(RunDir(run_dir).metrics)
    train = sum(r.get("train_seconds", 0) for r in rows)
    ev = sum(r["eval_seconds"] for r in rows)
    tokens = sum(rows[-1]["tokens"].values())
    return {"train_tokens_per_s": round(tokens / train, 1), "train_seconds": round(train, 2),
            "eval_seconds": round(ev, 2), "eval_share": round(ev / (ev + train), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of one run per variant, in rotated order")
    ap.add_argument("--steps", type=int, default=40, help="training steps per run")
    args = ap.parse_args()
    from megadrp.tools import pipeline

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = pipeline.prepare_data(tmp, docs_per_domain=800, eval_docs=20)
        base = ["data_dir=" + str(data), "train.log_interval=1000", "save.interval=0"]
        pipeline.train_stage("configs/tiny/pretrain.yaml", tmp / "base", base + ["train.steps=10"], ranks=1, quiet=True)
        init = f"model.init={tmp / 'base' / 'hf'}"
        steps = f"train.steps={args.steps}"
        variants = {"prune, 1 rank": ("configs/tiny/prune.yaml", 1), "prune, 2 ranks": ("configs/tiny/prune.yaml", 2),
                    MASKS_OFF: ("configs/tiny/continue.yaml", 1)}
        names = list(variants)
        runs: dict[str, list[dict]] = {k: [] for k in names}
        for r in range(args.rounds):  # rotated, so drift in the machine's speed hits each variant alike
            for k in rotated(names, r):
                config, ranks = variants[k]
                out = tmp / f"{names.index(k)}_{r}"
                pipeline.train_stage(config, out, base + [init, steps], ranks=ranks, quiet=True)
                runs[k].append(_stats(out))
    res = {k: {f: statistics.median(x[f] for x in v) for f in v[0]} for k, v in runs.items()}
    def tps(name: str) -> list[float]:
        return [x["train_tokens_per_s"] for x in runs[name]]

    mask_cost = 1 - paired_median(tps("prune, 1 rank"), tps(MASKS_OFF))
    scaling = paired_median(tps("prune, 2 ranks"), tps("prune, 1 rank"))
    md = [f"| run (median of {args.rounds}) | train tokens/s | train s | eval s | eval share |", "|---|---|---|---|---|"]
    md += [f"| {k} | {v['train_tokens_per_s']:,.1f} | {v['train_seconds']:.2f} | {v['eval_seconds']:.2f} | "
           f"{v['eval_share']:.1%} |" for k, v in res.items()]
    md += ["", f"Mask machinery (sampling, folded gates, Lagrangian, λ and mask optimizer groups, log-α clamp): "
               f"{mask_cost:.1%} of training throughput at 1 rank; 2 ranks / 1 rank: {scaling:.2f}× "
               "(both the median over rounds of same-round ratios).",
           f"{args.steps} steps × 16 × 128 tokens of the 5M-parameter tiny model, evaluation every 10 steps "
           f"(6 domains × 4096 tokens); {args.rounds} rounds, one run of each variant per round in rotated order."]
    save("engine", {"results": res, "runs": runs, "mask_machinery_share": round(mask_cost, 3),
                    "two_rank_scaling": round(scaling, 3)}, "\n".join(md))


if __name__ == "__main__":
    main()
