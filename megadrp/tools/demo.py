"""The main job on the embedded default, one command: `make demo` (= `megadrp demo`).

embedded corpus → tokenizer → shards → pretrain a small base model → prune it with
DRPruning to about half its size → continue pretraining → per-domain evaluation of base,
pruned and continued models → runs/demo/report.md with tables and plots.

Every training stage runs as 2 ranks of DeepSpeed ZeRO-3 on CPU. Finished stages are
reused on a rerun when they were made from the same corpus, scale, mode, ranks and config (a
stamp beside each: tools/stamps.py); a stage made from anything else is rebuilt, with every
stage after it, and a line says so. `--data DIR` runs the same pipeline on your own domains
(DIR/<domain>.jsonl, one {"text": ...} per line).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from megadrp.runtime.files import read_json
from megadrp.runtime.run_dir import RunDir
from megadrp.tools import pipeline
from megadrp.tools.pipeline import log


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/demo"), help="where everything goes (default runs/demo)")
    ap.add_argument("--data", type=Path, default=None, help="directory of <domain>.jsonl files (default: embedded corpus)")
    ap.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks per training stage (default 2)")
    ap.add_argument("--mode", default="drpruning", choices=("constant", "sheared", "dro", "dro_dyloss", "drpruning"),
                    help="dro.mode for prune and continue (default drpruning)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (e.g. 0.2 for a quick look)")
    ap.add_argument("--verbose", action="store_true", help="also show the DeepSpeed launcher's INFO lines")
    args = ap.parse_args(argv)
    if args.verbose:
        pipeline.VERBOSE = True
    if not (math.isfinite(args.scale) and args.scale > 0):
        ap.error(f"--scale={args.scale}: a positive number (0.2 for a quick look, 1 the full demo)")
    if args.ranks < 1:
        ap.error(f"--ranks={args.ranks}: at least 1")
    if args.data is not None and not args.data.is_dir():
        ap.error(f"--data {args.data}: not a directory of <domain>.jsonl files")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    t0 = time.time()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = pipeline.prepare_data(out, args.data.resolve() if args.data else None)
    common = [f"data_dir={data}"]
    if args.data:  # the user's domains: no names in the config, mix ∝ tokens^0.3 (SPEC §1)
        common += ["domains=null", "dro.initial_proportion=tokens^0.3"]
    steps = {"pretrain": 250, "prune": 150, "continue": 150}
    warmup = {"pretrain": 30, "prune": 10, "continue": 20}  # the tiny recipes' own
    if args.scale != 1.0:  # the warmup keeps its share of the stage
        steps = {k: max(10, int(v * args.scale)) for k, v in steps.items()}
        warmup = {k: min(warmup[k], max(1, int(warmup[k] * args.scale))) for k in warmup}
    timings = {}
    for stage, after in (("pretrain", []), ("prune", [f"model.init={out / 'pretrain' / 'hf'}", f"dro.mode={args.mode}"]),
                         ("continue", [f"model.init={out / 'prune' / 'hf'}", f"dro.mode={args.mode}"])):
        timings[stage] = pipeline.train_stage(
            f"configs/tiny/{stage}.yaml", out / stage,
            common + after + [f"train.steps={steps[stage]}", f"train.warmup_steps={warmup[stage]}"], args.ranks)
    log("evaluating base, pruned and continued models with transformers")
    evals = {label: pipeline.evaluate(RunDir(out / stage).hf, data, 4096, 128, RunDir(out / stage).eval_json)
             for label, stage in (("base", "pretrain"), ("pruned", "prune"), ("continued", "continue"))}
    from megadrp.tools import report

    params = {s: read_json(RunDir(out / s).hf / "megadrp.json")["parameters"]
              for s in ("pretrain", "prune", "continue")}
    extra = (f"Base {params['pretrain']:,} parameters → pruned {params['prune']:,} "
             f"({params['prune'] / params['pretrain']:.0%}) with `{args.mode}`; "
             f"stage times (s): {', '.join(f'{k} {v:.0f}' for k, v in timings.items())}; "
             f"total {time.time() - t0:.0f} s.")
    path = report.write_report(out, {"prune": out / "prune", "continue": out / "continue"}, evals, extra)
    print("", file=sys.stderr)
    for label, ev in evals.items():
        print(f"{label:>10}: mean ppl {ev['mean_ppl']:.2f}, worst ppl {ev['worst_ppl']:.2f}", file=sys.stderr)
    print(f"\nreport: {path}", file=sys.stderr)
    print(f"model:  {out / 'continue' / 'hf'}", file=sys.stderr)
    print("load it: python -c \"from transformers import AutoModelForCausalLM, AutoTokenizer; "
          f"m = AutoModelForCausalLM.from_pretrained('{out / 'continue' / 'hf'}'); "
          f"t = AutoTokenizer.from_pretrained('{out / 'continue' / 'hf'}')\"", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
