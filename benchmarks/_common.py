"""Shared by the benchmarks: results as JSON + Markdown, with the command that made them."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

from megadrp.runtime.files import atomic_write_text  # noqa: E402


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def save(name: str, data: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"command": " ".join(["python", *sys.argv]), "machine": machine(), **data}
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(data, indent=2) + "\n")
    md = f"# {name}\n\nCommand: `{data['command']}`  \nMachine: {data['machine']}\n\n{markdown}\n"
    atomic_write_text(RESULTS / f"{name}.md", md)
    print(md)


def rotated(names: list[str], round_index: int) -> list[str]:
    """The variants in the order of one round: rotated by the round's index, so that over
    the rounds each variant runs first, second, ... equally often."""
    k = round_index % len(names)
    return names[k:] + names[:k]


def paired_median(xs: list[float], ys: list[float]) -> float:
    """Median over rounds of x/y within the same round. The machine's speed drifts over
    seconds: a same-round ratio cancels the drift, and the median ignores the rounds a spike hit."""
    import statistics

    return statistics.median(x / y for x, y in zip(xs, ys))


def best_of(fn, repeats: int = 5) -> float:
    """Minimum wall time of `repeats` calls: the least noisy estimate on a shared machine."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def paired(values: list[float]) -> dict:
    """Mean of per-seed differences with a 95% Student-t interval (none for one seed)."""
    import numpy as np
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "ci95": [float(v.mean() - half), float(v.mean() + half)], "per_seed": v.tolist()}


def interval(p: dict) -> str:
    """'+1.23% [-0.50, +2.96] (per-seed values)' of a `paired` result."""
    import math

    seeds = ", ".join(f"{x:+.2f}" for x in p["per_seed"])
    if not math.isfinite(p["ci95"][0]):
        return f"{p['mean']:+.2f}%"
    return f"{p['mean']:+.2f}% [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}] ({seeds})"


def commit() -> str:
    import subprocess

    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=ROOT).stdout.strip()


def worst_ratio(e: dict, source_ppl: dict[str, float]) -> tuple[float, str]:
    """The largest ratio of a domain's perplexity (an eval JSON's `domain_ppl`) to the source
    model's, and its domain: what drpruning's references, the source's losses, aim to keep small."""
    return max((e["domain_ppl"][n] / source_ppl[n], n) for n in source_ppl)


def rows_seconds(rows: Iterable[dict]) -> float:
    """Training and evaluation seconds in a run's metrics rows, however many invocations of a
    benchmark trained it (a rerun reuses finished stages)."""
    return sum(r.get("train_seconds", 0.0) + r.get("eval_seconds", 0.0) for r in rows)


def stage_seconds(metrics: Path) -> float:
    """`rows_seconds` of a run's metrics.jsonl."""
    with open(metrics) as f:
        return rows_seconds(map(json.loads, f))


def first_weights(metrics: Path) -> dict[str, float]:
    """The domain weights in force at a run's first evaluation (its metrics.jsonl): its p0. The
    prune stage's p0 is the one χ² ball every schedule of a comparison is scored under."""
    with open(metrics) as f:
        first = json.loads(f.readline())
    return first.get("domain_weights") or first["weights"]


# ---- one seed's replicate of the pipeline, shared by the studies that score on the test split ----
# documents held out per domain (eval, test): Debian's shell scripts are 117 files on Debian 12
HELD_OUT = {"embedded": (50, 100), "debian": (30, 40)}
TEST_TOKENS = 8192  # per domain: 64 windows of 128 (capped by the split; the eval JSON says how many)


class Replicate:
    """One seed's whole pipeline, as benchmarks/ablation.py builds it under ROOT/seed<N>: its own
    corpus draw (embedded; Debian text is the machine's, one folder for every seed), its own
    held-out draw (50 eval + 100 test documents a domain; Debian 30 + 40), its own base model.
    Studies that compare arms from the same base (signal, methods, open questions) build on the
    ablation's replicates: a finished stage is reused where its stamp matches, never rebuilt."""

    def __init__(self, root: Path, corpus: str, seed: int) -> None:
        from megadrp.tools import pipeline

        self.root, self.corpus, self.seed, self.work = root, corpus, seed, root / f"seed{seed}"
        held = HELD_OUT[corpus]
        self.data = pipeline.prepare_data(self.work, self._corpus_dir(), seed=seed, eval_docs=held[0],
                                          test_docs=held[1], reuse="adopt")
        mix = ["domains=null", "dro.initial_proportion=tokens^0.3"] if corpus != "embedded" else []
        self.common = [f"data_dir={self.data}", f"seed={1234 + seed}", "train.log_interval=1000", *mix]
        self.base = self.work / "base"
        pipeline.train_stage("configs/tiny/pretrain.yaml", self.base, self.common, quiet=True, reuse="adopt")

    def _corpus_dir(self) -> Path | None:
        if self.corpus == "embedded":
            return None
        from megadrp.tools import pipeline

        out = self.root / "corpus"
        if not (out / "sources.json").is_file():
            pipeline.sh(pipeline.megadrp("debian-corpus", "--out", str(out), "--max-docs-per-domain", "600"))
        return out

    def stage(self, config: str, run: Path, overrides: list[str]) -> Path:
        """A stage under this replicate (common overrides first); returns its export."""
        from megadrp.runtime.run_dir import RunDir
        from megadrp.tools import pipeline

        pipeline.train_stage(config, run, self.common + overrides, quiet=True, reuse="adopt")
        return RunDir(run).hf

    def prune_continue(self, run: Path, prune: list[str], cont: list[str], prune_steps: int,
                       continue_steps: int) -> Path:
        """From the base: configs/tiny/prune.yaml with `prune`, then configs/tiny/continue.yaml
        from its export with `cont`; returns the continued export."""
        pruned = self.stage("configs/tiny/prune.yaml", run / "prune",
                            prune + [f"model.init={self.base / 'hf'}", f"train.steps={prune_steps}"])
        return self.stage("configs/tiny/continue.yaml", run / "continue",
                          cont + [f"model.init={pruned}", f"train.steps={continue_steps}"])

    def test_eval(self, model: Path, out: Path, p0: dict[str, float] | None = None) -> dict:
        """`megadrp eval --split test --shift` of `model`, cached in `out`."""
        from megadrp.tools import pipeline

        return pipeline.evaluate(model, self.data, TEST_TOKENS, 128, out, p0=p0)

    def source(self, p0: dict[str, float] | None = None) -> dict:
        """The base model scored on the test split (what the worst ratio divides by)."""
        return self.test_eval(self.base / "hf", self.work / "base_test.json", p0)

    def base_record(self) -> dict:
        from megadrp.runtime.files import read_json

        hf = self.base / "hf"
        return {"seed": self.seed, "path": str(hf.relative_to(ROOT)) if hf.is_relative_to(ROOT) else str(hf),
                "pretrain_seed": 1234 + self.seed, "corpus_seed": self.seed if self.corpus == "embedded" else None,
                "holdout_seed": self.seed, "parameters": read_json(hf / "megadrp.json")["parameters"]}


def replicate_args(ap, results: str) -> None:
    """The flags of a study on the ablation's replicates (`Replicate`): its seeds, the stages'
    lengths and update interval (the ablation's by default), the corpus, the root, the results name."""
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--prune-steps", type=int, default=150)
    ap.add_argument("--continue-steps", type=int, default=150)
    ap.add_argument("--eval-interval", type=int, default=4, help="steps between updates (the ablation's)")
    ap.add_argument("--corpus", choices=("embedded", "debian"), default="embedded")
    ap.add_argument("--root", type=Path, default=None, help="default runs/ablation (runs/ablation_debian)")
    ap.add_argument("--name", default=None, help=f"results name (default {results}, {results}_debian)")


def replicate_root(args, results: str) -> tuple[Path, str]:
    """(the replicates' root, the results name) of `replicate_args`' flags."""
    suffix = "" if args.corpus == "embedded" else f"_{args.corpus}"
    return (args.root or ROOT / "runs" / f"ablation{suffix}").resolve(), args.name or f"{results}{suffix}"
